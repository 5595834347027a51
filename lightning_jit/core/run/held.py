"""The samples a run holds besides the forget set: the frozen original, the class probes, the retain samples and the
retain samples of a forgotten label (the siblings, checked at the end).

This stage owns them, their loss terms and their state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_jit.core.batch import BatchFormat, ModelInput, batch_size, move
from lightning_jit.core.calibration import ForgetSurvey
from lightning_jit.core.cost import CostCounter
from lightning_jit.core.distillation import DistillationSet
from lightning_jit.core.reference import FrozenReference
from lightning_jit.core.run.collectives import cpu_generator
from lightning_jit.core.settings import JiTSettings
from lightning_jit.core.site import PerturbationSite


class HeldSamples:
    """The frozen original and the sample sets a run distils towards it.

    Args:
        settings: The run's settings (which terms are on, and their sizes).
        batch_format: How to read the retain batches and the model's output.
        cost: The run's cost counter (the retain loader's read is booked as ``retain``, the probes as ``synthesis``).
        site: Where the noise goes: the class probes are synthesised in its space (``None``: the input).

    Example:
        >>> held = HeldSamples(JiTSettings(probe_distillation=0.0), BatchFormat(), CostCounter())
        >>> held.losses(torch.nn.Identity(), 8)
        (None, None)
        >>> held.state_dict()["reference"] is None
        True
    """

    def __init__(
        self,
        settings: JiTSettings,
        batch_format: BatchFormat,
        cost: CostCounter,
        site: PerturbationSite | None = None,
    ) -> None:
        self.settings = settings
        #: Where the noise goes: the class probes live in its space.
        self.site = site
        self.batch_format = batch_format
        self.cost = cost
        self.reference: FrozenReference | None = None
        self.probes: DistillationSet | None = None
        self.retain: DistillationSet | None = None
        #: Retain samples of a forgotten label that the original recognised, checked at the end.
        self.siblings: tuple[ModelInput, Tensor] | None = None

    def setup(self, original: nn.Module, retain: Iterable[Any] | None, device: torch.device) -> None:
        """Freeze the original when a term needs it, and read the retain loader once (booked as ``retain``)."""
        settings = self.settings
        holds_retain = retain is not None and settings.retain_distillation > 0
        needs_reference = settings.logit_norm_penalty > 0 or settings.redistribution > 0
        if needs_reference or settings.probe_distillation > 0 or holds_retain:
            self.reference = FrozenReference(original, self.batch_format.unpack_input)
        if holds_retain:
            assert self.reference is not None
            with self.cost.kind("retain"):
                self.retain = DistillationSet.from_retain(self.reference, retain, self.batch_format, device=device)

    def ensure_reference(self, original: nn.Module) -> FrozenReference:
        """The frozen original, frozen now if no term needed it so far."""
        if self.reference is None:
            self.reference = FrozenReference(original, self.batch_format.unpack_input)
        return self.reference

    def synthesise(self, found: ForgetSurvey, task: str, device: torch.device) -> int | None:
        """A class task's counterfactual probes of the kept classes (booked as ``synthesis``); returns how many."""
        settings = self.settings
        kept = found.kept_classes()
        if not (settings.probe_distillation > 0 and task == "class" and kept and found.starts is not None):
            return None
        assert self.reference is not None
        with self.cost.kind("synthesis"):
            self.probes = DistillationSet.synthesise(
                self.reference,
                move(found.starts, device),
                kept,
                settings.probes_per_class,
                std=found.std,
                generator=cpu_generator(settings.seed),
                output_selector=self.batch_format.output_selector,
                site=self.site,
            )
        return batch_size(self.probes.probes)

    def hold_out_siblings(self, classes: list[int]) -> int | None:
        """Take the retain samples of the forgotten ``classes`` out of the distillation, to check at the end;
        returns how many (``None`` for none)."""
        assert self.retain is not None
        self.siblings = self.retain.hold_out(classes)
        if batch_size(self.retain.probes) == 0:
            self.retain = None
        return int(self.siblings[1].shape[0]) if self.siblings is not None else None

    def losses(self, forward: Callable[[Tensor], Any], batch_size: int) -> tuple[Tensor | None, Tensor | None]:
        """This step's probe and retain distillation losses (``None`` for a term that is off)."""
        probe_loss = retain_loss = None
        selector = self.batch_format.output_selector
        if self.probes is not None:
            with self.cost.kind("probes"):
                probe_loss = self.probes.loss(forward, batch_size, selector)
        if self.retain is not None:
            with self.cost.kind("retain"):
                retain_loss = self.retain.loss(forward, batch_size, selector)
        return probe_loss, retain_loss

    def state_dict(self) -> dict[str, Any]:
        held = {
            name: (d.probes, d.classes, d.targets, d.state_dict()["offset"], d.labels) if d is not None else None
            for name, d in (("probes", self.probes), ("retain", self.retain))
        }
        return {
            "reference": self.reference.state if self.reference is not None else None,
            "held": held,
            "siblings": self.siblings,
        }

    def load_state_dict(self, state: dict[str, Any], original: nn.Module, device: torch.device) -> None:
        if state["reference"] is not None:
            self.reference = FrozenReference.from_state(
                original, state["reference"], device, self.batch_format.unpack_input
            )
        for name, held in state["held"].items():
            if held is not None:
                distill = DistillationSet(
                    *(move(t, device) for t in held[:3]), site=self.site if name == "probes" else None
                )
                distill.load_state_dict({"offset": held[3]})
                distill.labels = held[4].to(device) if held[4] is not None else None
                setattr(self, name, distill)
        siblings = state["siblings"]
        self.siblings = (move(siblings[0], device), siblings[1].to(device)) if siblings is not None else None


__all__ = ["HeldSamples"]
