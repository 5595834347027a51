"""The plain JiT step as a user runs it, through ``Trainer.fit``, against the reference loop; and where its time goes.

:mod:`benchmarks.bench_objective` times the engine's step alone. This times what a user runs:
``trainer.fit(JiTUnlearning(model, JiTSettings.plain(...)), forget_loader)`` for one pass, ``N = 25``, with the
collapse guard left on and the Trainer's defaults for logging (no logger, no progress bar: ``quiet_trainer``), against
:func:`benchmarks.reference_port.reference_unlearn` (one pass) on the same trained digits CNN and the same loader, in
one process. The settings are the reference's computation (plain SGD at its ``eta``, its per-batch ``"sum"``, inputs
clamped to the batch range); the run's target is 0% so that no stopping rule ends the pass early (every run takes
one step per batch, which the output checks).

Rounds alternate the two methods (the order flips each round); medians are printed. The figure is ``reference time /
library time`` (the speed-up). The fit's time includes everything the user waits for: the Trainer's set-up, the
survey, every step, the guard's checks and the final verification.

Then, in runs of their own (the timers cost a few microseconds per call), :class:`benchmarks.breakdown.Breakdown`
splits the fit's time by component: each component's milliseconds per step, its share of the fit, and its share of
the reference's step.

On a shared machine use ``--clock cpu`` (process CPU time, the default with one thread): it does not count the time
the process waits for a core.

Run: ``python -m benchmarks.bench_plain_fit [--batches 1 128] [--samples 1024] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import logging
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.breakdown import Breakdown
from benchmarks.reference_port import reference_unlearn
from lightning_jit import JiTSettings, JiTUnlearning
from lightning_jit.demo.data import DigitsCNN, load_digits_split, train_classifier
from lightning_jit.lightning.trainer import quiet_trainer

SIGMA, ETA, N = 0.1, 3e-4, 25


def plain_settings() -> JiTSettings:
    """The reference's computation as plain JiT settings: one pass, N = 25, SGD at ``eta``, the per-batch sum."""
    return JiTSettings.plain(
        sigma=SIGMA,
        lr=ETA,
        n_perturbations=N,
        epochs=1,
        max_cost=None,
        reduction="sum",
        clamp="batch",
        task="class",
        target_forget_accuracy=0.0,
    )


def run_library(original: nn.Module, loader: DataLoader) -> tuple[int, str]:
    """One ``trainer.fit`` of the plain settings, the guard on; returns the steps taken and the outcome."""
    wrapper = JiTUnlearning(copy.deepcopy(original), plain_settings())
    trainer = quiet_trainer(max_epochs=-1)
    trainer.fit(wrapper, loader)
    return trainer.global_step, str(wrapper.outcome.value if wrapper.outcome is not None else None)


def run_reference(original: nn.Module, loader: DataLoader) -> None:
    reference_unlearn(copy.deepcopy(original), loader, sigma=SIGMA, eta=ETA, n_perturbations=N)


def _timed(fn: Callable[[], object], clock: Callable[[], float]) -> tuple[float, object]:
    start = clock()
    out = fn()
    return clock() - start, out


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 128], help="Batch sizes (default 1 128).")
    parser.add_argument("--samples", type=int, default=1024, help="Forget samples (default 1024).")
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved timing rounds (default 3).")
    parser.add_argument("--breakdown-rounds", type=int, default=1, help="Timed-component runs (default 1; 0: none).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1).")
    parser.add_argument("--clock", choices=["wall", "cpu"], default=None, help="default: cpu with one thread")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    clock_name = args.clock or ("cpu" if args.threads == 1 else "wall")
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    split = load_digits_split()
    original = train_classifier(DigitsCNN, split.x_train, split.y_train, epochs=15, seed=0)
    n = min(args.samples, int(split.x_train.shape[0]))
    data = TensorDataset(split.x_train[:n], split.y_train[:n])
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, clock {clock_name}; digits CNN, {n} forget"
        f" samples, N = {N}, one pass; medians of {args.rounds} interleaved rounds"
    )
    rows: list[dict[str, object]] = []
    for batch_size in args.batches:
        loader = DataLoader(data, batch_size=batch_size)
        batches = len(loader)
        run_library(original, loader)  # warm-up outside the clock
        seconds: dict[str, list[float]] = {"library": [], "reference": []}
        results = set()
        for r in range(args.rounds):
            order = ["library", "reference"] if r % 2 == 0 else ["reference", "library"]
            for method in order:
                if method == "library":
                    elapsed, result = _timed(functools.partial(run_library, original, loader), clock)
                    results.add(result)
                else:
                    elapsed, _ = _timed(functools.partial(run_reference, original, loader), clock)
                seconds[method].append(elapsed)
        library, reference = (statistics.median(seconds[k]) for k in ("library", "reference"))
        steps = {int(s) for s, _ in results}  # type: ignore[call-overload]
        outcomes = "/".join(sorted({str(o) for _, o in results}))  # type: ignore[misc]
        if steps != {batches}:
            print(f"  warning: the library took {sorted(steps)} steps, not one per batch ({batches})")
        row = {"batch": batch_size, "library_s": library, "reference_s": reference, "speedup": reference / library}
        rows.append(row)
        print(
            f"\nbatch {batch_size} ({batches} steps): library (Trainer.fit, plain, guard on, {outcomes})"
            f" {library:.3f} s, reference {reference:.3f} s: speed-up (reference / library) = {reference / library:.2f}"
        )
        if args.breakdown_rounds > 0:
            parts: Breakdown | None = None
            for _ in range(args.breakdown_rounds):
                with Breakdown(clock) as one:
                    run_library(original, loader)
                parts = one if parts is None else parts.merged(one)
            assert parts is not None
            print(f"\nWhere the fit's time goes at batch {batch_size} (timed runs, {args.breakdown_rounds} fit(s)):\n")
            print(parts.table(batches, reference_s=reference / batches, runs=args.breakdown_rounds))
    return rows


if __name__ == "__main__":
    main()
