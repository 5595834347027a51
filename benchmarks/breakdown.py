"""Where the time of a ``trainer.fit`` of :class:`~lightning_jit.JiTUnlearning` goes, component by component.

:class:`Breakdown` wraps a fixed list of functions (the library's and Lightning's) with timers for the duration of a
``with`` block and books each call's *exclusive* time (its own time, less that of the wrapped calls inside it) under a
component. Whatever the wrapped calls do not cover is Lightning's loop (its hooks, callbacks and bookkeeping), found
as the fit's total less the components. The timers cost a few microseconds per call, so the breakdown is measured in
runs of its own, never in the runs that give the headline times.

For the benchmarks only: nothing in the library imports it.

Example::

    with Breakdown() as parts:
        trainer.fit(wrapper, loader)
    print(parts.table(steps=trainer.global_step))
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import Strategy
from torch.utils.data.dataloader import _BaseDataLoaderIter

from lightning_jit.core import engine
from lightning_jit.core.cost import CostCounter
from lightning_jit.core.engine import JiTRun
from lightning_jit.core.run import update
from lightning_jit.core.run.budget import CostBound
from lightning_jit.core.run.stopping import StoppingRule
from lightning_jit.lightning.module import JiTUnlearning

#: The work a run books with its cost counter (``CostCounter.kind``) and the component it is shown as.
KIND_LABELS = {
    "calibration": "per-fit set-up: survey, step calibration",
    "synthesis": "per-fit set-up: survey, step calibration",
    "clean": "clean forward (with autograd)",
    "perturbed": "perturbed passes, noise and ratios",
    "penalty": "penalty terms",
    "probes": "probe / retain terms",
    "retain": "probe / retain terms",
    "stopping_rule": "stopping rule's forget-set check",
    "guard": "collapse guard's checks",
    "verification": "final verification pass",
    "heldout": "held-out test",
    "other": "other model passes",
}

#: The functions timed, as (owner, attribute, component). Owners are classes or modules; their attribute is replaced
#: inside the ``with`` block and put back after it.
TIMED: list[tuple[Any, str, str]] = [
    (JiTUnlearning, "log", "Lightning logging (self.log)"),
    (JiTUnlearning, "manual_backward", "backward"),
    (LightningOptimizer, "step", "optimizer step"),
    (torch.optim.Optimizer, "zero_grad", "zero_grad"),
    (update, "gradients_finite", "finite checks (gradients, weights)"),
    (engine, "_weights_finite", "finite checks (gradients, weights)"),
    (StoppingRule, "update", "stopping rule (window)"),
    (CostBound, "over", "cost bound"),
    (JiTRun, "start", "per-fit set-up: survey, step calibration"),
    (JiTRun, "finish", "final verification pass"),
    (JiTRun, "step", "engine bookkeeping (rest of JiTRun.step)"),
    (JiTUnlearning, "training_step", "wrapper's training_step (rest)"),
    (_BaseDataLoaderIter, "__next__", "data loading and collation"),
    (Strategy, "batch_to_device", "data loading and collation"),
]

LOOP = "Lightning's loop, hooks and fit set-up (the rest)"


class Breakdown:
    """Time the components of whatever runs inside the ``with`` block (see the module's docstring).

    Args:
        clock: ``time.perf_counter`` (wall) or ``time.process_time`` (CPU time of the process).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.seconds: dict[str, float] = {}
        self.total = 0.0
        self._stack: list[list[float]] = []  # [start, time spent in timed calls inside]
        self._saved: list[tuple[Any, str, Any, bool]] = []

    def _enter(self) -> None:
        self._stack.append([self.clock(), 0.0])

    def _exit(self, label: str) -> None:
        start, inner = self._stack.pop()
        elapsed = self.clock() - start
        self.seconds[label] = self.seconds.get(label, 0.0) + elapsed - inner
        if self._stack:
            self._stack[-1][1] += elapsed

    def _wrap(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._enter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._exit(label)

        return timed

    def _wrap_kind(self, kind: Callable[..., Any]) -> Callable[..., Any]:
        @contextlib.contextmanager
        def timed(counter: CostCounter, name: str) -> Iterator[None]:
            with kind(counter, name):
                self._enter()
                try:
                    yield
                finally:
                    self._exit(KIND_LABELS.get(name, name))

        return timed

    def __enter__(self) -> Breakdown:
        for owner, name, label in TIMED:
            own = name in vars(owner)
            original = getattr(owner, name)
            self._saved.append((owner, name, original if own else None, own))
            setattr(owner, name, self._wrap(original, label))
        self._saved.append((CostCounter, "kind", CostCounter.kind, True))
        CostCounter.kind = self._wrap_kind(CostCounter.kind)  # type: ignore[method-assign]
        self._start = self.clock()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.total += self.clock() - self._start
        for owner, name, original, own in reversed(self._saved):
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)
        self._saved = []
        self.seconds[LOOP] = self.total - sum(v for k, v in self.seconds.items() if k != LOOP)

    def merged(self, other: Breakdown) -> Breakdown:
        """The sum of two breakdowns (e.g. of several fits)."""
        out = Breakdown(self.clock)
        out.total = self.total + other.total
        for part in (self.seconds, other.seconds):
            for k, v in part.items():
                out.seconds[k] = out.seconds.get(k, 0.0) + v
        return out

    def table(self, steps: int, reference_s: float | None = None, runs: int = 1) -> str:
        """A markdown table: each component's milliseconds per step and share of the fit (and, with the
        reference's seconds per step, of the reference's step)."""
        header = "| component | ms per step | share of the fit |"
        rule = "|---|---:|---:|"
        if reference_s is not None:
            header += " share of a reference step |"
            rule += "---:|"
        lines = [header, rule]
        per_step = max(1, steps * runs)
        for label, seconds in sorted(self.seconds.items(), key=lambda kv: -kv[1]):
            row = f"| {label} | {1000 * seconds / per_step:.3f} | {100 * seconds / self.total:.1f}% |"
            if reference_s is not None:
                row += f" {100 * seconds / per_step / reference_s:.1f}% |"
            lines.append(row)
        total = f"| **whole fit** | **{1000 * self.total / per_step:.3f}** | 100% |"
        if reference_s is not None:
            total += f" {100 * self.total / per_step / reference_s:.1f}% |"
        lines.append(total)
        return "\n".join(lines)


__all__ = ["LOOP", "Breakdown"]
