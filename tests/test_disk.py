"""Nothing unverified on disk, and what an unverified run leaves in memory (issue 21), for the wrapper and the
callback with Lightning's default checkpointing left on; plus the cost record and the validation warning.

Every run is a real Trainer on scikit-learn's digits; files are read back with ``torch.load`` and the user's own
``DigitsCNN.load_from_checkpoint``, and weights are compared with the model in memory, bit for bit.
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from _utils import quiet_trainer, same_weights
from torch.utils.data import DataLoader, TensorDataset

from lightning_jit import JiTSettings, JiTUnlearning, JiTUnlearningCallback, Outcome
from lightning_jit.core.cost import CostCounter
from lightning_jit.core.outcome import JiTOutcomeWarning
from lightning_jit.core.weights import WeightSnapshot
from lightning_jit.demo.data import DigitsCNN, class_mask
from lightning_jit.lightning.checkpoint import JIT_SAFETY_KEY, JIT_UNVERIFIED_KEY
from lightning_jit.lightning.data import forget_loader


def _threes(digits):
    mask = class_mask(digits.y_train, [3])
    return TensorDataset(digits.x_train[mask], digits.y_train[mask], torch.nonzero(mask).flatten())


def _checkpointing_trainer(tmp_path, **kwargs) -> pl.Trainer:
    """A Trainer as the README teaches it (`max_epochs=-1`), with Lightning's default ModelCheckpoint left on."""
    return quiet_trainer(max_epochs=-1, enable_checkpointing=True, default_root_dir=tmp_path, **kwargs)


def _files(tmp_path) -> list:
    return sorted(tmp_path.rglob("*.ckpt"))


def _fit_quietly(trainer, unlearner, loader) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", JiTOutcomeWarning)
        trainer.fit(unlearner, loader)


@pytest.mark.parametrize(
    ("settings", "outcome"),
    [
        ({"max_cost": 10.0}, Outcome.NOT_FORGOTTEN),  # far too little to forget a class
        ({"sigma": 0.3, "lr": 3.0}, Outcome.ROLLED_BACK),  # the case: a step that collapses the model
    ],
)
def test_a_wrapper_run_that_did_not_forget_leaves_no_checkpoint(trained_cnn, digits, tmp_path, settings, outcome):
    start = WeightSnapshot(trained_cnn)
    seen = []

    class Count(pl.Callback):  # what the default ModelCheckpoint wrote while the run was in progress
        def on_train_end(self, trainer, pl_module):  # callbacks' on_train_end: before the run ends and settles
            seen.extend(_files(tmp_path))

    unlearner = JiTUnlearning(trained_cnn, **settings)
    _fit_quietly(_checkpointing_trainer(tmp_path, callbacks=[Count()]), unlearner, forget_loader(_threes(digits)))
    assert unlearner.outcome == outcome and unlearner.verification.restored
    assert seen, "the default ModelCheckpoint wrote nothing during the run: the test would prove nothing"
    assert _files(tmp_path) == []  # nothing unverified left on disk
    assert start.equals(trained_cnn)  # and the model in memory is the original


def test_a_file_written_during_the_run_is_refused_by_the_users_class_and_resumes(trained_cnn, digits, tmp_path):
    """An interrupted run leaves its resume points; they are not in the user's format."""
    from test_outcomes import _Preempted

    unlearner = JiTUnlearning(trained_cnn, JiTSettings(epochs=3, target_forget_accuracy=0.0))
    trainer = _checkpointing_trainer(tmp_path, callbacks=[_Preempted(at_epoch=1)])
    with pytest.raises(RuntimeError, match="preempted"):
        trainer.fit(unlearner, forget_loader(_threes(digits)))
    (path,) = _files(tmp_path)
    saved = torch.load(path, weights_only=False)
    assert JIT_UNVERIFIED_KEY in saved and JIT_SAFETY_KEY not in saved
    assert all(key.startswith("model.") for key in saved["state_dict"] if key != "_extra_state")  # the wrapper's
    with pytest.raises((RuntimeError, TypeError)):
        DigitsCNN.load_from_checkpoint(path, strict=True)


def test_a_forgotten_wrapper_run_leaves_only_checkpoints_with_its_record(trained_cnn, digits, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    every_pass = ModelCheckpoint(dirpath=tmp_path / "every", save_top_k=-1, every_n_epochs=1)
    unlearner = JiTUnlearning(trained_cnn)
    _fit_quietly(_checkpointing_trainer(tmp_path, callbacks=[every_pass]), unlearner, forget_loader(_threes(digits)))
    assert unlearner.outcome == Outcome.FORGOTTEN and unlearner.verification.restored is False
    assert unlearner.verification.passes >= 2, "one pass: no earlier file to remove, the test would prove less"
    (kept,) = _files(tmp_path / "every")  # the passes before the last held weights that were never verified
    assert kept.name.startswith(f"epoch={unlearner.verification.passes - 1}-")
    assert _files(tmp_path) == [kept]  # (a ModelCheckpoint given replaces Lightning's default one)
    for path in [kept]:
        saved = torch.load(path, weights_only=True)
        assert JIT_UNVERIFIED_KEY not in saved and "jit_run_state" not in saved
        assert saved[JIT_SAFETY_KEY]["verification"]["outcome"] == "forgotten"
        loaded = DigitsCNN.load_from_checkpoint(path, strict=True)
        assert same_weights(loaded, trained_cnn)  # the verified weights, the ones in memory


def test_a_user_checkpoint_after_the_run_is_in_the_users_format(trained_cnn, digits, tmp_path):
    unlearner = JiTUnlearning(trained_cnn, max_cost=10.0, on_unverified="keep")
    trainer = quiet_trainer(max_epochs=-1)
    _fit_quietly(trainer, unlearner, forget_loader(_threes(digits)))
    trainer.save_checkpoint(tmp_path / "inspect.ckpt")  # after the run: the user's format, with the record
    saved = torch.load(tmp_path / "inspect.ckpt", weights_only=True)
    assert saved[JIT_SAFETY_KEY]["verification"]["outcome"] == "not_forgotten"
    assert saved[JIT_SAFETY_KEY]["verification"]["restored"] is False
    assert same_weights(DigitsCNN.load_from_checkpoint(tmp_path / "inspect.ckpt", strict=True), trained_cnn)


# ----------------------------------------------------------------------------------------------------------------------
# The callback: the job goes on from the original weights
# ----------------------------------------------------------------------------------------------------------------------
def _job(digits, tmp_path, callbacks):
    """One epoch of fine-tuning on data no request touches, unshuffled, with Lightning's default checkpointing."""
    trainer = quiet_trainer(
        max_epochs=1, limit_train_batches=2, enable_checkpointing=True, default_root_dir=tmp_path, callbacks=callbacks
    )
    return trainer, DataLoader(TensorDataset(digits.x_train[400:528], digits.y_train[400:528]), batch_size=64)


def _job_checkpoint(tmp_path) -> DigitsCNN:
    (path,) = [p for p in _files(tmp_path) if p.name.startswith("epoch=")]
    return DigitsCNN.load_from_checkpoint(path, strict=True)


@pytest.mark.parametrize("on_unverified", ["restore", "keep"])
def test_the_callback_job_trains_on_from_the_original_weights(trained_cnn, digits, tmp_path, on_unverified):
    start = {k: v.clone() for k, v in trained_cnn.state_dict().items()}
    trainer, job = _job(digits, tmp_path / "plain", [])
    trainer.fit(trained_cnn, job)  # the same job without any request: the independent result
    without_jit = _job_checkpoint(tmp_path / "plain")

    model = DigitsCNN()
    model.load_state_dict(start)
    callback = JiTUnlearningCallback(_threes(digits), when="fit_start", max_cost=10.0, on_unverified=on_unverified)
    trainer, job = _job(digits, tmp_path / "jit", [callback])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", JiTOutcomeWarning)
        trainer.fit(model, job)
    assert callback.outcome == Outcome.NOT_FORGOTTEN
    assert callback.ledger.runs[-1]["verification"]["restored"] is (on_unverified == "restore")
    job_checkpoint = _job_checkpoint(tmp_path / "jit")
    assert same_weights(job_checkpoint, model)
    # restore: bit for bit the job that never saw a request; keep: the partial weights went into the job.
    assert same_weights(job_checkpoint, without_jit) is (on_unverified == "restore")


# ----------------------------------------------------------------------------------------------------------------------
# The cost record, and the validation warning
# ----------------------------------------------------------------------------------------------------------------------
def test_the_cost_record_counts_every_pass_against_the_references_unit(trained_cnn, digits):
    """An independent hook around the whole fit sees exactly what the record books, the final retain pass (and the
    sibling check) included; `over_reference` divides by the reference's 25 + 3 per sample, whatever N the run drew."""
    keep = ~class_mask(digits.y_train, [3])
    retain = DataLoader(TensorDataset(digits.x_train[keep][:200], digits.y_train[keep][:200]), batch_size=64)
    unlearner = JiTUnlearning(trained_cnn, n_perturbations=4, retain=retain)
    outside = CostCounter()
    with outside.attached(trained_cnn):
        _fit_quietly(quiet_trainer(max_epochs=-1), unlearner, forget_loader(_threes(digits)))
    cost = unlearner.verification.cost
    assert unlearner.verification.retain_accuracy is not None
    assert cost["total"] == outside.total
    n = len(_threes(digits))
    assert cost["over_reference"] == pytest.approx(outside.total / (n * (25 + 3)))
    assert cost["n_perturbations"] == 4


def test_a_fit_without_a_val_loader_is_not_warned_about_a_validation_step(trained_cnn, digits):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_epochs=1).fit(JiTUnlearning(trained_cnn, epochs=1), forget_loader(_threes(digits)))
    assert not [w for w in caught if "validation_step" in str(w.message)]
    # With a val loader, validation runs (the wrapped model's own validation_step logs `val_acc`).
    val = DataLoader(TensorDataset(digits.x_test, digits.y_test), batch_size=256)
    trainer = quiet_trainer(max_epochs=1, num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", JiTOutcomeWarning)
        trainer.fit(JiTUnlearning(trained_cnn, epochs=1), forget_loader(_threes(digits)), val)
    assert "val_acc" in trainer.callback_metrics
