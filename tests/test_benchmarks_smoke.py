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


def test_bench_objective_ratios_are_speed_ratios_of_the_same_case():
    """Hand-made rows of two cases: each ratio divides the library's speed by the other method's, case by case."""
    speeds = {("digits", 2): {"library": 300.0, "reference": 100.0, "floor": 600.0}, ("digits", 8): {}}
    speeds[("digits", 8)] = {"library": 50.0, "reference": 200.0, "floor": 25.0, "library+compile": 75.0}
    rows = [
        bench_objective.Row("digits", batch, 3, method, 1.0, speed)
        for (_, batch), by_method in speeds.items()
        for method, speed in by_method.items()
    ]
    assert bench_objective.ratios(rows) == {
        ("digits", 2, "32-true"): {"library/reference": 3.0, "library/floor": 0.5},
        ("digits", 8, "32-true"): {"library/reference": 0.25, "library/floor": 2.0, "compile/library": 1.5},
    }


@pytest.mark.slow
def test_bench_defaults_tiny_run_times_whole_passes_of_both_settings(capsys):
    """Each timed run is one whole pass over digit 3 of the training split in batches of 32 (the count is computed
    here from the split), and both settings get a time per step."""
    from lightning_jit.demo.data import load_digits_split

    result = bench_defaults.main(["--rounds", "1", "--epochs", "1"])
    assert set(result) == {"plain JiT", "defaults", "ratio"}
    assert all(0 < value < float("inf") for value in result.values())
    batches = -(-int((load_digits_split().y_train == 3).sum()) // 32)
    printed = capsys.readouterr().out
    for name in ("plain JiT", "defaults"):
        assert f"{name}: {result[name]:.1f} ms per step (median of 1 runs of {batches} steps, whole fit)" in printed


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
    from lightning_jit.core.cost import CostCounter
    from lightning_jit.core.run import update
    from lightning_jit.core.weights import gradients_finite
    from lightning_jit.lightning.trainer import quiet_trainer

    kind = CostCounter.kind
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    data = DataLoader(TensorDataset(torch.randn(8, 1, 4, 4), torch.zeros(8, dtype=torch.long)), batch_size=4)
    wrapper = JiTUnlearning(net, bench_plain_fit.plain_settings().replace(n_perturbations=3))
    with Breakdown() as parts:
        quiet_trainer(max_epochs=-1).fit(wrapper, data)
    assert "log" not in vars(JiTUnlearning) and JiTUnlearning.log is LightningModule.log
    assert update.gradients_finite is gradients_finite and CostCounter.kind is kind
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


@pytest.mark.slow
def test_bench_generalise_token_family_runs_the_library_at_the_embedding(tmp_path, monkeypatch):
    from benchmarks import bench_generalise
    from benchmarks import datasets as D

    monkeypatch.setattr(D, "CACHE_DIR", tmp_path / "cache")
    bench_generalise.main(
        ["--quick", "--datasets", "token_digits", "--methods", "reference,library", "--out", str(tmp_path / "out")]
    )
    rows = [json.loads(line) for line in (tmp_path / "out" / "rows.jsonl").read_text().splitlines()]
    # Full-class only, the transformer only (BERT's dict batches do not reach a run), no reference (token ids take no
    # input noise): one case, its original, its retrained model and the library's run.
    assert [(r["method"], r["model"], r["kind"]) for r in rows] == [
        ("original", "transformer", "full-class"),
        ("retrained", "transformer", "full-class"),
        ("library", "transformer", "full-class"),
    ]
    lib = rows[2]
    assert lib["n_forget"] == int(
        (D.load_split("token_digits").y_train == bench_generalise.CLASSES["token_digits"][0]).sum()
    )
    assert lib["cost_vs_ref"] == pytest.approx(lib["cost"] / (28 * lib["n_forget"]))
    forgot, kept = lib["forget_test"] <= 5.0, lib["retained"] >= rows[1]["retained"] - 2.0
    assert lib["goals"] == {"goal": forgot and kept, "forgot": forgot, "kept": kept,
                            "honest": (forgot and kept) or lib["outcome"] != "forgotten"}  # fmt: skip
