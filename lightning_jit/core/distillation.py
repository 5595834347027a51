"""Distillation towards the original model on a held set of inputs: class probes or retain samples.

A run holds up to two such sets (:class:`~lightning_jit.core.run.held.HeldSamples`): the class probes of the kept
classes (``JiTSettings.probe_distillation``, zero-shot) and the first samples of the user's ``retain`` loader
(``retain_distillation``). At every step a share of each set is distilled towards the original's predictions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_jit.core.accuracy import top1_hits
from lightning_jit.core.batch import (
    ModelInput,
    OutputSelector,
    batch_size,
    concat,
    device_of,
    index,
    move,
    select_output,
)
from lightning_jit.core.batch import batch_size as count  # `loss` has an argument named `batch_size`
from lightning_jit.core.errors import MisconfigurationException
from lightning_jit.core.probes import counterfactual_probes, run_in_space
from lightning_jit.core.site import PerturbationSite

#: Probes in one step, as a share of the forget batch's size (at least one, at most all).
PROBES_PER_STEP = 0.5
#: Most probes in all (with many classes, each gets fewer), and most synthesised at a time.
MAX_PROBES = 2048
SYNTHESIS_CHUNK = 256
#: Most retain samples a run keeps (the first ones the retain loader yields).
MAX_RETAIN = 4096


class DistillationSet:
    """A set of inputs on which the model's predictions are held where the original model had them: a retain term.

    The inputs are either class probes (:meth:`synthesise`: zero-shot, ``JiTSettings.probe_distillation``) or
    samples the user keeps (:meth:`from_retain`: the optional ``retain`` loader, ``retain_distillation``).
    JiT's damage to the kept classes is invisible to it, since it never sees their data. Class probes give it a
    stand-in: probes of every class the forget set does not hold
    (:func:`~lightning_jit.core.probes.counterfactual_probes`, synthesised once from the original model), and at every
    step the KL divergence from the original model's
    predictions on a share of them to the current model's,

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
        >>> distill = DistillationSet(x, torch.zeros(6, dtype=torch.long), torch.log_softmax(net(x), 1).detach())
        >>> round(distill.loss(net, batch_size=4).item(), 6)  # the model has not moved: nothing to hold
        0.0
        >>> distill.taken
        2
    """

    def __init__(
        self,
        probes: ModelInput,
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
    ) -> DistillationSet:
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
                [
                    site.space(reference, index(starts, slice(i, i + SYNTHESIS_CHUNK)))
                    for i in range(0, batch_size(starts), SYNTHESIS_CHUNK)
                ]
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
                    select_output(run_in_space(site, reference, x[i : i + SYNTHESIS_CHUNK]), output_selector).float(),
                    dim=1,
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
    ) -> DistillationSet:
        """Hold the original model's predictions on samples the user keeps (the optional ``retain`` loader): its
        first ``limit`` inputs, read once, with the original's predictions computed once.

        Raises:
            MisconfigurationException: for an empty retain loader.
        """
        inputs: list[ModelInput] = []
        labels: list[Tensor] | None = []
        kept = 0
        for batch in retain:
            x = index(move(batch_format.forget_input(batch, structured=True), device), slice(None, limit - kept))
            y = batch_format.labels(batch)
            if y is None or labels is None:
                labels = None
            else:
                labels.append(y.to(device).long()[: batch_size(x)])
            inputs.append(x)
            kept += batch_size(x)
            if kept >= limit:
                break
        if not kept:
            raise MisconfigurationException("`retain` is empty: pass a loader of samples you keep, or None.")
        x = concat(inputs)
        targets = torch.cat(
            [
                torch.log_softmax(
                    batch_format.logits(reference(index(x, slice(i, i + SYNTHESIS_CHUNK)))).float(), dim=1
                )
                for i in range(0, batch_size(x), SYNTHESIS_CHUNK)
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
            >>> distill = DistillationSet(x, y, targets)
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
        recognised = sibling & top1_hits(self.targets, labels)
        held = (index(self.probes, recognised), labels[recognised])
        keep = ~sibling
        self.probes, self.classes, self.targets, self.labels = (
            index(self.probes, keep),
            self.classes[keep],
            self.targets[keep],
            labels[keep],
        )
        return held

    def loss(
        self, model: nn.Module | Callable[[Tensor], Any], batch_size: int, output_selector: OutputSelector = None
    ) -> Tensor:
        """The mean KL divergence over this step's probes, with gradients through ``model``."""
        n = count(self.probes)
        k = min(n, max(1, math.ceil(self.per_step * batch_size)))
        take = (torch.arange(k, device=device_of(self.probes)) + self._offset) % n
        self._offset = (self._offset + k) % n
        self.taken = k
        logits = select_output(run_in_space(self.site, model, index(self.probes, take)), output_selector).float()
        return F.kl_div(torch.log_softmax(logits, dim=1), self.targets[take], log_target=True, reduction="batchmean")

    def state_dict(self) -> dict[str, Any]:
        """Where the rotation through the inputs stands (the inputs, classes, targets and labels are the
        constructor's arguments and public attributes).

        Example:
            >>> distill = DistillationSet(torch.zeros(5, 2), torch.zeros(5, dtype=torch.long), torch.zeros(5, 3))
            >>> _ = distill.loss(torch.nn.Linear(2, 3), batch_size=4)
            >>> distill.state_dict()
            {'offset': 2}
        """
        return {"offset": self._offset}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go on rotating from where :meth:`state_dict` stood."""
        self._offset = int(state["offset"])
