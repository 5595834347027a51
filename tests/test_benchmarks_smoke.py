"""Tiny configurations of the speed benchmark and the GPU check, so that they cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench_defaults, bench_fit, bench_objective, bench_plain_fit
from benchmarks.breakdown import LOOP, Breakdown
from benchmarks.reference_port import reference_step
from lightning_jit import jit_objective

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_objective_tiny_run_reports_every_method(tmp_path):
    out = tmp_path / "rows.json"
    rows = bench_objective.main(
        ["--models", "digits", "--batches", "2", "--n", "3", "--repeats", "2", "--chunks", "4", "--json", str(out)]
    )
    methods = {r.method for r in rows}
    assert methods == {"library", "library[chunk=4]", "reference", "floor"}
    assert all(r.samples_per_s > 0 and r.batch == 2 and r.n == 3 for r in rows)
    assert len(json.loads(out.read_text())) == len(rows)
    (ratios,) = bench_objective.ratios(rows).values()
    assert set(ratios) == {"library/reference", "library/floor"}


@pytest.mark.slow
def test_bench_defaults_tiny_run_times_both_settings():
    result = bench_defaults.main(["--rounds", "1", "--epochs", "1"])
    assert set(result) == {"plain JiT", "defaults", "ratio"}
    assert result["plain JiT"] > 0 and result["ratio"] == result["defaults"] / result["plain JiT"]


@pytest.mark.slow
def test_bench_fit_times_both_methods_on_every_case():
    rows = bench_fit.main(["--rounds", "1"])
    assert [(r["forget"], r["batch"]) for r in rows] == [(n, b) for _, n, b in bench_fit.CASES]
    assert all(r["library_s"] > 0 and r["reference_s"] > 0 and r["outcomes"] for r in rows)
    # The fixed cost is a part of a timed fit: positive (every request surveys and verifies) and less than all of it.
    assert all(0 < r["fixed_s"] < r["timed_fit_s"] for r in rows)


@pytest.mark.slow
def test_bench_plain_fit_times_both_methods_and_breaks_the_fit_down(capsys):
    rows = bench_plain_fit.main(["--samples", "8", "--batches", "4", "--rounds", "1"])
    assert [r["batch"] for r in rows] == [4]
    assert rows[0]["speedup"] == rows[0]["reference_s"] / rows[0]["library_s"]
    out = capsys.readouterr().out
    assert "(2 steps)" in out and "warning" not in out  # one step per batch: no stopping rule ended the pass
    assert "| backward |" in out and "| **whole fit** |" in out


@pytest.mark.slow
def test_breakdown_times_a_real_fit_and_puts_everything_back():
    """The timed components of a real fit: the model's passes and Lightning's loop are there, no component's own time
    is negative, and the patched functions are the originals again afterwards."""
    from lightning.pytorch import LightningModule
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_jit import JiTUnlearning
    from lightning_jit.core import engine
    from lightning_jit.core.cost import CostCounter
    from lightning_jit.core.state import gradients_finite
    from lightning_jit.lightning.trainer import quiet_trainer

    kind = CostCounter.kind
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    data = DataLoader(TensorDataset(torch.randn(8, 1, 4, 4), torch.zeros(8, dtype=torch.long)), batch_size=4)
    wrapper = JiTUnlearning(net, bench_plain_fit.plain_settings().replace(n_perturbations=3))
    with Breakdown() as parts:
        quiet_trainer(max_epochs=-1).fit(wrapper, data)
    assert "log" not in vars(JiTUnlearning) and JiTUnlearning.log is LightningModule.log
    assert engine.gradients_finite is gradients_finite and CostCounter.kind is kind
    for part in ("perturbed passes, noise and ratios", "clean forward (with autograd)", "backward", LOOP):
        assert parts.seconds[part] > 0
    assert min(parts.seconds.values()) >= 0


def test_benchmark_compares_the_same_objective():
    """The library and the reference port time the same quantity: with the same noise, the same loss ("sum")."""
    torch.manual_seed(0)
    model = bench_objective.build_model("digits").eval()
    x = torch.randn(3, 1, 8, 8)
    torch.manual_seed(1)
    want = reference_step(model, x, 0.1, 4)  # draws randn(x.shape) on the CPU per perturbation
    torch.manual_seed(1)
    got = jit_objective(model, x, 0.1, 4, reduction="sum", clamp="batch", perturbation_chunk=None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_gpu_check_script_runs_on_cpu(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_TIMEOUT="280")
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["failed"] == []
    assert set(summary["checks"]) == {"bf16_forgets_like_32", "fp16_scaler_skip", "ddp_equals_single"}
    assert summary["checks"]["fp16_scaler_skip"]["skipped_and_scale_with_bad_batch"][0] >= 1
    assert {(r["precision"], r["method"]) for r in summary["bench"]} == {
        (p, m) for p in ("32-true", "bf16-mixed") for m in ("library", "reference", "floor")
    }
    assert (tmp_path / "gpu_check.md").read_text().startswith("# lightning-jit GPU check: cpu")


@pytest.mark.slow
def test_bench_samples_quick_run_judges_every_row_against_retraining(tmp_path, monkeypatch):
    from benchmarks import bench_samples
    from benchmarks import datasets as D

    monkeypatch.setattr(D, "CACHE_DIR", tmp_path / "cache")
    summary = bench_samples.main(["--quick", "--out", str(tmp_path / "out")])
    rows = [json.loads(line) for line in (tmp_path / "out" / "rows.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == {"original", "retrained", "library", "library, no held-out"}
    assert all(r["outcome"] == "unverifiable" for r in rows if r["method"] == "library, no held-out")
    assert "| **all** |" in summary and (tmp_path / "out" / "summary.md").exists()
