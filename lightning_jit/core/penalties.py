"""Zero-shot terms computed against the original model (:mod:`lightning_jit.core.reference`): the logit-norm penalty
and the redistribution of the forgotten classes' probability."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_jit.core.batch import ModelInput, OutputSelector, check_logits, select_output
from lightning_jit.core.batch import batch_size as count
from lightning_jit.core.noise import NoiseStream, PerturbationSpec
from lightning_jit.core.settings import Reduction
from lightning_jit.core.site import InputSite, PerturbationSite

#: Added to the seed of the logit-norm penalty's noise, so that its noisy copies never repeat the JiT perturbations.
_PENALTY_SEED_SALT = 0x5EED


def logit_norm_penalty(
    model: nn.Module | Callable[[Any], Any],
    reference: Callable[[Any], Any],
    x: ModelInput,
    sigma: float,
    *,
    clean_logits: Tensor | None = None,
    reference_logits: Tensor | None = None,
    reduction: Reduction = "mean",
    output_selector: OutputSelector = None,
    generator: torch.Generator | None = None,
    keys: Sequence[Any] | None = None,
    seed: int = 0,
    epoch: int = 0,
    perturbation: PerturbationSpec = "gaussian",
    site: PerturbationSite | None = None,
) -> Tensor:
    """How far the model's logits have grown beyond the original model's, around the forget samples.

    JiT's usual failure is a *sink* class: smoothing the forget samples inflates the logits of a neighbouring class,
    which then swallows retained samples too. This term penalises exactly that growth, one-sidedly, against
    ``reference`` (the original model, frozen), on each forget input and on one noisy copy of it:

    .. code-block:: text

        g(v)      = relu(||f(v)|| / max(||f0(v)||, 1) - 1) ** 2
        penalty_b = (g(x_b) + g(x_b + sigma * noise_b)) / 2
        penalty   = mean over samples (reduction="mean") or sum (reduction="sum")

    Logits that shrink, or keep their norm while changing direction (which forgetting needs), cost nothing. Original
    logits of norm below 1 (nearly uniform predictions, e.g. an untrained model's) count as norm 1, so that growth out
    of them is not blown up into a diverging step. It uses
    no retained data: only the forget inputs and the original model. Gradients flow through ``model``'s passes.

    Args:
        model: The model being unlearned.
        reference: The original model's forward (no gradient needed), e.g. a
            :class:`~lightning_jit.core.reference.FrozenReference`.
        x: The forget inputs, ``(B, ...)`` (with a module ``site``, any input the model takes, as in
            :func:`~lightning_jit.core.objective.jit_objective`; ``model`` and ``reference`` take it as one argument).
        sigma: Std of the noisy copies, in input units (typically several times the JiT ``sigma``).
        clean_logits: ``model(x)`` if already computed with autograd.
        reference_logits: ``reference(x)`` if already computed (then only the noisy copies go through ``reference``).
        reduction: ``"mean"`` or ``"sum"`` over samples, as in :func:`jit_objective`.
        output_selector: How to find the logits in the model's output.
        generator: Optional generator for the noise.
        keys: Per-sample ids for keyed noise (see :func:`jit_objective`).
        seed: Seed combined with ``keys``.
        epoch: Epoch combined with ``keys``.
        perturbation: The noise distribution of the noisy copies.
        site: Where the noisy copies' noise goes (:mod:`lightning_jit.core.site`; ``None``: the input). ``sigma`` is
            in that space's units.

    Example:
        >>> net = torch.nn.Linear(4, 3)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.eye(3, 4)), net.bias.fill_(3.0)  # logits of norm > 1 near x = 0
        >>> frozen = torch.nn.Linear(4, 3)
        >>> _ = frozen.load_state_dict(net.state_dict())
        >>> x = 0.1 * torch.randn(8, 4)
        >>> logit_norm_penalty(net, frozen, x, sigma=0.1).item()  # same weights: no growth
        0.0
        >>> with torch.no_grad():
        ...     _ = net.weight.mul_(2.0), net.bias.mul_(2.0)  # doubled logits: growth 1 everywhere
        >>> round(logit_norm_penalty(net, frozen, x, sigma=0.1).item(), 5)
        1.0
    """
    batch_size = count(x)
    if clean_logits is None:
        clean_logits = select_output(model(x), output_selector)
    site = site if site is not None else InputSite(model if isinstance(model, nn.Module) else None)
    drawn: list[Tensor] = []

    def noise(like: Tensor) -> Tensor:
        """One noisy copy per sample, in the site's space; drawn once, so the model and the reference see the same."""
        if not drawn:
            stream = NoiseStream(
                like,
                sigma,
                generator=generator,
                keys=keys,
                seed=seed + _PENALTY_SEED_SALT,
                epoch=epoch,
                perturbation=perturbation,
            )
            drawn.append(stream.next())
        return drawn[0]

    with site.perturbing(x, noise) as noisy:
        noisy_logits = select_output(model(noisy.inputs), output_selector)
    out = torch.cat([check_logits(clean_logits, batch_size), check_logits(noisy_logits, batch_size)]).float()
    with torch.no_grad():
        if reference_logits is None:
            with site.perturbing(x, noise, clean_first=True) as both:
                ref = select_output(reference(both.inputs), output_selector)
        else:
            with site.perturbing(x, noise) as noisy:
                ref = torch.cat([reference_logits, select_output(reference(noisy.inputs), output_selector)])
        ref = check_logits(ref, 2 * batch_size).float()
    growth = out.norm(dim=1) / ref.norm(dim=1).clamp_min(1.0) - 1.0
    per_sample = growth.clamp_min(0.0).pow(2).view(2, batch_size).mean(dim=0)
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


def redistribution_loss(
    logits: Tensor,
    reference_logits: Tensor,
    forget_classes: Sequence[int],
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """Where the forgotten classes' probability should go: to the classes the original model ranked next.

    Smoothing alone flattens the model around a forget sample but leaves open which class takes its probability; on
    many models one neighbouring class takes it all and grows into a *sink* that swallows retained samples too. This
    term names the destination. The target is the original model's prediction on the forget input with the forget
    set's classes removed, so a forgotten "3" is pulled towards what the original thought it resembled next ("8" or
    "5"), each class in proportion to the original's belief:

    .. code-block:: text

        q_b     = softmax(f0(x_b) with the forget classes at -inf)
        term_b  = KL(q_b || softmax(f(x_b)))
        loss    = mean over samples (reduction="mean") or sum (reduction="sum")

    It uses no retained data: only the forget inputs and the original model. It is meant for class forgetting
    (the forget classes leave the model); gradients flow through ``logits`` only.

    Args:
        logits: The model's logits on the forget inputs, ``(B, C)``, with autograd.
        reference_logits: The original model's logits on the same inputs, ``(B, C)``.
        forget_classes: The classes the forget set holds (at most ``C - 1`` of them).
        reduction: ``"mean"`` or ``"sum"`` over samples, as in :func:`~lightning_jit.core.objective.jit_objective`.

    Example:
        >>> original = torch.tensor([[4.0, 2.0, 0.0]])  # a forgotten class 0 looked like class 1, then class 2
        >>> target = torch.softmax(torch.tensor([2.0, 0.0]), 0)  # class 1 : class 2 = e^2 : 1
        >>> model = torch.tensor([[0.0, 2.0, 0.0]], requires_grad=True)  # class 0 at e^0, the rest as the target
        >>> kl = redistribution_loss(model, original, [0])
        >>> expected = (target * (target.log() - torch.log_softmax(model, 1)[0, 1:])).sum()
        >>> torch.isclose(kl, expected).item(), round(expected.item(), 4)  # = -log(1 - p_model(class 0))
        (True, 0.1126)
    """
    if reference_logits.shape != logits.shape:
        raise ValueError(
            f"`reference_logits` has shape {tuple(reference_logits.shape)}, `logits` {tuple(logits.shape)}."
        )
    masked = reference_logits.detach().float().clone()
    masked[:, list(forget_classes)] = float("-inf")
    target = torch.log_softmax(masked, dim=1).clamp_min(-1e4)  # -inf -> a finite log, whose weight exp() is 0
    per_sample = (target.exp() * (target - torch.log_softmax(logits.float(), dim=1))).sum(dim=1)
    return per_sample.mean() if reduction == "mean" else per_sample.sum()
