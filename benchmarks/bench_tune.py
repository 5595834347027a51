"""``tune_jit`` on scikit-learn's digits: its cost against one unlearning run, and whether what it picks on one class
works on classes it never saw.

For each model (the small CNN and the CNN with BatchNorm) and seed, it trains the original model, runs ``tune_jit``
(zero-shot: the model and the forget set alone) on one class, then unlearns each held-out class with the chosen
settings and compares with a model retrained without that class. Variants, from the same 16 Sobol points:

* ``halving``: the default (successive halving, then two finalists confirmed by a repeat run);
* ``halving, no repeats``: the same without the confirmation runs (``finalists=0``).

The library's defaults (no setting given: everything calibrated) are the baseline row. The cost is the tuning's wall
time divided by the mean wall time of one unlearning run with the chosen settings (measured in the same process, on the
held-out classes). Writes ``tune_bench.md`` (and ``tune_bench.json``) to ``--out``. Measured results:
``docs/results/tune.md``.

Run: ``python -m benchmarks.bench_tune [--out benchmarks/out] [--seeds 3] [--workers 1] [--quick]``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks._overrides import add_set_argument, parse_overrides
from lightning_jit import JiTSettings, JiTUnlearning, tune_jit
from lightning_jit.demo.data import DigitsCNN, accuracy, class_mask, load_digits_split, train_classifier
from lightning_jit.io import atomic_write
from lightning_jit.lightning.data import forget_loader
from lightning_jit.lightning.trainer import quiet_trainer

TUNE_CLASS = 1
HELD_OUT = (0, 3, 4, 8)
VARIANTS: dict[str, dict[str, Any]] = {
    "halving": {},
    "halving, no repeats": {"finalists": 0},
}
MODELS = {"CNN": False, "CNN+BatchNorm": True}


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)


def _loader(x, y) -> DataLoader:
    return forget_loader(TensorDataset(x, y))


def _defaults(seed: int) -> dict[str, Any]:
    """The library's defaults (everything calibrated) with this seed, as keyword arguments."""
    return {**dataclasses.asdict(JiTSettings()), "seed": seed}


def _unlearn(original, split, cls: int, settings: dict[str, Any]) -> dict[str, float]:
    model = copy.deepcopy(original)
    f = class_mask(split.y_train, [cls])
    trainer = quiet_trainer(max_epochs=settings["epochs"] or -1)
    start = time.perf_counter()
    trainer.fit(JiTUnlearning(model, **settings), _loader(split.x_train[f], split.y_train[f]))
    seconds = time.perf_counter() - start
    ft = class_mask(split.y_test, [cls])
    return {
        "forget_test": accuracy(model, split.x_test[ft], split.y_test[ft]),
        "retained": accuracy(model, split.x_test[~ft], split.y_test[~ft]),
        "seconds": seconds,
    }


def run_job(job: tuple[str, int, bool, int, list[int], int, int, dict, list[str]]) -> dict:
    """One (model, seed): tune with every variant, unlearn the held-out classes, retrain without each.

    ``overrides`` are extra ``tune_jit`` keyword arguments (fixed JiT settings such as ``logit_norm_penalty``).
    """
    model_name, seed, quick, threads, held_out, n_configs, max_epochs, overrides, variants = job
    _quiet()
    torch.set_num_threads(threads)
    split = load_digits_split()
    batchnorm = MODELS[model_name]
    epochs = 2 if quick else 15
    original = train_classifier(lambda: DigitsCNN(batchnorm=batchnorm), split.x_train, split.y_train, epochs, seed=seed)
    f = class_mask(split.y_train, [TUNE_CLASS])
    forget = _loader(split.x_train[f], split.y_train[f])
    out: dict = {"model": model_name, "seed": seed, "retrained": {}, "variants": {}}
    for cls in held_out:
        keep = ~class_mask(split.y_train, [cls])
        gold = train_classifier(
            lambda: DigitsCNN(batchnorm=batchnorm), split.x_train[keep], split.y_train[keep], epochs, seed=seed
        )
        ft = class_mask(split.y_test, [cls])
        out["retrained"][cls] = accuracy(gold, split.x_test[~ft], split.y_test[~ft])
    settings_by_variant = {"library defaults (not tuned)": (_defaults(seed), 0.0, None)}
    for name, kwargs in VARIANTS.items():
        if variants and name not in variants:
            continue
        start = time.perf_counter()
        result = tune_jit(
            original,
            forget,
            seed=seed,
            n_configs=n_configs,
            max_epochs=max_epochs,
            progress=False,
            trainer_kwargs={"accelerator": "cpu"},
            **kwargs,
            **overrides,
        )
        settings_by_variant[name] = (result.settings(), time.perf_counter() - start, result)
    for name, (settings, tune_seconds, result) in settings_by_variant.items():
        runs = {cls: _unlearn(original, split, cls, settings) for cls in held_out}
        one_run = float(np.mean([r["seconds"] for r in runs.values()]))
        out["variants"][name] = {
            "sigma": settings["sigma"],
            "lr": settings["lr"],
            "tune_seconds": tune_seconds,
            "one_run_seconds": one_run,
            "cost": tune_seconds / one_run if tune_seconds else 0.0,
            "runs": runs,
            "trials_run": sum(1 + len(t.repeats) for t in result.trials if t.history) if result else 0,
        }
    return out


def _value(value: float | None) -> str:
    return "calibrated" if value is None else f"{value:.3g}"


def to_markdown(jobs: list[dict], held_out: list[int]) -> str:
    lines = [
        f"Tuned on digit {TUNE_CLASS} (zero-shot), applied to held-out digits {', '.join(map(str, held_out))}."
        " Forget = forgotten digit's test accuracy %, kept = other digits' test accuracy % (retrained model in"
        " brackets). Goal per class: forget <= 5 and kept >= retrained - 2. Mean ± std over seeds.",
        "",
    ]
    for model_name in dict.fromkeys(j["model"] for j in jobs):
        mine = [j for j in jobs if j["model"] == model_name]
        lines += [f"### {model_name} ({len(mine)} seed(s))", ""]
        head = ["settings", "sigma", "lr", "tune s", "one run s", "tune / run"]
        for cls in held_out:
            gold = np.mean([j["retrained"][cls] for j in mine])
            head.append(f"digit {cls}: forget / kept [{gold:.1f}]")
        head.append("goal met")
        lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for name in mine[0]["variants"]:
            vs = [j["variants"][name] for j in mine]

            def ms(values, fmt="{:.1f}"):
                return (fmt + " ± " + fmt).format(np.mean(values), np.std(values))

            cells = [
                name,
                " / ".join(_value(v["sigma"]) for v in vs),
                " / ".join(_value(v["lr"]) for v in vs),
                ms([v["tune_seconds"] for v in vs]) if vs[0]["tune_seconds"] else "-",
                ms([v["one_run_seconds"] for v in vs], "{:.2f}"),
                ms([v["cost"] for v in vs]) if vs[0]["tune_seconds"] else "-",
            ]
            met = total = 0
            for cls in held_out:
                forget = [v["runs"][cls]["forget_test"] for v in vs]
                kept = [v["runs"][cls]["retained"] for v in vs]
                cells.append(f"{ms(forget)} / {ms(kept)}")
                for j, v in zip(mine, vs, strict=True):
                    total += 1
                    run = v["runs"][cls]
                    met += run["forget_test"] <= 5 and run["retained"] >= j["retrained"][cls] - 2
            cells.append(f"{met} / {total}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/out", help="Output directory for tune_bench.md and .json.")
    parser.add_argument("--seeds", type=int, default=3, help="Number of seeds (default 3).")
    parser.add_argument("--workers", type=int, default=1, help="Parallel processes, one per (model, seed).")
    parser.add_argument("--quick", action="store_true", help="A tiny configuration for the test suite.")
    parser.add_argument("--variants", default="", help=f"Comma-separated subset of {', '.join(VARIANTS)}.")
    parser.add_argument("--models", default="", help=f"Comma-separated subset of {', '.join(MODELS)}.")
    add_set_argument(parser)
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.set)
    held_out = [0] if args.quick else list(HELD_OUT)
    variants = [v for v in args.variants.split(",") if v] if args.variants else []
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}.")
    models = [m for m in args.models.split(",")] if args.models else None
    models = models or (["CNN"] if args.quick else list(MODELS))
    n_configs, max_epochs = (2, 2) if args.quick else (16, 30)
    threads = 1 if args.workers > 1 or args.quick else 2  # --quick: the test suite's processes take one thread
    jobs = [
        (m, s, args.quick, threads, held_out, n_configs, max_epochs, overrides, variants)
        for m in models
        for s in range(args.seeds)
    ]
    start = time.perf_counter()
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as pool:
            results = list(pool.map(run_job, jobs))
    else:
        results = [run_job(job) for job in jobs]
    table = to_markdown(results, held_out)
    out = Path(args.out)
    with atomic_write(out / "tune_bench.md") as fh:
        fh.write(table)
    with atomic_write(out / "tune_bench.json") as fh:
        json.dump(results, fh, indent=1, default=str)
    print(table)
    print(f"bench_tune finished in {time.perf_counter() - start:.0f} s; wrote {out / 'tune_bench.md'}")
    return table


if __name__ == "__main__":
    main()
