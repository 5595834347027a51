"""The forget loader the no-knob path expects: the forget set in a few shuffled batches."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_jit.core.batching import MAX_BATCH, STEPS_PER_PASS, batch_size_for


class EpochShuffle(Sampler[int]):
    """A random permutation per pass, drawn from ``(seed, epoch)`` alone: Lightning calls :meth:`set_epoch` before
    each pass, so a run resumed from a checkpoint reads its next pass in the order the uninterrupted run would have.

    Example:
        >>> sampler = EpochShuffle(5, seed=0)
        >>> first = list(sampler); sampler.set_epoch(1); second = list(sampler); sampler.set_epoch(0)
        >>> sorted(first) == [0, 1, 2, 3, 4], first == list(sampler), first != second
        (True, True, True)
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


class FirstBatches:
    """The first ``n`` batches of ``loader``, read afresh at each iteration (as a Trainer with
    ``limit_train_batches=n`` reads a pass), so that a stream without end can be surveyed and verified.

    Example:
        >>> first = FirstBatches(range(10), 3)
        >>> list(first), list(first)
        ([0, 1, 2], [0, 1, 2])
    """

    def __init__(self, loader: Iterable[Any], n: int) -> None:
        self.loader, self.n = loader, int(n)

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.loader), self.n)

    def __len__(self) -> int:
        return self.n


def forget_loader(dataset: Dataset, *, batch_size: int | None = None, seed: int = 0, **kwargs: Any) -> DataLoader:
    """A ``DataLoader`` over the forget set as the calibrated defaults were measured with: about
    :data:`~lightning_jit.core.batching.STEPS_PER_PASS` batches per pass (at most
    :data:`~lightning_jit.core.batching.MAX_BATCH` samples each), reshuffled at every pass from ``(seed, pass)``
    (:class:`EpochShuffle`, so that a resumed run reads the same batches as an uninterrupted one).

    Any loader works with :class:`~lightning_jit.lightning.module.JiTUnlearning`; this one is the documented path for a
    new model. The callback and the command line batch the forget set the same way themselves.

    Args:
        dataset: The forget set (map-style, sized).
        batch_size: Overrides the batch size.
        seed: Seed of the shuffling.
        kwargs: Other ``DataLoader`` arguments (``num_workers``, ``collate_fn``...).

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> loader = forget_loader(TensorDataset(torch.zeros(135, 4)))
        >>> loader.batch_size, len(loader)
        (17, 8)
    """
    n = len(dataset)  # type: ignore[arg-type]
    size = batch_size if batch_size is not None else batch_size_for(n)
    return DataLoader(dataset, batch_size=size, sampler=EpochShuffle(n, seed), **kwargs)


__all__ = ["MAX_BATCH", "STEPS_PER_PASS", "EpochShuffle", "FirstBatches", "forget_loader"]
