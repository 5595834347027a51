"""Atomic, non-destructive outputs: temporary file + fsync + rename, and what SIGINT / SIGTERM leave behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from _utils import quiet_trainer
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch.utils.data import DataLoader, TensorDataset

from lightning_jit import AtomicCheckpointIO, JiTUnlearning
from lightning_jit.demo.data import DigitsCNN
from lightning_jit.io import atomic_append_line, atomic_torch_save, atomic_write

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with atomic_write(target) as fh:
        fh.write("new")
        assert target.read_text() == "old"  # nothing visible before the rename
    assert target.read_text() == "new"
    assert _leftovers(tmp_path) == []
    with pytest.raises(FileExistsError, match="overwrite"):
        with atomic_write(target, overwrite=False):
            pass
    with pytest.raises(ValueError, match="`mode`"):
        with atomic_write(target, mode="a"):
            pass


def test_error_while_writing_keeps_the_old_file(tmp_path):
    target = tmp_path / "model.ckpt"
    atomic_torch_save({"w": torch.ones(3)}, target)
    before = target.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - whatever pickling raises
        atomic_torch_save({"w": torch.zeros(3), "bad": lambda: None}, target)
    assert target.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_atomic_append_line(tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    atomic_append_line(ledger, '{"id": 1}')
    atomic_append_line(ledger, '{"id": 2}\n')
    assert ledger.read_text().splitlines() == ['{"id": 1}', '{"id": 2}']


def test_wrapper_writes_checkpoints_atomically(digits, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    model = DigitsCNN()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    trainer = quiet_trainer(enable_checkpointing=True, callbacks=[ckpt], default_root_dir=tmp_path)
    loader = DataLoader(TensorDataset(digits.x_train[:64], digits.y_train[:64]), batch_size=32)
    # A target of 100% verifies the run: the file of its last step is rewritten as the result, the other removed.
    unlearner = JiTUnlearning(model, sigma=0.1, lr=0.001, n_perturbations=2, target_forget_accuracy=100.0)
    trainer.fit(unlearner, loader)
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    written = sorted(tmp_path.glob("*.ckpt"))
    assert [p.name for p in written] == ["epoch=0-step=2.ckpt"] and _leftovers(tmp_path) == []
    reloaded = DigitsCNN.load_from_checkpoint(written[-1], strict=True)
    pairs = zip(reloaded.state_dict().values(), model.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_a_checkpoint_io_the_user_chose_is_kept(digits):
    class MyIO(TorchCheckpointIO):
        pass

    mine = MyIO()
    trainer = quiet_trainer(plugins=[mine])
    loader = DataLoader(TensorDataset(digits.x_train[:32], digits.y_train[:32]), batch_size=32)
    trainer.fit(JiTUnlearning(DigitsCNN(), sigma=0.1, lr=0.001, n_perturbations=2), loader)
    assert trainer.strategy.checkpoint_io is mine


_WRITER = """
import sys, time
from lightning_jit.io import atomic_write
with atomic_write(sys.argv[1], "wb") as fh:
    fh.write(b"x" * 100000)
    fh.flush()
    print("WRITING", flush=True)
    time.sleep(60)
    fh.write(b"never")
"""


@posix_only
def test_sigterm_while_writing_leaves_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "WRITING"
    assert _leftovers(tmp_path)  # the temporary exists while writing
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM  # still ends by SIGTERM
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


_UNLEARN = """
import sys, time
import torch
torch.set_num_threads(1)
import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset
from lightning_jit import JiTUnlearning
from lightning_jit.demo.data import DigitsCNN

source, out = sys.argv[1], sys.argv[2]
model = DigitsCNN.load_from_checkpoint(source)

class Beat(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        print(f"STEP {trainer.global_step}", flush=True)
        time.sleep(0.05)

g = torch.Generator().manual_seed(0)
loader = DataLoader(TensorDataset(torch.randn(64, 1, 8, 8, generator=g), torch.zeros(64, dtype=torch.long)), 16)
trainer = pl.Trainer(accelerator="cpu", max_epochs=1000, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=out,
                     callbacks=[Beat(), ModelCheckpoint(dirpath=out, every_n_train_steps=2, save_top_k=-1)])
trainer.fit(JiTUnlearning(model, sigma=0.1, lr=1e-4, n_perturbations=2, epochs=1000), loader)
trainer.save_checkpoint(out + "/final.ckpt")
print("SAVED", flush=True)
"""


@pytest.mark.slow  # a new Python process that imports Lightning
@posix_only
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_unlearning_leaves_input_untouched_and_no_partial_output(tmp_path, signum):
    source = tmp_path / "input.ckpt"
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, max_epochs=0)
    torch.manual_seed(0)
    model = DigitsCNN()
    with torch.no_grad():  # it recognises the forget set (class 0) far beyond what 1e-4 steps undo by step 5
        model.head[-1].bias[0] += 20.0
    trainer.strategy.connect(model)
    trainer.save_checkpoint(source)
    before = source.read_bytes()
    mtime = source.stat().st_mtime_ns
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_UNLEARN), str(source), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        # A shell starts background jobs with SIGINT ignored, and the child would inherit that: give it the default.
        preexec_fn=lambda: signal.signal(signum, signal.SIG_DFL),
    )
    lines = []
    for line in proc.stdout:
        lines.append(line.strip())
        if line.strip() == "STEP 5":
            proc.send_signal(signum)
            break
    proc.wait(timeout=120)
    rest = proc.stdout.read()
    assert "SAVED" not in rest and "STEP 5" in lines
    assert source.read_bytes() == before and source.stat().st_mtime_ns == mtime
    assert not (out / "final.ckpt").exists()
    assert _leftovers(out) == []
    written = list(out.glob("*.ckpt"))
    assert written  # ModelCheckpoint saved every 2 steps before the signal: the run's resume points
    for path in written:  # each of those files is complete, and not in the user's format (not a result)
        saved = torch.load(path, weights_only=False)
        assert "jit_unverified" in saved and "jit_run_state" in saved
        with pytest.raises((RuntimeError, TypeError)):
            DigitsCNN.load_from_checkpoint(path, strict=True)


def test_atomic_write_gives_the_permissions_a_plain_open_would(tmp_path):
    import os

    from lightning_jit.io import atomic_write

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    with atomic_write(tmp_path / "atomic.txt") as fh:
        fh.write("x")
    assert os.stat(tmp_path / "atomic.txt").st_mode & 0o777 == os.stat(plain).st_mode & 0o777


def test_audit_records_are_strict_json_through_the_one_sanitiser(tmp_path):
    """The audit file holds strict JSON: the values a run record carries are written as the standard library reads
    them back (NaN as null, tensors and arrays as lists, paths as strings)."""
    import json

    import numpy as np

    from lightning_jit.lightning.ledger import read_audit, write_audit_record

    record = {
        "accuracy": float("nan"),
        "ids": (3, 5),
        "seen": {7},
        "loss": torch.tensor(0.25),
        "rows": np.array([[1, 2]]),
        "path": tmp_path / "x.ckpt",
        "counts": {1: np.int64(4)},
    }
    write_audit_record(tmp_path / "audit.jsonl", record)
    line = (tmp_path / "audit.jsonl").read_text().strip()
    want = {"accuracy": None, "ids": [3, 5], "seen": [7], "loss": 0.25, "rows": [[1, 2]]}
    want |= {"path": str(tmp_path / "x.ckpt"), "counts": {"1": 4}}
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}")) == want
    assert read_audit(tmp_path / "audit.jsonl") == [want]
