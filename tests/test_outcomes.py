"""Verified outcomes: each outcome reached for real on digits, and never a claim that was not checked."""

from __future__ import annotations

import pytest
import torch
from _utils import quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_jit import (
    JiTDivergenceError,
    JiTInputError,
    JiTSettings,
    JiTUnlearning,
    JiTUnlearningCallback,
    JiTUnlearningFailed,
    Outcome,
)
from lightning_jit.core.engine import JiTRun
from lightning_jit.core.outcome import JiTOutcomeWarning
from lightning_jit.core.weights import WeightSnapshot
from lightning_jit.demo.data import DigitsCNN, accuracy, class_mask
from lightning_jit.lightning.data import forget_loader
from lightning_jit.lightning.ledger import AUDIT_FILENAME, read_audit

#: Plain JiT at a step that collapses the digits CNN, guarded every step and stopped at the first collapse.
COLLAPSING = JiTSettings.plain(sigma=0.1, lr=0.03, n_perturbations=8, epochs=3, target_forget_accuracy=10.0)


def _threes(digits):
    mask = class_mask(digits.y_train, [3])
    return TensorDataset(digits.x_train[mask], digits.y_train[mask], torch.nonzero(mask).flatten())


def _job(digits, tmp_path, callback, ckpt_path=None):
    """A one-epoch fine-tuning job on data no request touches, with the JiT callback and a checkpoint directory."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = quiet_trainer(
        max_epochs=1 if ckpt_path is None else 2,
        limit_train_batches=2,
        enable_checkpointing=True,
        default_root_dir=tmp_path,
        callbacks=[callback, checkpoint],
    )
    job = DataLoader(TensorDataset(digits.x_train[400:528], digits.y_train[400:528]), batch_size=64)
    return trainer, job


def test_not_forgotten_when_the_bound_is_reached_warns_and_strict_raises_after_restoring(trained_cnn, digits):
    start = WeightSnapshot(trained_cnn)
    bounded = JiTUnlearning(trained_cnn, max_cost=10.0)  # far too little to forget a class
    with pytest.warns(JiTOutcomeWarning, match="NOT forgotten.*the weights from before the run were restored"):
        quiet_trainer(max_epochs=-1).fit(bounded, forget_loader(_threes(digits)))
    assert bounded.outcome == Outcome.NOT_FORGOTTEN and bounded.verification.extra["bound_reached"]
    # The default (on_unverified="restore"): the partial weights it measured are gone, the original is back.
    assert bounded.verification.forget_accuracy > 5.0 and start.equals(trained_cnn)
    assert bounded.verification.restored and bounded.verification.as_dict()["restored"] is True

    kept = JiTUnlearning(trained_cnn, max_cost=10.0, on_unverified="keep")
    with pytest.warns(JiTOutcomeWarning, match="partial weights were kept"):
        quiet_trainer(max_epochs=-1).fit(kept, forget_loader(_threes(digits)))
    assert kept.outcome == Outcome.NOT_FORGOTTEN and kept.verification.restored is False
    assert not start.equals(trained_cnn)  # it did move, not enough: kept on request
    mask = class_mask(digits.y_train, [3])  # the record measured the weights that were kept
    assert kept.verification.forget_accuracy == pytest.approx(
        accuracy(trained_cnn, digits.x_train[mask], digits.y_train[mask])
    )

    start.restore(trained_cnn)
    strict = JiTUnlearning(trained_cnn, max_cost=10.0, strict=True)
    with pytest.raises(JiTUnlearningFailed, match="NOT forgotten") as info:
        quiet_trainer(max_epochs=-1).fit(strict, forget_loader(_threes(digits)))
    assert info.value.verification.outcome == "not_forgotten"
    assert start.equals(trained_cnn)  # strict: the original weights are back


def test_a_collapsing_callback_run_claims_nothing(trained_cnn, digits, tmp_path):
    """The issue's case: settings that collapse a class. The guard rolls the model back, the ids stay pending, no
    unlearned checkpoint is written, and the audit line says what happened."""
    start = WeightSnapshot(trained_cnn)
    callback = JiTUnlearningCallback(
        _threes(digits), COLLAPSING, when="fit_start", check_every=1, on_collapse="stop", ledger_name="a"
    )
    trainer, job = _job(digits, tmp_path, callback)
    seen = {}

    class Snap(__import__("lightning.pytorch").pytorch.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["after_jit"] = WeightSnapshot(pl_module)

    trainer.callbacks.append(Snap())
    trainer.fit(trained_cnn, job)
    assert callback.outcome == Outcome.ROLLED_BACK
    assert seen["after_jit"].state.keys() == start.state.keys() and all(
        torch.equal(seen["after_jit"].state[k], start.state[k]) for k in start.state
    )  # rolled back to the original weights at the hook
    assert len(callback.ledger) == 0 and callback.ledger.pending([0]) == [0]
    assert not (tmp_path / "ckpt" / "unlearned.ckpt").exists()
    (record,) = read_audit(tmp_path / "ckpt" / AUDIT_FILENAME)
    assert record["outcome"] == "rolled_back" and record["counts"]["forgotten"] == 0
    assert record["verification"]["verdict"].startswith("NOT forgotten: rolled back")


def test_failed_ids_stay_pending_and_are_retried(trained_cnn, digits, tmp_path):
    """A run that does not verify leaves its ids pending; the next request (here a resumed job) forgets them."""
    first = JiTUnlearningCallback(_threes(digits), when="fit_start", max_cost=10.0, ledger_name="r")
    trainer, job = _job(digits, tmp_path / "one", first)
    trainer.fit(trained_cnn, job)
    assert first.outcome == Outcome.NOT_FORGOTTEN and len(first.ledger) == 0
    assert read_audit(tmp_path / "one" / "ckpt" / AUDIT_FILENAME)[0]["outcome"] == "not_forgotten"

    second = JiTUnlearningCallback(_threes(digits), when="fit_start", ledger_name="r")
    trainer, job = _job(digits, tmp_path / "two", second, ckpt_path=True)
    trainer.fit(DigitsCNN(), job, ckpt_path=tmp_path / "one" / "ckpt" / "last.ckpt")
    runs = second.ledger.runs
    assert [r["outcome"] for r in runs] == ["not_forgotten", "forgotten"]  # the first job's record carried over
    assert runs[1]["ids"] == runs[0]["ids"] and len(second.ledger) == len(_threes(digits))
    assert (tmp_path / "two" / "ckpt" / "unlearned.ckpt").exists()


def test_an_interrupted_verification_leaves_no_claim(trained_cnn, digits, tmp_path, monkeypatch):
    """SIGTERM or Ctrl+C while the final weights are checked: no ledger entry, no audit line, the weights restored."""
    start = WeightSnapshot(trained_cnn)

    def interrupted(self, *args, **kwargs):
        raise SystemExit(143)  # what the library's SIGTERM handler raises (lightning_jit.io), mid-measurement

    monkeypatch.setattr(JiTRun, "_outcome", interrupted)
    callback = JiTUnlearningCallback(_threes(digits), when="fit_start", epochs=1, ledger_name="i")
    trainer, job = _job(digits, tmp_path, callback)
    with pytest.raises(SystemExit):
        trainer.fit(trained_cnn, job)
    assert len(callback.ledger) == 0 and callback.ledger.runs == []
    assert not (tmp_path / "ckpt" / AUDIT_FILENAME).exists() and not (tmp_path / "ckpt" / "unlearned.ckpt").exists()
    assert start.equals(trained_cnn)


def test_divergence_is_the_diverged_outcome_with_the_original_weights(trained_cnn, digits):
    start = WeightSnapshot(trained_cnn)
    unlearner = JiTUnlearning(trained_cnn, sigma=0.1, lr=1e38)
    with pytest.raises(JiTDivergenceError):
        quiet_trainer(max_epochs=-1).fit(unlearner, forget_loader(_threes(digits)))
    assert unlearner.outcome == Outcome.DIVERGED and start.equals(trained_cnn)


class _DictOutput(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return {"logits": self.model(x)}


class _FeaturesAndLogits(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.features(x).flatten(1), self.model(x)


def test_wrong_results_that_looked_like_success_are_named_errors(trained_cnn, digits):
    """A model returning (features, logits) without `output_selector`, and forget labels outside the model's classes:
    both once ran to a "stopped early" with the class still recognised; both now stop before any update."""
    start = WeightSnapshot(trained_cnn)
    with pytest.raises(JiTInputError, match="output_selector"):
        quiet_trainer(max_epochs=-1).fit(JiTUnlearning(_FeaturesAndLogits(trained_cnn)), forget_loader(_threes(digits)))
    x = digits.x_train[:16]
    for bad in (7 + 3, -1):
        labels = torch.full((16,), bad)
        with pytest.raises(JiTInputError, match="outside the model's 10 classes"):
            quiet_trainer(max_epochs=-1).fit(JiTUnlearning(trained_cnn), DataLoader(TensorDataset(x, labels), 8))
    with pytest.raises(JiTInputError, match="output_selector='logit'"):  # a typo: named, not a bare KeyError
        quiet_trainer(max_epochs=-1).fit(
            JiTUnlearning(_DictOutput(trained_cnn), output_selector="logit"), DataLoader(TensorDataset(x), 8)
        )
    assert start.equals(trained_cnn)
    # With the right selector the same model forgets, and the verification reads the logits.
    unlearner = JiTUnlearning(_FeaturesAndLogits(trained_cnn), output_selector=1)
    quiet_trainer(max_epochs=-1).fit(unlearner, forget_loader(_threes(digits)))
    mask = class_mask(digits.y_train, [3])
    assert unlearner.outcome == "forgotten"
    assert unlearner.verification.forget_accuracy == pytest.approx(
        accuracy(trained_cnn, digits.x_train[mask], digits.y_train[mask])
    )


def test_validation_runs_during_unlearning_and_validate_works(trained_cnn, digits):
    """`trainer.fit(unlearner, forget, val)` runs the wrapped model's own validation_step; `trainer.validate` too."""
    val = DataLoader(TensorDataset(digits.x_test, digits.y_test), batch_size=256)
    unlearner = JiTUnlearning(trained_cnn, epochs=1, on_unverified="keep")  # keep: the weights validated stay
    trainer = quiet_trainer(max_epochs=-1, num_sanity_val_steps=0)
    trainer.fit(unlearner, forget_loader(_threes(digits)), val)
    assert "val_acc" in trainer.callback_metrics  # DigitsCNN logs it as a fraction
    assert float(trainer.callback_metrics["val_acc"]) == pytest.approx(
        accuracy(trained_cnn, digits.x_test, digits.y_test) / 100, abs=1e-4
    )
    plain = JiTUnlearning(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), sigma=0.1)  # no validation_step: accuracy
    (metrics,) = quiet_trainer().validate(plain, val, verbose=False)
    assert metrics["val_acc"] == pytest.approx(accuracy(plain.model, digits.x_test, digits.y_test), abs=1e-3)


def test_resuming_from_an_epoch_checkpoint_equals_the_uninterrupted_run(trained_cnn, digits, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    start = {k: v.clone() for k, v in trained_cnn.state_dict().items()}
    # Three whole passes, whatever happens; kept, so that the two runs' weights are compared, not the original's.
    settings = JiTSettings(epochs=3, target_forget_accuracy=0.0, on_unverified="keep")

    def fresh():
        model = DigitsCNN()
        model.load_state_dict(start)
        return model

    whole = fresh()
    quiet_trainer(max_epochs=-1).fit(JiTUnlearning(whole, settings), forget_loader(_threes(digits)))

    first = fresh()
    saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, save_on_train_epoch_end=True)
    callbacks = [saver, _Preempted(at_epoch=1)]  # the job is stopped after the first pass's checkpoint
    trainer = quiet_trainer(max_epochs=-1, enable_checkpointing=True, callbacks=callbacks, default_root_dir=tmp_path)
    with pytest.raises(RuntimeError, match="preempted"):
        trainer.fit(JiTUnlearning(first, settings), forget_loader(_threes(digits)))
    (checkpoint,) = tmp_path.glob("epoch=0*.ckpt")  # an interrupted run leaves its resume points
    saved = torch.load(checkpoint, weights_only=False)
    assert "jit_run_state" in saved and "jit_unverified" in saved  # saved mid-run: the run's state goes along
    resumed = fresh()
    quiet_trainer(max_epochs=-1).fit(
        JiTUnlearning(resumed, settings), forget_loader(_threes(digits)), ckpt_path=checkpoint
    )
    for name, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


class _Preempted(__import__("lightning.pytorch").pytorch.Callback):
    """Stops a fit with an error when a given epoch starts (a preempted job)."""

    def __init__(self, at_epoch: int) -> None:
        self.at_epoch = at_epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.at_epoch:
            raise RuntimeError("preempted")
