"""Class probes synthesised from the model alone: a zero-shot stand-in for retained data.

JiT never sees retained data, so nothing measures what an unlearning run costs the classes it should keep. Class
probes fill that gap without breaking the zero-shot promise: for each kept class, a few inputs are optimised, starting
from noise shaped like the forget inputs, until the *original* model classifies them as that class with confidence
(a light form of model inversion). After unlearning, the mean probability the model still gives each probe's class
(:func:`probe_confidence`) tracks the accuracy on real retained data. On the digits CNN, over 27 unlearning runs
(digits 3, 4 and 8, nine sigma/lr settings each; ``normalize_logits``, stopping at 15%, no logit-norm penalty), its
Spearman correlation with the retained-class test accuracy was 0.81 overall and 0.95-1.00 within each forgotten class;
the probes' plain accuracy saturates and did worse (0.78), and noise inputs did not track it at all (0.23). With the
logit-norm penalty on, it stays near 100% for easy classes (digit 1), so it separates settings less there.
:func:`~lightning_jit.tune.tune_jit` ranks its trials with it.

The same probes also *protect* the kept classes during unlearning: :class:`ProbeDistillation` holds the model's
predictions on them at the original's (``probe_distillation`` in :class:`~lightning_jit.module.JiTUnlearning`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_jit.objective import OutputSelector, select_output


@torch.no_grad()
def probe_confidence(model: nn.Module, probes: tuple[Tensor, Tensor], output_selector: OutputSelector = None) -> float:
    """The mean probability (percent) that ``model``, in eval mode, gives each probe of ``probes = (x, y)`` for its
    class ``y``. Unlike the probes' accuracy it does not saturate: it falls as soon as the kept classes are damaged."""
    x, y = probes
    was_training = model.training
    model.eval()
    try:
        logits = select_output(model(x), output_selector).float()
    finally:
        model.train(was_training)
    return float(torch.softmax(logits, dim=1).gather(1, y.to(logits.device)[:, None]).mean() * 100.0)


def synthesize_class_probes(
    model: nn.Module | Callable[[Tensor], Any],
    classes: Sequence[int],
    like: Tensor,
    per_class: int = 16,
    steps: int = 60,
    lr: float = 0.1,
    seed: int = 0,
    output_selector: OutputSelector = None,
    *,
    scale: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor]:
    """Synthesise ``per_class`` inputs for each class in ``classes`` that ``model`` classifies as that class.

    Each probe starts as Gaussian noise with the mean and std of ``like`` (e.g. a forget batch) and takes ``steps``
    Adam steps on the cross-entropy of its class, with a small pull back towards that mean. Only the probes move: the
    model's parameters and gradients are left untouched, and the model runs in eval mode.

    Args:
        model: The trained classifier (before unlearning), or a callable that evaluates it with gradients flowing to
            its input (e.g. :meth:`~lightning_jit.step.FrozenReference.differentiable`), which then sets its own mode.
        classes: The classes to probe, e.g. every class but the forgotten ones.
        like: Real inputs (e.g. the forget set) that give the probes' shape, dtype, device and scale.
        per_class: Probes per class.
        steps: Optimisation steps.
        lr: Adam step size, in units of the input's std.
        seed: Seed of the starting noise.
        output_selector: How to find the logits in the model's output (as in
            :func:`~lightning_jit.objective.select_output`).
        scale: ``(mean, std)`` to use instead of ``like``'s (e.g. pooled over several processes' batches).

    Returns:
        ``(x, y)``: ``len(classes) * per_class`` probes and their classes.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        >>> x, y = synthesize_class_probes(net, [0, 2], like=torch.randn(8, 1, 4, 4), per_class=4, steps=30)
        >>> tuple(x.shape), y.tolist()
        ((8, 1, 4, 4), [0, 0, 0, 0, 2, 2, 2, 2])
        >>> probe_confidence(net, (x, y)) > 90
        True
    """
    if not classes:
        raise MisconfigurationException("`classes` is empty: give at least one class to synthesise probes for.")
    if per_class < 1 or steps < 0:
        raise MisconfigurationException(f"`per_class` must be >= 1 and `steps` >= 0, got {per_class} and {steps}.")
    like = like.detach()
    if scale is None:
        mean, std = float(like.float().mean()), float(like.float().std())
    else:
        mean, std = float(scale[0]), float(scale[1])
    std = max(std, 1e-6)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn((len(classes) * per_class, *like.shape[1:]), generator=generator)
    x = (mean + std * noise).to(device=like.device, dtype=like.dtype).requires_grad_(True)
    y = torch.tensor(list(classes), device=like.device).repeat_interleave(per_class)
    optimizer = torch.optim.Adam([x], lr=lr * std)
    is_module = isinstance(model, nn.Module)
    was_training = model.training if is_module else False
    if is_module:
        model.eval()
    try:
        with torch.enable_grad():
            for _ in range(steps):
                logits = select_output(model(x), output_selector)
                loss = F.cross_entropy(logits.float(), y) + 1e-3 * ((x - mean) / std).pow(2).mean()
                (grad,) = torch.autograd.grad(loss, [x])
                x.grad = grad
                optimizer.step()
    finally:
        if is_module:
            model.train(was_training)
    return x.detach(), y


class ProbeDistillation:
    """Keeps the model's predictions on class probes where the original model had them: a zero-shot retain term.

    JiT's damage to the kept classes is invisible to it, since it never sees their data. This term gives it a
    stand-in: at the first forget batch it synthesises ``per_class`` probes from the original model
    (:func:`synthesize_class_probes`) for every class that batch does not hold, and at every step it adds the KL
    divergence from the original model's
    predictions on the probes to the current model's,

    .. code-block:: text

        loss = mean over active probes p of  KL( softmax f0(p) || softmax f(p) )

    where a probe is *active* while its class has not appeared among the forget set's labels (or, for unlabelled
    batches, among the original model's predictions on the forget inputs): the classes being forgotten are never
    held in place. When every class appears in the forget set (random forgetting) no probe is active and the term
    is zero. At most ``max_per_step`` probes enter one step, taken in turn, so a step costs one forward/backward of
    at most that many inputs.

    On the digits benchmark (``docs/quality_exploration.md``) weight 1 kept 0.2-4 points more retained accuracy in
    every full-class case, the plain CNN's digit 4 from 94.2% to 98.3%; holding the forgotten class's own probes
    as well blocked forgetting.

    Args:
        reference: The original model, evaluated with gradients flowing to its inputs only
            (:meth:`~lightning_jit.step.FrozenReference.differentiable`).
        per_class: Probes per class (fewer when the classes are many, see ``max_probes``).
        max_per_step: Most probes in one step, and in one synthesis batch.
        max_probes: Most probes in all: with ``C`` classes each gets ``min(per_class, max_probes // C)``, at least 1
            (ImageNet's 1000 classes: 2 each). They are kept on the inputs' device.
        seed: Seed of the probes' starting noise.
        output_selector: How to find the logits in the model's output.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        >>> distill = ProbeDistillation(net, per_class=4)
        >>> distill.observe(torch.randn(8, 1, 4, 4), classes=torch.zeros(8, dtype=torch.long))
        >>> distill.active_classes()
        [1, 2]
        >>> round(distill.loss(net).item(), 6)  # the model has not moved: its probe predictions are the original's
        0.0
    """

    def __init__(
        self,
        reference: Callable[[Tensor], Any],
        per_class: int = 16,
        max_per_step: int = 256,
        max_probes: int = 2048,
        seed: int = 0,
        output_selector: OutputSelector = None,
    ) -> None:
        self.reference = reference
        self.per_class = int(per_class)
        self.max_per_step = int(max_per_step)
        self.max_probes = int(max_probes)
        self.seed = int(seed)
        self.output_selector = output_selector
        self.probes: Tensor | None = None
        self.probe_classes: Tensor | None = None
        self.targets: Tensor | None = None
        self.forgotten: Tensor | None = None
        self._offset = 0

    def observe(
        self, x: Tensor, classes: Tensor | None = None, gather: Callable[[Tensor], Tensor] | None = None
    ) -> None:
        """Record the classes of a forget batch; at the first call, synthesise the probes of the other classes.

        Args:
            x: The forget inputs (their scale, shape and device shape the probes).
            classes: Their labels; ``None`` takes the original model's predictions.
            gather: Under DDP, where each process holds another batch: an all-gather (e.g.
                ``LightningModule.all_gather``), so that every process pools the same scale and classes.
        """
        x = x.detach()
        with torch.no_grad():
            if classes is None or self.probes is None:
                logits = select_output(self.reference(x), self.output_selector) if x.shape[0] else None
            if classes is None:
                classes = logits.argmax(1) if logits is not None else x.new_zeros(0, dtype=torch.long)
        if self.forgotten is None:
            num_classes = torch.tensor([logits.shape[1] if logits is not None else 0], device=x.device)
            if gather is not None:
                num_classes = gather(num_classes).reshape(-1).max()
            self.forgotten = torch.zeros(int(num_classes.max()), dtype=torch.bool, device=x.device)
        seen = torch.zeros_like(self.forgotten)
        classes = classes.to(seen.device).long()
        seen[classes[(classes >= 0) & (classes < seen.shape[0])]] = True  # e.g. an ignore index is no class
        if gather is not None:
            seen = gather(seen.to(torch.int32)).reshape(-1, seen.shape[0]).bool().any(0)
        self.forgotten |= seen
        if self.probes is None:
            self._synthesise(x, gather)

    def _synthesise(self, x: Tensor, gather: Callable[[Tensor], Tensor] | None) -> None:
        """Probes for every class not in the first batch (random forgetting then often needs none), at the scale of
        the first (global) batch; fewer per class when the classes are many, `max_per_step` at a time."""
        assert self.forgotten is not None
        count = torch.tensor(float(x.numel()), device=x.device)
        stats = torch.stack([x.float().sum(), x.float().pow(2).sum(), count])
        if gather is not None:
            stats = gather(stats).reshape(-1, 3).sum(0)
        count = float(stats[2].clamp_min(1))
        mean = float(stats[0]) / count
        std = max(float(stats[1]) / count - mean * mean, 0.0) ** 0.5
        like = x if x.shape[0] else x.new_zeros((1, *x.shape[1:]))
        classes = (~self.forgotten).nonzero().flatten().tolist()
        per_class = max(1, min(self.per_class, self.max_probes // max(1, len(self.forgotten))))
        classes_per_chunk = max(1, self.max_per_step // per_class)
        probes, labels, targets = [like[:0]], [torch.zeros(0, dtype=torch.long, device=x.device)], []
        for index, start in enumerate(range(0, len(classes), classes_per_chunk)):
            chunk, chunk_labels = synthesize_class_probes(
                self.reference,
                classes[start : start + classes_per_chunk],
                like,
                per_class=per_class,
                seed=self.seed + index,
                output_selector=self.output_selector,
                scale=(mean, std),
            )
            with torch.no_grad():
                logits0 = select_output(self.reference(chunk), self.output_selector).float()
            probes.append(chunk)
            labels.append(chunk_labels)
            targets.append(torch.log_softmax(logits0, dim=1))
        self.probes, self.probe_classes = torch.cat(probes), torch.cat(labels)
        self.targets = torch.cat(targets) if targets else None

    def active_classes(self) -> list[int]:
        """The classes whose probes are held in place (none before the first :meth:`observe`)."""
        return [] if self.forgotten is None else (~self.forgotten).nonzero().flatten().tolist()

    def loss(self, model: nn.Module | Callable[[Tensor], Any]) -> Tensor | None:
        """The mean KL divergence over this step's active probes, with gradients through ``model``; ``None`` when
        no probe is active."""
        if self.probes is None or self.forgotten is None:
            raise RuntimeError("ProbeDistillation.loss() before observe(): no probes have been synthesised yet.")
        active = (~self.forgotten[self.probe_classes]).nonzero().flatten()
        if active.numel() == 0:
            return None
        assert self.targets is not None
        if active.numel() > self.max_per_step:
            take = (torch.arange(self.max_per_step, device=active.device) + self._offset) % active.numel()
            self._offset = (self._offset + self.max_per_step) % active.numel()
            active = active[take]
        logits = select_output(model(self.probes[active]), self.output_selector).float()
        return F.kl_div(torch.log_softmax(logits, dim=1), self.targets[active], log_target=True, reduction="batchmean")
