"""What the defaults cost per step: a JiT run with the defaults against plain JiT, in the same process.

The defaults (``JiTSettings()``: 8 perturbations, normalised logits, the logit-norm penalty, the redistribution term,
probe distillation) against ``JiTSettings.plain()`` (the reference's objective, 25 perturbations). This times whole
``trainer.fit`` runs of at most ``--epochs`` passes (tiny lr, the guard off) on the digits CNN, forgetting digit 3 in
batches of 32, alternating the two settings, and prints the median wall time per step taken of each and their ratio.

Run: ``python -m benchmarks.bench_defaults [--rounds 5] [--epochs 5]``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_jit import JiTSettings, JiTUnlearning
from lightning_jit.demo.data import DigitsCNN, class_mask, load_digits_split, train_classifier
from lightning_jit.lightning.trainer import quiet_trainer

SETTINGS = {"plain JiT": JiTSettings.plain, "defaults": JiTSettings}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="Runs of each setting (default 5).")
    parser.add_argument("--epochs", type=int, default=5, help="Epochs per run (default 5).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1).")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    split = load_digits_split()
    original = train_classifier(DigitsCNN, split.x_train, split.y_train, epochs=15, seed=0)
    forget = class_mask(split.y_train, [3])
    loader = DataLoader(TensorDataset(split.x_train[forget], split.y_train[forget]), batch_size=32)
    per_run: dict[str, list[float]] = {name: [] for name in SETTINGS}  # ms per step of each run
    steps: dict[str, set[int]] = {name: set() for name in SETTINGS}
    for _ in range(args.rounds):
        for name, preset in SETTINGS.items():
            model = DigitsCNN()
            model.load_state_dict(original.state_dict())
            wrapper = JiTUnlearning(model, preset(sigma=0.1, lr=1e-4, epochs=args.epochs), guard=False)
            trainer = quiet_trainer(max_epochs=args.epochs)
            start = time.perf_counter()
            trainer.fit(wrapper, loader)
            # the steps this run took (a stopping rule or the cost bound may end a run early)
            per_run[name].append((time.perf_counter() - start) / trainer.global_step * 1000)
            steps[name].add(trainer.global_step)
    per_step = {name: statistics.median(values) for name, values in per_run.items()}
    for name, ms in per_step.items():
        taken = "/".join(str(n) for n in sorted(steps[name]))
        print(f"{name}: {ms:.1f} ms per step (median of {args.rounds} runs of {taken} steps, whole fit)")
    ratio = per_step["defaults"] / per_step["plain JiT"]
    print(f"defaults / plain JiT: {ratio:.2f}x")
    return {**per_step, "ratio": ratio}


if __name__ == "__main__":
    main()
