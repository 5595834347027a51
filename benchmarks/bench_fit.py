"""A whole unlearning request, end to end: the no-knob path against the reference's single pass, in one process.

Where :mod:`benchmarks.bench_objective` times one step, this times what a user waits for: ``trainer.fit`` of
``JiTUnlearning(model)`` with no setting (survey, calibration, probe synthesis, every pass until the verified stop, the
final verification) against the faithful port of the authors' loop (:func:`benchmarks.reference_port.reference_unlearn`,
one pass), on the same forget loader of the user's batch size. The digits CNN forgets digit 3 (64 samples at batch 1)
or digits 3 and 8 (256 samples at batch 128). Rounds alternate the two methods; medians are printed with the outcome.

Run: ``python -m benchmarks.bench_fit [--rounds 3] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
import warnings

import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.reference_port import reference_unlearn
from lightning_jit import JiTUnlearning
from lightning_jit.demo.data import DigitsCNN, class_mask, load_digits_split, train_classifier
from lightning_jit.lightning.trainer import quiet_trainer

#: (forgotten digits, forget samples, batch size) of each case.
CASES = (((3,), 64, 1), ((3, 8), 256, 128))


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="Runs of each method per case (default 3).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1).")
    args = parser.parse_args(argv)
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
        for _ in range(args.rounds):
            model = copy.deepcopy(original)
            wrapper = JiTUnlearning(model, seed=0)
            start = time.perf_counter()
            quiet_trainer(max_epochs=-1).fit(wrapper, loader)
            seconds["library"].append(time.perf_counter() - start)
            outcomes.add(str(wrapper.outcome.value))
            model = copy.deepcopy(original)
            start = time.perf_counter()
            reference_unlearn(model, loader, sigma=0.1, eta=3e-4)
            seconds["reference"].append(time.perf_counter() - start)
        library, reference = (statistics.median(seconds[k]) for k in ("library", "reference"))
        rows.append(
            {"forget": n, "batch": batch_size, "library_s": library, "reference_s": reference, "outcomes": outcomes}
        )
        outcome = "/".join(sorted(outcomes))
        print(
            f"{n} forget samples at batch {batch_size}: library (no knob, {outcome}) {library:.2f} s,"
            f" reference (one pass) {reference:.2f} s: library / reference time = {library / reference:.2f}"
        )
    return rows


if __name__ == "__main__":
    main()
