"""lightning-jit: JiT zero-shot machine unlearning for PyTorch Lightning."""

from lightning_jit.callback import JiTUnlearningCallback
from lightning_jit.config import PLAIN_JIT, JiTConfig
from lightning_jit.evaluate import UnlearningEvaluation, UnlearningReport, evaluate_unlearning
from lightning_jit.guard import CollapseGuard, JiTDivergenceError
from lightning_jit.io import AtomicCheckpointIO
from lightning_jit.module import JiTUnlearning
from lightning_jit.objective import JiTInputError, jit_objective
from lightning_jit.tune import TuneResult, tune_jit

__version__ = "0.1.0"

__all__ = [
    "AtomicCheckpointIO",
    "CollapseGuard",
    "JiTConfig",
    "JiTDivergenceError",
    "JiTInputError",
    "JiTUnlearning",
    "JiTUnlearningCallback",
    "PLAIN_JIT",
    "UnlearningEvaluation",
    "TuneResult",
    "UnlearningReport",
    "__version__",
    "evaluate_unlearning",
    "jit_objective",
    "tune_jit",
]
