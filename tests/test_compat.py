"""Checkpoints written by the previous version (0.1.0, tests/fixtures/v0_1_0) still load and resume."""

from __future__ import annotations

from pathlib import Path

import torch
from _utils import quiet_trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_jit import JiTUnlearning, JiTUnlearningCallback
from lightning_jit.demo.data import DigitsCNN

FIXTURES = Path(__file__).parent / "fixtures" / "v0_1_0"


def test_a_wrapper_checkpoint_of_0_1_loads_into_the_users_class():
    ckpt = torch.load(FIXTURES / "wrapper.ckpt", weights_only=False)
    model = DigitsCNN.load_from_checkpoint(FIXTURES / "wrapper.ckpt", strict=True)
    assert model.hparams.width == 2
    for name, value in model.state_dict().items():
        assert torch.equal(value, ckpt["state_dict"][name]), name
    assert ckpt["jit_safety"]["outcome"] in ("completed", "stopped_early", "rolled_back")


def test_a_wrapper_run_resumes_from_a_0_1_checkpoint(digits):
    x, y = digits.x_train[:32], digits.y_train[:32]
    unlearner = JiTUnlearning(
        DigitsCNN(width=2), sigma=0.1, lr=0.01, n_perturbations=2, epochs=2, target_forget_accuracy=0.0
    )
    quiet_trainer(max_epochs=2).fit(
        unlearner, DataLoader(TensorDataset(x, y), batch_size=16), ckpt_path=FIXTURES / "wrapper.ckpt"
    )
    assert unlearner.run is not None and unlearner.run.steps == 2  # the second epoch ran from the restored weights


def test_a_0_1_callback_ledger_carries_over(digits, tmp_path):
    """A job resuming from a 0.1 checkpoint knows the ids 0.1 forgot, and forgets only the new ones."""
    forget = TensorDataset(digits.x_train[:12], digits.y_train[:12], torch.arange(12))
    callback = JiTUnlearningCallback(
        forget, sigma=0.1, lr=0.01, n_perturbations=2, when="fit_start", checkpoint_filename=None,
        audit_path=tmp_path / "audit.jsonl",
    )  # fmt: skip
    trainer = quiet_trainer(max_epochs=2, callbacks=[callback], limit_train_batches=1)
    job = DataLoader(TensorDataset(digits.x_train[400:464], digits.y_train[400:464]), batch_size=64)
    trainer.fit(DigitsCNN(width=2), job, ckpt_path=FIXTURES / "callback_job.ckpt")
    assert [r["ids"] for r in callback.ledger.runs] == [list(range(8)), list(range(8, 12))]
