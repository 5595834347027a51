"""The update of a sample request: move memorised forget samples to where unseen data lies, and nothing else.

A model that memorised some training samples is more sure of them than of data it never saw. Retrained without them,
it treats them like held-out data: most are still right, with held-out-like confidence, and about as many are wrong
as on held-out data. Every update rule measured that acts on the forget samples alone (JiT's smoothing, gradient
ascent, distillation to perturbed predictions, with or without a KL anchor) moves the whole model with them: test
accuracy falls as fast as forget accuracy (``docs/results/sample_requests.md``). What is selective is this:

* **targets**: each forget sample's *label margin* (its label's logit minus the largest other logit) is matched, by
  its rank among the forget set on the original weights, to the held-out margin at the same quantile
  (:class:`MarginTargets`), so the forget set's margins end up distributed like held-out data's, the errors included;
* **a one-sided pull**: a sample above its target is pulled down towards it, never below (:func:`matching_loss`);
* **a held-out projection**: the update is projected off the span of the per-sample gradients of held-out samples'
  margins (:class:`HeldoutProjection`), so that to first order the model's margins on held-out data, and on data
  like it, do not move.

The run stops at the end of the first pass after which the forget set passes the held-out test
(:mod:`lightning_jit.core.membership`) on the margins it measured during the pass, and the outcome is the held-out
test on the final weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_jit.core.errors import JiTSettingError
from lightning_jit.core.weights import is_sharded

#: Held-out samples whose margin gradients span the directions the update must not take.
MAX_BASIS = 256
#: The most floats the basis may hold (``directions x parameters``); a larger model gets fewer directions.
MAX_BASIS_FLOATS = 2**27
#: The normalised step of a sample request (a share of the weights' norm per step).
STEP = 3e-3
#: Most passes over the forget set of a sample request, unless ``epochs`` says otherwise.
MAX_PASSES = 20


def label_margin(logits: Tensor, labels: Tensor) -> Tensor:
    """Each row's logit of its label minus its largest other logit (negative: misclassified).

    Example:
        >>> label_margin(torch.tensor([[2.0, 0.5, 1.0], [0.0, 3.0, 1.0]]), torch.tensor([0, 2]))
        tensor([ 1., -2.])
    """
    labelled = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.masked_fill(nn.functional.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
    return labelled - others.max(1).values


class MarginTargets:
    """Where each forget sample's margin should go: the held-out margin at the quantile of its original margin among
    the forget set's original margins.

    Args:
        forget_margins: The forget samples' margins on the original weights.
        heldout_margins: The held-out samples' margins on the original weights.

    Example:
        >>> targets = MarginTargets(torch.tensor([10.0, 20.0]), torch.tensor([-1.0, 1.0, 2.0, 3.0]))
        >>> targets(torch.tensor([10.0, 20.0]))  # the lower forget margin gets the lower held-out quantile
        tensor([1., 3.])
    """

    def __init__(self, forget_margins: Tensor, heldout_margins: Tensor) -> None:
        self.forget = forget_margins.detach().float().sort().values
        self.heldout = heldout_margins.detach().float().sort().values

    def __call__(self, original_margins: Tensor) -> Tensor:
        forget, heldout = self.forget.to(original_margins.device), self.heldout.to(original_margins.device)
        rank = torch.searchsorted(forget, original_margins.detach().float().contiguous()).float() + 0.5
        index = (rank / len(forget) * len(heldout)).long().clamp(0, len(heldout) - 1)
        return heldout[index]


def matching_loss(margins: Tensor, targets: Tensor) -> Tensor:
    """The one-sided pull, summed over the samples: each margin above its target counts its excess.

    Example:
        >>> matching_loss(torch.tensor([5.0, 0.0]), torch.tensor([1.0, 1.0]))
        tensor(4.)
    """
    above = (margins.detach() > targets).to(margins.dtype)
    return (above * (margins - targets.to(margins.dtype))).sum()


class HeldoutProjection:
    """Removes from the gradients every component in the span of held-out samples' margin gradients.

    Args:
        basis: Orthonormal rows over the concatenated parameters (``directions x parameters``).
        params: The parameters, in the order of the basis's columns.

    Example:
        >>> w = nn.Parameter(torch.zeros(3))
        >>> projection = HeldoutProjection(torch.tensor([[1.0, 0.0, 0.0]]), [w])
        >>> w.grad = torch.tensor([2.0, 3.0, 4.0])
        >>> projection.project_()
        >>> w.grad
        tensor([0., 3., 4.])
    """

    def __init__(self, basis: Tensor, params: list[nn.Parameter]) -> None:
        self.basis = basis
        self.params = params

    @classmethod
    def build(
        cls,
        model: nn.Module,
        params: list[nn.Parameter],
        x: Tensor,
        labels: Tensor,
        logits_of: Callable[[Any], Tensor],
    ) -> HeldoutProjection:
        """The basis from the margin gradients of the held-out samples ``x`` (at most as many as
        :data:`MAX_BASIS_FLOATS` allows), in the model's current mode.

        Args:
            model: The model.
            params: The parameters the update moves (gradients of the others are ignored).
            x: Held-out inputs.
            labels: Their labels.
            logits_of: Reads the logits from the model's output.
        """
        if is_sharded(model):
            raise JiTSettingError(
                "task",
                "is a sample request (samples, not a class), which is not supported on a sharded model (fully_shard,"
                " ModelParallelStrategy): its held-out projection needs each sample's full gradient. Run it with"
                " `strategy='ddp'` or on one device.",
            )
        size = sum(p.numel() for p in params)
        n = max(1, min(len(x), MAX_BASIS_FLOATS // max(1, size)))
        x, labels = x[:n], labels[:n]
        rows = _margin_gradients(model, params, x, labels, logits_of)
        q, _ = torch.linalg.qr(rows.T.float())  # orthonormal columns spanning the rows
        return cls(q.T.contiguous(), params)

    def project_(self) -> None:
        """Project the parameters' gradients in place (parameters without a gradient count as zero)."""
        grads = [p.grad for p in self.params]
        if all(g is None for g in grads):
            return
        flat = torch.cat(
            [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, self.params, strict=True)]
        )
        basis = self.basis.to(device=flat.device)
        flat = flat - (basis.T @ (basis @ flat.float())).to(flat.dtype)
        offset = 0
        for p in self.params:
            n = p.numel()
            if p.grad is not None:
                p.grad.copy_(flat[offset : offset + n].view_as(p))
            offset += n


def _margin_gradients(
    model: nn.Module, params: list[nn.Parameter], x: Tensor, labels: Tensor, logits_of: Callable[[Any], Tensor]
) -> Tensor:
    """One row per sample: the gradient of its label margin over ``params`` (concatenated)."""
    names = {id(p): name for name, p in model.named_parameters()}
    moving = {names[id(p)]: p.detach() for p in params}
    fixed = {name: t.detach() for name, t in [*model.named_parameters(), *model.named_buffers()] if name not in moving}

    def margin(weights: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = torch.func.functional_call(model, {**fixed, **weights}, (xi[None],))
        return label_margin(logits_of(out), yi[None]).sum()

    try:
        grads = torch.func.vmap(torch.func.grad(margin), in_dims=(None, 0, 0), chunk_size=32)(moving, x, labels)
        return torch.cat([grads[names[id(p)]].reshape(len(x), -1) for p in params], 1)
    except RuntimeError:  # a model vmap cannot trace (in-place ops, data-dependent control flow): one sample at a time
        rows = []
        for xi, yi in zip(x, labels, strict=True):
            value = label_margin(logits_of(model(xi[None])), yi[None]).sum()
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params, allow_unused=False)]))
        return torch.stack(rows)


__all__ = [
    "MAX_BASIS",
    "MAX_PASSES",
    "STEP",
    "HeldoutProjection",
    "MarginTargets",
    "label_margin",
    "matching_loss",
]
