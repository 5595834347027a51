"""The ``unlearn`` subcommand and the ``lightning-jit`` console script, run as a user runs them: in a subprocess.

A digits CNN checkpoint is written in the test; the CLI unlearns from it with the example configs; the output is loaded
with ``DigitsCNN.load_from_checkpoint(strict=True)`` and evaluated here. Subprocesses start in parallel (torch and
lightning take seconds to import) and run with one thread each.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_jit.cli import _GUARD_FIELDS, UNLEARN_RECORD_KEY, JiTArgs
from lightning_jit.config import JiTConfig
from lightning_jit.data import DigitsCNN, DigitsDataModule, accuracy, class_mask
from lightning_jit.forget import ForgetSet, JiTUsageError, read_ids_file, select_forget_loader
from lightning_jit.module import JiTUnlearning

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
_SCRIPT = Path(sys.executable).parent / "lightning-jit"
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "lightning_jit"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _run_all(commands: list[list[str]], timeout: float = 300) -> list[subprocess.CompletedProcess]:
    def run(cmd: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)

    with ThreadPoolExecutor(max_workers=3) as pool:
        return list(pool.map(run, commands))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")}


def _save_checkpoint(model: pl.LightningModule, path: Path) -> None:
    """Write a real Lightning checkpoint (state dict, hparams, version) as ``trainer.save_checkpoint`` does."""
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)


@pytest.fixture(scope="module")
def ckpt(_trained_state, tmp_path_factory) -> Path:
    """The digits CNN trained in this test session (conftest), as a checkpoint on disk."""
    model = DigitsCNN()
    model.load_state_dict(_trained_state)
    path = tmp_path_factory.mktemp("trained") / "digits.ckpt"
    _save_checkpoint(model, path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# In-process checks of the pieces
# ---------------------------------------------------------------------------------------------------------------------
def test_jit_group_covers_every_jit_setting():
    cli_fields = {f.name for f in dataclasses.fields(JiTArgs)}
    config_fields = {f.name for f in dataclasses.fields(JiTConfig)} - {"batch_to_input"}
    assert cli_fields - set(_GUARD_FIELDS) == config_fields
    wrapper_args = set(inspect.signature(JiTUnlearning.__init__).parameters)
    assert cli_fields <= wrapper_args
    documented = JiTArgs.__doc__
    assert all(f"    {name}: " in documented for name in cli_fields)
    with pytest.raises(JiTUsageError, match="--jit.sigma"):
        JiTArgs(sigma=0.0, lr=0.1).to_config()
    with pytest.raises(JiTUsageError, match="--jit.n_perturbations"):
        JiTArgs(sigma=0.1, lr=0.1, n_perturbations=0).to_config()


def test_read_ids_file(tmp_path):
    good = tmp_path / "ids.txt"
    good.write_text("# ids\n3, 5\n\n  8 # trailing comment\n13\n")
    assert read_ids_file(good) == [3, 5, 8, 13]
    cases = {"1\n2\nx3\n": "line 3", "# nothing\n\n": "lists no ids", "4\n4\n": "listed twice", "1 -2\n": "line 1"}
    for i, (text, message) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.txt"
        bad.write_text(text)
        with pytest.raises(JiTUsageError, match=message) as err:
            read_ids_file(bad)
        assert err.value.flag == "--forget.ids_file"
    with pytest.raises(JiTUsageError, match="no such file"):
        read_ids_file(tmp_path / "missing.txt")


def test_forget_selection_matches_an_independent_selection(digits):
    dm = DigitsDataModule(forget_digits=[3])
    loader = select_forget_loader(dm, ForgetSet(classes=[3, 5]))
    x = torch.cat([b[0] for b in loader])
    y = torch.cat([b[1] for b in loader])
    mask = (digits.y_train == 3) | (digits.y_train == 5)  # independent: straight from the split
    assert torch.equal(x, digits.x_train[mask]) and torch.equal(y, digits.y_train[mask])

    loader = select_forget_loader(dm, ForgetSet(indices=[5, 2, 900], batch_size=2))
    assert torch.equal(torch.cat([b[0] for b in loader]), digits.x_train[[5, 2, 900]])

    hook = select_forget_loader(dm, ForgetSet())  # no selection: the datamodule's forget_dataloader() hook
    assert len(hook.dataset) == int((digits.y_train == 3).sum())

    for forget, flag in [
        (ForgetSet(classes=[1], indices=[2]), "--forget.indices"),
        (ForgetSet(classes=[10]), "--forget.classes"),
        (ForgetSet(indices=[len(digits.y_train)]), "--forget.indices"),
        (ForgetSet(indices=[]), "--forget.indices"),
    ]:
        with pytest.raises(JiTUsageError) as err:
            select_forget_loader(dm, forget)
        assert err.value.flag == flag
    with pytest.raises(JiTUsageError) as err:
        select_forget_loader(DigitsDataModule(), ForgetSet())  # the hook without forget_digits
    assert err.value.flag == "--forget.loader"


# ---------------------------------------------------------------------------------------------------------------------
# The console script and a user script, as subprocesses
# ---------------------------------------------------------------------------------------------------------------------
def test_help_lists_unlearn_and_the_jit_group():
    top, unlearn, user = _run_all(
        [CLI + ["--help"], CLI + ["unlearn", "--help"], [sys.executable, "examples/digits_cli.py", "--help"]]
    )
    assert top.returncode == 0, top.stderr
    for word in ("demo", "unlearn", "evaluate", "--verbose"):
        assert word in top.stdout
    assert unlearn.returncode == 0, unlearn.stderr
    for flag in (
        "--jit.sigma",
        "--jit.lr",
        "--jit.n_perturbations",
        "--jit.target_forget_accuracy",
        "--ckpt_path",
        "--forget.classes",
        "--forget.indices",
        "--forget.ids_file",
        "--forget.loader",
        "--output",
        "--overwrite",
    ):
        assert flag in unlearn.stdout, flag
    # the help text comes from the docstrings
    assert "Std of the Gaussian input perturbations" in unlearn.stdout
    assert "Where to write the unlearned checkpoint" in unlearn.stdout
    assert user.returncode == 0, user.stderr
    assert "unlearn" in user.stdout and "fit" in user.stdout


def test_unlearn_full_class_then_evaluate(ckpt, digits, tmp_path):
    before = _sha(ckpt)
    out = tmp_path / "unlearned.ckpt"
    run_dir = tmp_path / "run"
    common = ["--config", "examples/configs/full_class.yaml", f"--ckpt_path={ckpt}"]
    (result,) = _run_all(
        [CLI + ["unlearn", *common, f"--trainer.default_root_dir={run_dir}", f"--output={out}", "--model.lr=0.01"]]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert _sha(ckpt) == before  # the input checkpoint is never touched

    original = DigitsCNN.load_from_checkpoint(ckpt, strict=True)
    unlearned = DigitsCNN.load_from_checkpoint(out, strict=True)
    test3, train3 = class_mask(digits.y_test, [3]), class_mask(digits.y_train, [3])
    acc_before = accuracy(original, digits.x_test[test3], digits.y_test[test3])
    acc_after = accuracy(unlearned, digits.x_test[test3], digits.y_test[test3])
    assert acc_before > 90 and acc_after < acc_before - 50, (acc_before, acc_after)

    saved = torch.load(out, weights_only=True)
    record = saved[UNLEARN_RECORD_KEY]
    assert record["source_sha256"] == before and record["forget_samples"] == int(train3.sum())
    # the command line's --model.lr is kept (not silently replaced by the checkpoint's 0.003), with a warning
    assert saved["hyper_parameters"]["lr"] == 0.01 and saved["hyper_parameters"]["width"] == 32
    assert "--model.lr=0.01 was given and is kept" in result.stderr
    configs = list(run_dir.rglob("config.yaml"))
    assert len(configs) == 1
    config = yaml.safe_load(configs[0].read_text())
    assert config["jit"]["sigma"] == 0.1 and config["forget"]["classes"] == [3]
    assert config["model"]["init_args"]["lr"] == 0.01

    evaluate_unlearning = pytest.importorskip("lightning_jit.evaluate").evaluate_unlearning
    assert callable(evaluate_unlearning)
    report_dir = tmp_path / "report"
    (ev,) = _run_all(
        [
            CLI
            + [
                "evaluate",
                "--config",
                "examples/configs/full_class.yaml",
                f"--unlearned={out}",
                f"--report_dir={report_dir}",
            ]
        ]
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    report = json.loads((report_dir / "report.json").read_text())
    # the report's forget accuracy is the one computed here on the forget set (train samples of digit 3)
    expected = accuracy(unlearned, digits.x_train[train3], digits.y_train[train3])
    assert report["accuracy"]["unlearned"]["forget"] == pytest.approx(expected)
    assert (report_dir / "report.md").exists()


def test_user_script_jitcli_random_forgetting(ckpt, digits, tmp_path):
    """The JiTCLI subclass path from a user's LightningCLI script, with the random-forgetting example (ids file)."""
    out = tmp_path / "unlearned.ckpt"
    (result,) = _run_all(
        [
            [
                sys.executable,
                "examples/digits_cli.py",
                "unlearn",
                "--config",
                "examples/configs/random.yaml",
                f"--ckpt_path={ckpt}",
                f"--trainer.default_root_dir={tmp_path / 'run'}",
                f"--output={out}",
            ]
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ids = torch.tensor(read_ids_file(CONFIGS / "random_forget_ids.txt"))
    unlearned = DigitsCNN.load_from_checkpoint(out, strict=True)
    original = DigitsCNN.load_from_checkpoint(ckpt, strict=True)
    record = torch.load(out, weights_only=True)[UNLEARN_RECORD_KEY]
    assert record["forget_samples"] == len(ids) == 100
    assert accuracy(unlearned, digits.x_train[ids], digits.y_train[ids]) < accuracy(
        original, digits.x_train[ids], digits.y_train[ids]
    )


def test_bad_inputs_exit_2_name_the_flag_and_write_nothing(ckpt, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    other = inputs / "boring.ckpt"  # another class, without hyperparameters: caught by the strict load
    _save_checkpoint(BoringModel(), other)
    other_hp = inputs / "boring_hparams.ckpt"  # another class whose hyperparameters DigitsCNN does not take
    checkpoint = torch.load(other, weights_only=True)
    checkpoint["hyper_parameters"] = {"hidden_dim": 7}
    torch.save(checkpoint, other_hp)
    bad_ids = inputs / "bad_ids.txt"
    bad_ids.write_text("3\n5\nseven\n")
    existing = inputs / "existing.ckpt"
    existing.write_bytes(b"keep me")
    work = tmp_path / "work"  # the runs' default_root_dir: must stay empty
    work.mkdir()
    out = work / "out.ckpt"
    base = ["unlearn", "--config", "examples/configs/full_class.yaml", f"--trainer.default_root_dir={work}"]
    cases = [
        (["--jit.sigmaa=0.1"], "jit.sigmaa"),
        ([f"--ckpt_path={inputs / 'missing.ckpt'}"], "--ckpt_path"),
        ([f"--ckpt_path={other}"], "--ckpt_path"),
        ([f"--ckpt_path={other_hp}"], "--ckpt_path"),
        (["--jit.sigma=0"], "--jit.sigma"),
        (["--forget.classes=[]"], "--forget.classes"),
        (["--forget.classes=[12]"], "--forget.classes"),
        (["--forget.classes=null", f"--forget.ids_file={bad_ids}"], "--forget.ids_file"),
        ([f"--output={ckpt}"], "--output"),
        ([f"--output={existing}"], "--output"),
    ]
    commands = []
    for i, (args, _) in enumerate(cases):
        # one case through `python -m lightning_jit`, the others through the console script
        prefix = [sys.executable, "-m", "lightning_jit"] if i == 0 else CLI
        ckpt_arg = [] if any(a.startswith("--ckpt_path") for a in args) else [f"--ckpt_path={ckpt}"]
        out_arg = [] if any(a.startswith("--output") for a in args) else [f"--output={out}"]
        commands.append(prefix + base + ckpt_arg + out_arg + args)
    hashes = {p: _sha(p) for p in (ckpt, other, other_hp, existing)}
    before = _tree(tmp_path)
    results = _run_all(commands)
    for (args, flag), result in zip(cases, results, strict=True):
        assert result.returncode == 2, (args, result.returncode, result.stderr[-2000:])
        assert flag in result.stderr, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, args
    assert {p: _sha(p) for p in hashes} == hashes
    assert _tree(tmp_path) == before  # nothing written, nothing touched
    assert not any(work.iterdir())


def test_failure_exits_1_with_one_line_and_verbose_traceback(ckpt, tmp_path):
    # input_key=5 passes the usage checks but no batch has a 6th item: the run itself fails.
    args = ["unlearn", "--config", "examples/configs/full_class.yaml", f"--ckpt_path={ckpt}", "--jit.input_key=5"]
    quiet, verbose = _run_all(
        [
            CLI + args + [f"--trainer.default_root_dir={tmp_path / n}", f"--output={tmp_path / n}.ckpt"] + extra
            for n, extra in (("a", []), ("b", ["--verbose"]))
        ]
    )
    assert quiet.returncode == 1 and verbose.returncode == 1, (quiet.stderr[-2000:], verbose.stderr[-2000:])
    last = quiet.stderr.strip().splitlines()[-1]
    assert last.startswith("lightning-jit: error: JiTInputError:") and "input_key" in last
    assert "Traceback" not in quiet.stderr
    assert "Traceback" in verbose.stderr
    assert not (tmp_path / "a.ckpt").exists() and not (tmp_path / "b.ckpt").exists()
