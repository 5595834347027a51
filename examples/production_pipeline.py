"""A production pipeline that receives per-user deletion requests, on scikit-learn's digits (about a minute on a CPU).

1. Train a digits CNN (the production model). Every training image belongs to one of 40 users, so a user's records
   are spread across all ten digits, as a real deletion request is.
2. Job 1, a short fine-tuning job with ``JiTUnlearningCallback(when="fit_start")`` and the validation split as
   held-out data (``monitor=``): three users ask for their records to be deleted. A request that names individual
   samples is verified against held-out data: the forget samples must look like data the model never saw. Three
   users' records are too few for that test to tell a memorised set from an unseen one against this validation split,
   so the run changes nothing and records the ids as *unverifiable* (never as forgotten), with the size it would take.
3. Job 2 resumes from job 1's checkpoint, where the ledger travels. Six more users ask: the unverifiable ids are
   tried again together with the new ones, and now the request is large enough to verify. Only then do the ids move
   to "forgotten", and the callback writes ``unlearned.ckpt``.
4. The audit record of each job is printed, with the held-out test's figures, next to a model retrained from scratch
   without the deleted records (the gold standard).

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

USERS = 40


def records_of(split, users: range) -> list[int]:
    """The training-set indices of the given users' records (user of record ``i``: ``i % USERS``)."""
    return [i for i in range(len(split.y_train)) if i % USERS in users]


def requests(split, indices: list[int]) -> TensorDataset:
    """The records of a deletion request as ``(x, y, id)``: the id is the training-set index."""
    idx = torch.tensor(indices)
    return TensorDataset(split.x_train[idx], split.y_train[idx], idx)


def job(model, split, keep, callback, out: Path, max_epochs: int, ckpt_path=None) -> None:
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


def summary(record: dict) -> dict:
    """The parts of an audit record a reviewer reads first."""
    verification = record.get("verification") or {}
    return {
        "outcome": record["outcome"],
        "verdict": verification.get("verdict"),
        "counts": record["counts"],
        "heldout_test": verification.get("heldout_test"),
        "checkpoint": record["checkpoint"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("production_pipeline_out"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    out: Path = args.out
    split = load_digits_split()
    validation = DataLoader(TensorDataset(split.x_test, split.y_test), batch_size=256)  # data the model never saw

    # 1. The production model.
    model = train_classifier(DigitsCNN, split.x_train, split.y_train, epochs=15, seed=0)
    original = DigitsCNN()
    original.load_state_dict(model.state_dict())

    # 2. Job 1: three users ask for deletion.
    first = records_of(split, range(0, 3))
    keep = torch.ones(len(split.y_train), dtype=torch.bool)
    keep[first] = False
    callback = JiTUnlearningCallback(requests(split, first), monitor=validation, seed=0, when="fit_start")
    job(model, split, keep, callback, out / "job1", max_epochs=1)
    record1 = read_audit(out / "job1" / "checkpoints" / AUDIT_FILENAME)[-1]
    print(f"\nJob 1: {len(first)} records of 3 users\n" + json.dumps(summary(record1), indent=2))

    # 3. Job 2: six more users; the unverifiable ids are tried again with them.
    both = records_of(split, range(0, 9))
    keep[both] = False
    callback2 = JiTUnlearningCallback(requests(split, both), monitor=validation, seed=0, when="fit_start")
    job(model, split, keep, callback2, out / "job2", max_epochs=2, ckpt_path=out / "job1" / "checkpoints" / "last.ckpt")
    record2 = read_audit(out / "job2" / "checkpoints" / AUDIT_FILENAME)[-1]
    print(f"\nJob 2: {len(both)} records of 9 users\n" + json.dumps(summary(record2), indent=2))
    ledger = callback2.ledger
    unverifiable = sum(ledger.is_unverifiable(i) for i in both)
    print(f"\nLedger: {len(ledger)} ids forgotten, {unverifiable} unverifiable, {len(ledger.runs)} runs.")

    # 4. Against the gold standard: a model retrained from scratch without the deleted records.
    retrained = train_classifier(DigitsCNN, split.x_train[keep], split.y_train[keep], epochs=15, seed=0)
    x_f, y_f = split.x_train[both], split.y_train[both]
    print(f"\n{'model':<30}{'deleted records acc %':>24}{'validation acc %':>18}")
    for name, m in (("original", original), ("after job 2", model), ("retrained without them", retrained)):
        print(f"{name:<30}{accuracy(m, x_f, y_f):>24.1f}{accuracy(m, split.x_test, split.y_test):>18.1f}")


if __name__ == "__main__":
    main()
