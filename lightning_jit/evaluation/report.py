"""``UnlearningReport``: the result of :func:`~lightning_jit.evaluation.evaluate.evaluate_unlearning` and how it is
shown: a JSON-ready dict, JSON, Markdown, a PNG, and the flat figures the loggers get.

The report holds figures only; it computes nothing from models. Each figure is defined in ``docs/metrics.md``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_jit.evaluation.functional import SPLITS
from lightning_jit.io import atomic_write, json_safe, save_png


@dataclass
class UnlearningReport:
    """The result of :func:`~lightning_jit.evaluation.evaluate.evaluate_unlearning`: every figure, per model and split.

    Missing figures (a metric that was skipped) are absent from their dict, and ``notes`` says why. Show it with
    :meth:`to_markdown`, :meth:`to_json`, :meth:`plot` or :meth:`save` (all three files); :meth:`metrics` gives the flat
    ``forget/acc``-style figures a logger takes.

    Attributes:
        models: The models evaluated, among ``"original"``, ``"unlearned"``, ``"retrained"``.
        sizes: Samples per split (only the splits given).
        num_classes: Number of classes (the models' output width).
        accuracy: ``accuracy[model][split]``, top-1 accuracy in percent.
        entropy: ``entropy[model][split]``, mean prediction entropy in nats.
        mia: ``mia[model] = {"mia": fraction of forget predicted member, "attack_accuracy": ...,
            "attack_balanced_accuracy": ...}`` (needs retain and test).
        zrf: ``zrf[model]``, ZRF score against a seeded random copy of the architecture.
        retrain_match: ``retrain_match[model]`` for original and unlearned vs the retrained model: the Wilcoxon
            (paired), KS and Mann-Whitney (unpaired) tests of forget-set entropies, activation distance and JS
            divergence.
        tug_of_war: ``tug_of_war[model]`` vs the retrained model (needs retain, test and the retrained model).
        information: The forget set split by information: threshold, counts and per-group figures per model.
        timing: ``unlearning_seconds``, ``retrain_seconds`` and their ratio ``speedup`` (when known).
        settings: ``tau``, ``k``, ``seed``, ``feature_layer``.
        notes: One line per metric that was skipped or needs care, and why.
        forget_entropies: Per-sample forget-set entropies per model (for the histogram; not in :meth:`to_dict` unless
            asked for).
        forget_alpha: Per-sample alpha of the forget set.

    Example:
        >>> report = UnlearningReport(
        ...     models=["original", "unlearned"], sizes={"forget": 10}, num_classes=3,
        ...     accuracy={"original": {"forget": 100.0}, "unlearned": {"forget": 10.0}},
        ... )
        >>> report.metrics("unlearned")
        {'forget/acc': 10.0}
        >>> for line in report.to_markdown().splitlines()[2:5]:
        ...     print(line)
        | metric | good when | original | unlearned |
        |---|---|---:|---:|
        | forget accuracy (%) | ≈ retrained | 100.0 | 10.0 |
    """

    models: list[str]
    sizes: dict[str, int]
    num_classes: int
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    entropy: dict[str, dict[str, float]] = field(default_factory=dict)
    mia: dict[str, dict[str, float]] = field(default_factory=dict)
    zrf: dict[str, float] = field(default_factory=dict)
    retrain_match: dict[str, dict[str, float]] = field(default_factory=dict)
    tug_of_war: dict[str, float] = field(default_factory=dict)
    information: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, float | None] = field(default_factory=dict)
    #: The unlearning run's verified outcome (``Verification.as_dict()``), when the report knows it: its verdict is
    #: the report's first line and the figure's title.
    verification: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    forget_entropies: dict[str, list[float]] = field(default_factory=dict, repr=False)
    forget_alpha: list[float] = field(default_factory=list, repr=False)

    # -- serialisation -------------------------------------------------------------------------------------------------
    def to_dict(self, per_sample: bool = False) -> dict[str, Any]:
        """A JSON-ready dict (non-finite numbers become ``None``); ``per_sample`` adds the per-sample values."""
        out = asdict(self)
        if not per_sample:
            out.pop("forget_entropies")
            out.pop("forget_alpha")
        return json_safe(out)

    def to_json(self, path: str | os.PathLike | None = None, per_sample: bool = False) -> str:
        """The report as JSON text; also written (atomically) to ``path`` if given."""
        text = json.dumps(self.to_dict(per_sample=per_sample), indent=2, allow_nan=False)
        if path is not None:
            with atomic_write(path) as fh:
                fh.write(text + "\n")
        return text

    def metrics(self, model: str = "unlearned") -> dict[str, float]:
        """Flat ``{"forget/acc": ..., "retain/acc": ...}`` figures of one model, for loggers (finite values only)."""
        flat: dict[str, float | None] = {}
        for split, acc in self.accuracy.get(model, {}).items():
            flat[f"{split}/acc"] = acc
        for split, h in self.entropy.get(model, {}).items():
            flat[f"{split}/entropy"] = h
        if model in self.mia:
            flat["forget/mia"] = self.mia[model]["mia"]
            flat["forget/mia_attack_acc"] = self.mia[model]["attack_accuracy"]
            flat["forget/mia_attack_balanced_acc"] = self.mia[model]["attack_balanced_accuracy"]
        if model in self.zrf:
            flat["forget/zrf"] = self.zrf[model]
        for key, value in self.retrain_match.get(model, {}).items():
            flat[f"forget/{key}"] = value
        if model in self.tug_of_war:
            flat["test/tow"] = self.tug_of_war[model]
        for group in ("low", "high"):
            for key, value in self.information.get("groups", {}).get(group, {}).get(model, {}).items():
                flat[f"forget/{key}_{group}_info"] = value
        return {k: float(v) for k, v in flat.items() if v is not None and math.isfinite(v)}

    def to_markdown(self) -> str:
        """The report as Markdown: one table of metrics by model, the information split, and the notes."""
        models = self.models
        head = "| metric | good when | " + " | ".join(models) + " |"
        rule = "|---|---|" + "---:|" * len(models)
        rows: list[str] = []

        def row(name: str, good: str, values: dict[str, Any], fmt: str = "{:.1f}") -> None:
            if any(values.get(m) is not None for m in models):
                cells = [_fmt(values.get(m), fmt) for m in models]
                rows.append(f"| {name} | {good} | " + " | ".join(cells) + " |")

        for split in SPLITS:
            good = "≈ retrained" if split == "forget" else "high"
            row(f"{split} accuracy (%)", good, {m: self.accuracy.get(m, {}).get(split) for m in models})
        for split in SPLITS:
            good = "≈ retrained" if split == "forget" else "≈ original"
            row(f"{split} entropy (nats)", good, {m: self.entropy.get(m, {}).get(split) for m in models}, "{:.3f}")
        row(
            "MIA: forget predicted member",
            "≈ retrained (low)",
            {m: self.mia.get(m, {}).get("mia") for m in models},
            "{:.3f}",
        )
        row(
            "MIA attack accuracy (own data)",
            "see balanced",
            {m: self.mia.get(m, {}).get("attack_accuracy") for m in models},
            "{:.3f}",
        )
        row(
            "MIA attack balanced accuracy",
            "> 0.5 (else MIA is void)",
            {m: self.mia.get(m, {}).get("attack_balanced_accuracy") for m in models},
            "{:.3f}",
        )
        row("ZRF vs random model", "≈ retrained (high)", self.zrf, "{:.3f}")
        row("Tug of War vs retrained", "high (1 = match)", self.tug_of_war, "{:.3f}")
        for key, label, good in (
            ("activation_distance", "activation distance to retrained", "low"),
            ("js_divergence", "JS divergence to retrained (bits)", "low"),
            ("wilcoxon_pvalue", "Wilcoxon p vs retrained (paired)", "high"),
            ("ks_pvalue", "KS p vs retrained (unpaired)", "high"),
            ("mannwhitney_pvalue", "Mann-Whitney p vs retrained", "high"),
        ):
            fmt = "{:.3g}" if "pvalue" in key else "{:.4f}"
            row(label, good, {m: self.retrain_match.get(m, {}).get(key) for m in models}, fmt)
        seconds = {"unlearned": self.timing.get("unlearning_seconds"), "retrained": self.timing.get("retrain_seconds")}
        row("time (s)", "low", seconds, "{:.2f}")

        sizes = ", ".join(f"{n} {s}" for s, n in self.sizes.items())
        lines = [f"Samples: {sizes}; {self.num_classes} classes.", "", head, rule, *rows]
        if self.verdict is not None:
            lines = [f"**{self.verdict}**", "", *lines]
        speedup = self.timing.get("speedup")
        if speedup:
            pace = f"{speedup:.1f}x faster than" if speedup >= 1 else f"{1 / speedup:.1f}x slower than"
            lines += ["", f"Unlearning was {pace} retraining."]
        info = self.information
        if info.get("groups"):
            lines += [
                "",
                f"Forget set by information (alpha over k={info['k']} neighbours in {info['space']};"
                f" high information: alpha < tau = {info['tau']}):",
                "",
                "| group | n | "
                + " | ".join(f"{m} forget acc (%)" for m in models)
                + " | "
                + " | ".join(f"{m} MIA" for m in models if m in self.mia)
                + " |",
                "|---|---:|" + "---:|" * (len(models) + sum(m in self.mia for m in models)),
            ]
            for group, label in (("low", "low information"), ("high", "high information")):
                per = info["groups"][group]
                cells = [_fmt(per.get(m, {}).get("acc"), "{:.1f}") for m in models]
                cells += [_fmt(per.get(m, {}).get("mia"), "{:.3f}") for m in models if m in self.mia]
                lines.append(f"| {label} | {info['counts'][group]} | " + " | ".join(cells) + " |")
        if self.notes:
            lines += ["", "Notes:", *[f"- {n}" for n in self.notes]]
        return "\n".join(lines) + "\n"

    @property
    def verdict(self) -> str | None:
        """The unlearning run's one-line verdict (e.g. ``"forgotten: 0.0% of 127 forget samples still recognised
        (target 2.5%)"``), or ``None`` when the report was not given the run's verification."""
        return None if self.verification is None else self.verification.get("verdict")

    def plot(self, path: str | os.PathLike) -> Path:
        """Draw the report as a PNG: forget-set entropy histograms per model, accuracy bars per split and model,
        and forget accuracy by information group (when computed). Written atomically; returns the path."""
        from matplotlib.figure import Figure

        groups = self.information.get("groups")
        panels = 3 if groups else 2
        fig = Figure(figsize=(5.2 * panels, 4.0), layout="constrained")
        axes = fig.subplots(1, panels)
        colors = {"original": "#4c72b0", "unlearned": "#dd8452", "retrained": "#55a868"}
        if self.verdict is not None:
            fig.suptitle(self.verdict)

        ax = axes[0]
        values = {m: v for m, v in self.forget_entropies.items() if len(v)}
        top = max((max(v) for v in values.values()), default=1.0)
        bins = np.linspace(0.0, max(top, 1e-3) * 1.02, 31).tolist()
        for m, v in values.items():
            ax.hist(v, bins=bins, alpha=0.5, label=m, color=colors.get(m))
        ax.set_title("Forget-set prediction entropy")
        ax.set_xlabel("entropy (nats)")
        ax.set_ylabel("samples")
        ax.legend()

        ax = axes[1]
        splits = [s for s in SPLITS if s in self.sizes]
        width = 0.8 / max(len(self.models), 1)
        for i, m in enumerate(self.models):
            accs = [self.accuracy.get(m, {}).get(s, float("nan")) for s in splits]
            xs = [j + (i - (len(self.models) - 1) / 2) * width for j in range(len(splits))]
            bars = ax.bar(xs, accs, width, label=m, color=colors.get(m))
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(splits)), [f"{s}\n(n={self.sizes[s]})" for s in splits])
        ax.set_ylim(0, 125)
        ax.set_ylabel("accuracy (%)")
        ax.set_title("Accuracy per split")
        ax.legend(loc="upper center", ncol=len(self.models), fontsize=8)

        if groups:
            ax = axes[2]
            names = ["low", "high"]
            for i, m in enumerate(self.models):
                accs = [groups[g].get(m, {}).get("acc") for g in names]
                accs = [float("nan") if a is None else a for a in accs]
                xs = [j + (i - (len(self.models) - 1) / 2) * width for j in range(2)]
                bars = ax.bar(xs, accs, width, label=m, color=colors.get(m))
                ax.bar_label(bars, fmt="%.0f", fontsize=7)
            counts = self.information["counts"]
            ax.set_xticks(
                range(2),
                [
                    f"low information\nalpha >= {self.information['tau']} (n={counts['low']})",
                    f"high information\nalpha < {self.information['tau']} (n={counts['high']})",
                ],
            )
            ax.set_xlim(-0.6, 1.6)
            ax.set_ylim(0, 125)
            for j, g in enumerate(names):
                if counts[g] == 0:
                    ax.text(j, 5, "no samples", ha="center", fontsize=8, color="gray")
            ax.set_ylabel("forget accuracy (%)")
            ax.legend(loc="upper center", ncol=len(self.models), fontsize=8)
            ax.set_title("Forget set by information of the sample")
        return save_png(fig, path)

    def save(self, directory: str | os.PathLike) -> dict[str, Path]:
        """Write ``report.json``, ``report.md`` and ``report.png`` into ``directory``; return their paths."""
        directory = Path(directory)
        paths = {
            "json": directory / "report.json",
            "markdown": directory / "report.md",
            "png": directory / "report.png",
        }
        self.to_json(paths["json"])
        with atomic_write(paths["markdown"]) as fh:
            fh.write(self.to_markdown())
        self.plot(paths["png"])
        return paths


def _fmt(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return fmt.format(value)


__all__ = ["UnlearningReport"]
