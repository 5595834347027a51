"""What every benchmark does before it measures: one CPU thread, quiet logs, an output folder with an empty
``rows.jsonl`` (rows are appended as they are measured)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch


def start_benchmark(out: str | Path) -> Path:
    """One thread, Lightning's and Python's warnings off, ``out`` made; returns ``out/rows.jsonl``, emptied."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    rows_path = folder / "rows.jsonl"
    rows_path.write_text("")
    return rows_path
