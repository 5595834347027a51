"""One no-knob JiT run on the digits CNN: on one device, or sharded with FSDP2 (``--shard``) over ``--devices``.

Run by ``tests/test_sharded.py`` (2 CPU processes, gloo) and by the GPU check (every GPU, NCCL).
``ModelParallelStrategy`` starts its other processes by running this script again (Lightning's subprocess launcher),
so the sharded run cannot live inside a pytest process. The launching process is rank 0: it writes the full weights
and the outcome it holds to ``--out``. The unsharded one-device runs they are compared with need no launch: the test
and the GPU check call :func:`run_all` in their own process.

``--runs`` names the runs, one after the other in the same processes (one launch, one process group): ``wrapper``
(the default), ``retain`` (the wrapper with ``retain=``) and ``callback`` (``JiTUnlearningCallback`` in a training job
whose module shards itself). With one run ``--out`` holds ``{"weights", "summary"}``; with several, ``{run: {"weights",
"summary"}}``.

Example::

    python benchmarks/sharded_fit.py --state trained.pt --out one.pt
    python benchmarks/sharded_fit.py --state trained.pt --out two.pt --devices 2 --shard --runs wrapper,callback
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, TensorDataset

from lightning_jit import JiTUnlearning, JiTUnlearningCallback
from lightning_jit.demo.data import DigitsCNN, class_mask, load_digits_split
from lightning_jit.lightning.data import forget_loader
from lightning_jit.lightning.distributed import shard_model
from lightning_jit.lightning.trainer import quiet_trainer


class ShardedDigitsCNN(DigitsCNN):
    """A training job's module that shards itself under ``ModelParallelStrategy``, as FSDP2 users write it."""

    def configure_model(self) -> None:
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            shard_model(self, self.device_mesh["data_parallel"])


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, gathered whole (a collective: every rank calls it)."""
    out = {}
    for name, value in model.state_dict().items():
        value = value.full_tensor() if hasattr(value, "full_tensor") else value
        out[name] = value.detach().cpu().clone()
    return out


RUNS = ("wrapper", "retain", "callback")


def run(name: str, state: dict[str, torch.Tensor], sharded: dict) -> tuple[dict[str, torch.Tensor], dict, int]:
    """One run (see ``--runs``) with the Trainer arguments ``sharded``: the full weights after it, its summary, and
    this process's global rank."""
    digits = load_digits_split()
    mask = class_mask(digits.y_train, [3])
    ids = torch.nonzero(mask).flatten()[:96]
    data = TensorDataset(digits.x_train[ids], digits.y_train[ids], ids)
    kept = torch.nonzero(~mask).flatten()[:20]
    if name in ("wrapper", "retain"):
        retain = (
            DataLoader(TensorDataset(digits.x_train[kept], digits.y_train[kept]), batch_size=10)
            if name == "retain"
            else None
        )
        model = DigitsCNN()
        model.load_state_dict(state)
        unlearner = JiTUnlearning(model, seed=0, retain=retain, on_unverified="keep")  # the path the README teaches
        trainer = quiet_trainer(max_epochs=-1, use_distributed_sampler=False, **sharded)
        trainer.fit(unlearner, forget_loader(data))
        weights, record = full_weights(model), unlearner.verification
        summary = {"outcome": str(record.outcome), "n_forget": record.n_forget, "accuracy": record.forget_accuracy}
    else:
        model = ShardedDigitsCNN(lr=0.0)  # the job itself changes nothing: the weights are the callback's
        model.load_state_dict(state)
        callback = JiTUnlearningCallback(data, seed=0, when="fit_start", on_unverified="keep", audit_path=None)
        job = DataLoader(TensorDataset(digits.x_train[~mask][:64], digits.y_train[~mask][:64]), batch_size=32)
        trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, callbacks=[callback], **sharded)
        trainer.fit(model, job)
        weights = full_weights(model)
        last = callback.ledger.runs[-1]
        summary = {"outcome": str(last["outcome"]), "counts": last["counts"], "forgotten": len(callback.ledger)}
    return weights, summary, trainer.global_rank


def run_all(names: list[str], state: dict[str, torch.Tensor], trainer_kwargs: dict, shard: bool) -> tuple[dict, int]:
    """The runs ``names``, in order, in this process (``{run: {"weights", "summary"}}``) and its global rank.

    Unsharded (``shard=False``) on one device the runs need no launch: the tests and the GPU check call this in their
    own process for the one-device side. With ``shard=True``, FSDP2 over every process, as docs/scale.md teaches it: a
    new strategy per run (the launch and the process group are the first run's)."""
    results, rank = {}, 0
    for name in names:
        kwargs = dict(trainer_kwargs)
        if shard:
            kwargs["strategy"] = ModelParallelStrategy(data_parallel_size=kwargs["devices"], tensor_parallel_size=1)
        weights, summary, rank = run(name, state, kwargs)
        results[name] = {"weights": weights, "summary": summary}
    return results, rank


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--runs", default="wrapper", help=f"comma-separated, in order, from {', '.join(RUNS)}")
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--shard", action="store_true", help="FSDP2 over --devices (even one)")
    args = parser.parse_args()
    names = args.runs.split(",")
    if not names or any(n not in RUNS for n in names):
        raise SystemExit(f"--runs takes names from {', '.join(RUNS)}, comma-separated; got {args.runs!r}")
    if args.accelerator == "cpu":
        torch.set_num_threads(1)
    if args.devices > 1 and not args.shard:
        raise SystemExit("--devices above 1 needs --shard")
    state = torch.load(args.state, map_location="cpu")
    # Lightning's files go next to --out.
    trainer_kwargs = {
        "accelerator": args.accelerator,
        "devices": args.devices,
        "default_root_dir": Path(args.out).parent,
    }
    results, rank = run_all(names, state, trainer_kwargs, args.shard)
    if rank == 0:
        torch.save(results[names[0]] if len(names) == 1 else results, args.out)
    if torch.distributed.is_initialized():
        # Every rank leaves the process group together: left to each process's exit, one rank's gloo teardown can
        # race the other's exit and abort it ("terminate called without an active exception").
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
