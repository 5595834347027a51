"""Forgetting quality on scikit-learn's digits: JiT against retraining and against the reference's code.

For each seed, model (a small CNN, and the same CNN with BatchNorm) and scenario (full-class forgetting of several
classes, sub-class forgetting on coarse labels, random forgetting of 5% of the training set) it trains the original
model, retrains from scratch without the forget set (the gold standard), and unlearns with:

* ``reference``: the faithful port of the authors' code (``benchmarks/reference_port.py``), with its sigma and eta
  chosen from a small grid on the same data (by Tug of War against the retrained model, on the first seed);
* ``library defaults``: ``JiTUnlearning`` with its default options (bugs fixed, eval-mode normalisation, one pass),
  tuned on the same grid in the same way;
* ``library improved``: ``JiTUnlearning`` with the improvements kept by this benchmark, at fixed settings that are
  *not* tuned per class or seed (``IMPROVED`` below: one setting per kind of scenario).

No method sees retain data. Figures are mean ± std over seeds. Writes ``quality.md`` and ``quality.png``.

Run: ``python benchmarks/bench_quality.py [--out benchmarks/out] [--seeds 3] [--quick]``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import logging
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._overrides import add_set_argument, parse_overrides  # noqa: E402
from benchmarks.reference_port import reference_unlearn  # noqa: E402
from lightning_jit.data import (  # noqa: E402
    DigitsCNN,
    accuracy,
    class_mask,
    load_digits_split,
    quiet_trainer,
    random_forget_mask,
    train_classifier,
)
from lightning_jit.demo import DEMO_BATCH_SIZE, DEMO_JIT_SETTINGS, SUBCLASS_LOGIT_NORM_SIGMA  # noqa: E402
from lightning_jit.io import atomic_write, save_png  # noqa: E402
from lightning_jit.metrics import entropy_tests, fit_entropy_attack, prediction_entropy  # noqa: E402
from lightning_jit.module import JiTUnlearning  # noqa: E402

#: The library's improved settings, one fixed setting per kind of scenario (never tuned per class or seed): the demo's
#: for full-class forgetting (the scale-free objective, the logit-norm penalty, the forget-set stopping rule); the same
#: with the penalty's noise at SUBCLASS_LOGIT_NORM_SIGMA for sub-class forgetting (measured: with 1.0 the plain CNN's
#: forget set stayed at 68 ± 35%); one pass, without the stopping rule, for random forgetting.
IMPROVED: dict[str, dict] = {
    "full-class": dict(DEMO_JIT_SETTINGS),
    "sub-class": {**DEMO_JIT_SETTINGS, "logit_norm_sigma": SUBCLASS_LOGIT_NORM_SIGMA},
    "random": {**{k: v for k, v in DEMO_JIT_SETTINGS.items() if k != "target_forget_accuracy"}, "epochs": 1},
}
#: The grid the reference (and the library's defaults) are tuned on: sigma x eta (the reference's "sum" step size).
GRID_SIGMA = (0.1, 0.5)
GRID_ETA = (1e-4, 3e-4, 1e-3)
#: The reference's batch sizes: 128 for full-class and random forgetting, 64 for sub-class.
REFERENCE_BATCH = {"full-class": 128, "sub-class": 64, "random": 128}
IMPROVED_BATCH = DEMO_BATCH_SIZE
TRAIN_EPOCHS = 15


@dataclass
class Scenario:
    name: str  # "full-class 3", "sub-class 3", "random 5%"
    kind: str  # "full-class" | "sub-class" | "random"
    forget_train: Tensor  # bool mask over the training set
    forget_test: Tensor | None  # bool mask over the test set (the forgotten class / digit), None for random
    coarse: bool
    #: Sub-class: the test samples of the other fine digits under the forgotten digit's coarse label (digit 2 for 3).
    sibling_test: Tensor | None = None


@dataclass
class Row:
    forget_acc: float
    forget_test_acc: float  # the forgotten class's (sub-class: digit's) test accuracy; NaN for random forgetting
    retained_acc: float
    mia: float
    pvalue: float
    time_fraction: float
    sibling_acc: float = float("nan")


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)


def _loader(x: Tensor, y: Tensor, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def _entropy(model: nn.Module, x: Tensor) -> Tensor:
    model.eval()
    with torch.no_grad():
        return prediction_entropy(model(x))


def _measure(model: nn.Module, data, sc: Scenario, seconds: float, retrain_seconds: float, retrained_h) -> Row:
    x_tr, y_tr, x_te, y_te = data
    f = sc.forget_train
    retained = ~sc.forget_test if sc.forget_test is not None else torch.ones_like(y_te, dtype=torch.bool)
    attack = fit_entropy_attack(_entropy(model, x_tr[~f]), _entropy(model, x_te))
    forget_h = _entropy(model, x_tr[f])
    mia = float(attack.predict(forget_h.double().numpy().reshape(-1, 1)).mean() * 100)
    pvalue = entropy_tests(forget_h.numpy(), retrained_h.numpy())["ks_pvalue"] if retrained_h is not None else 1.0
    return Row(
        forget_acc=accuracy(model, x_tr[f], y_tr[f]),
        forget_test_acc=accuracy(model, x_te[sc.forget_test], y_te[sc.forget_test])
        if sc.forget_test is not None
        else float("nan"),
        retained_acc=accuracy(model, x_te[retained], y_te[retained]),
        mia=mia,
        pvalue=pvalue,
        time_fraction=seconds / retrain_seconds,
        sibling_acc=accuracy(model, x_te[sc.sibling_test], y_te[sc.sibling_test])
        if sc.sibling_test is not None
        else float("nan"),
    )


def _tow(row: Row, gold: Row) -> float:
    return (1 - abs(row.forget_acc - gold.forget_acc) / 100) * (1 - abs(row.retained_acc - gold.retained_acc) / 100)


def _run_library(model: nn.Module, x: Tensor, y: Tensor, batch_size: int, seed: int, **settings) -> float:
    pl.seed_everything(seed, verbose=False)
    wrapper = JiTUnlearning(model, **settings)
    trainer = quiet_trainer(max_epochs=settings.get("epochs", 1))
    start = time.perf_counter()
    trainer.fit(wrapper, _loader(x, y, batch_size))
    return time.perf_counter() - start


def _run_reference(model: nn.Module, x: Tensor, y: Tensor, batch_size: int, seed: int, sigma: float, eta: float):
    torch.manual_seed(seed)
    start = time.perf_counter()
    reference_unlearn(model, _loader(x, y, batch_size), sigma=sigma, eta=eta)
    model.eval()
    return time.perf_counter() - start


def _scenarios(split, fine_train: Tensor, fine_test: Tensor, classes: list[int], quick: bool) -> list[Scenario]:
    out = [
        Scenario(f"full-class {c}", "full-class", class_mask(split.y_train, [c]), class_mask(split.y_test, [c]), False)
        for c in classes
    ]
    if quick:
        return out
    sibling = class_mask(fine_test, [2])  # digit 2 shares coarse label 1 (= 3 // 2) with the forgotten digit 3
    out.append(
        Scenario("sub-class 3", "sub-class", class_mask(fine_train, [3]), class_mask(fine_test, [3]), True, sibling)
    )
    out.append(Scenario("random 5%", "random", random_forget_mask(len(split.y_train), 0.05, seed=0), None, False))
    return out


def run(
    seeds: int,
    classes: list[int],
    models: dict[str, Callable[[int], nn.Module]],
    quick: bool,
    epochs: int,
    improved: dict[str, dict] | None = None,
):
    """Returns {(model, scenario, method): [Row per seed]} and the tuned grid points.

    ``improved`` replaces :data:`IMPROVED` (the settings of the "library improved" row), to measure a variant.
    """
    improved = improved or IMPROVED
    _quiet()
    fine = load_digits_split()
    coarse = load_digits_split(coarse=True)
    scenarios = _scenarios(fine, fine.y_train, fine.y_test, classes, quick)
    grid = [(s, e) for s, e in itertools.product(GRID_SIGMA, GRID_ETA)] if not quick else [(0.5, 3e-4)]
    results: dict[tuple[str, str, str], list[Row]] = {}
    tuned: dict[tuple[str, str, str], tuple[float, float]] = {}
    for seed, (model_name, factory) in itertools.product(range(seeds), models.items()):
        originals = {}
        for use_coarse, split in ((False, fine), (True, coarse)):
            if use_coarse and all(not sc.coarse for sc in scenarios):
                continue
            originals[use_coarse] = train_classifier(
                functools.partial(factory, split.num_classes), split.x_train, split.y_train, epochs=epochs, seed=seed
            )
        for sc in scenarios:
            split = coarse if sc.coarse else fine
            data = (split.x_train, split.y_train, split.x_test, split.y_test)
            f = sc.forget_train
            start = time.perf_counter()
            retrained = train_classifier(
                functools.partial(factory, split.num_classes),
                split.x_train[~f],
                split.y_train[~f],
                epochs=epochs,
                seed=seed,
            )
            retrain_seconds = time.perf_counter() - start
            retrained_h = _entropy(retrained, split.x_train[f])
            original = originals[sc.coarse]

            def record(method: str, row: Row, model_name: str = model_name, scenario: str = sc.name) -> None:
                results.setdefault((model_name, scenario, method), []).append(row)

            gold = _measure(retrained, data, sc, retrain_seconds, retrain_seconds, retrained_h)
            record("original", _measure(original, data, sc, 0.0, retrain_seconds, retrained_h))
            record("retrained", gold)
            xf, yf = split.x_train[f], split.y_train[f]
            ref_batch = REFERENCE_BATCH[sc.kind]

            # Reference and library defaults: tune on the grid on the first seed (by Tug of War), then reuse.
            for method in ("reference", "library defaults"):
                key = (model_name, sc.name, method)
                if key not in tuned:
                    best = None
                    for sigma, eta in grid:
                        model = copy.deepcopy(original)
                        secs = _apply(method, model, xf, yf, ref_batch, seed, sigma, eta)
                        row = _measure(model, data, sc, secs, retrain_seconds, retrained_h)
                        if best is None or _tow(row, gold) > best[0]:
                            best = (_tow(row, gold), (sigma, eta), row)
                    tuned[key] = best[1]
                    record(method, best[2])
                else:
                    model = copy.deepcopy(original)
                    secs = _apply(method, model, xf, yf, ref_batch, seed, *tuned[key])
                    record(method, _measure(model, data, sc, secs, retrain_seconds, retrained_h))

            model = copy.deepcopy(original)
            settings = improved[sc.kind]
            if quick:
                settings = {**settings, "epochs": min(settings["epochs"], 3)}
            secs = _run_library(model, xf, yf, IMPROVED_BATCH, seed, **settings)
            record("library improved", _measure(model, data, sc, secs, retrain_seconds, retrained_h))
    return results, tuned


def _apply(method: str, model: nn.Module, xf: Tensor, yf: Tensor, batch: int, seed: int, sigma: float, eta: float):
    if method == "reference":
        return _run_reference(model, xf, yf, batch, seed, sigma, eta)
    # The library's "mean" learning rate equivalent to the reference's "sum" step size at this batch size.
    return _run_library(model, xf, yf, batch, seed, sigma=sigma, lr=eta * batch)


METHODS = ("original", "retrained", "reference", "library defaults", "library improved")
COLUMNS = (
    ("forget_acc", "forget acc %"),
    ("forget_test_acc", "forgotten test acc %"),
    ("retained_acc", "retained test acc %"),
    ("mia", "MIA %"),
    ("pvalue", "entropy-match p"),
    ("time_fraction", "time / retrain"),
)


def to_markdown(results, tuned) -> str:
    lines = []
    models = sorted({k[0] for k in results})
    scenarios = list(dict.fromkeys(k[1] for k in results))
    for model_name in models:
        lines += [f"### {model_name}", ""]
        lines.append("| scenario | method | " + " | ".join(c[1] for c in COLUMNS) + " |")
        lines.append("|---|---|" + "---:|" * len(COLUMNS))
        for sc in scenarios:
            for method in METHODS:
                rows = results.get((model_name, sc, method))
                if not rows:
                    continue
                cells = []
                for attr, _ in COLUMNS:
                    v = np.array([getattr(r, attr) for r in rows])
                    fmt = "{:.3f} ± {:.3f}" if attr in ("pvalue", "time_fraction") else "{:.1f} ± {:.1f}"
                    cells.append("–" if np.isnan(v).all() else fmt.format(v.mean(), v.std()))
                name = method
                if (model_name, sc, method) in tuned:
                    s, e = tuned[(model_name, sc, method)]
                    name += f" (σ={s:g}, η={e:g})"
                lines.append(f"| {sc} | {name} | " + " | ".join(cells) + " |")
        lines.append("")
    sub = [k for k in results if k[1].startswith("sub-class")]
    if sub:
        lines += [
            "### Sub-class: where the retained accuracy goes",
            "",
            "Test accuracy on digit 2, which shares the forgotten digit 3's coarse label (mean ± std over seeds):",
            "",
            "| model | " + " | ".join(METHODS) + " |",
            "|---|" + "---:|" * len(METHODS),
        ]
        for model_name in models:
            cells = []
            for method in METHODS:
                v = np.array([r.sibling_acc for r in results.get((model_name, "sub-class 3", method), [])])
                cells.append(f"{v.mean():.1f} ± {v.std():.1f}" if len(v) else "–")
            lines.append(f"| {model_name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results, path: Path) -> None:
    from matplotlib.figure import Figure

    models = sorted({k[0] for k in results})
    scenarios = list(dict.fromkeys(k[1] for k in results))
    fig = Figure(figsize=(7 * len(models), 5))
    axes = fig.subplots(1, len(models), squeeze=False)
    markers = dict(zip(METHODS, "os^Dv", strict=True))
    for ax, model_name in zip(axes[0], models, strict=True):
        for method in METHODS:
            xs, ys = [], []
            for sc in scenarios:
                rows = results.get((model_name, sc, method))
                if rows:
                    xs.append(np.mean([r.forget_acc for r in rows]))
                    ys.append(np.mean([r.retained_acc for r in rows]))
            ax.scatter(xs, ys, marker=markers[method], s=60, label=method)
            for x, y, sc in zip(xs, ys, scenarios, strict=True):
                ax.annotate(sc, (x, y), fontsize=6, alpha=0.6)
        ax.set_xlabel("forget-set accuracy % (lower forgets more)")
        ax.set_ylabel("retained test accuracy %")
        ax.set_title(f"digits, {model_name}: mean over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "CNN": lambda n: DigitsCNN(num_classes=n),
    "CNN+BatchNorm": lambda n: DigitsCNN(num_classes=n, batchnorm=True),
}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/out", help="Output directory for quality.md and quality.png.")
    parser.add_argument("--seeds", type=int, default=3, help="Number of seeds (default 3).")
    parser.add_argument("--classes", default="3,4,8", help="Classes for full-class forgetting (default 3,4,8).")
    parser.add_argument("--quick", action="store_true", help="A tiny configuration for the test suite.")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2).")
    add_set_argument(parser)
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.set)
    improved = {
        "full-class": {**IMPROVED["full-class"], **overrides},
        "sub-class": {**IMPROVED["sub-class"], **overrides},
        "random": {**IMPROVED["random"], **{k: v for k, v in overrides.items() if k != "target_forget_accuracy"}},
    }
    torch.set_num_threads(args.threads)
    classes = [int(c) for c in args.classes.split(",")]
    models = MODELS if not args.quick else {"CNN": MODELS["CNN"]}
    start = time.perf_counter()
    results, tuned = run(
        args.seeds, classes, models, args.quick, epochs=TRAIN_EPOCHS if not args.quick else 2, improved=improved
    )
    table = to_markdown(results, tuned)
    out = Path(args.out)
    with atomic_write(out / "quality.md") as fh:
        fh.write(table)
    plot(results, out / "quality.png")
    print(table)
    print(f"bench_quality finished in {time.perf_counter() - start:.0f} s; wrote {out / 'quality.md'} and quality.png")
    return table


if __name__ == "__main__":
    main()
