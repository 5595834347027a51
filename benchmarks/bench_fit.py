"""A whole unlearning request, end to end: the no-knob path against the reference's single pass, in one process.

Where :mod:`benchmarks.bench_objective` times one step, this times what a user waits for: ``trainer.fit`` of
``JiTUnlearning(model)`` with no setting (survey, calibration, probe synthesis, every pass until the verified stop, the
final verification) against the faithful port of the authors' loop (:func:`benchmarks.reference_port.reference_unlearn`,
one pass), on the same forget loader of the user's batch size. The digits CNN forgets digit 3 (64 samples at batch 1)
or digits 3 and 8 (256 samples at batch 128). Rounds alternate the two methods (the order flips each round); medians
are printed with the outcome.

A run of its own per case, timed by component (:class:`benchmarks.breakdown.Breakdown`), splits the request into its
**fixed cost**, the work a request does whatever its passes (the set-up: survey, step-size calibration, probe
synthesis; the final verification pass; the stopping rule's forget-set checks; the collapse guard's checks), and the
rest (the steps and Lightning's loop); the fixed cost is printed as its own line, in seconds and over the reference's
pass.

On a shared machine use ``--clock cpu`` (process CPU time, the default with one thread): it does not count the time
the process waits for a core.

Run: ``python -m benchmarks.bench_fit [--rounds 3] [--threads 1] [--clock cpu|wall]``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import logging
import statistics
import time
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.breakdown import KIND_LABELS, Breakdown
from benchmarks.reference_port import reference_unlearn
from lightning_jit import JiTUnlearning
from lightning_jit.demo.data import DigitsCNN, class_mask, load_digits_split, train_classifier
from lightning_jit.lightning.trainer import quiet_trainer

#: (forgotten digits, forget samples, batch size) of each case.
CASES = (((3,), 64, 1), ((3, 8), 256, 128))

#: The components of :class:`~benchmarks.breakdown.Breakdown` that make up a request's fixed cost.
FIXED = {
    "set-up (survey, step calibration, probe synthesis)": KIND_LABELS["calibration"],
    "final verification": KIND_LABELS["verification"],
    "stopping rule's checks": KIND_LABELS["stopping_rule"],
    "guard's checks": KIND_LABELS["guard"],
}


def fixed_cost(parts: Breakdown) -> dict[str, float]:
    """The seconds of each fixed part of a request (and their ``"total"``) in a timed fit."""
    out = {name: parts.seconds.get(label, 0.0) for name, label in FIXED.items()}
    out["total"] = sum(out.values())
    return out


def run_library(original: nn.Module, loader: DataLoader, outcomes: set[str], steps: set[int]) -> None:
    """One no-knob request: ``trainer.fit(JiTUnlearning(model, seed=0), loader)``; notes its outcome and steps."""
    wrapper = JiTUnlearning(copy.deepcopy(original), seed=0)
    trainer = quiet_trainer(max_epochs=-1)
    trainer.fit(wrapper, loader)
    outcomes.add(str(wrapper.outcome.value if wrapper.outcome is not None else None))
    steps.add(trainer.global_step)


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="Runs of each method per case (default 3).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1).")
    parser.add_argument("--clock", choices=["wall", "cpu"], default=None, help="default: cpu with one thread")
    parser.add_argument("--breakdown", action="store_true", help="also print the timed fit's table by component")
    args = parser.parse_args(argv)
    clock_name = args.clock or ("cpu" if args.threads == 1 else "wall")
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    split = load_digits_split()
    original = train_classifier(DigitsCNN, split.x_train, split.y_train, epochs=15, seed=0)
    rows = []
    for digits, n, batch_size in CASES:
        mask = class_mask(split.y_train, list(digits))
        forget = TensorDataset(split.x_train[mask][:n], split.y_train[mask][:n])
        loader = DataLoader(forget, batch_size=batch_size)
        seconds: dict[str, list[float]] = {"library": [], "reference": []}
        outcomes = set()
        steps: set[int] = set()
        library_run = functools.partial(run_library, original, loader, outcomes, steps)
        reference_run = functools.partial(reference_unlearn, sigma=0.1, eta=3e-4)
        for r in range(args.rounds):
            for name in ("library", "reference") if r % 2 == 0 else ("reference", "library"):
                start = clock()
                if name == "library":
                    library_run()
                else:
                    reference_run(copy.deepcopy(original), loader)
                seconds[name].append(clock() - start)
        library, reference = (statistics.median(seconds[k]) for k in ("library", "reference"))
        with Breakdown(clock) as parts:  # a run of its own: the timers cost a little per call
            library_run()
        fixed = fixed_cost(parts)
        rows.append(
            {
                "forget": n,
                "batch": batch_size,
                "library_s": library,
                "reference_s": reference,
                "outcomes": outcomes,
                "fixed_s": fixed["total"],
                "timed_fit_s": parts.total,
            }
        )
        outcome = "/".join(sorted(outcomes))
        taken = "/".join(str(k) for k in sorted(steps))
        print(
            f"{n} forget samples at batch {batch_size}: library (no knob, {outcome}, {taken} steps) {library:.2f} s,"
            f" reference (one pass) {reference:.2f} s: library / reference time = {library / reference:.2f}"
        )
        detail = ", ".join(f"{name} {value:.3f} s" for name, value in fixed.items() if name != "total")
        print(
            f"  fixed cost per request: {fixed['total']:.3f} s = {fixed['total'] / reference:.2f}x the reference's"
            f" pass, {100 * fixed['total'] / parts.total:.0f}% of a timed fit of {parts.total:.2f} s ({detail});"
            f" the rest (steps, Lightning's loop): {(parts.total - fixed['total']) / reference:.2f}x"
        )
        if args.breakdown:
            print(parts.table(max(steps), reference_s=reference / len(loader)))
    print(f"(clock {clock_name}, {torch.get_num_threads()} thread(s), medians of {args.rounds} rounds)")
    return rows


if __name__ == "__main__":
    main()
