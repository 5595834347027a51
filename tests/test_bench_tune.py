"""The tuning benchmark's building blocks on a tiny configuration: catches breakage, asserts no quality figure."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_tune


@pytest.mark.slow
def test_bench_tune_quick_writes_every_row(tmp_path):
    table = bench_tune.main(["--quick", "--seeds", "1", "--variants", "halving", "--out", str(tmp_path)])
    assert "| library defaults (not tuned) |" in table and "| halving |" in table
    assert (tmp_path / "tune_bench.md").read_text() == table
    (job,) = json.loads((tmp_path / "tune_bench.json").read_text())
    run = job["variants"]["halving"]
    assert run["tune_seconds"] > 0 and run["cost"] == run["tune_seconds"] / run["one_run_seconds"]
