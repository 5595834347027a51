"""Every Python snippet of the README runs as written, on digits, with its placeholders defined."""

from __future__ import annotations

import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_jit.demo.data import DigitsCNN, class_mask, train_classifier

ROOT = Path(__file__).resolve().parents[1]
SNIPPETS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


@pytest.fixture
def placeholders(digits, tmp_path, monkeypatch):
    """What the snippets leave to the reader: a trained checkpoint of the user's class, the forget set, the deletion
    requests as ``(x, y, id)``, a model and its training loader."""
    monkeypatch.chdir(tmp_path)
    model = train_classifier(DigitsCNN, digits.x_train, digits.y_train, epochs=5, seed=0)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint("trained.ckpt")
    forget = class_mask(digits.y_train, [3])
    ids = torch.nonzero(forget).flatten()
    records = torch.randperm(len(digits.y_train), generator=torch.Generator().manual_seed(0))[:300]
    return {
        "val_loader": DataLoader(TensorDataset(digits.x_test, digits.y_test), batch_size=128),
        "user_records": TensorDataset(digits.x_train[records], digits.y_train[records]),
        "MyClassifier": DigitsCNN,
        "forget_set": TensorDataset(digits.x_train[forget], digits.y_train[forget]),
        "requests": TensorDataset(digits.x_train[ids], digits.y_train[ids], ids),
        "model": model,
        "train_loader": DataLoader(TensorDataset(digits.x_train[~forget], digits.y_train[~forget]), batch_size=64),
    }


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index, placeholders, capsys):
    namespace = dict(placeholders)
    exec(compile(SNIPPETS[index], f"README.md snippet {index}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "forgotten" in printed  # each snippet prints a verified outcome: it ran to the end


def test_the_readme_has_snippets():
    assert len(SNIPPETS) >= 2
