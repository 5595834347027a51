"""The cost bound: ``max_cost`` samples through the model per forget sample, beyond the run's fixed set-up."""

from __future__ import annotations

from typing import Any

import torch

from lightning_jit.core.cost import CostCounter
from lightning_jit.core.run.collectives import Collectives


class CostBound:
    """Whether a run has spent its ``max_cost``.

    Not the forget set's work, so not counted: the set-up (the survey, the step-size calibration, the probes'
    synthesis and the retain loader's first read), and the passes over held-out data (the held-out test, and the
    guard's checks when it watches a monitor), which a large held-out split would otherwise spend the bound on.

    Args:
        max_cost: The bound (``None``: none).
        cost: The run's counter.
        watches_monitor: Whether the guard's checks read held-out data.
        collectives: How the processes agree.

    Example:
        >>> cost = CostCounter()
        >>> bound = CostBound(10, cost)
        >>> cost.counts["clean"], cost.counts["calibration"] = 30, 500
        >>> bound.over(4), bound.over(3)  # 30 samples beyond the set-up: 7.5 per forget sample, then 10
        (False, True)
    """

    def __init__(
        self,
        max_cost: float | None,
        cost: CostCounter,
        *,
        watches_monitor: bool = False,
        collectives: Collectives | None = None,
    ) -> None:
        self.max_cost = max_cost
        self.cost = cost
        self.watches_monitor = watches_monitor
        self.collectives = collectives if collectives is not None else Collectives()
        #: Samples the retain loader's first read cost (part of the set-up).
        self.retain_setup = 0
        #: Whether the bound ended the run.
        self.reached = False

    def setup_spent(self) -> int:
        """The samples the set-up and the held-out passes spent so far (this process)."""
        fixed = ("calibration", "synthesis", "heldout", *(("guard",) if self.watches_monitor else ()))
        return sum(self.cost.counts[kind] for kind in fixed) + self.retain_setup

    def over(self, n_forget: int | None, device: torch.device | None = None) -> bool:
        """Whether the run has spent ``max_cost`` samples per forget sample (over all processes) beyond its set-up."""
        if self.max_cost is None or not n_forget:
            return False
        spent = torch.tensor(float(self.cost.total - self.setup_spent()), dtype=torch.float64, device=device)
        if self.collectives.world_size > 1:
            spent = self.collectives.sum(spent)
        return float(spent) >= self.max_cost * n_forget

    def state_dict(self) -> dict[str, Any]:
        return {"retain_setup": self.retain_setup}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.retain_setup = int(state["retain_setup"])


__all__ = ["CostBound"]
