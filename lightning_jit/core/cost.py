"""What a run costs, counted as samples through the user's model: a forward pass counts 1 per sample, a forward that
is back-propagated counts 3.

:class:`CostCounter` hangs a forward hook on the model and books each pass under the kind of work the run is doing
at that moment (:meth:`CostCounter.kind`, :data:`KINDS`). A pass with autograd enabled is counted as forward and
backward. Frozen-copy passes (``torch.func.functional_call`` on the same module) go through the same hook. The
reference's one pass over a forget set of ``n`` samples costs ``(N + 3) * n`` with the reference's ``N = 25``
(:data:`REFERENCE_N`, :func:`reference_cost`): 28 per forget sample, the unit the benchmarks, the README and every
run's ``verification.cost["over_reference"]`` report against, whatever ``N`` the run itself drew.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lightning_jit.core.batch import tensors

#: The kinds of work a run books its passes under, in report order.
KINDS = (
    "calibration",
    "clean",
    "perturbed",
    "penalty",
    "probes",
    "synthesis",
    "retain",
    "stopping_rule",
    "guard",
    "verification",
    "heldout",
    "other",
)


#: The reference's number of perturbations per forget sample: its one pass costs ``REFERENCE_N + 3`` per sample.
REFERENCE_N = 25


def reference_cost(n_forget: int, n_perturbations: int = REFERENCE_N) -> int:
    """The reference's one pass: per forget sample, ``N`` no-grad forwards and one forward+backward.

    Example:
        >>> reference_cost(10)
        280
    """
    return int(n_forget) * (int(n_perturbations) + 3)


class CostCounter:
    """Count the samples that go through ``model``, by kind of work.

    Example:
        >>> net = torch.nn.Linear(3, 2)
        >>> counter = CostCounter()
        >>> with counter.attached(net):
        ...     with counter.kind("perturbed"), torch.no_grad():
        ...         _ = net(torch.zeros(5, 3))
        ...     with counter.kind("clean"):
        ...         _ = net(torch.zeros(2, 3))
        >>> counter.counts["perturbed"], counter.counts["clean"], counter.total
        (5, 6, 11)
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = dict.fromkeys(KINDS, 0)
        self._kind = "other"
        self._handle: Any = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @contextlib.contextmanager
    def kind(self, name: str) -> Iterator[None]:
        """Book the passes made inside the block under ``name``."""
        previous, self._kind = self._kind, name
        self.counts.setdefault(name, 0)
        try:
            yield
        finally:
            self._kind = previous

    def _hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        # The first tensor the forward was given: positional, or in a dict or tuple input (keyword arguments).
        first = next(iter(tensors((args, kwargs))), None)
        n = int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() > 0 else 1
        self.counts[self._kind] += n * (3 if torch.is_grad_enabled() else 1)

    def attach(self, model: nn.Module) -> None:
        """Start counting the forwards of ``model`` (idempotent)."""
        if self._handle is None:
            self._handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def detach(self) -> None:
        """Stop counting."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @contextlib.contextmanager
    def attached(self, model: nn.Module) -> Iterator[CostCounter]:
        """Count the forwards of ``model`` inside the block."""
        self.attach(model)
        try:
            yield self
        finally:
            self.detach()

    def report(self, n_forget: int | None = None, n_perturbations: int | None = None) -> dict[str, Any]:
        """The counts by kind and in total; with ``n_forget``, also per forget sample and over the reference's pass.

        Args:
            n_forget: The forget samples the run served.
            n_perturbations: The run's own ``N``, recorded as ``n_perturbations`` for the record. It does not change
                the unit: ``over_reference`` always divides by the reference's pass, ``(REFERENCE_N + 3) * n_forget``,
                so that runs with different ``N`` (and the benchmarks) are comparable.

        Example:
            >>> counter = CostCounter()
            >>> counter.counts["clean"] = 280
            >>> counter.report(n_forget=10, n_perturbations=8)["over_reference"]  # 280 / (10 * (25 + 3))
            1.0
        """
        out: dict[str, Any] = {"by_kind": {k: v for k, v in self.counts.items() if v}, "total": self.total}
        if n_perturbations is not None:
            out["n_perturbations"] = int(n_perturbations)
        if n_forget:
            out["per_forget_sample"] = self.total / n_forget
            out["over_reference"] = self.total / reference_cost(n_forget, REFERENCE_N)
        return out
