"""The Lightning fronts of the run engine: the wrapper, the callback, and what they share (strategies, checkpoints,
the deletion ledger)."""

from lightning_jit.lightning.callback import JiTUnlearningCallback
from lightning_jit.lightning.checkpoint import AtomicCheckpointIO
from lightning_jit.lightning.module import JiTUnlearning
from lightning_jit.lightning.trainer import quiet_trainer

__all__ = ["AtomicCheckpointIO", "JiTUnlearning", "JiTUnlearningCallback", "quiet_trainer"]
