"""The cost bound: ``max_cost`` samples through the model per forget sample, beyond the run's fixed set-up."""

from __future__ import annotations

from typing import Any

import torch

from lightning_jit.core.cost import CostCounter
from lightning_jit.core.run.collectives import Collectives

#: The kinds of work every process repeats in full when the processes share out one global batch (``split="shard"``):
#: the class probes' and the retain samples' distillation (each process takes the same probes, as many as the global
#: batch asks for) and the guard's checks (the first global forget batch, the noise and the class probes). The bound
#: counts them once; the forget set's work (``clean``, ``perturbed``, ``penalty``, ``stopping_rule``,
#: ``verification``), done on each process's share, is summed over the processes.
REPLICATED = ("probes", "retain", "guard")


class CostBound:
    """Whether a run has spent its ``max_cost``.

    Not the forget set's work, so not counted: the set-up (the survey, the step-size calibration, the probes'
    synthesis and the retain loader's first read), and the passes over held-out data (the held-out test, and the
    guard's checks when it watches a monitor), which a large held-out split would otherwise spend the bound on.

    Under DDP the bound sees what one process would spend on the same global batches: each process's share of the
    forget set's work is summed, and the work every process repeats in full (:data:`REPLICATED`, when the processes
    shard one global batch) is counted once. With a ``DistributedSampler`` (``split="local"``) every process's work
    is its own local batch's and all of it is summed: the probes a step takes grow with the local batch, so their sum
    is what one process would take for the union of the local batches.

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

    def replicated(self) -> int:
        """The samples of this process's work beyond the set-up that every process repeats in full (0 for one
        process, or with ``split="local"``)."""
        coll = self.collectives
        if coll.world_size <= 1 or coll.split != "shard":
            return 0
        kinds = [kind for kind in REPLICATED if not (kind == "guard" and self.watches_monitor)]
        return sum(self.cost.counts[kind] for kind in kinds) - self.retain_setup

    def spent(self, device: torch.device | None = None) -> float:
        """The samples the run spent beyond its set-up, over all processes, with replicated work counted once.

        Example:
            >>> cost = CostCounter()
            >>> two = Collectives(world_size=2, split="shard", sum=lambda t: 2 * t)  # two processes that agree
            >>> cost.counts["perturbed"], cost.counts["probes"], cost.counts["guard"] = 40, 12, 5
            >>> CostBound(10, cost, collectives=two).spent()  # 2 * 40 + 12 + 5
            97.0
        """
        coll = self.collectives
        replicated = self.replicated()
        own = self.cost.total - self.setup_spent() - replicated
        if coll.world_size <= 1:
            return float(own)
        both = coll.sum(torch.tensor([float(own), float(replicated)], dtype=torch.float64, device=device))
        return float(both[0]) + float(both[1]) / coll.world_size  # the processes' equal counts, once

    def over(self, n_forget: int | None, device: torch.device | None = None) -> bool:
        """Whether the run has spent ``max_cost`` samples per forget sample (over all processes, replicated work
        once) beyond its set-up."""
        if self.max_cost is None or not n_forget:
            return False
        return self.spent(device) >= self.max_cost * n_forget

    def state_dict(self) -> dict[str, Any]:
        return {"retain_setup": self.retain_setup}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.retain_setup = int(state["retain_setup"])


__all__ = ["REPLICATED", "CostBound"]
