"""``evaluate_unlearning(...)``: run the models over the splits and compute every standard unlearning metric.

The evaluation compares the original, the unlearned and (optionally) the retrained-from-scratch model on the forget,
retain and test splits with the metrics of :mod:`lightning_jit.evaluation.metrics` (`docs/metrics.md`), and splits
the forget-set figures by the information of each sample (:mod:`lightning_jit.evaluation.information`), which makes
the JiT paper's central claim -- high-information samples are harder to forget -- checkable on the user's own model.
The result is an :class:`~lightning_jit.evaluation.report.UnlearningReport`.

Batches are read with :class:`~lightning_jit.core.batch.BatchFormat`, the reader JiT itself uses: a batch (and a model
output) that ``JiTUnlearning`` accepts with a given ``batch_format`` is accepted here with the same one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_jit.core.batch import BatchFormat, as_class_labels, batch_size, describe_input, move, tensors
from lightning_jit.core.errors import JiTInputError
from lightning_jit.core.outcome import Verification
from lightning_jit.core.weights import normalization_mode
from lightning_jit.evaluation.functional import SPLITS, activation_distance, random_copy, warn_if_useless_attack
from lightning_jit.evaluation.information import check_tau, layer_features, sample_information, split_by_information
from lightning_jit.evaluation.metrics import (
    EntropyMIA,
    ForgetAccuracy,
    PredictionEntropy,
    RetrainMatch,
    SplitAccuracy,
    TugOfWar,
    ZRFScore,
)
from lightning_jit.evaluation.report import UnlearningReport

#: A split: a DataLoader (or any iterable of batches that ``batch_format`` reads, e.g. ``(x, y, ...)`` tuples or
#: ``{"x": ..., "y": ...}`` dicts) or an ``(x, y)`` pair of tensors.
Split = Iterable[Any] | tuple[Tensor, Tensor]

#: The name of the random copy of the architecture (the ZRF teacher) among the models run on the forget split.
_RANDOM = "random"


# ----------------------------------------------------------------------------------------------------------------------
# Running the models over the splits
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class _SplitOutputs:
    logits: dict[str, Tensor]
    y: Tensor
    features: Tensor | None


def check_batch_format(batch_format: BatchFormat | None) -> BatchFormat:
    """``batch_format``, or the automatic ``BatchFormat()`` for ``None``.

    Raises:
        MisconfigurationException: if it is neither.
    """
    if batch_format is None:
        return BatchFormat()
    if not isinstance(batch_format, BatchFormat):
        raise MisconfigurationException(
            f"`batch_format` must be a lightning_jit.BatchFormat or None, got {type(batch_format).__name__}. Build it"
            " as for JiT, e.g. `BatchFormat(input_key='pixels', label_key='digit', output_selector=0)`."
        )
    return batch_format


def _is_pair(split: Any) -> bool:
    return isinstance(split, (tuple, list)) and len(split) == 2 and all(isinstance(t, Tensor) for t in split)


def _read_batch(batch_format: BatchFormat, batch: Any, name: str) -> tuple[Tensor, Tensor]:
    try:
        return batch_format.input_and_labels(batch, name, structured=True)
    except JiTInputError as err:
        raise MisconfigurationException(
            f"Cannot read a `{name}` batch of type {type(batch).__name__}: {err} Give the evaluation the same"
            " `batch_format=BatchFormat(input_key=..., label_key=...)` as JiT."
        ) from err


def _iter_split(split: Split, name: str, batch_size: int, batch_format: BatchFormat) -> Iterator[tuple[Tensor, Tensor]]:
    if _is_pair(split):
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
        yield _read_batch(batch_format, batch, name)


def _rows(x: Any) -> int:
    try:
        return batch_size(x)
    except JiTInputError as err:
        raise MisconfigurationException(str(err)) from err


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _logits_of(model: nn.Module, name: str, x: Any, split: str, batch_format: BatchFormat) -> Tensor:
    try:
        output = batch_format.call(model, move(x, _device_of(model)))
    except (RuntimeError, TypeError) as err:  # e.g. inputs of the wrong shape for the model: name the split
        raise MisconfigurationException(
            f"The {name} model cannot run on the `{split}` split: inputs {describe_input(x)} ({err}). Pass"
            f" `{split}` data in the form the models were trained on."
        ) from err
    try:
        logits = batch_format.for_model(model).logits(output)
    except JiTInputError as err:
        raise MisconfigurationException(
            f"Cannot find the {name} model's logits on the `{split}` split: {err} Give the evaluation the same"
            " `batch_format=BatchFormat(output_selector=...)` as JiT."
        ) from err
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != batch_size(x):
        raise MisconfigurationException(
            f"The {name} model must return (batch, classes) logits with batch={batch_size(x)}, or"
            f" `batch_format=BatchFormat(output_selector=...)` must select them from its output;"
            f" got {getattr(logits, 'shape', type(logits))}."
        )
    return logits


@torch.no_grad()
def _run_split(
    models: dict[str, nn.Module],
    split: Split,
    name: str,
    batch_size: int,
    batch_format: BatchFormat,
    feature_fn: Any = None,
    want_features: bool = False,
    num_classes: int | None = None,
) -> _SplitOutputs:
    logits: dict[str, list[Tensor]] = {m: [] for m in models}
    labels: list[Tensor] = []
    features: list[Tensor] = []
    for x, y in _iter_split(split, name, batch_size, batch_format):
        n = _rows(x)
        if n == 0:
            continue
        if y.dim() != 1 or y.shape[0] != n or y.dtype == torch.bool:
            raise MisconfigurationException(
                f"`{name}` labels must be a 1-D integer tensor with one class index per sample, got {tuple(y.shape)}"
                f" ({y.dtype})."
            )
        try:
            y = as_class_labels(y, f"{name} labels")
        except JiTInputError as err:
            raise MisconfigurationException(str(err)) from err
        widths = {}
        for m, model in models.items():
            out = _logits_of(model, m, x, name, batch_format)
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
            f = (
                feature_fn(x)
                if feature_fn is not None
                else torch.cat([t.reshape(n, -1).float() for t in tensors(x)], 1)
            )
            features.append(f.detach().reshape(n, -1).float().cpu())
    if not labels:
        raise MisconfigurationException(
            f"The `{name}` split is empty: it has no samples. Pass a non-empty split, or `None` to skip its metrics."
        )
    return _SplitOutputs(
        logits={m: torch.cat(v) for m, v in logits.items()},
        y=torch.cat(labels),
        features=torch.cat(features) if want_features else None,
    )


@contextlib.contextmanager
def _eval_mode(models: Iterable[nn.Module]) -> Iterator[None]:
    """Put every model in eval mode for the evaluation and restore each submodule's mode afterwards."""
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(normalization_mode(model, "eval"))
        yield


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MisconfigurationException(f"`{name}` must be a positive integer, got {value!r}.")
    return value


def predict_split(
    model: nn.Module,
    split: Split,
    name: str = "split",
    batch_size: int = 512,
    *,
    batch_format: BatchFormat | None = None,
) -> tuple[Tensor, Tensor]:
    """The model's logits (float32, on the CPU, eval mode) and the labels of a labelled split.

    The model's mode (train or eval) is restored afterwards.

    Args:
        model: The classifier.
        split: A loader (or iterable) of batches, or an ``(x, y)`` pair of tensors.
        name: The split's name, for error messages.
        batch_size: Batch size when ``split`` is an ``(x, y)`` pair.
        batch_format: How batches are read and where the logits are in the model's output
            (:class:`~lightning_jit.core.batch.BatchFormat`); default: automatic.

    Raises:
        MisconfigurationException: for an empty split, labels outside the model's classes, or batches or outputs
            ``batch_format`` cannot read.

    Example:
        >>> logits, y = predict_split(torch.nn.Linear(4, 3), (torch.randn(5, 4), torch.zeros(5, dtype=torch.long)))
        >>> tuple(logits.shape), tuple(y.shape)
        ((5, 3), (5,))
    """
    batch_format = check_batch_format(batch_format)
    _check_positive_int("batch_size", batch_size)
    with _eval_mode([model]):
        out = _run_split({"model": model}, split, name, batch_size, batch_format)
    return out.logits["model"], out.y


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
    batch_format: BatchFormat | None = None,
    verification: Verification | dict[str, Any] | None = None,
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
        forget: The forget set: a DataLoader of batches (``(x, y, ...)``, ``{"x": ..., "y": ...}``, or any layout
            ``batch_format`` reads), or an ``(x, y)`` pair of tensors.
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
        batch_format: How batches are read (``input_key``, ``label_key``, ``batch_to_input``) and where the logits
            are in the models' outputs (``output_selector``): the
            :class:`~lightning_jit.core.batch.BatchFormat` given to JiT. Default: automatic (position 0/1 of a tuple,
            the usual dict keys, a tensor output or the first item of a tuple).
        verification: The unlearning run's verified outcome (``unlearner.verification``, or its ``as_dict()`` as a
            checkpoint's ``jit_unlearning`` record holds it): its verdict becomes the report's first line and the
            figure's title.

    Returns:
        The :class:`~lightning_jit.evaluation.report.UnlearningReport`.

    Raises:
        MisconfigurationException: for an empty split, labels outside the models' classes, models with different
            output widths, ``tau`` outside ``(0, 1]``, ``original is unlearned``, or splits, batches or outputs that
            cannot be read.

    Example:
        >>> from lightning_jit.demo.data import DigitsCNN
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> original, unlearned = DigitsCNN(), DigitsCNN()
        >>> x, y = torch.randn(40, 1, 8, 8), torch.randint(0, 10, (40,))
        >>> report = evaluate_unlearning(original, unlearned, (x[:10], y[:10]), (x[10:30], y[10:30]), (x[30:], y[30:]))
        >>> sorted(report.accuracy["unlearned"]), "mia" in report.mia["unlearned"], len(report.notes) > 0
        (['forget', 'retain', 'test'], True, True)
    """
    tau = check_tau(tau)
    batch_format = check_batch_format(batch_format)
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
    _check_positive_int("k", k)
    _check_positive_int("batch_size", batch_size)
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
    teacher = random_copy(unlearned, seed=seed)
    feature_fn = layer_features(original, feature_layer) if feature_layer is not None else None
    outputs: dict[str, _SplitOutputs] = {}
    with _eval_mode([*models.values(), teacher]):
        for name, split in (("forget", forget), ("retain", retain), ("test", test)):
            if split is not None:
                outputs[name] = _run_split(
                    {**models, _RANDOM: teacher} if name == "forget" else models,
                    split,
                    name,
                    batch_size,
                    batch_format,
                    feature_fn,
                    want_features=name in ("forget", "retain"),
                    num_classes=num_classes,
                )
    shapes = {n: tuple(o.features.shape[1:]) for n, o in outputs.items() if o.features is not None}
    if len(set(shapes.values())) > 1:
        raise MisconfigurationException(f"The splits have different input/feature sizes {shapes}.")

    report = UnlearningReport(
        models=list(models),
        sizes={n: int(o.y.numel()) for n, o in outputs.items()},
        num_classes=outputs["forget"].logits["unlearned"].shape[1],
        settings={"tau": tau, "k": k, "seed": seed, "feature_layer": _layer_name(feature_layer)},
        verification=verification.as_dict() if isinstance(verification, Verification) else verification,
    )
    _accuracy_and_entropy(report, outputs)
    attacks = _membership_inference(report, outputs)
    _zrf(report, outputs["forget"])
    if retrained is not None:
        _retrain_match(report, outputs)
    else:
        report.notes.append(
            "Retrain match (entropy tests, activation distance, JS divergence) and Tug of War skipped: no `retrained`"
            " model was given."
        )
    report.information = _information(outputs, report.models, attacks, tau, k, feature_layer, report.notes)
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
        report.notes.append("Unlearning time unknown: pass `unlearning_seconds` to report it.")
    return report


def _accuracy_and_entropy(report: UnlearningReport, outputs: dict[str, _SplitOutputs]) -> None:
    for m in report.models:
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


def _membership_inference(report: UnlearningReport, outputs: dict[str, _SplitOutputs]) -> dict[str, Any]:
    """The entropy MIA of every model; returns the fitted attacks (for the information groups)."""
    attacks: dict[str, Any] = {}
    if "retain" not in outputs or "test" not in outputs:
        report.notes.append("MIA skipped: it needs both `retain` (members) and `test` (non-members) data.")
        return attacks
    for m in report.models:
        mia = EntropyMIA()
        for split in SPLITS:
            mia.update(outputs[split].logits[m], split)
        report.mia[m] = {key: float(value) for key, value in mia.compute().items()}
        attacks[m] = mia.attack
        note = warn_if_useless_attack(report.mia[m]["attack_balanced_accuracy"], m)
        if note:
            report.notes.append(note)
    return attacks


def _zrf(report: UnlearningReport, forget: _SplitOutputs) -> None:
    for m in report.models:
        zrf = ZRFScore()
        zrf.update(forget.logits[m], forget.logits[_RANDOM])
        report.zrf[m] = float(zrf.compute())


def _retrain_match(report: UnlearningReport, outputs: dict[str, _SplitOutputs]) -> None:
    """The retrain match of the original and the unlearned model, and their Tug of War when every split is there."""
    forget = outputs["forget"]
    for m in ("original", "unlearned"):
        match = RetrainMatch()
        match.update(forget.logits[m], forget.logits["retrained"])
        report.retrain_match[m] = {key: float(value) for key, value in match.compute().items()}
    if "retain" not in outputs or "test" not in outputs:
        report.notes.append("Tug of War skipped: it needs the accuracies on `retain` and `test` as well as `forget`.")
        return
    for m in ("original", "unlearned"):
        tow = TugOfWar()
        for split in SPLITS:
            tow.update(outputs[split].logits[m], outputs[split].logits["retrained"], outputs[split].y, split)
        report.tug_of_war[m] = float(tow.compute())


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
    """The forget set split by information: alpha of each forget sample, and per-group figures of every model."""
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


__all__ = ["Split", "check_batch_format", "evaluate_unlearning", "predict_split"]
