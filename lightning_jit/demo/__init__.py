"""The embedded default job (scikit-learn's digits): data, small models, and the demo ``lightning-jit demo`` runs."""

import lightning_jit.data  # noqa: F401 - the 0.1 path of these classes: checkpoints that name it load only once imported
from lightning_jit.demo.data import DigitsCNN, DigitsDataModule, load_digits_split
from lightning_jit.demo.run import run_demo

__all__ = ["DigitsCNN", "DigitsDataModule", "load_digits_split", "run_demo"]
