"""The ``lightning-jit`` console script and ``JiTCLI``, run in-process through ``main(argv)`` as a user runs them.

A small digits CNN is trained once for the module (a plain torch loop, one thread) and saved as a Lightning checkpoint;
the CLI unlearns from it with the example configs; the outputs are loaded with ``DigitsCNN.load_from_checkpoint``
(strictly) and measured here, independently of the library. One slow test starts the installed script in a subprocess.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import docstring_parser
import lightning.pytorch as pl
import pytest
import torch
import yaml
from _utils import same_weights
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_jit.cli import UNLEARN_RECORD_KEY, ForgetSelection, JiTTrainer, JiTUsageError, main
from lightning_jit.cli.commands import _without_classes
from lightning_jit.cli.forget import dataset_labels, read_ids_file, select_forget_loader
from lightning_jit.cli.migration import MOVED, REMOVED
from lightning_jit.cli.trainer import unlearn_groups
from lightning_jit.core.batch import BatchFormat
from lightning_jit.core.batching import batch_size_for
from lightning_jit.core.outcome import JiTUnlearningFailed
from lightning_jit.core.settings import JiTSettings
from lightning_jit.demo.data import DigitsCNN, DigitsDataModule, accuracy
from lightning_jit.tune.settings import TuneSettings

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
FULL_CLASS = str(CONFIGS / "full_class.yaml")
V0_1_0 = ROOT / "tests" / "fixtures" / "v0_1_0"
#: Cheap JiT settings for the runs that test the plumbing, not the forgetting: a target of 100% verifies any run, so
#: the exit code is the plumbing's (the outcomes are tested with real targets below).
QUICK = [
    "--jit.target_forget_accuracy=100",
    "--jit.epochs=1",
    "--jit.n_perturbations=2",
    "--jit.probe_distillation=0",
    "--trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and much faster than on two when the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _save_checkpoint(model: pl.LightningModule, path: Path) -> Path:
    """Write a real Lightning checkpoint (state dict, hparams, version) as ``trainer.save_checkpoint`` does."""
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def ckpt(digits, tmp_path_factory, _one_thread) -> Path:
    """A DigitsCNN(width=8) trained for this module on the digits training split, as a checkpoint on disk."""
    torch.manual_seed(0)
    model = DigitsCNN(width=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        order = torch.randperm(len(digits.y_train), generator=generator)
        for i in range(0, len(order), 64):
            batch = order[i : i + 64]
            loss = torch.nn.functional.cross_entropy(model(digits.x_train[batch]), digits.y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return _save_checkpoint(model.eval(), tmp_path_factory.mktemp("trained") / "digits.ckpt")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")}


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ": error: " in line]


def _unlearn(ckpt: Path, run: Path, *args: str, config: str = FULL_CLASS) -> list[str]:
    return ["unlearn", "--config", config, f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={run}", *args]


# ----------------------------------------------------------------------------------------------------------------------
# --help: every setting of the declarations, documented by its docstring
# ----------------------------------------------------------------------------------------------------------------------
def test_help_shows_every_setting_with_its_docstring(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100000")  # no wrapping, so that each description is one run of text
    assert main(["unlearn", "--help"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    groups = unlearn_groups()
    assert set(groups) >= {"jit", "batch", "guard", "forget"}
    for group, declaration in groups.items():
        documented = {p.arg_name: p.description for p in docstring_parser.parse(declaration.__doc__).params}
        for f in dataclasses.fields(declaration):
            assert f"--{group}.{f.name} " in shown, f"--{group}.{f.name}"
            assert " ".join(documented[f.name].split()) in shown, f"--{group}.{f.name}"
    for flag, text in (
        ("--ckpt_path", "Checkpoint of the trained model"),
        ("--output", "Where to write the unlearned"),
    ):
        assert flag in shown and text in shown

    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    assert all(word in top for word in ("demo", "unlearn", "evaluate", "tune", "--verbose"))
    for command in ("evaluate", "tune", "demo"):
        assert main([command, "--help"]) == 0
        assert "--config" in capsys.readouterr().out or command == "demo"
    # `tune`'s flags are the search's declaration: each field, with its docstring and its default
    assert main(["tune", "--help"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    documented = {p.arg_name: p.description for p in docstring_parser.parse(TuneSettings.__doc__).params}
    for f in dataclasses.fields(TuneSettings):
        if f.name != "task":  # `--task` is tune's own: by default it follows the forget selection
            assert f"--{f.name} " in shown and " ".join(documented[f.name].split()) in shown, f.name
            assert f.default is None or f"default: {f.default}" in shown, f.name


def test_user_script_help_lists_unlearn(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["digits_cli.py"])
    cli_main = runpy.run_path(str(ROOT / "examples" / "digits_cli.py"), run_name="digits_cli")["cli_main"]
    with pytest.raises(SystemExit) as done:
        cli_main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "unlearn" in out and "fit" in out


# ----------------------------------------------------------------------------------------------------------------------
# The examples: full-class forgetting with the console script, random forgetting with a user's JiTCLI script
# ----------------------------------------------------------------------------------------------------------------------
def test_unlearn_full_class_example(ckpt, digits, tmp_path, capsys):
    before = _sha(ckpt)
    out, run = tmp_path / "unlearned.ckpt", tmp_path / "run"
    args = _unlearn(ckpt, run, f"--output={out}", "--model.lr=0.01", "--trainer.enable_progress_bar=false")
    with pytest.warns(UserWarning, match=r"--model.lr=0.01 was given and is kept"):
        code = main(args)
    assert code == 0, capsys.readouterr().err[-3000:]
    assert _sha(ckpt) == before  # the input checkpoint is never touched

    original = DigitsCNN.load_from_checkpoint(ckpt, strict=True)
    unlearned = DigitsCNN.load_from_checkpoint(out, strict=True)
    test3, train3 = digits.y_test == 3, digits.y_train == 3
    acc_before = accuracy(original, digits.x_test[test3], digits.y_test[test3])
    acc_after = accuracy(unlearned, digits.x_test[test3], digits.y_test[test3])
    rest_after = accuracy(unlearned, digits.x_test[~test3], digits.y_test[~test3])
    assert acc_before > 90 and acc_after < 20 and rest_after > 85, (acc_before, acc_after, rest_after)

    saved = torch.load(out, weights_only=True)
    record = saved[UNLEARN_RECORD_KEY]
    assert record["source_sha256"] == before and record["forget_samples"] == int(train3.sum())
    assert record["outcome"] == "forgotten" and record["stopped_early"]  # the calibrated target (2.5%) ended it
    forget_after = accuracy(unlearned, digits.x_train[train3], digits.y_train[train3])
    assert record["verification"]["forget_accuracy"] == pytest.approx(forget_after)
    # the command line's --model.lr is kept (not silently replaced by the checkpoint's 0.003); width is restored
    assert saved["hyper_parameters"]["lr"] == 0.01 and saved["hyper_parameters"]["width"] == 8
    (config_file,) = run.rglob("config.yaml")
    config = yaml.safe_load(config_file.read_text())
    assert config["jit"]["sigma"] is None and config["jit"]["seed"] == 0 and config["forget"]["classes"] == [3]
    assert set(config["batch"]) == {f.name for f in dataclasses.fields(BatchFormat)} and config["guard"]["enabled"]
    # `evaluate` of that checkpoint opens its report with the run's verdict, read from the checkpoint's record
    report_dir = tmp_path / "report"
    assert main(["evaluate", "--config", FULL_CLASS, f"--unlearned={out}", f"--report_dir={report_dir}"]) == 0
    first = (report_dir / "report.md").read_text().splitlines()[0]
    assert first == f"**{record['verification']['verdict']}**" and first.startswith("**forgotten: ")


def test_user_script_random_forgetting_example(ckpt, digits, tmp_path, monkeypatch):
    """The JiTCLI path of a user's LightningCLI script, with the random-forgetting example (a file of ids)."""
    monkeypatch.chdir(ROOT)  # the example's ids_file is relative to the repository root
    monkeypatch.setattr(sys, "argv", ["digits_cli.py"])
    cli_main = runpy.run_path(str(ROOT / "examples" / "digits_cli.py"), run_name="digits_cli")["cli_main"]
    out = tmp_path / "unlearned.ckpt"
    config = str(CONFIGS / "random.yaml")
    cli_main(_unlearn(ckpt, tmp_path / "run", f"--output={out}", "--trainer.enable_progress_bar=false", config=config))
    ids = torch.tensor(read_ids_file(CONFIGS / "random_forget_ids.txt"))
    original = DigitsCNN.load_from_checkpoint(ckpt, strict=True)
    unlearned = DigitsCNN.load_from_checkpoint(out, strict=True)
    record = torch.load(out, weights_only=True)[UNLEARN_RECORD_KEY]
    assert record["forget_samples"] == len(ids) == 100
    before = accuracy(original, digits.x_train[ids], digits.y_train[ids])
    after = accuracy(unlearned, digits.x_train[ids], digits.y_train[ids])
    assert after <= 97.0 < before, (before, after)  # stopped by the config's target, 97%


# ----------------------------------------------------------------------------------------------------------------------
# Usage errors: exit code 2, one line naming the flag, nothing written
# ----------------------------------------------------------------------------------------------------------------------
def test_bad_inputs_exit_2_with_one_line_naming_the_flag_and_write_nothing(ckpt, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    boring = _save_checkpoint(BoringModel(), inputs / "boring.ckpt")  # another class: caught by the strict load
    boring_hp = inputs / "boring_hparams.ckpt"  # another class, with hyperparameters DigitsCNN does not take
    foreign = inputs / "foreign_class.ckpt"  # DigitsCNN weights, but recorded as another class
    checkpoint = torch.load(boring, weights_only=True)
    torch.save({**checkpoint, "hyper_parameters": {"hidden_dim": 7}}, boring_hp)
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["hyper_parameters"]["_class_path"] = "lightning.pytorch.demos.boring_classes.BoringModel"
    torch.save(checkpoint, foreign)
    bad_batch = inputs / "bad_batch.yaml"  # a list is no position or key
    bad_batch.write_text("batch:\n  label_key: [1]\n")
    bad_ids = inputs / "bad_ids.txt"
    bad_ids.write_text("3\n5\nseven\n")
    existing = inputs / "existing.ckpt"
    existing.write_bytes(b"keep me")
    work = tmp_path / "work"  # the runs' default_root_dir: must stay empty
    work.mkdir()
    out = work / "out.ckpt"
    cases = [
        (["--jit.sigma=abc"], "--jit.sigma"),
        (["--jit.sigma=0"], "--jit.sigma"),
        (["--jit.sigmaa=0.1"], "--jit.sigmaa"),
        (["--jit.n_perturbations=0"], "--jit.n_perturbations"),
        (["--config", str(bad_batch)], f"batch.label_key (in {bad_batch})"),
        (["--guard.check_every=abc"], "--guard.check_every"),
        (["--guard.check_every=0"], "--guard.check_every"),
        (["--guard.on_collapse=explode"], "--guard.on_collapse"),
        (["--no_such_flag=1"], "--no_such_flag"),
        (["--overwrite=maybe"], "--overwrite"),
        ([f"--ckpt_path={inputs / 'missing.ckpt'}"], "--ckpt_path"),
        ([f"--ckpt_path={boring}"], "--ckpt_path"),
        ([f"--ckpt_path={boring_hp}"], "--ckpt_path"),
        ([f"--ckpt_path={foreign}"], "--ckpt_path"),
        (["--forget.classes=[]"], "--forget.classes"),
        (["--forget.classes=[12]"], "--forget.classes"),
        (["--forget.classes=null", f"--forget.ids_file={bad_ids}"], "--forget.ids_file"),
        ([f"--output={ckpt}"], "--output"),
        ([f"--output={existing}"], "--output"),
    ]
    hashes = {p: _sha(p) for p in (ckpt, boring, boring_hp, foreign, existing)}
    before = _tree(tmp_path)
    for args, flag in cases:
        output = [] if any(a.startswith("--output") for a in args) else [f"--output={out}"]
        code = main(_unlearn(ckpt, work, *output, *args))
        err = capsys.readouterr().err
        assert code == 2, (args, code, err[-2000:])
        (line,) = _errors(err)
        assert line.startswith(f"lightning-jit unlearn: error: {flag}"), (args, line)
        assert "Traceback" not in err and "usage:" not in err, args
    assert {p: _sha(p) for p in hashes} == hashes
    assert _tree(tmp_path) == before  # nothing written, nothing touched
    assert not any(work.iterdir())


def test_moved_and_removed_keys_of_the_previous_version(ckpt, tmp_path, capsys):
    """A 0.1 config with a moved or removed ``jit:`` key fails with one line saying where it went; the map itself
    points at settings that exist."""
    groups = unlearn_groups()
    for new in MOVED.values():
        group, name = new.split(".")
        assert name in {f.name for f in dataclasses.fields(groups[group])}, new
    old_config = yaml.safe_load(Path(FULL_CLASS).read_text())
    for old, where in {**MOVED, **{k: "removed" for k in REMOVED if k.startswith("jit.")}}.items():
        config = dict(old_config, jit={**old_config["jit"], old.split(".")[1]: 1})
        path = tmp_path / "old.yaml"
        path.write_text(yaml.safe_dump(config))
        code = main(_unlearn(ckpt, tmp_path / "work", config=str(path)))
        (line,) = _errors(capsys.readouterr().err)
        assert code == 2 and f"{old} (in {path})" in line and where in line, line
    assert main(_unlearn(ckpt, tmp_path / "work", "--jit.check_every=2")) == 2  # the same, as a flag
    (line,) = _errors(capsys.readouterr().err)
    assert "--jit.check_every: " in line and "guard.check_every" in line, line
    assert main(["tune", "--config", FULL_CLASS, "--search", "halving"]) == 2
    (line,) = _errors(capsys.readouterr().err)
    assert "--search" in line and "removed" in line
    assert not (tmp_path / "work").exists()


def test_model_class_from_the_current_folder(ckpt, tmp_path, monkeypatch, capsys):
    """``class_path: mymodel.MyNet`` finds ``./mymodel.py``, as ``python main.py`` would; a missing module is one line
    naming ``model.class_path``."""
    (tmp_path / "mymodel.py").write_text(
        "from lightning_jit.demo.data import DigitsCNN\n\nclass MyNet(DigitsCNN):\n    pass\n"
    )
    config = yaml.safe_load(Path(FULL_CLASS).read_text())
    config["model"] = {"class_path": "mymodel.MyNet"}
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(config))
    config["model"] = {"class_path": "notthere.MyNet"}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "mymodel", raising=False)
    path_before = list(sys.path)
    try:
        code = main(_unlearn(ckpt, tmp_path / "run", "--output=out.ckpt", *QUICK, config="my.yaml"))
        assert code == 0, capsys.readouterr().err[-3000:]
        assert type(sys.modules["mymodel"].MyNet.load_from_checkpoint("out.ckpt", strict=True)).__name__ == "MyNet"
        assert sys.path == path_before  # the current folder is on the path only while the command runs

        assert main(_unlearn(ckpt, tmp_path / "run2", *QUICK, config="bad.yaml")) == 2
        (line,) = _errors(capsys.readouterr().err)
        assert "model.class_path" in line and "No module named 'notthere'" in line
        assert not (tmp_path / "run2").exists()
    finally:
        sys.modules.pop("mymodel", None)


#: One gentle pass with a real target: the forget set stays recognised.
NOT_ENOUGH = ["--jit.target_forget_accuracy=5", "--jit.lr=0.0001"]


def test_a_run_that_did_not_forget_exits_3_and_writes_no_checkpoint(ckpt, tmp_path, capsys):
    output = tmp_path / "out.ckpt"
    code = main(_unlearn(ckpt, tmp_path / "run", f"--output={output}", *QUICK, *NOT_ENOUGH))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lightning-jit")]
    assert code == 3
    assert lines[-1].startswith("lightning-jit unlearn: NOT forgotten:") and "target 5%" in lines[-1]
    assert not output.exists() and not (tmp_path / "out.unverified.ckpt").exists()

    code = main(_unlearn(ckpt, tmp_path / "run2", f"--output={output}", "--keep_unverified=true", *QUICK, *NOT_ENOUGH))
    assert code == 3 and not output.exists()
    record = torch.load(tmp_path / "out.unverified.ckpt", weights_only=True)["jit_unlearning"]
    assert record["outcome"] == "not_forgotten" and record["verification"]["forget_accuracy"] > 5.0


def test_checkpoint_recording_the_previous_class_path_is_accepted(ckpt, tmp_path, capsys):
    """0.1 checkpoints record ``lightning_jit.data.DigitsCNN``: the same class as ``lightning_jit.demo.data``'s."""
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["hyper_parameters"]["_class_path"] = "lightning_jit.data.DigitsCNN"
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    code = main(_unlearn(old, tmp_path / "run", f"--output={tmp_path / 'out.ckpt'}", *QUICK))
    assert code == 0, capsys.readouterr().err[-3000:]
    assert DigitsCNN.load_from_checkpoint(tmp_path / "out.ckpt", strict=True).hparams.width == 8


def test_trainer_unlearn_from_python(ckpt, digits, tmp_path):
    model = DigitsCNN.load_from_checkpoint(ckpt)
    trainer = JiTTrainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    settings = JiTSettings(sigma=0.1, lr=0.03, n_perturbations=2, probe_distillation=0.0, redistribution=0.0)
    forget = ForgetSelection(indices=[4, 0, 9])
    with pytest.raises(MisconfigurationException, match="guard"):
        trainer.unlearn(model, DigitsDataModule(), jit=settings, guard={"enabled": False}, forget=forget)
    # One pass with a 5% target does not forget: in Python the outcome is an exception, and nothing is written.
    with pytest.raises(JiTUnlearningFailed, match="NOT forgotten") as info:
        trainer.unlearn(model, DigitsDataModule(), jit=settings.replace(target_forget_accuracy=5.0), forget=forget,
                        output=str(tmp_path / "no.ckpt"))  # fmt: skip
    assert info.value.verification.outcome == "not_forgotten" and not (tmp_path / "no.ckpt").exists()
    model = DigitsCNN.load_from_checkpoint(ckpt)
    trainer = JiTTrainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    settings = settings.replace(target_forget_accuracy=100.0)  # any run verifies: this part tests the plumbing
    out = trainer.unlearn(model, DigitsDataModule(), jit=settings, forget=forget, output=str(tmp_path / "u.ckpt"))
    record = torch.load(out, weights_only=True)[UNLEARN_RECORD_KEY]
    assert record["forget_samples"] == 3 and record["source_checkpoint"] is None and trainer.current_epoch == 1
    assert record["outcome"] == "forgotten" and record["verification"]["target"] == 100.0
    assert not torch.equal(model.head[-1].weight, DigitsCNN.load_from_checkpoint(ckpt).head[-1].weight)


def test_ctrl_c_during_the_run_exits_130_and_writes_nothing(ckpt, tmp_path, capsys):
    """Lightning turns Ctrl+C inside `fit` into exit code 1; the command line reports it as an interruption."""
    out = tmp_path / "out.ckpt"
    before = _sha(ckpt)
    args = _unlearn(ckpt, tmp_path / "run", f"--output={out}", "--trainer.callbacks=_utils.InterruptAtFirstBatch")
    assert main(args) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "lightning-jit: interrupted"
    assert not out.exists() and _sha(ckpt) == before


def test_failure_exits_1_with_one_line_and_verbose_traceback(ckpt, tmp_path, capsys):
    # input_key=5 passes the usage checks, but no batch has a 6th item: the run itself fails.
    for name, extra in (("quiet", []), ("verbose", ["--verbose"])):
        args = _unlearn(ckpt, tmp_path / name, f"--output={tmp_path / name}.ckpt", "--batch.input_key=5", *QUICK)
        assert main(args + extra) == 1
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert last.startswith("lightning-jit: error: JiTInputError:") and "input_key" in last
        assert ("Traceback" in err) == (name == "verbose")
        assert not (tmp_path / f"{name}.ckpt").exists()


def test_console_usage_errors_are_one_line(capsys, tmp_path):
    existing = tmp_path / "tune"
    existing.mkdir()
    (existing / "tuned.yaml").write_text("keep: me\n")
    cases = [
        ([], "command"),
        (["bogus"], "bogus"),
        (["evaluate"], "--config"),
        (["evaluate", "--config", FULL_CLASS, "--unlearned", str(tmp_path / "none.ckpt")], "--unlearned"),
        (["evaluate", "--config", FULL_CLASS, "--no_such_flag"], "--no_such_flag"),
        (["tune", "--config", FULL_CLASS, "--n_configs", "0"], "--n_configs"),
        (["tune", "--config", FULL_CLASS, "--n_configs", "many"], "--n_configs"),
        (["tune", "--config", FULL_CLASS, "--out", str(existing), "--ckpt_path", "x.ckpt"], "--out"),
        (["demo", "--forget-class", "12"], "--forget_class"),  # either spelling; the error names the declared one
        (["tune", "--config", FULL_CLASS, "--sigma_range", "[0, 1]"], "--sigma_range"),
        (["tune", "--config", FULL_CLASS, "--task", "subclass"], "--task"),
        (["tune", "--config", FULL_CLASS, "--max_drop", "-1"], "--max_drop"),
        (["evaluate", "--config", FULL_CLASS, "--unlearned", "x.ckpt", "--overwrite", "maybe"], "--overwrite"),
        (["evaluate", "--config", FULL_CLASS, "--seed", "one"], "--seed"),
    ]
    for args, flag in cases:
        assert main(args) == 2, args
        (line,) = _errors(capsys.readouterr().err)
        assert f"error: {flag}" in line, (args, line)
    assert (existing / "tuned.yaml").read_text() == "keep: me\n"


# ----------------------------------------------------------------------------------------------------------------------
# evaluate: reads the batch group; loads a checkpoint written by 0.1
# ----------------------------------------------------------------------------------------------------------------------
def test_evaluate_a_checkpoint_of_the_previous_version(ckpt, digits, tmp_path, capsys):
    """Depends on ``lightning_jit.evaluation`` (``evaluate_unlearning(batch_format=...)``)."""
    unlearned = V0_1_0 / "wrapper.ckpt"  # DigitsCNN(width=2), digit 3 unlearned by lightning-jit 0.1.0
    report_dir = tmp_path / "report"
    args = ["evaluate", "--config", FULL_CLASS, f"--original={ckpt}", f"--unlearned={unlearned}"]
    code = main([*args, f"--report_dir={report_dir}"])
    assert code == 0, capsys.readouterr().err[-3000:]
    report = json.loads((report_dir / "report.json").read_text())
    model = DigitsCNN.load_from_checkpoint(unlearned, strict=True)
    train3 = digits.y_train == 3
    expected = accuracy(model, digits.x_train[train3], digits.y_train[train3])  # the forget set, computed here
    assert report["accuracy"]["unlearned"]["forget"] == pytest.approx(expected)
    assert (report_dir / "report.md").exists() and model.hparams.width == 2
    assert not (report_dir / "report.md").read_text().startswith("**")  # 0.1 recorded no verified verdict

    # the labels are read where `batch.label_key` says: position 0 holds the images, so this must fail
    config = yaml.safe_load(Path(FULL_CLASS).read_text())
    config["batch"] = {"label_key": 0}
    config["forget"] = {"indices": [0, 1, 2]}
    (tmp_path / "labels_at_0.yaml").write_text(yaml.safe_dump(config))
    args[2] = str(tmp_path / "labels_at_0.yaml")
    assert main([*args, f"--report_dir={tmp_path / 'report2'}"]) != 0
    assert "label_key" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "report2").exists()


def test_monitor_batches_drop_the_forgotten_classes():
    batches = [{"image": torch.arange(8.0).reshape(4, 2), "label": torch.tensor([0, 3, 1, 3])}]
    kept = _without_classes(batches, [3], BatchFormat())
    assert [x.tolist() for x, _ in kept] == [[[0.0, 1.0], [4.0, 5.0]]] and kept[0][1].tolist() == [0, 1]
    with pytest.raises(JiTUsageError, match="no sample of a kept class"):
        _without_classes(batches, [0, 1, 3], BatchFormat())


# ----------------------------------------------------------------------------------------------------------------------
# Forget-set selection
# ----------------------------------------------------------------------------------------------------------------------
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
    loader = select_forget_loader(dm, ForgetSelection(classes=[3, 5]))
    selected = [loader.dataset[i] for i in range(len(loader.dataset))]
    x, y = torch.stack([a for a, _ in selected]), torch.stack([torch.as_tensor(b) for _, b in selected])
    mask = (digits.y_train == 3) | (digits.y_train == 5)  # independent: straight from the split
    assert torch.equal(x, digits.x_train[mask]) and torch.equal(y, digits.y_train[mask])
    read = torch.cat([b[1] for b in loader])  # one pass reads every selected sample once, shuffled
    assert torch.equal(read.sort().values, y.sort().values) and loader.batch_size == batch_size_for(len(y))

    loader = select_forget_loader(dm, ForgetSelection(indices=[5, 2, 900], batch_size=2))
    assert loader.batch_size == 2 and torch.equal(loader.dataset[1][0], digits.x_train[2])

    hook = select_forget_loader(dm, ForgetSelection())  # no selection: the datamodule's forget_dataloader() hook
    assert len(hook.dataset) == int((digits.y_train == 3).sum())

    for forget, flag in [
        (ForgetSelection(classes=[1], indices=[2]), "--forget.indices"),
        (ForgetSelection(classes=[10]), "--forget.classes"),
        (ForgetSelection(indices=[len(digits.y_train)]), "--forget.indices"),
        (ForgetSelection(indices=[]), "--forget.indices"),
    ]:
        with pytest.raises(JiTUsageError) as err:
            select_forget_loader(dm, forget)
        assert err.value.flag == flag
    with pytest.raises(JiTUsageError) as err:
        select_forget_loader(DigitsDataModule(), ForgetSelection())  # the hook without forget_digits
    assert err.value.flag == "--forget.loader"


def test_dataset_labels_follow_the_batch_format():
    class Samples(torch.utils.data.Dataset):
        def __init__(self, key):
            self.key = key

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"pixels": torch.zeros(2), self.key: [4, 1, 4][i]}

    assert dataset_labels(Samples("target")).tolist() == [4, 1, 4]  # None: the first of the automatic label keys
    assert dataset_labels(Samples("digit"), "digit").tolist() == [4, 1, 4]
    with pytest.raises(JiTUsageError, match="--batch.label_key") as err:
        dataset_labels(Samples("digit"))
    assert err.value.flag == "--forget.classes"


# ----------------------------------------------------------------------------------------------------------------------
# The installed script, in a subprocess (exit codes as a shell sees them)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_installed_script_exit_codes(ckpt, tmp_path, capsys, monkeypatch):
    """Each exit code of ``main`` for the command line's cases, then the installed script in a subprocess for one of
    them (3), which proves that the script exits with what ``main`` returns, as a shell sees it."""
    script = Path(sys.executable).parent / "lightning-jit"
    assert script.exists(), "the package is not installed: `pip install -e .`"
    monkeypatch.chdir(tmp_path)  # where the script runs below

    assert main(["--help"]) == 0
    capsys.readouterr()
    assert main(_unlearn(ckpt, tmp_path / "run", "--jit.sigma=abc")) == 2
    bad = capsys.readouterr().err
    assert len(_errors(bad)) == 1 and "--jit.sigma" in bad
    assert main(_unlearn(ckpt, tmp_path / "run", f"--output={tmp_path / 'x.ckpt'}", "--batch.input_key=5", *QUICK)) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("lightning-jit: error:")
    done = main(_unlearn(ckpt, tmp_path / "run", f"--output={tmp_path / 'ok.ckpt'}", *QUICK))
    assert done == 0, capsys.readouterr().err[-2000:]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    args = _unlearn(ckpt, tmp_path / "run", f"--output={tmp_path / 'no.ckpt'}", *QUICK, *NOT_ENOUGH)
    kept = subprocess.run([str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert kept.returncode == 3 and kept.stderr.strip().splitlines()[-1].startswith(
        "lightning-jit unlearn: NOT forgotten"
    )
    assert not (tmp_path / "no.ckpt").exists()
    assert DigitsCNN.load_from_checkpoint(tmp_path / "ok.ckpt", strict=True).hparams.width == 8


# ----------------------------------------------------------------------------------------------------------------------
# Nothing unverified on disk, with Lightning's default checkpointing left on (issue 21)
# ----------------------------------------------------------------------------------------------------------------------
CHECKPOINTING = ["--trainer.enable_checkpointing=true"]  # the examples turn it off; a minimal config does not


def test_unlearn_with_default_checkpointing_leaves_only_verified_files(ckpt, tmp_path, capsys):
    out = tmp_path / "out.ckpt"
    code = main(_unlearn(ckpt, tmp_path / "run", f"--output={out}", *CHECKPOINTING, *QUICK, *NOT_ENOUGH))
    assert code == 3, capsys.readouterr().err[-2000:]
    assert sorted(tmp_path.rglob("*.ckpt")) == []  # the epoch checkpoint Lightning wrote during the run is gone

    args = _unlearn(ckpt, tmp_path / "run2", f"--output={out}", "--keep_unverified=true", *CHECKPOINTING, *QUICK)
    assert main([*args, *NOT_ENOUGH]) == 3
    assert [p.name for p in tmp_path.rglob("*.ckpt")] == ["out.unverified.ckpt"]  # only what was asked for
    original = DigitsCNN.load_from_checkpoint(ckpt, strict=True)
    kept = DigitsCNN.load_from_checkpoint(tmp_path / "out.unverified.ckpt", strict=True)
    assert not same_weights(kept, original)  # --keep_unverified implies on_unverified="keep": the partial weights

    verified = tmp_path / "verified.ckpt"
    assert main(_unlearn(ckpt, tmp_path / "run3", f"--output={verified}", *CHECKPOINTING, *QUICK)) == 0
    written = sorted((tmp_path / "run3").rglob("*.ckpt"))
    assert written, "Lightning's ModelCheckpoint wrote nothing: the test would prove nothing"
    result = DigitsCNN.load_from_checkpoint(verified, strict=True)
    for path in written:  # settled: the user's format, the verification record, the verified weights
        saved = torch.load(path, weights_only=True)
        assert saved["jit_safety"]["verification"]["outcome"] == "forgotten" and "jit_unverified" not in saved
        loaded = DigitsCNN.load_from_checkpoint(path, strict=True)
        assert same_weights(loaded, result)


def test_an_output_selector_that_finds_no_logits_is_a_usage_error_and_writes_nothing(ckpt, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    tuple_model = ["--model.class_path=_utils.FeaturesAndLogitsCNN"]  # forward returns (features, logits)
    for args in (["--batch.output_selector=5"], [*tuple_model, "--batch.output_selector=2"]):
        code = main(_unlearn(ckpt, work, f"--output={work / 'out.ckpt'}", *CHECKPOINTING, *QUICK, *args))
        err = capsys.readouterr().err
        assert code == 2, (args, code, err[-2000:])
        (line,) = _errors(err)
        assert line.startswith("lightning-jit unlearn: error: --batch.output_selector"), line
        assert not any(work.iterdir()), sorted(work.rglob("*"))  # no config.yaml, hparams.yaml or checkpoint
    # The same model with no selector runs: it states its class count (hparams.num_classes), which finds the logits.
    args = _unlearn(ckpt, work, f"--output={work / 'out.ckpt'}", *QUICK, *tuple_model)
    assert main(args) == 0, capsys.readouterr().err[-2000:]


def test_a_sample_request_needs_a_heldout_split_and_is_verified_against_it(ckpt, tmp_path):
    """Samples across every class, with no target: without `--forget.heldout` a usage error naming it (no update,
    nothing written); with it, the held-out test decides, and its record is in the checkpoint."""
    forget = ForgetSelection(indices=list(range(0, 600, 2)))  # 300 training samples, every digit
    settings = JiTSettings(seed=0)

    def unlearn(**kwargs):
        model = DigitsCNN.load_from_checkpoint(ckpt)
        trainer = JiTTrainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        return model, trainer.unlearn(
            model, DigitsDataModule(), jit=settings, output=str(tmp_path / "u.ckpt"), **kwargs
        )

    with pytest.raises(JiTUsageError, match="--forget.heldout"):
        unlearn(forget=forget)
    assert not (tmp_path / "u.ckpt").exists()
    with pytest.raises(JiTUsageError, match="--forget.heldout"):
        unlearn(forget=ForgetSelection(indices=forget.indices, heldout="no_such_method"))
    # This CNN does not memorise its digits: 300 of them already look like the held-out split, which is verified.
    _, out = unlearn(forget=ForgetSelection(indices=forget.indices, heldout="val_dataloader"))
    record = torch.load(out, weights_only=True)[UNLEARN_RECORD_KEY]["verification"]
    assert record["outcome"] == "forgotten"
    assert record["heldout_test"]["n_forget"] == 300 and record["heldout_test"]["passed"]
    assert record["heldout_test"]["memorised_p"] < record["heldout_test"]["alpha"]  # the test could have failed it


def test_a_failed_unlearn_leaves_nothing_on_disk(ckpt, tmp_path, capsys):
    """With Lightning's default logger and checkpointing on, as a minimal config leaves them: exit 3 (not forgotten)
    and exit 2 (a sample request without `--forget.heldout`, which the run itself finds) leave no `config.yaml`, no
    logger files and no checkpoint. Only `--keep_unverified true` keeps the run's files, with the weights it asked
    for (which shows what the fit writes)."""
    sample_request = ["--forget.classes=null", f"--forget.indices={list(range(0, 40, 2))}", "--jit.epochs=1"]
    cases = {
        "not_forgotten": ([*QUICK, *NOT_ENOUGH], 3),
        "no_heldout": ([*sample_request, "--trainer.enable_progress_bar=false"], 2),
    }
    for name, (args, exit_code) in cases.items():
        work = tmp_path / name
        work.mkdir()
        code = main(_unlearn(ckpt, work / "run", f"--output={work / 'out.ckpt'}", *CHECKPOINTING, *args))
        err = capsys.readouterr().err
        assert code == exit_code, (name, err[-2000:])
        if exit_code == 2:
            (line,) = _errors(err)
            assert line.startswith("lightning-jit unlearn: error: --forget.heldout"), line
        assert sorted(work.rglob("*")) == [], name  # not even the run directory

    work = tmp_path / "kept"
    args = _unlearn(ckpt, work / "run", f"--output={work / 'out.ckpt'}", "--keep_unverified=true", *CHECKPOINTING)
    assert main([*args, *QUICK, *NOT_ENOUGH]) == 3
    written = {p.name for p in work.rglob("*") if p.is_file()}
    assert {"out.unverified.ckpt", "config.yaml", "hparams.yaml"} <= written and "out.ckpt" not in written
    assert not [name for name in written if name.endswith(".ckpt") and name != "out.unverified.ckpt"]
