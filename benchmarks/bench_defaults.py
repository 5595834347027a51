"""What the default improvements cost: a JiT run with the defaults against plain JiT, in the same process.

The defaults (``normalize_logits``, ``logit_norm_penalty=10``, ``probe_distillation=1``) add the penalty's passes, a
forward/backward of the class probes per step, and the probes' synthesis and the frozen copy of the weights once per
run. This times whole ``trainer.fit`` runs of a fixed number of epochs (no stopping rule, tiny lr) on the digits CNN,
forgetting digit 3 in batches of 32, alternating the two settings, and prints the median wall time per step of each
and their ratio.

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
    seconds: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, preset in SETTINGS.items():
            model = DigitsCNN()
            model.load_state_dict(original.state_dict())
            wrapper = JiTUnlearning(model, preset(sigma=0.1, lr=1e-4, epochs=args.epochs), guard=False)
            start = time.perf_counter()
            quiet_trainer(max_epochs=args.epochs).fit(wrapper, loader)
            seconds[name].append(time.perf_counter() - start)
    steps = args.epochs * len(loader)
    per_step = {name: statistics.median(values) / steps * 1000 for name, values in seconds.items()}
    for name, ms in per_step.items():
        print(f"{name}: {ms:.1f} ms per step (median of {args.rounds} runs of {steps} steps, whole fit)")
    ratio = per_step["defaults"] / per_step["plain JiT"]
    print(f"defaults / plain JiT: {ratio:.2f}x")
    return {**per_step, "ratio": ratio}


if __name__ == "__main__":
    main()
