"""The tuning benchmark's building blocks on a tiny configuration: catches breakage, asserts no quality figure, and
checks the recorded figures against computations of its own."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_tune
from lightning_jit.demo.data import DigitsCNN, load_digits_split, train_classifier


@pytest.mark.slow
def test_bench_tune_quick_writes_every_row(tmp_path):
    table = bench_tune.main(["--quick", "--seeds", "1", "--variants", "halving", "--out", str(tmp_path)])
    assert "| library defaults (not tuned) |" in table and "| halving |" in table
    assert (tmp_path / "tune_bench.md").read_text() == table
    (job,) = json.loads((tmp_path / "tune_bench.json").read_text())
    run = job["variants"]["halving"]
    assert run["tune_seconds"] > 0 and run["one_run_seconds"] > 0
    # The retrained model's figure: the same model retrained here without digit 0 (2 epochs, seed 0, as --quick does),
    # its accuracy on the other digits' test samples counted by hand (on one thread, as --quick trains).
    torch.set_num_threads(1)
    split = load_digits_split()
    keep = split.y_train != 0
    gold = train_classifier(DigitsCNN, split.x_train[keep], split.y_train[keep], 2, seed=0).eval()
    kept = split.y_test != 0
    with torch.no_grad():
        correct = (gold(split.x_test[kept]).argmax(1) == split.y_test[kept]).sum().item()
    assert job["retrained"]["0"] == pytest.approx(100 * correct / int(kept.sum()))
    # The table's goal count, from the recorded figures by the stated goal (forget <= 5, kept >= retrained - 2).
    met = sum(
        r["forget_test"] <= 5 and r["retained"] >= job["retrained"]["0"] - 2
        for v in job["variants"].values()
        for r in v["runs"].values()
    )
    rows = [line for line in table.splitlines() if line.startswith(("| library defaults", "| halving"))]
    assert sum(int(line.split(" | ")[-1].split(" / ")[0]) for line in rows) == met
