"""Protection against a JiT run that fails: weights are restored bit for bit, never left half-updated."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn


class WeightSnapshot:
    """A copy of every parameter and buffer of a module, restorable bit for bit.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 2)
        >>> snap = WeightSnapshot(net)
        >>> with torch.no_grad():
        ...     _ = net.weight.add_(1.0)
        >>> snap.restore(net)
        >>> snap.equals(net)
        True
    """

    def __init__(self, module: nn.Module) -> None:
        self.state = {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}

    @torch.no_grad()
    def restore(self, module: nn.Module) -> None:
        for key, tensor in module.state_dict(keep_vars=True).items():
            tensor.data.copy_(self.state[key])

    def equals(self, module: nn.Module) -> bool:
        current = module.state_dict()
        return current.keys() == self.state.keys() and all(torch.equal(current[k], self.state[k]) for k in current)


class RollbackOnError(pl.Callback):
    """Snapshot the LightningModule's weights when training starts and restore them if the run raises.

    Added automatically by :class:`~lightning_jit.module.JiTUnlearning`, so that an error in the middle of a run
    (bad batch, non-finite weights, Ctrl+C) never leaves a half-unlearned model behind.
    """

    def __init__(self) -> None:
        self._snapshot: WeightSnapshot | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._snapshot = WeightSnapshot(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._snapshot = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._snapshot is None:
            return
        self._snapshot.restore(pl_module)
        self._snapshot = None
        rank_zero_warn(
            f"JiT unlearning was interrupted by {type(exception).__name__}; the model's weights were restored to"
            " their values before the run."
        )

    def state_dict(self) -> dict[str, Any]:
        return {}
