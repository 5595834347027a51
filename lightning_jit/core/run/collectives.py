"""How the processes of a run split the batches and agree, and the small helpers every stage of a run shares."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_jit.core.batch import ModelInput, batch_size, index

#: A factory of the context the forward passes run under (e.g. the precision plugin's autocast), or ``None``.
ForwardContext = Callable[[], contextlib.AbstractContextManager[Any]] | None


def same(value: Any) -> Any:
    """The identity: what a collective is on one process."""
    return value


@dataclass
class Collectives:
    """How the processes of a run split the batches and agree; the defaults are those of one process.

    Args:
        world_size: Number of processes.
        rank: This process's rank.
        split: ``"shard"``: every process receives the same global batch and uses its contiguous share of it, so the
            result does not depend on the number of processes. ``"local"``: each process holds its own batch (a
            ``DistributedSampler``); the global batch is their union. ``None`` for one process.
        all_true: Whether a condition holds on every process (e.g. ``reduce_boolean_decision(ok, all=True)``).
        any_true: Whether it holds on some process.
        sum: Sums a tensor over the processes.
        gather: All-gathers a tensor (for the probes' classes and scale with ``split="local"``).

    Example:
        >>> coll = Collectives()
        >>> coll.world_size, coll.all_true(True), gather(coll, torch.ones(2)).tolist()
        (1, True, [1.0, 1.0])
    """

    world_size: int = 1
    rank: int = 0
    split: Literal["shard", "local"] | None = None
    all_true: Callable[[bool], bool] = same
    any_true: Callable[[bool], bool] = same
    sum: Callable[[Tensor], Tensor] = same
    gather: Callable[[Tensor], Tensor] | None = None


def gather(coll: Collectives, values: Tensor) -> Tensor:
    """Every process's ``values`` (1-D), concatenated in rank order, on every process (through ``coll.sum``)."""
    if coll.world_size <= 1:
        return values
    counts = torch.zeros(coll.world_size, dtype=torch.float64, device=values.device)
    counts[coll.rank] = values.numel()
    counts = coll.sum(counts)
    offset = int(counts[: coll.rank].sum())
    out = torch.zeros(int(counts.sum()), dtype=torch.float64, device=values.device)
    out[offset : offset + values.numel()] = values.double()
    return coll.sum(out)


def take_shard(
    x: ModelInput, labels: Tensor | None, keys: list[Any] | None, rank: int, world_size: int
) -> tuple[ModelInput, Tensor | None, list[Any] | None]:
    """Rank ``rank``'s contiguous share of a global batch: ``ceil(B / world_size)`` samples (fewer for the last;
    a dict or tuple input field by field).

    Example:
        >>> x, labels, _ = take_shard(torch.arange(5), torch.arange(5), None, rank=1, world_size=2)
        >>> x.tolist(), labels.tolist()
        ([3, 4], [3, 4])
    """
    n = batch_size(x)
    per_rank = -(-n // max(1, int(world_size)))
    start, stop = rank * per_rank, min(n, (rank + 1) * per_rank)
    start = min(start, stop)
    return (
        index(x, slice(start, stop)),
        labels[start:stop] if labels is not None and labels.shape[0] == n else labels,
        keys[start:stop] if keys is not None else None,
    )


def to_device(batch: Any, device: torch.device) -> Any:
    """Move the tensors of a batch to ``device`` (tuples, lists and dicts are rebuilt). The core is pure torch, so
    this stands in for Lightning's ``move_data_to_device``.

    Example:
        >>> to_device({"x": [torch.ones(1)], "id": "a"}, torch.device("cpu"))
        {'x': [tensor([1.])], 'id': 'a'}
    """
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, list):
        return [to_device(b, device) for b in batch]
    if isinstance(batch, tuple):
        return tuple(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def within(forward_context: ForwardContext) -> contextlib.AbstractContextManager[Any]:
    """A fresh context from ``forward_context``, or a context that does nothing."""
    return forward_context() if forward_context is not None else contextlib.nullcontext()


def cpu_generator(seed: int | None) -> torch.Generator | None:
    """A CPU generator seeded with ``seed``, or ``None`` without a seed."""
    return torch.Generator().manual_seed(seed) if seed is not None else None


__all__ = ["Collectives", "ForwardContext", "cpu_generator", "gather", "same", "take_shard", "to_device", "within"]
