"""lightning-jit: JiT zero-shot machine unlearning for PyTorch Lightning."""

from lightning_jit.config import JiTConfig
from lightning_jit.module import JiTUnlearning
from lightning_jit.objective import JiTInputError, jit_objective

__version__ = "0.1.0"

__all__ = ["JiTConfig", "JiTInputError", "JiTUnlearning", "jit_objective", "__version__"]
