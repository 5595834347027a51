"""A production pipeline that receives deletion requests, on scikit-learn's digits (runs on a CPU in about a minute).

1. Train a digits CNN (the production model), with a checkpoint.
2. A deletion request arrives: a set of training-sample indices whose influence must be removed (here every image of
   one source whose licence was withdrawn: all the 3s).
3. Run a short fine-tuning job on the remaining data with ``JiTUnlearningCallback(when="fit_start")``: the requested
   samples are unlearned first, then fine-tuning continues; the callback saves ``unlearned.ckpt`` and writes an audit
   record next to the checkpoints.
4. Show that the requested samples are forgotten, next to a model retrained from scratch without them (the gold
   standard), and print the audit record with its verified outcome. ``unlearned.ckpt`` is written, and the ids are
   recorded as forgotten, only when the outcome is verified ``forgotten``.
5. A second job resumes from the first one's checkpoint with the same request plus new ids (a second source: the
   8s): the ledger in the checkpoint makes it process only the new ones.

Usage::

    python examples/production_pipeline.py --out runs/pipeline
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_jit import JiTUnlearningCallback
from lightning_jit.demo.data import DigitsCNN, accuracy, load_digits_split, train_classifier
from lightning_jit.lightning.ledger import AUDIT_FILENAME, read_audit

SETTINGS = dict(seed=0)  # no knob: the run calibrates itself and verifies its outcome


def mean_entropy(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Mean predictive entropy (nats): a memorised sample gets a confident, low-entropy prediction."""
    with torch.no_grad():
        p = torch.softmax(model.eval()(x).double(), dim=1)
    return float(-(p * p.clamp_min(1e-300).log()).sum(1).mean())


def requested(split, indices: list[int]) -> TensorDataset:
    """The samples of a deletion request as ``(x, y, id)``: the id is the training-set index."""
    idx = torch.tensor(indices)
    return TensorDataset(split.x_train[idx], split.y_train[idx], idx)


def job(model, split, keep, callback, out: Path, max_epochs: int, ckpt_path=None) -> pl.Trainer:
    """A short fine-tuning job on the data that is kept (Adam, lr 3e-4), with the deletion-request callback."""
    model.hparams.lr = 3e-4
    loader = DataLoader(
        TensorDataset(split.x_train[keep], split.y_train[keep]),
        batch_size=64,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        limit_train_batches=5,
        logger=False,
        enable_model_summary=False,
        default_root_dir=out,
        callbacks=[callback, ModelCheckpoint(dirpath=out / "checkpoints", save_last=True)],
    )
    trainer.fit(model, loader, ckpt_path=ckpt_path)
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("production_pipeline_out"))
    parser.add_argument("--first-class", type=int, default=3, help="The digit of the first request.")
    parser.add_argument("--second-class", type=int, default=8, help="The digit the second request adds.")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    out: Path = args.out
    split = load_digits_split()

    # 1. The production model.
    model = train_classifier(DigitsCNN, split.x_train, split.y_train, epochs=15, seed=0)
    original = DigitsCNN()
    original.load_state_dict(model.state_dict())

    # 2. A deletion request: training-set indices.
    first = torch.nonzero(split.y_train == args.first_class).flatten().tolist()
    second = torch.nonzero(split.y_train == args.second_class).flatten().tolist()
    keep = torch.ones(len(split.y_train), dtype=torch.bool)
    keep[first] = False

    # 3. A fine-tuning job that processes the request first.
    callback = JiTUnlearningCallback(requested(split, first), **SETTINGS, when="fit_start")
    job(model, split, keep, callback, out / "job1", max_epochs=1)

    # 4. Forgotten? Compare with the gold standard: a model retrained from scratch without the requested samples.
    retrained = train_classifier(DigitsCNN, split.x_train[keep], split.y_train[keep], epochs=15, seed=0)
    x_f, y_f = split.x_train[first], split.y_train[first]
    print(f"\nRequested samples ({len(first)}): accuracy, mean entropy; and test accuracy")
    print(f"{'model':<34}{'forget acc %':>14}{'forget entropy':>16}{'test acc %':>12}")
    unlearned = DigitsCNN.load_from_checkpoint(out / "job1" / "checkpoints" / "unlearned.ckpt", strict=True)
    rows = (
        ("original", original),
        ("unlearned.ckpt (JiT only)", unlearned),
        ("after the job (JiT + fine-tune)", model),
        ("retrained without them", retrained),
    )
    for name, m in rows:
        print(
            f"{name:<34}{accuracy(m, x_f, y_f):>14.1f}{mean_entropy(m, x_f):>16.4f}"
            f"{accuracy(m, split.x_test, split.y_test):>12.1f}"
        )
    audit = read_audit(out / "job1" / "checkpoints" / AUDIT_FILENAME)
    record = audit[-1]
    shown = {
        k: record[k]
        for k in (
            "outcome",
            "verification",
            "run",
            "time",
            "moment",
            "counts",
            "metrics_before",
            "metrics_after",
            "steps",
            "wall_time_s",
            "checkpoint",
            "versions",
        )
    }
    shown["ids"] = f"{record['ids'][:8]} ... ({len(record['ids'])} ids)"
    shown["settings"] = {
        k: record["settings"].get(k) for k in ("sigma", "lr", "n_perturbations", "seed", "norm_policy")
    }
    print("\nAudit record of job 1:\n" + json.dumps(shown, indent=2))

    # 5. A second job: the same request plus new ids, resumed from the first job's unlearned checkpoint.
    keep[second] = False
    callback2 = JiTUnlearningCallback(requested(split, first + second), **SETTINGS, when="fit_start")
    job(
        DigitsCNN(),
        split,
        keep,
        callback2,
        out / "job2",
        max_epochs=2,
        ckpt_path=out / "job1" / "checkpoints" / "unlearned.ckpt",
    )
    record2 = read_audit(out / "job2" / "checkpoints" / AUDIT_FILENAME)[-1]
    print(
        f"\nJob 2 request: {record2['counts']['requested']} ids; already forgotten:"
        f" {record2['counts']['already_forgotten']}; processed now: {record2['counts']['forgotten']}"
    )
    assert sorted(record2["ids"]) == second, "job 2 must process exactly the new ids"
    print(f"Ledger now holds {len(callback2.ledger)} forgotten ids over {len(callback2.ledger.runs)} runs.")


if __name__ == "__main__":
    main()
