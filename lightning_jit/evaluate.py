"""``evaluate_unlearning(...)``: every standard unlearning metric in one report (dict, JSON, Markdown, PNG).

The report compares the original, the unlearned and (optionally) the retrained-from-scratch model on the forget,
retain and test splits, with the metrics of :mod:`lightning_jit.metrics` (DESIGN.md section 2), and splits the
forget-set figures by the information of each sample (:mod:`lightning_jit.information`), which makes the JiT paper's
central claim -- high-information samples are harder to forget -- checkable on the user's own model.

:class:`UnlearningEvaluation` is a Lightning callback that runs the same evaluation at the end of an unlearning run,
logs the figures to the Trainer's loggers under ``forget/``, ``retain/`` and ``test/`` and writes the report files
into the Trainer's log directory.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn

from lightning_jit.information import check_tau, layer_features, sample_information, split_by_information
from lightning_jit.io import atomic_write, json_safe, save_png
from lightning_jit.metrics import (
    SPLITS,
    EntropyMIA,
    ForgetAccuracy,
    PredictionEntropy,
    RetrainMatch,
    SplitAccuracy,
    TugOfWar,
    ZRFScore,
    activation_distance,
    random_copy,
    warn_if_useless_attack,
)
from lightning_jit.objective import select_output

#: A split: a DataLoader (or any iterable of ``(x, y, ...)`` / ``{"x": ..., "y": ...}`` batches) or an ``(x, y)`` pair.
Split = Iterable[Any] | tuple[Tensor, Tensor]

_X_KEYS = ("x", "input", "inputs", "image", "images")
_Y_KEYS = ("y", "label", "labels", "target", "targets")
_RANDOM = "random"


# ----------------------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class UnlearningReport:
    """The result of :func:`evaluate_unlearning`.

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

    def plot(self, path: str | os.PathLike) -> Path:
        """Draw the report as a PNG: forget-set entropy histograms per model, accuracy bars per split and model,
        and forget accuracy by information group (when computed). Written atomically; returns the path."""
        from matplotlib.figure import Figure

        groups = self.information.get("groups")
        panels = 3 if groups else 2
        fig = Figure(figsize=(5.2 * panels, 4.0), layout="constrained")
        axes = fig.subplots(1, panels)
        colors = {"original": "#4c72b0", "unlearned": "#dd8452", "retrained": "#55a868"}

        ax = axes[0]
        values = {m: v for m, v in self.forget_entropies.items() if len(v)}
        top = max((max(v) for v in values.values()), default=1.0)
        bins = torch.linspace(0.0, max(top, 1e-3) * 1.02, 31).tolist()
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


# ----------------------------------------------------------------------------------------------------------------------
# Running the models over the splits
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class _SplitOutputs:
    logits: dict[str, Tensor]
    y: Tensor
    features: Tensor | None


def _batch_xy(batch: Any, name: str) -> tuple[Tensor, Tensor]:
    x = y = None
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        x, y = batch[0], batch[1]
    elif isinstance(batch, dict):
        x = next((batch[k] for k in _X_KEYS if k in batch), None)
        y = next((batch[k] for k in _Y_KEYS if k in batch), None)
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise MisconfigurationException(
            f"Cannot find inputs and labels in a `{name}` batch of type {type(batch).__name__}: batches must be"
            f" `(x, y, ...)` tuples or dicts with keys among {_X_KEYS} and {_Y_KEYS}."
        )
    return x, y


def _iter_split(split: Split, name: str, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    if isinstance(split, (tuple, list)) and len(split) == 2 and all(isinstance(t, Tensor) for t in split):
        x, y = split
        if x.shape[0] != y.shape[0]:
            raise MisconfigurationException(
                f"`{name}` has {x.shape[0]} inputs but {y.shape[0]} labels: an `(x, y)` pair needs one label per input."
            )
        for start in range(0, x.shape[0], batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]
        return
    if isinstance(split, Tensor) or not isinstance(split, Iterable):
        raise MisconfigurationException(
            f"`{name}` must be a DataLoader (or iterable of batches) or an `(x, y)` pair of tensors,"
            f" got {type(split).__name__}."
        )
    for batch in split:
        yield _batch_xy(batch, name)


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@torch.no_grad()
def _run_split(
    models: dict[str, nn.Module],
    split: Split,
    name: str,
    batch_size: int,
    feature_fn: Any,
    want_features: bool,
    num_classes: int | None,
) -> _SplitOutputs:
    logits: dict[str, list[Tensor]] = {m: [] for m in models}
    labels: list[Tensor] = []
    features: list[Tensor] = []
    for x, y in _iter_split(split, name, batch_size):
        if x.shape[0] == 0:
            continue
        if y.dim() != 1 or y.shape[0] != x.shape[0] or torch.is_floating_point(y):
            raise MisconfigurationException(
                f"`{name}` labels must be a 1-D integer tensor with one class index per sample, got {tuple(y.shape)}"
                f" ({y.dtype})."
            )
        widths = {}
        for m, model in models.items():
            try:
                out = select_output(model(x.to(_device_of(model))))
            except (RuntimeError, TypeError) as err:  # e.g. inputs of the wrong shape for the model: name the split
                raise MisconfigurationException(
                    f"The {m} model cannot run on the `{name}` split: inputs of shape {tuple(x.shape)} and dtype"
                    f" {x.dtype} ({err}). Pass `{name}` data in the form the models were trained on."
                ) from err
            if not isinstance(out, Tensor) or out.dim() != 2:
                raise MisconfigurationException(
                    f"The {m} model must return (batch, classes) logits, got {getattr(out, 'shape', type(out))}."
                )
            widths[m] = out.shape[1]
            logits[m].append(out.detach().float().cpu())
        if len(set(widths.values())) > 1:
            raise MisconfigurationException(
                f"The models have different output widths {widths}: original, unlearned and retrained models must"
                " classify into the same classes (the retrained model keeps the forgotten class's output)."
            )
        width = next(iter(widths.values()))
        if num_classes is not None and width != num_classes:
            raise MisconfigurationException(
                f"`num_classes={num_classes}` but the models output {width} classes. Pass the models' class count."
            )
        if int(y.min()) < 0 or int(y.max()) >= width:
            raise MisconfigurationException(
                f"The `{name}` split has labels in [{int(y.min())}, {int(y.max())}] but the models have {width}"
                " classes: the split and the models disagree on the number of classes."
            )
        labels.append(y.cpu())
        if want_features:
            f = feature_fn(x) if feature_fn is not None else x
            features.append(f.detach().reshape(x.shape[0], -1).float().cpu())
    if not labels:
        raise MisconfigurationException(
            f"The `{name}` split is empty: it has no samples. Pass a non-empty split, or `None` to skip its metrics."
        )
    return _SplitOutputs(
        logits={m: torch.cat(v) for m, v in logits.items()},
        y=torch.cat(labels),
        features=torch.cat(features) if want_features else None,
    )


def predict_split(model: nn.Module, split: Split, name: str = "split", batch_size: int = 512) -> tuple[Tensor, Tensor]:
    """The model's logits (float32, on the CPU, eval mode) and the labels of a labelled split.

    Args:
        model: The classifier.
        split: A loader (or iterable) of ``(x, y, ...)`` / dict batches, or an ``(x, y)`` pair of tensors.
        name: The split's name, for error messages.
        batch_size: Batch size when ``split`` is an ``(x, y)`` pair.

    Example:
        >>> logits, y = predict_split(torch.nn.Linear(4, 3), (torch.randn(5, 4), torch.zeros(5, dtype=torch.long)))
        >>> tuple(logits.shape), tuple(y.shape)
        ((5, 3), (5,))
    """
    with _EvalMode([model]):
        out = _run_split({"model": model}, split, name, batch_size, None, False, None)
    return out.logits["model"], out.y


class _EvalMode:
    """Put every model in eval mode for the evaluation and restore each one's mode afterwards."""

    def __init__(self, models: Iterable[nn.Module]) -> None:
        self.models = list(models)

    def __enter__(self) -> None:
        self.modes = [m.training for m in self.models]
        for m in self.models:
            m.eval()

    def __exit__(self, *exc: object) -> None:
        for m, mode in zip(self.models, self.modes, strict=True):
            m.train(mode)


# ----------------------------------------------------------------------------------------------------------------------
# evaluate_unlearning
# ----------------------------------------------------------------------------------------------------------------------
def evaluate_unlearning(
    original: nn.Module,
    unlearned: nn.Module,
    forget: Split,
    retain: Split | None = None,
    test: Split | None = None,
    retrained: nn.Module | None = None,
    *,
    unlearning_seconds: float | None = None,
    retrain_seconds: float | None = None,
    tau: float = 0.5,
    k: int = 10,
    feature_layer: str | nn.Module | None = None,
    num_classes: int | None = None,
    seed: int = 0,
    batch_size: int = 512,
) -> UnlearningReport:
    """Evaluate an unlearned model against the original and (optionally) a model retrained without the forget set.

    Missing optional inputs skip the metrics that need them, with a note in ``report.notes``; they never raise:

    * without ``retain`` and ``test``: no MIA (it is fitted on retain vs test) and no Tug of War;
    * without ``retrained``: no retrain match and no Tug of War;
    * without ``retain``: alpha is measured among the forget samples only.

    Args:
        original: The model before unlearning. JiT changes a model in place, so this must be a copy made before
            unlearning (``copy.deepcopy(model)``), not the same object as ``unlearned``.
        unlearned: The model after unlearning.
        forget: The forget set: a DataLoader of ``(x, y, ...)`` (or ``{"x", "y"}``) batches, or an ``(x, y)`` pair.
        retain: The retain set (training data that was kept), same forms. Members for the MIA.
        test: Held-out test data, same forms. Non-members for the MIA.
        retrained: A model retrained from scratch without the forget set, the gold standard.
        unlearning_seconds: Wall-clock time of the unlearning, reported next to ``retrain_seconds``.
        retrain_seconds: Wall-clock time of the retraining.
        tau: Information threshold in ``(0, 1]``: forget samples with ``alpha < tau`` are "high information".
        k: Neighbours used for alpha.
        feature_layer: Measure alpha in the feature space of this layer of the **original** model (a name from
            ``named_modules()`` or the module itself); default: input space.
        num_classes: Expected number of classes; checked against the models' output width.
        seed: Seed of the random model used for the ZRF score.
        batch_size: Batch size for ``(x, y)`` pairs.

    Returns:
        The :class:`UnlearningReport`.

    Raises:
        MisconfigurationException: for an empty split, labels outside the models' classes, models with different
            output widths, ``tau`` outside ``(0, 1]``, ``original is unlearned``, or malformed splits.

    Example:
        >>> from lightning_jit.data import DigitsCNN
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> original, unlearned = DigitsCNN(), DigitsCNN()
        >>> x, y = torch.randn(40, 1, 8, 8), torch.randint(0, 10, (40,))
        >>> report = evaluate_unlearning(original, unlearned, (x[:10], y[:10]), (x[10:30], y[10:30]), (x[30:], y[30:]))
        >>> sorted(report.accuracy["unlearned"]), "mia" in report.mia["unlearned"], len(report.notes) > 0
        (['forget', 'retain', 'test'], True, True)
    """
    tau = check_tau(tau)
    for name, model in (("original", original), ("unlearned", unlearned), ("retrained", retrained)):
        if model is not None and not isinstance(model, nn.Module):
            raise MisconfigurationException(f"`{name}` must be a torch.nn.Module, got {type(model).__name__}.")
    if original is unlearned:
        raise MisconfigurationException(
            "`original` and `unlearned` are the same object. JiT updates a model in place: keep a copy made before"
            " unlearning (`original = copy.deepcopy(model)`) and pass that as `original`."
        )
    if retrained is not None and retrained in (original, unlearned):
        raise MisconfigurationException("`retrained` must be a separate model, retrained without the forget set.")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise MisconfigurationException(f"`k` must be a positive integer, got {k!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise MisconfigurationException(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2
    ):
        raise MisconfigurationException(f"`num_classes` must be an integer >= 2, got {num_classes!r}.")
    for name, value in (("unlearning_seconds", unlearning_seconds), ("retrain_seconds", retrain_seconds)):
        if value is not None and not (isinstance(value, (int, float)) and value >= 0):
            raise MisconfigurationException(f"`{name}` must be a non-negative number of seconds, got {value!r}.")

    models: dict[str, nn.Module] = {"original": original, "unlearned": unlearned}
    if retrained is not None:
        models["retrained"] = retrained
    notes: list[str] = []
    teacher = random_copy(unlearned, seed=seed)
    feature_fn = layer_features(original, feature_layer) if feature_layer is not None else None
    splits = {"forget": forget, "retain": retain, "test": test}

    outputs: dict[str, _SplitOutputs] = {}
    with _EvalMode([*models.values(), teacher]):
        for name, split in splits.items():
            if split is None:
                continue
            run = {**models, _RANDOM: teacher} if name == "forget" else models
            outputs[name] = _run_split(
                run,
                split,
                name,
                batch_size,
                feature_fn,
                want_features=name in ("forget", "retain"),
                num_classes=num_classes,
            )
    shapes = {n: tuple(o.features.shape[1:]) for n, o in outputs.items() if o.features is not None}
    if len(set(shapes.values())) > 1:
        raise MisconfigurationException(f"The splits have different input/feature sizes {shapes}.")
    width = outputs["forget"].logits["unlearned"].shape[1]
    names = list(models)
    report = UnlearningReport(
        models=names,
        sizes={n: int(o.y.numel()) for n, o in outputs.items()},
        num_classes=width,
        settings={"tau": tau, "k": k, "seed": seed, "feature_layer": _layer_name(feature_layer)},
        notes=notes,
    )

    # accuracy and entropy per split and model
    for m in names:
        report.accuracy[m], report.entropy[m] = {}, {}
        for split, out in outputs.items():
            acc = ForgetAccuracy() if split == "forget" else SplitAccuracy(split=split)
            acc.update(out.logits[m], out.y)
            report.accuracy[m][split] = float(acc.compute())
            ent = PredictionEntropy()
            ent.update(out.logits[m])
            report.entropy[m][split] = float(ent.compute())
            if split == "forget":
                report.forget_entropies[m] = ent.per_sample().tolist()
    forget_out = outputs["forget"]

    # entropy MIA
    attacks: dict[str, Any] = {}
    if "retain" in outputs and "test" in outputs:
        for m in names:
            mia = EntropyMIA()
            for split in SPLITS:
                mia.update(outputs[split].logits[m], split)
            res = mia.compute()
            attacks[m] = mia.attack
            report.mia[m] = {k_: float(v) for k_, v in res.items()}
            note = warn_if_useless_attack(report.mia[m]["attack_balanced_accuracy"], m)
            if note:
                notes.append(note)
    else:
        notes.append("MIA skipped: it needs both `retain` (members) and `test` (non-members) data.")

    # ZRF
    for m in names:
        zrf = ZRFScore()
        zrf.update(forget_out.logits[m], forget_out.logits[_RANDOM])
        report.zrf[m] = float(zrf.compute())

    # retrain match and Tug of War
    if retrained is not None:
        for m in ("original", "unlearned"):
            match = RetrainMatch()
            match.update(forget_out.logits[m], forget_out.logits["retrained"])
            report.retrain_match[m] = {k_: float(v) for k_, v in match.compute().items()}
        if "retain" in outputs and "test" in outputs:
            for m in ("original", "unlearned"):
                tow = TugOfWar()
                for split in SPLITS:
                    tow.update(outputs[split].logits[m], outputs[split].logits["retrained"], outputs[split].y, split)
                report.tug_of_war[m] = float(tow.compute())
        else:
            notes.append("Tug of War skipped: it needs the accuracies on `retain` and `test` as well as `forget`.")
    else:
        notes.append(
            "Retrain match (entropy tests, activation distance, JS divergence) and Tug of War skipped: no `retrained`"
            " model was given."
        )

    # information of the forget samples
    report.information = _information(outputs, names, attacks, tau, k, feature_layer, notes)
    report.forget_alpha = report.information.pop("_alpha")

    report.timing = {
        "unlearning_seconds": None if unlearning_seconds is None else float(unlearning_seconds),
        "retrain_seconds": None if retrain_seconds is None else float(retrain_seconds),
        "speedup": (
            float(retrain_seconds) / float(unlearning_seconds)
            if unlearning_seconds and retrain_seconds is not None
            else None
        ),
    }
    if unlearning_seconds is None:
        notes.append("Unlearning time unknown: pass `unlearning_seconds` to report it.")
    return report


def _layer_name(layer: str | nn.Module | None) -> str | None:
    if layer is None or isinstance(layer, str):
        return layer
    return type(layer).__name__


def _information(
    outputs: dict[str, _SplitOutputs],
    names: list[str],
    attacks: dict[str, Any],
    tau: float,
    k: int,
    feature_layer: Any,
    notes: list[str],
) -> dict[str, Any]:
    forget = outputs["forget"]
    assert forget.features is not None
    pool_x, pool_y = forget.features, forget.y
    if "retain" in outputs:
        retain = outputs["retain"]
        assert retain.features is not None
        pool_x, pool_y = torch.cat([pool_x, retain.features]), torch.cat([pool_y, retain.y])
    else:
        notes.append(
            "alpha measured among the forget samples only (no `retain` given); with a whole class forgotten every"
            " alpha is then 1. Pass `retain` for the paper's definition over the training set."
        )
    n_forget = forget.y.numel()
    space = f"the features of layer {_layer_name(feature_layer)!r}" if feature_layer is not None else "input space"
    info: dict[str, Any] = {"tau": tau, "k": k, "space": space}
    if pool_y.numel() < 2:
        notes.append("Information split skipped: alpha needs at least two samples.")
        info["_alpha"] = []
        return info
    k_used = min(k, pool_y.numel() - 1)
    if k_used != k:
        notes.append(f"alpha uses k={k_used} neighbours: only {pool_y.numel()} samples are available.")
        info["k"] = k_used
    alpha = sample_information(pool_x, pool_y, k=k_used, queries=torch.arange(n_forget))
    groups = split_by_information(alpha, tau)
    info["counts"] = {"low": int(groups.low.sum()), "high": int(groups.high.sum())}
    info["mean_alpha"] = float(alpha.mean())
    info["groups"] = {}
    for group, mask in (("low", groups.low), ("high", groups.high)):
        per: dict[str, dict[str, float | None]] = {}
        if not bool(mask.any()):
            notes.append(
                f"No forget sample has {'alpha >= tau' if group == 'low' else 'alpha < tau'} (tau={tau}):"
                f" the {group}-information group is empty."
            )
        for m in names:
            logits, y = forget.logits[m][mask], forget.y[mask]
            entry: dict[str, float | None] = {"acc": None, "entropy": None, "mia": None, "activation_distance": None}
            if y.numel():
                acc = ForgetAccuracy()
                acc.update(logits, y)
                ent = PredictionEntropy()
                ent.update(logits)
                entry["acc"], entry["entropy"] = float(acc.compute()), float(ent.compute())
                if m in attacks:
                    h = ent.per_sample().numpy().reshape(-1, 1)
                    entry["mia"] = float(attacks[m].predict(h).mean())
                if "retrained" in forget.logits and m != "retrained":
                    entry["activation_distance"] = float(
                        activation_distance(logits, forget.logits["retrained"][mask]).mean()
                    )
            per[m] = entry
        info["groups"][group] = per
    info["_alpha"] = alpha.tolist()
    return info


# ----------------------------------------------------------------------------------------------------------------------
# The callback
# ----------------------------------------------------------------------------------------------------------------------
class UnlearningEvaluation(pl.Callback):
    """Evaluate unlearning at the end of a run: log the metrics and write the report into the Trainer's log dir.

    Use it with :class:`~lightning_jit.module.JiTUnlearning` (``trainer.fit(wrapper, forget_loader)``) or with
    :class:`~lightning_jit.callback.JiTUnlearningCallback`. It keeps a CPU copy of the model's weights as the
    "original" (unless ``original`` is given, or :meth:`snapshot_original` was called): at ``on_train_start`` with the
    wrapper; with a JiT callback, right before that callback fires (place ``UnlearningEvaluation`` before it in
    ``callbacks=[...]``; with ``when="train_epoch_end"`` the snapshot is taken at the end of the first epoch). It
    times the run (or takes the JiT callback's own wall time) and, at ``on_fit_end`` (after every ``on_train_end``
    hook, so after any unlearning callback), calls :func:`evaluate_unlearning` on global rank zero.

    Lightning forbids ``self.log`` in ``on_train_end`` / ``on_fit_end``, so the figures of the unlearned model go to
    every logger of the Trainer via ``logger.log_metrics`` (at the last global step) and into
    ``trainer.callback_metrics``, named ``forget/acc``, ``forget/mia``, ``retain/acc``, ``test/acc``, ``test/tow``...
    The report is kept as ``self.report`` and written as ``report.json``, ``report.md`` and ``report.png`` into
    ``dirpath`` or else ``trainer.log_dir`` (the ``default_root_dir`` when there is no logger).

    Args:
        forget: The forget set (DataLoader or ``(x, y)``).
        retain: Optional retain set.
        test: Optional test set.
        retrained: Optional model retrained without the forget set.
        original: The model before unlearning; default: a snapshot taken before unlearning (see above).
        retrain_seconds: Time the retraining took, for the report.
        tau, k, feature_layer, num_classes, seed, batch_size: As in :func:`evaluate_unlearning`.
        dirpath: Where to write the report files; default the Trainer's log dir.
        write_files: Set ``False`` to only log.

    Example:
        >>> import lightning.pytorch as pl, tempfile
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from lightning_jit import JiTUnlearning
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        >>> x, y = torch.randn(30, 1, 4, 4), torch.randint(0, 3, (30,))
        >>> evaluation = UnlearningEvaluation(
        ...     forget=(x[:10], y[:10]), retain=(x[10:20], y[10:20]), test=(x[20:], y[20:])
        ... )
        >>> trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                      enable_model_summary=False, default_root_dir=tempfile.mkdtemp(),
        ...                      callbacks=[evaluation])
        >>> trainer.fit(JiTUnlearning(net, sigma=0.5, lr=0.01), DataLoader(TensorDataset(x[:10], y[:10]), batch_size=5))
        >>> sorted(p.name for p in evaluation.paths.values())
        ['report.json', 'report.md', 'report.png']
    """

    def __init__(
        self,
        forget: Split,
        retain: Split | None = None,
        test: Split | None = None,
        retrained: nn.Module | None = None,
        *,
        original: nn.Module | None = None,
        retrain_seconds: float | None = None,
        tau: float = 0.5,
        k: int = 10,
        feature_layer: str | None = None,
        num_classes: int | None = None,
        seed: int = 0,
        batch_size: int = 512,
        dirpath: str | os.PathLike | None = None,
        write_files: bool = True,
    ) -> None:
        if forget is None:
            raise MisconfigurationException("`forget` is required: the forget set to evaluate on.")
        self.tau = check_tau(tau)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise MisconfigurationException(f"`k` must be a positive integer, got {k!r}.")
        for name, model in (("retrained", retrained), ("original", original)):
            if model is not None and not isinstance(model, nn.Module):
                raise MisconfigurationException(f"`{name}` must be a torch.nn.Module, got {type(model).__name__}.")
        self.forget, self.retain, self.test = forget, retain, test
        self.retrained, self.original = retrained, original
        self.retrain_seconds = retrain_seconds
        self.k, self.feature_layer, self.num_classes = k, feature_layer, num_classes
        self.seed, self.batch_size = seed, batch_size
        self.dirpath = dirpath
        self.write_files = write_files
        self.report: UnlearningReport | None = None
        self.paths: dict[str, Path] = {}
        self._snapshot: dict[str, Tensor] | None = None
        self._start: float | None = None
        self._seconds: float | None = None
        self._jit_callback: Any = None
        self._snapshot_hook = "on_train_start"

    @staticmethod
    def target_model(pl_module: pl.LightningModule) -> nn.Module:
        """The model being unlearned: the wrapped model of a :class:`JiTUnlearning`, else the module itself."""
        from lightning_jit.module import JiTUnlearning

        return pl_module.model if isinstance(pl_module, JiTUnlearning) else pl_module

    def snapshot_original(self, model: nn.Module) -> None:
        """Keep a CPU copy of ``model``'s current weights as the "original" (call it right before unlearning)."""
        self._snapshot = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Find when to snapshot the original: at the start of training, or right before a JiT callback fires."""
        from lightning_jit.callback import JiTUnlearningCallback

        self._jit_callback = next((c for c in trainer.callbacks if isinstance(c, JiTUnlearningCallback)), None)
        self._snapshot_hook = "on_train_start"
        if self._jit_callback is not None and self.original is None and self._snapshot is None:
            if trainer.callbacks.index(self) > trainer.callbacks.index(self._jit_callback):
                raise MisconfigurationException(
                    "UnlearningEvaluation comes after JiTUnlearningCallback in the Trainer's callbacks, so it cannot"
                    " keep the weights from before unlearning. Put it before the JiT callback in `callbacks=[...]`"
                    " (it still evaluates after it, at `on_fit_end`), or pass `original=`."
                )
            self._snapshot_hook = {
                "fit_start": "on_train_start",
                "train_epoch_end": "on_train_epoch_end",
                "fit_end": "on_train_end",
            }[self._jit_callback.when]

    def _maybe_snapshot(self, hook: str, pl_module: pl.LightningModule) -> None:
        if hook == self._snapshot_hook and self.original is None and self._snapshot is None:
            self.snapshot_original(self.target_model(pl_module))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_snapshot("on_train_start", pl_module)
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_snapshot("on_train_epoch_end", pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_snapshot("on_train_end", pl_module)
        if self._start is not None:
            self._seconds = time.perf_counter() - self._start

    def _original_model(self, model: nn.Module) -> nn.Module:
        if self.original is not None:
            return self.original
        if self._snapshot is None:
            raise MisconfigurationException(
                "UnlearningEvaluation has no snapshot of the original weights: the training loop did not run."
                " Pass `original=` or call `snapshot_original(model)` before unlearning."
            )
        trainer = getattr(model, "_trainer", None)
        memo: dict[int, Any] = {id(trainer): None} if trainer is not None else {}
        original = copy.deepcopy(model, memo)
        original.load_state_dict(self._snapshot)
        return original

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        directory = self.dirpath if self.dirpath is not None else (trainer.log_dir or trainer.default_root_dir)
        runs = getattr(getattr(self._jit_callback, "ledger", None), "runs", None)
        if runs:  # the JiT callback's own wall time of its latest run, rather than the whole training
            self._seconds = runs[-1].get("wall_time_s", self._seconds)
        if trainer.is_global_zero:
            model = self.target_model(pl_module)
            self.report = evaluate_unlearning(
                self._original_model(model),
                model,
                self.forget,
                self.retain,
                self.test,
                self.retrained,
                unlearning_seconds=self._seconds,
                retrain_seconds=self.retrain_seconds,
                tau=self.tau,
                k=self.k,
                feature_layer=self.feature_layer,
                num_classes=self.num_classes,
                seed=self.seed,
                batch_size=self.batch_size,
            )
            metrics = self.report.metrics("unlearned")
            for ref in ("original", "retrained"):
                if ref in self.report.models:
                    metrics.update({f"{k}_{ref}": v for k, v in self.report.metrics(ref).items()})
            if self.report.timing.get("unlearning_seconds") is not None:
                metrics["unlearning/seconds"] = float(self.report.timing["unlearning_seconds"])
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
                logger.save()
            trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
            if self.write_files:
                self.paths = self.report.save(directory)
                rank_zero_info(f"Unlearning report written to {Path(directory).resolve()} (report.md, .json, .png).")
            for note in self.report.notes:
                rank_zero_info(f"Unlearning report: {note}")
        trainer.strategy.barrier("UnlearningEvaluation.on_fit_end")


__all__ = ["UnlearningEvaluation", "UnlearningReport", "evaluate_unlearning"]
