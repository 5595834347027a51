"""Class probes synthesised from the model alone: a zero-shot stand-in for retained data.

JiT never sees retained data, so nothing measures what an unlearning run costs the classes it should keep. Class
probes fill that gap without breaking the zero-shot promise: for each kept class, a few inputs are optimised, starting
from noise shaped like the forget inputs, until the *original* model classifies them as that class with confidence
(a light form of model inversion). After unlearning, the mean probability the model still gives each probe's class
(:func:`probe_confidence`) tracks the accuracy on real retained data (measured in ``docs/results/tune.md``);
:func:`~lightning_jit.tune.tune_jit` ranks its trials with it.

With a perturbation site (``JiTSettings.perturb_at``, :mod:`lightning_jit.core.site`) the probes live in the site's
space (a token model's embedding output), not among the inputs: token ids cannot take gradient steps.

The same probes also *protect* the kept classes during unlearning: :class:`ProbeDistillation` holds the model's
predictions on them at the original's (``JiTSettings.probe_distillation``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_jit.core.batch import OutputSelector, select_output
from lightning_jit.core.errors import MisconfigurationException
from lightning_jit.core.site import PerturbationSite


@torch.no_grad()
def probe_confidence(
    model: nn.Module,
    probes: tuple[Tensor, Tensor],
    output_selector: OutputSelector = None,
    site: PerturbationSite | None = None,
) -> float:
    """The mean probability (percent) that ``model``, in eval mode, gives each probe of ``probes = (x, y)`` for its
    class ``y``. Unlike the probes' accuracy it does not saturate: it falls as soon as the kept classes are damaged.
    Probes synthesised in a perturbation site's space (``site``, as :func:`synthesize_class_probes` made them) are
    evaluated from that space."""
    x, y = probes
    was_training = model.training
    model.eval()
    try:
        logits = select_output(_run(site, model, x), output_selector).float()
    finally:
        model.train(was_training)
    return float(torch.softmax(logits, dim=1).gather(1, y.to(logits.device)[:, None]).mean() * 100.0)


def synthesize_class_probes(
    model: nn.Module | Callable[[Tensor], Any],
    classes: Sequence[int],
    like: Tensor,
    per_class: int,
    steps: int = 60,
    lr: float = 0.1,
    seed: int = 0,
    output_selector: OutputSelector = None,
    *,
    scale: tuple[float, float] | None = None,
    site: PerturbationSite | None = None,
) -> tuple[Tensor, Tensor]:
    """Synthesise ``per_class`` inputs for each class in ``classes`` that ``model`` classifies as that class.

    Each probe starts as Gaussian noise with the mean and std of ``like`` (e.g. a forget batch) and takes ``steps``
    Adam steps on the cross-entropy of its class, with a small pull back towards that mean. Only the probes move: the
    model's parameters and gradients are left untouched, and the model runs in eval mode.

    Args:
        model: The trained classifier (before unlearning), or a callable that evaluates it with gradients flowing to
            its input (e.g. :meth:`~lightning_jit.core.reference.FrozenReference.differentiable`), which then sets
            its own mode.
        classes: The classes to probe, e.g. every class but the forgotten ones.
        like: Real inputs (e.g. the forget set) that give the probes' shape, dtype, device and scale.
        per_class: Probes per class.
        steps: Optimisation steps.
        lr: Adam step size, in units of the input's std.
        seed: Seed of the starting noise.
        output_selector: How to find the logits in the model's output (as in
            :func:`~lightning_jit.core.batch.select_output`).
        scale: ``(mean, std)`` to use instead of ``like``'s (e.g. pooled over several processes' batches).
        site: Where the probes live (:mod:`lightning_jit.core.site`): ``None``, the input; a module site (e.g. a
            token model's embedding, ``site_for("embedding", model)``) synthesises them in its module's output space,
            from ``like``'s values there, and :func:`probe_confidence` must then be given the same site.

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
    if site is not None:
        with torch.no_grad():
            was = model.training if isinstance(model, nn.Module) else False
            if isinstance(model, nn.Module):
                model.eval()
            try:
                like = site.space(model, like).detach()
            finally:
                if isinstance(model, nn.Module):
                    model.train(was)
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
                logits = select_output(_run(site, model, x), output_selector)
                loss = F.cross_entropy(logits.float(), y) + 1e-3 * ((x - mean) / std).pow(2).mean()
                (grad,) = torch.autograd.grad(loss, [x])
                x.grad = grad
                optimizer.step()
    finally:
        if is_module:
            model.train(was_training)
    return x.detach(), y


#: Counterfactual probes: Adam steps on each probe, and the Adam step size in stds of the forget inputs.
PROBE_STEPS = 20
PROBE_LR = 0.1
#: Probes in one step, as a share of the forget batch's size (at least one, at most all).
PROBES_PER_STEP = 0.5
#: Most probes in all (with many classes, each gets fewer), and most synthesised at a time.
MAX_PROBES = 2048
SYNTHESIS_CHUNK = 256
#: Most retain samples a run keeps (the first ones the retain loader yields).
MAX_RETAIN = 4096


def counterfactual_probes(
    reference: Callable[[Tensor], Any],
    starts: Tensor,
    classes: Sequence[int],
    per_class: int,
    *,
    std: float,
    steps: int = PROBE_STEPS,
    lr: float = PROBE_LR,
    generator: torch.Generator | None = None,
    output_selector: OutputSelector = None,
) -> tuple[Tensor, Tensor]:
    """Probes of each kept class that start at forget samples, pushed until the original model calls them that class.

    Each probe starts at a forget input drawn from ``starts`` and takes ``steps`` Adam steps (``lr`` stds of the
    inputs) on the cross-entropy of its class under the original model, with a small pull back to its start. They sit
    where the forget set borders each kept class: where forgetting the class would otherwise let a neighbouring class
    swallow the forget samples and their neighbours. Probes synthesised from noise do not protect real data as well
    (``docs/results/generalise.md``).

    Args:
        reference: The original model, differentiable in its input
            (:meth:`~lightning_jit.core.reference.FrozenReference.differentiable`).
        starts: Forget inputs to start from.
        classes: The kept classes.
        per_class: Probes per class.
        std: The forget inputs' std (the unit of ``lr`` and of the pull back).
        steps: Adam steps.
        lr: Adam step, in units of ``std``.
        generator: Draws the starting samples.
        output_selector: How to find the logits in the model's output.

    Returns:
        ``(x, y)``: the probes and their classes.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Linear(4, 3)
        >>> x, y = counterfactual_probes(net, torch.randn(6, 4), [1, 2], 2, std=1.0, steps=60, lr=0.3)
        >>> y.tolist(), bool((net(x).argmax(1) == y).all())
        ([1, 1, 2, 2], True)
    """
    y = torch.tensor(list(classes), device=starts.device, dtype=torch.long).repeat_interleave(per_class)
    index = torch.randint(0, starts.shape[0], (y.shape[0],), generator=generator).to(starts.device)
    start = starts[index].detach()
    x = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr * std)
    with torch.enable_grad():
        for _ in range(steps):
            logits = select_output(reference(x), output_selector).float()
            loss = F.cross_entropy(logits, y) + 1e-3 * ((x - start) / std).pow(2).mean()
            (grad,) = torch.autograd.grad(loss, [x])
            x.grad = grad
            optimizer.step()
    return x.detach(), y


class ProbeDistillation:
    """Holds the model's predictions on class probes where the original model had them: a zero-shot retain term.

    JiT's damage to the kept classes is invisible to it, since it never sees their data. This term gives it a
    stand-in: probes of every class the forget set does not hold (:func:`counterfactual_probes`, synthesised once from
    the original model), and at every step the KL divergence from the original model's predictions on a share of
    them to the current model's,

    .. code-block:: text

        loss = mean over this step's probes p of  KL( softmax f0(p) || softmax f(p) )

    The original's predictions are computed once. Each step takes ``ceil(per_step * B)`` probes (``B`` the forget
    batch), in turn, so the term costs a forward and backward of half a batch. The forgotten classes are never held:
    holding their probes too blocks forgetting (``docs/results/quality_exploration.md``).

    Args:
        probes: The probe inputs.
        classes: Each probe's class.
        targets: The original model's log-probabilities on the probes.
        per_step: Probes per step, as a share of the forget batch.
        site: The perturbation site whose space the probes are points of (:mod:`lightning_jit.core.site`);
            ``None``: they are inputs.

    Example:
        >>> net = torch.nn.Linear(4, 3)
        >>> x = torch.randn(6, 4)
        >>> distill = ProbeDistillation(x, torch.zeros(6, dtype=torch.long), torch.log_softmax(net(x), 1).detach())
        >>> round(distill.loss(net, batch_size=4).item(), 6)  # the model has not moved: nothing to hold
        0.0
        >>> distill.taken
        2
    """

    def __init__(
        self,
        probes: Tensor,
        classes: Tensor,
        targets: Tensor,
        per_step: float = PROBES_PER_STEP,
        site: PerturbationSite | None = None,
    ) -> None:
        self.probes = probes
        #: Where the probes live (``None``: they are inputs).
        self.site = site
        self.classes = classes
        self.targets = targets
        self.per_step = float(per_step)
        #: The true labels of the inputs, when known (a retain loader's); see :meth:`hold_out`.
        self.labels: Tensor | None = None
        self.taken = 0
        self._offset = 0

    @classmethod
    @torch.no_grad()
    def synthesise(
        cls,
        reference: Any,
        starts: Tensor,
        classes: Sequence[int],
        per_class: int,
        *,
        std: float,
        generator: torch.Generator | None = None,
        output_selector: OutputSelector = None,
        site: PerturbationSite | None = None,
    ) -> ProbeDistillation:
        """Synthesise the probes of ``classes`` from the forget inputs ``starts`` and the original model
        ``reference`` (a :class:`~lightning_jit.core.reference.FrozenReference`), at most :data:`MAX_PROBES` in all,
        :data:`SYNTHESIS_CHUNK` at a time. With a module ``site`` the probes live in its module's output space: they
        start where the forget inputs reach it, and ``std`` is in its units.

        Raises:
            MisconfigurationException: when there is no class to hold.
        """
        if not classes:
            raise MisconfigurationException("No class to hold: the forget set holds every class of the model.")
        per_class = max(1, min(int(per_class), MAX_PROBES // len(classes)))
        chunk = max(1, SYNTHESIS_CHUNK // per_class)
        differentiable = reference.differentiable
        if site is not None:
            starts = torch.cat(
                [site.space(reference, starts[i : i + SYNTHESIS_CHUNK]) for i in range(0, len(starts), SYNTHESIS_CHUNK)]
            )

            def differentiable(z: Tensor) -> Any:
                return site.run(reference.differentiable, z)

        probes, labels = [], []
        for start in range(0, len(classes), chunk):
            x, y = counterfactual_probes(
                differentiable,
                starts,
                classes[start : start + chunk],
                per_class,
                std=std,
                generator=generator,
                output_selector=output_selector,
            )
            probes.append(x)
            labels.append(y)
        x, y = torch.cat(probes), torch.cat(labels)
        targets = torch.cat(
            [
                torch.log_softmax(
                    select_output(_run(site, reference, x[i : i + SYNTHESIS_CHUNK]), output_selector).float(), dim=1
                )
                for i in range(0, x.shape[0], SYNTHESIS_CHUNK)
            ]
        )
        return cls(x, y, targets, site=site)

    @classmethod
    @torch.no_grad()
    def from_retain(
        cls,
        reference: Callable[[Tensor], Any],
        retain: Any,
        batch_format: Any,
        *,
        device: torch.device,
        limit: int = MAX_RETAIN,
    ) -> ProbeDistillation:
        """Hold the original model's predictions on samples the user keeps (the optional ``retain`` loader): its
        first ``limit`` inputs, read once, with the original's predictions computed once.

        Raises:
            MisconfigurationException: for an empty retain loader.
        """
        inputs: list[Tensor] = []
        labels: list[Tensor] | None = []
        kept = 0
        for batch in retain:
            x = batch_format.forget_input(batch).to(device)[: limit - kept]
            y = batch_format.labels(batch)
            if y is None or labels is None:
                labels = None
            else:
                labels.append(y.to(device).long()[: x.shape[0]])
            inputs.append(x)
            kept += x.shape[0]
            if kept >= limit:
                break
        if not kept:
            raise MisconfigurationException("`retain` is empty: pass a loader of samples you keep, or None.")
        x = torch.cat(inputs)
        targets = torch.cat(
            [
                torch.log_softmax(batch_format.logits(reference(x[i : i + SYNTHESIS_CHUNK])).float(), dim=1)
                for i in range(0, x.shape[0], SYNTHESIS_CHUNK)
            ]
        )
        distill = cls(x, targets.argmax(1), targets)
        distill.labels = torch.cat(labels) if labels else None
        return distill

    def hold_out(self, classes: Sequence[int]) -> tuple[Tensor, Tensor] | None:
        """Take the samples whose label is one of ``classes`` out of the distillation (the retain loader's
        *siblings*: kept samples of a label the forget set holds, as in sub-class forgetting). Holding them would
        fight the forgetting; they are returned instead, those the original recognised, as ``(inputs, labels)``
        for a check at the end. ``None`` when there are none (or the retain loader has no labels).

        Example:
            >>> x, y = torch.randn(4, 2), torch.tensor([0, 1, 1, 2])
            >>> targets = torch.log_softmax(torch.eye(3)[y] * 5, 1)  # the original recognises all four
            >>> distill = ProbeDistillation(x, y, targets)
            >>> distill.labels = y
            >>> held = distill.hold_out([1])
            >>> held[1].tolist(), distill.probes.shape[0]
            ([1, 1], 2)
        """
        labels = self.labels
        if labels is None:
            return None
        sibling = torch.isin(labels, torch.as_tensor(list(classes), device=labels.device))
        if not bool(sibling.any()):
            return None
        recognised = sibling & (self.targets.argmax(1) == labels)
        held = (self.probes[recognised], labels[recognised])
        keep = ~sibling
        self.probes, self.classes, self.targets, self.labels = (
            self.probes[keep],
            self.classes[keep],
            self.targets[keep],
            labels[keep],
        )
        return held

    def loss(
        self, model: nn.Module | Callable[[Tensor], Any], batch_size: int, output_selector: OutputSelector = None
    ) -> Tensor:
        """The mean KL divergence over this step's probes, with gradients through ``model``."""
        n = self.probes.shape[0]
        k = min(n, max(1, math.ceil(self.per_step * batch_size)))
        take = (torch.arange(k, device=self.probes.device) + self._offset) % n
        self._offset = (self._offset + k) % n
        self.taken = k
        logits = select_output(_run(self.site, model, self.probes[take]), output_selector).float()
        return F.kl_div(torch.log_softmax(logits, dim=1), self.targets[take], log_target=True, reduction="batchmean")


def _run(site: PerturbationSite | None, model: Callable[[Tensor], Any], x: Tensor) -> Any:
    """``model`` on ``x``, or from ``x`` in ``site``'s space."""
    return model(x) if site is None else site.run(model, x)
