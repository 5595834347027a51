"""Precision, multi-process strategies and world-size-independent results, on CPU with gloo."""

from __future__ import annotations

import hashlib
import os
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _utils import RecordOnRankZero, RecordRunOnRankZero, quiet_trainer, release_process_group
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_jit import JiTSettings, JiTUnlearning, JiTUnlearningCallback
from lightning_jit.core.outcome import Outcome, Verification
from lightning_jit.core.run.collectives import take_shard as _take_shard
from lightning_jit.demo.data import DigitsCNN, accuracy, class_mask
from lightning_jit.io import json_safe
from lightning_jit.lightning.data import forget_loader
from lightning_jit.lightning.ledger import AUDIT_FILENAME, read_audit

MARK = 40.0  # a pixel value no digit has (they are normalised): the model below returns Inf for such samples


class InfOnMarkedBatch(DigitsCNN):
    """A digits CNN whose outputs are infinite for samples whose first pixel is ``MARK`` (and their perturbations)."""

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        marked = x.flatten(1)[:, :1] > MARK / 2
        return out * torch.where(marked, torch.full_like(marked, float("inf"), dtype=out.dtype), 1.0)


def _weights(model: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _max_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ---------------------------------------------------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------------------------------------------------
def test_bf16_mixed_forgets_like_32_true_and_perturbed_passes_run_under_autocast(digits, _trained_state):
    mask = class_mask(digits.y_train, [3])
    loader = forget_loader(TensorDataset(digits.x_train[mask], digits.y_train[mask]))
    results = {}
    autocast_seen: dict[str, list[bool]] = {}
    for precision in ("32-true", "bf16-mixed"):
        model = DigitsCNN()
        model.load_state_dict(_trained_state)
        assert accuracy(model, digits.x_train[mask], digits.y_train[mask]) > 95.0
        # Record, for every no-grad (perturbed) forward during the run, whether autocast was on.
        seen: list[bool] = []
        hook = model.register_forward_pre_hook(
            lambda m, a, seen=seen: None if torch.is_grad_enabled() else seen.append(torch.is_autocast_enabled("cpu"))
        )
        torch.manual_seed(0)
        wrapper = JiTUnlearning(model, seed=0)  # the no-knob path
        trainer = quiet_trainer(max_epochs=-1, precision=precision)
        trainer.fit(wrapper, loader)
        hook.remove()
        autocast_seen[precision] = seen
        assert wrapper.skipped_steps == 0
        results[precision] = accuracy(model, digits.x_train[mask], digits.y_train[mask])
    assert autocast_seen["bf16-mixed"] and all(autocast_seen["bf16-mixed"])
    assert autocast_seen["32-true"] and not any(autocast_seen["32-true"])
    assert results["32-true"] <= 5.0 and results["bf16-mixed"] <= 5.0, results
    assert abs(results["32-true"] - results["bf16-mixed"]) <= 5.0, results


def _marked_loader(digits, with_bad: bool, batch_size: int = 8) -> DataLoader:
    """Three batches of digits with ids; the middle one is marked so that ``InfOnMarkedBatch`` returns Inf on it."""
    x, y = digits.x_train[:24].clone(), digits.y_train[:24].clone()
    ids = torch.arange(24)
    x[8:16, :, 0, 0] = MARK
    keep = torch.ones(24, dtype=torch.bool)
    if not with_bad:
        keep[8:16] = False
    return DataLoader(TensorDataset(x[keep], y[keep], ids[keep]), batch_size=batch_size)


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_non_finite_step_is_skipped_counted_and_never_applied(digits, _trained_state, precision):
    """A batch on which the model outputs Inf: its step is skipped and counted; the others are applied as usual.

    Independent check: the weights equal those of a run that never saw the bad batch (same keyed noise). Under
    "16-mixed" (the CPU GradScaler through the precision plugin) the scaler also lowers its scale once.
    """
    finals, skipped, scales = [], [], []
    for with_bad in (True, False):
        model = InfOnMarkedBatch()
        model.load_state_dict(_trained_state)
        # Plain JiT: with probe distillation the skipped batch's classes would also leave the probes (they are forget
        # classes), so the run that never saw it would hold other probes.
        wrapper = JiTUnlearning(
            model,
            JiTSettings.plain(
                sigma=0.2, lr=0.05, n_perturbations=4, seed=5, on_unverified="keep", target_forget_accuracy=0.0
            ),
            guard=False,
        )
        plugins = [MixedPrecision("16-mixed", "cpu")] if precision == "16-mixed" else []
        trainer = quiet_trainer(plugins=plugins)
        start = _weights(model)
        trainer.fit(wrapper, _marked_loader(digits, with_bad))
        assert _max_diff(start, _weights(model)) > 0  # the good steps were applied
        assert all(torch.isfinite(v).all() for v in model.state_dict().values())
        scaler = trainer.precision_plugin.scaler if precision == "16-mixed" else None
        scales.append(scaler.get_scale() if scaler is not None else 1.0)
        skipped.append(wrapper.skipped_steps)
        finals.append(_weights(model))
    if precision == "32-true":
        assert skipped == [1, 0]
    else:
        # The GradScaler may also skip a step while it searches for its scale (fp16 overflow of a good batch); the
        # bad batch costs exactly one more skip, and one more halving of the scale.
        assert skipped[0] == skipped[1] + 1
        assert scales[0] == scales[1] * 0.5
    assert _max_diff(*finals) == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------------------------------
def _ddp_run(digits, devices: int, strategy: str) -> tuple[dict[str, Tensor], Verification | None]:
    torch.manual_seed(0)
    model = DigitsCNN()  # untrained: large gradients make any difference between the runs show
    wrapper = JiTUnlearning(  # with the logit-norm penalty: its keyed noise and its reduction are sharded too
        model,
        sigma=0.2,
        lr=0.05,
        n_perturbations=5,
        epochs=2,
        seed=7,
        perturbation_chunk=16,
        guard=False,
        logit_norm_penalty=1.0,  # (10 diverges on this untrained model, whose logits are tiny)
        on_unverified="keep",  # the weights the runs reach are compared, not the original's
        target_forget_accuracy=0.0,  # a target: the run steps (a sample request without held-out data would not)
    )
    data = TensorDataset(digits.x_train[:40], digits.y_train[:40], torch.arange(40))
    # 40 samples in batches of 13: the last batch has a single sample, so one of the two ranks gets none of it.
    trainer = quiet_trainer(
        devices=devices,
        strategy=strategy,
        max_epochs=2,
        use_distributed_sampler=False,
        callbacks=[release_process_group()],
    )
    trainer.fit(wrapper, DataLoader(data, batch_size=13))
    return _weights(model), wrapper.verification


@pytest.mark.slow
def test_ddp_spawn_two_processes_give_the_one_process_weights_and_outcome(digits):
    torch.manual_seed(0)
    initial = _weights(DigitsCNN())
    one, verified_one = _ddp_run(digits, 1, "auto")
    two, verified_two = _ddp_run(digits, 2, "ddp_spawn")
    assert _max_diff(initial, one) > 1e-3  # JiT changed the weights
    assert _max_diff(one, two) < 1e-5
    # The launching process of the spawned run holds rank 0's verified outcome, as the one-process run does.
    assert verified_two is not None and verified_two.outcome == verified_one.outcome
    assert (verified_two.n_forget, verified_two.forget_accuracy) == (
        verified_one.n_forget,
        verified_one.forget_accuracy,
    )


def test_take_shard_covers_the_batch_once():
    x = torch.arange(13.0).view(13, 1)
    labels = torch.arange(13)
    for world in (1, 2, 3, 5, 16):
        parts = [_take_shard(x, labels, list(range(13)), r, world) for r in range(world)]
        assert torch.cat([p[0] for p in parts]).flatten().tolist() == list(range(13))
        assert sum((p[2] for p in parts), []) == list(range(13))


def test_unsupported_strategy_is_refused_by_name():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    loader = DataLoader(TensorDataset(torch.randn(8, 1, 4, 4)), batch_size=4)
    trainer = quiet_trainer(strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2))
    with pytest.raises(MisconfigurationException, match="ModelParallelStrategy"):
        trainer.fit(JiTUnlearning(net, sigma=0.5, lr=0.01), loader)


def test_compile_option_gives_the_same_update(digits, _trained_state):
    """``compile_model`` runs the step through ``torch.compile`` (the cheap "eager" backend here): same update."""
    loader = DataLoader(TensorDataset(digits.x_train[:16], digits.y_train[:16], torch.arange(16)), batch_size=8)
    finals = []
    for options in (False, {"backend": "eager"}):
        model = DigitsCNN()
        model.load_state_dict(_trained_state)
        wrapper = JiTUnlearning(
            model,
            sigma=0.2,
            lr=0.05,
            n_perturbations=3,
            seed=1,
            guard=False,
            compile_model=options,
            target_forget_accuracy=0.0,
            on_unverified="keep",
        )
        quiet_trainer().fit(wrapper, loader)
        assert len(wrapper._compiled) == (1 if options else 0)
        assert all(not k.startswith("_compiled") for k in wrapper.state_dict())
        finals.append(_weights(model))
    assert _max_diff(*finals) < 1e-6


def test_compile_option_is_validated():
    with pytest.raises(MisconfigurationException, match="compile_model"):
        JiTUnlearning(DigitsCNN(), sigma=0.1, lr=0.1, compile_model="yes")


def _no_knob_run(trained_state, data, devices: int) -> dict[str, Tensor]:
    model = DigitsCNN()
    model.load_state_dict(trained_state)
    wrapper = JiTUnlearning(model, seed=0, on_unverified="keep")  # the path the README teaches
    trainer = quiet_trainer(
        max_epochs=-1,
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        use_distributed_sampler=False,
        callbacks=[release_process_group()],
    )
    trainer.fit(wrapper, forget_loader(data))
    return _weights(model)


@pytest.mark.slow
def test_the_no_knob_path_gives_the_same_weights_on_one_and_two_processes(digits, _trained_state):
    """Under the documented rule (ids, ``seed=``, ``use_distributed_sampler=False``); with ``retain=``: the cost-bound
    test below. The stopping rule's window once counted each process's share, so two processes stopped at another
    step."""
    mask = class_mask(digits.y_train, [3])
    ids = torch.nonzero(mask).flatten()[:96]
    data = TensorDataset(digits.x_train[ids], digits.y_train[ids], ids)
    one = _no_knob_run(_trained_state, data, 1)
    two = _no_knob_run(_trained_state, data, 2)
    update = _max_diff(one, {k: v for k, v in _trained_state.items()})
    assert update > 1e-2 and _max_diff(one, two) <= 1e-5 * update


#: A cost bound the digits run below reaches in its first pass, before it forgets to its target of 0%.
BOUND = 12.0


def _bounded_run(trained_state, data, devices: int, path, retain) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The no-knob path with ``retain=`` and a ``max_cost`` the run reaches before it forgets: the weights and how
    rank 0's run ended."""
    model = DigitsCNN()
    model.load_state_dict(trained_state)
    wrapper = JiTUnlearning(
        model, seed=0, retain=retain, max_cost=BOUND, target_forget_accuracy=0.0, on_unverified="keep"
    )
    trainer = quiet_trainer(
        max_epochs=-1,
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        use_distributed_sampler=False,
        callbacks=[RecordRunOnRankZero(path), release_process_group()],
    )
    trainer.fit(wrapper, forget_loader(data))
    return _weights(model), torch.load(path, weights_only=False)


@pytest.mark.slow
def test_the_cost_bound_ends_one_and_two_process_runs_at_the_same_step(digits, _trained_state, tmp_path):
    """The class probes' and the retain samples' distillation and the guard's checks run in full on every process:
    the bound counts them once, so two processes reach ``max_cost`` at the one-process step, with the one-process
    weights (it once summed them, and stopped earlier)."""
    mask = class_mask(digits.y_train, [3])
    ids = torch.nonzero(mask).flatten()[:96]
    data = TensorDataset(digits.x_train[ids], digits.y_train[ids], ids)
    kept = torch.nonzero(~mask).flatten()[:20]
    retain = DataLoader(TensorDataset(digits.x_train[kept], digits.y_train[kept]), batch_size=10)
    one, ran_one = _bounded_run(_trained_state, data, 1, tmp_path / "one.pt", retain)
    two, ran_two = _bounded_run(_trained_state, data, 2, tmp_path / "two.pt", retain)
    replicated = ("probes", "retain", "guard")
    assert ran_one["bound_reached"] and all(ran_one["cost"][k] > 0 for k in replicated), ran_one
    assert (ran_two["steps"], ran_two["bound_reached"]) == (ran_one["steps"], ran_one["bound_reached"])
    # Rank 0 took the same probes, retain samples and guard checks as the one process (the bound counts them once).
    assert [ran_two["cost"][k] for k in replicated] == [ran_one["cost"][k] for k in replicated]
    update = _max_diff(one, {k: v for k, v in _trained_state.items()})
    assert update > 1e-2 and _max_diff(one, two) <= 1e-5 * update


def _callback_run(trained_state, requests, job, devices: int, root: Path) -> tuple[dict[str, Tensor], Any, dict]:
    """The weights after the job, its callback (in the launching process) and what rank 0's callback held. The job
    checkpoints under ``root / "ckpt"``, where the callback writes ``unlearned.ckpt`` and the audit file."""
    model = DigitsCNN(lr=0.0)  # the job itself changes nothing: the weights are the callback's
    model.load_state_dict(trained_state)
    callback = JiTUnlearningCallback(requests, seed=0, when="fit_start", on_unverified="keep")
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, save_on_train_epoch_end=True)
    trainer = quiet_trainer(
        max_epochs=1,
        limit_train_batches=1,
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        enable_checkpointing=True,
        default_root_dir=root,
        callbacks=[callback, checkpoint, RecordOnRankZero(root / "rank0.pt"), release_process_group()],
    )
    trainer.fit(model, job)
    return _weights(model), callback, torch.load(root / "rank0.pt", weights_only=False)


def _same_record(a: Verification | None, b: Verification | None) -> bool:
    return a is not None and b is not None and json_safe(a.as_dict()) == json_safe(b.as_dict())


@pytest.mark.slow
def test_the_callbacks_no_knob_run_gives_the_same_weights_on_one_and_two_processes(digits, _trained_state, tmp_path):
    """Same weights, and (issue 21) under ``ddp_spawn``, whose fit runs in two new processes, the launching process's
    callback holds rank 0's outcome, verification and ledger (as rank 0 saved them), which match the one-process
    run's; rank 0's checkpoint and audit line record the same run."""
    mask = class_mask(digits.y_train, [3])
    ids = torch.nonzero(mask).flatten()[:96]
    requests = TensorDataset(digits.x_train[ids], digits.y_train[ids], ids)
    job = DataLoader(TensorDataset(digits.x_train[~mask][:64], digits.y_train[~mask][:64]), batch_size=32)
    one, callback_one, _ = _callback_run(_trained_state, requests, job, 1, tmp_path / "one")
    two, callback_two, rank0 = _callback_run(_trained_state, requests, job, 2, tmp_path / "two")
    update = _max_diff(one, {k: v for k, v in _trained_state.items()})
    assert update > 1e-2 and _max_diff(one, two) <= 1e-5 * update
    # The launching process holds exactly what rank 0 held.
    assert callback_two.outcome is rank0["outcome"] is Outcome.FORGOTTEN
    assert _same_record(callback_two.verification, rank0["verification"])
    assert callback_two.ledger.state_dict() == rank0["ledger"]
    # And it is the one-process run's result: the same ids forgotten, the same verified figures.
    assert callback_one.outcome is Outcome.FORGOTTEN
    assert sorted(callback_two.ledger.forgotten) == sorted(callback_one.ledger.forgotten)
    assert len(callback_two.ledger) == 96
    assert len(callback_two.ledger.runs) == len(callback_one.ledger.runs) == 1
    figures = ("outcome", "n_forget", "forget_accuracy", "target", "measured_against", "passes", "restored")
    v_one, v_two = callback_one.verification, callback_two.verification
    assert [getattr(v_two, f) for f in figures] == [getattr(v_one, f) for f in figures]
    run_one, run_two = callback_one.ledger.runs[0], callback_two.ledger.runs[0]
    assert (run_two["world_size"], run_one["world_size"]) == (2, 1)
    for key in ("ids", "counts", "outcome", "settings", "id_source", "epochs_run", "steps", "skipped_steps", "moment"):
        assert run_two[key] == run_one[key], key
    for key in ("metrics_before", "metrics_after"):  # each process runs its own conv kernels: equal up to rounding
        assert run_two[key] == pytest.approx(run_one[key], rel=1e-5), key
    # Rank 0's files: the audit line is the ledger's run record plus the checkpoint's sha256 (which the checkpoint
    # cannot hold about itself), and the checkpoint holds the ledger and the one-process weights.
    folder = tmp_path / "two" / "ckpt"
    (record,) = read_audit(folder / AUDIT_FILENAME)
    assert record.pop("checkpoint_sha256") == hashlib.sha256((folder / "unlearned.ckpt").read_bytes()).hexdigest()
    ckpt = torch.load(folder / "unlearned.ckpt", weights_only=False)
    assert ckpt["callbacks"][callback_two.state_key]["ledger"] == callback_two.ledger.state_dict()
    assert callback_two.ledger.runs == [record]
    unlearned = DigitsCNN.load_from_checkpoint(folder / "unlearned.ckpt", strict=True)
    assert _max_diff(_weights(unlearned), one) <= 1e-5 * update


DDP_SCRIPT = Path(__file__).parent / "fixtures" / "ddp_launcher_run.py"


@pytest.mark.slow
def test_under_the_ddp_launcher_every_rank_holds_the_one_process_outcome_and_ledger(_trained_state, tmp_path):
    """Lightning's ``ddp`` launcher re-executes the script for the other ranks and runs rank 0 in the process that was
    started (so the script runs in a subprocess of the test): after ``trainer.fit`` the wrapper's and the callback's
    outcome, verification and ledger are the same in both ranks, and the one-process run's."""
    torch.save(_trained_state, tmp_path / "state.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(DDP_SCRIPT), str(tmp_path / "state.pt"), str(tmp_path / "two"), "2"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / "two" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    one = runpy.run_path(str(DDP_SCRIPT))["run"](tmp_path / "state.pt", tmp_path / "one", 1)
    figures = ("outcome", "n_forget", "forget_accuracy", "target", "measured_against", "passes", "restored")
    for front in ("wrapper", "callback"):
        expected = one[front]
        assert expected["outcome"] is Outcome.FORGOTTEN, front
        update = _max_diff(expected["weights"], _trained_state)
        for rank in ranks:
            got = rank[front]
            assert got["outcome"] is Outcome.FORGOTTEN, (front, rank["rank"])
            assert [getattr(got["verification"], f) for f in figures] == [
                getattr(expected["verification"], f) for f in figures
            ], (front, rank["rank"])
            assert _max_diff(got["weights"], expected["weights"]) <= 1e-5 * update, (front, rank["rank"])
        assert _same_record(ranks[0][front]["verification"], ranks[1][front]["verification"]), front
    # Every rank holds rank 0's ledger (its record, times included), with the one-process run's forgotten ids.
    assert ranks[0]["callback"]["ledger"] == ranks[1]["callback"]["ledger"]
    assert sorted(ranks[0]["callback"]["ledger"]["forgotten"]) == sorted(one["callback"]["ledger"]["forgotten"])
    assert len(ranks[0]["callback"]["ledger"]["forgotten"]) == 96
