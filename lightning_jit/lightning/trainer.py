"""A quiet Trainer for work the library does on the user's behalf (demo, tuning trials, benchmarks)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """A ``pl.Trainer`` for work done on the user's behalf: one CPU device, no logger, checkpoints, progress bar or
    model summary, and none of Lightning's start-up lines (devices, tips). Any argument overrides these defaults.

    Example:
        >>> quiet_trainer(max_epochs=2).max_epochs
        2
    """
    import logging

    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = logger.level
    logger.setLevel(logging.WARNING)  # "GPU available", "TPU available", tips: info lines a trial must not print
    try:
        return pl.Trainer(**{**defaults, **kwargs})
    finally:
        logger.setLevel(level)
