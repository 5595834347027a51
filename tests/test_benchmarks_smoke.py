"""Tiny configurations of the speed benchmark and the GPU check, so that they cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench_defaults, bench_fit, bench_objective
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
    """Every part of the GPU check, at tiny sizes on the CPU (2 gloo processes for DDP and FSDP2)."""
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_TIMEOUT="880")
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["failed"] == []
    assert set(summary["checks"]) == {
        "bf16_forgets_like_32",
        "fp16_scaler_skip",
        "ddp_equals_single",
        "fsdp2_equals_single",
        "no_knob_resnet18",
        "no_knob_vit_small",
    }
    assert summary["checks"]["fp16_scaler_skip"]["skipped_and_scale_with_bad_batch"][0] >= 1
    assert summary["checks"]["ddp_equals_single"]["devices"] == 2
    assert summary["checks"]["fsdp2_equals_single"]["devices"] == 2
    assert {(r["precision"], r["method"]) for r in summary["bench"]} == {
        (p, m) for p in ("32-true", "bf16-mixed") for m in ("library", "reference", "floor")
    }
    section = (tmp_path / "gpu_check.md").read_text()
    assert section.startswith(f"## GPU (measured {summary['date']}, cpu x2)")
    assert "| fsdp2_equals_single | PASS |" in section
    assert (tmp_path / "gpu_check.log").read_text().startswith("# lightning-jit GPU check: cpu x2")


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
