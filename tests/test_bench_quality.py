"""The quality benchmark's building blocks on a tiny configuration: catches breakage, asserts no quality figure."""

from __future__ import annotations

from benchmarks import bench_quality


def test_bench_quality_quick_runs_every_row(tmp_path):
    table = bench_quality.main(["--quick", "--seeds", "1", "--classes", "3", "--out", str(tmp_path)])
    for method in bench_quality.METHODS:
        assert f"| full-class 3 | {method}" in table
    assert (tmp_path / "quality.md").read_text() == table
    assert (tmp_path / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_improved_settings_use_the_kept_improvements():
    """The improvements the benchmark keeps are really switched on in the settings it runs."""
    for settings in bench_quality.IMPROVED.values():
        assert settings["normalize_logits"] is True
        assert settings["logit_norm_penalty"] == 10.0
        assert settings["probe_distillation"] == 1.0
    assert bench_quality.IMPROVED["full-class"]["target_forget_accuracy"] is not None
    assert bench_quality.IMPROVED["sub-class"]["logit_norm_sigma"] == 0.5


def test_reference_tuning_picks_best_tug_of_war():
    def row(forget, retained, pvalue=0.5, time_fraction=0.1):
        return bench_quality.Row(forget, forget, retained, 5.0, pvalue, time_fraction)

    gold = row(0.0, 98.0, 1.0, 1.0)
    close = row(2.0, 96.0)
    far = row(0.0, 60.0)
    assert bench_quality._tow(close, gold) > bench_quality._tow(far, gold)
    assert abs(bench_quality._tow(close, gold) - 0.98 * 0.98) < 1e-12
