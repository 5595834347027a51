"""The collapse guard's place in a run: its checks, the rollback to the last weights that passed, step halving."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_jit.core.batch import BatchFormat
from lightning_jit.core.cost import CostCounter
from lightning_jit.core.distillation import DistillationSet
from lightning_jit.core.guard import CollapseCheck, GuardEvent, GuardSettings
from lightning_jit.core.run.collectives import Collectives, ForwardContext
from lightning_jit.core.site import PerturbationSite
from lightning_jit.core.weights import WeightSnapshot


@dataclass
class GuardVerdict:
    """What one check of the guard decided: ``diverged`` (the outputs or weights are NaN/Inf), ``rolled_back`` (the
    last weights that passed were restored) and ``stop`` (the run must end)."""

    diverged: bool = False
    rolled_back: bool = False
    stop: bool = False


class Rollback:
    """The collapse guard of a run: it checks the model every ``check_every`` steps and, on a collapse, restores the
    last weights that passed (those from before the run without a monitor), then halves the step or stops.

    Args:
        guard: The guard's settings (``enabled=False``: no checks).
        batch_format: How to read the monitor's batches.
        monitor: Held-out labelled batches the guard watches (optional).
        cost: The run's counter (checks are booked as ``guard``).
        collectives: How the processes agree.
        warn: Where the rollback's warning goes.
        site: Where the noise goes: the guard's noise probes are drawn in its space (``None``: the input).

    Example:
        >>> Rollback(GuardSettings(enabled=False), BatchFormat()).due(steps=1)
        False
    """

    def __init__(
        self,
        guard: GuardSettings,
        batch_format: BatchFormat,
        monitor: Iterable[Any] | None = None,
        cost: CostCounter | None = None,
        collectives: Collectives | None = None,
        warn: Callable[[str], None] | None = None,
        site: PerturbationSite | None = None,
    ) -> None:
        self.guard = guard
        self.monitor = monitor
        self.cost = cost if cost is not None else CostCounter()
        self.collectives = collectives if collectives is not None else Collectives()
        self.warn = warn if warn is not None else (lambda message: None)
        self.check: CollapseCheck | None = CollapseCheck(guard, batch_format, monitor, site) if guard.enabled else None
        #: The weights a collapse restores: the last that passed a check (with a monitor), else those before the run.
        self.last_good: WeightSnapshot | None = None

    @property
    def events(self) -> list[GuardEvent]:
        return self.check.events if self.check is not None else []

    def due(self, steps: int) -> bool:
        """Whether the guard checks after step ``steps``."""
        return self.check is not None and steps % self.guard.check_every == 0

    def watch_probes(self, probes: DistillationSet | None) -> None:
        """Let the guard watch the class probes the run holds, with the original's class of each."""
        if self.check is not None and probes is not None:
            self.check.class_probes = (probes.probes, probes.targets.argmax(1))

    def begin(self, model: nn.Module, x: Any, forward_context: ForwardContext, pre_run: WeightSnapshot) -> None:
        """Before the first step: the guard's reference measurements (booked as ``guard``)."""
        if self.check is None or self.check.begun:
            return
        with self.cost.kind("guard"):
            self.check.begin(model, x, forward_context)
        self.last_good = WeightSnapshot(model) if self.monitor is not None else pre_run

    def run_check(
        self, model: nn.Module, optimizer: Optimizer | None, forward_context: ForwardContext, step: int, final: bool
    ) -> GuardVerdict:
        """Measure the model; on a collapse restore :attr:`last_good`, clear the optimizer's state and halve its step
        (unless the halvings are spent, the run is ending, or there is no optimizer: then stop)."""
        check = self.check
        assert check is not None
        with self.cost.kind("guard"):
            measures = check.measure(model, forward_context)
        check.checks += 1
        reason = check.verdict(measures)
        coll = self.collectives
        diverged = coll.any_true(reason == "non_finite")
        failed = coll.any_true(reason is not None)
        check.last = {k: v for k, v in measures.items() if k != "non_finite"}
        detail = {k: round(v, 4) for k, v in check.last.items() if math.isfinite(v)}
        if diverged:
            check.events.append(GuardEvent(step, "non_finite", "diverged", detail))
            return GuardVerdict(diverged=True)
        if not failed:
            if self.monitor is not None and self.last_good is not None:
                self.last_good.update(model)
            return GuardVerdict()
        reason = reason or "other_rank"
        assert self.last_good is not None
        self.last_good.restore(model)
        raw = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        if raw is not None:
            raw.state.clear()  # momentum buffers point the way that collapsed
        guard = self.guard
        if guard.on_collapse == "halve_lr" and check.halvings < guard.max_halvings and not final and raw is not None:
            action, stop = "halve_lr", False
            check.halvings += 1
            for group in raw.param_groups:
                group["lr"] = group["lr"] * 0.5
        else:
            action, stop = "stop", True
        check.events.append(GuardEvent(step, reason, action, detail))
        restored = "the last weights that passed" if self.monitor is not None else "the weights from before the run"
        then = (
            f"the learning rate was halved (halving {check.halvings} of {guard.max_halvings})"
            if action == "halve_lr"
            else "the run was stopped"
        )
        self.warn(
            f"JiT collapse guard at step {step}: {check.describe(reason, measures)}. Restored {restored}; {then}."
        )
        return GuardVerdict(rolled_back=True, stop=stop)

    def report(self) -> dict[str, Any] | None:
        return self.check.report() if self.check is not None else None

    def state_dict(self) -> dict[str, Any]:
        keeps_own = self.last_good is not None and self.monitor is not None
        return {
            "guard": self.check.state_dict() if self.check is not None else None,
            "last_good": self.last_good.state if keeps_own else None,  # type: ignore[union-attr]
        }

    def load_state_dict(self, state: dict[str, Any], pre_run: WeightSnapshot, device: torch.device) -> None:
        if self.check is not None and state["guard"] is not None:
            self.check.load_state_dict(state["guard"], device)
            if self.check.begun:
                self.last_good = (
                    WeightSnapshot.from_state(state["last_good"], device) if state["last_good"] is not None else pre_run
                )


__all__ = ["GuardVerdict", "Rollback"]
