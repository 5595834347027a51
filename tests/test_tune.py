"""``tune_jit``, its probes and ``lightning-jit tune``, on real digits data and the session-trained digits CNN."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml
from _utils import quiet_trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

from lightning_jit.data import DigitsCNN, accuracy, class_mask
from lightning_jit.module import JiTUnlearning
from lightning_jit.probes import probe_confidence, synthesize_class_probes
from lightning_jit.tune import _schedule, tune_jit


def _class_loader(digits, cls: int, batch_size: int = 32) -> DataLoader:
    f = class_mask(digits.y_train, [cls])
    return DataLoader(TensorDataset(digits.x_train[f], digits.y_train[f]), batch_size=batch_size)


def _tune(model: torch.nn.Module, forget, **kwargs):
    """``tune_jit`` as the tests run it: on the CPU, without a progress bar."""
    return tune_jit(model, forget, progress=False, trainer_kwargs={"accelerator": "cpu"}, **kwargs)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_settings_tuned_on_one_class_forget_another(trained_cnn, digits):
    """The issue's acceptance test: tune (zero-shot) on digit 1, then unlearn digit 0 with the chosen settings."""
    before = _state(trained_cnn)
    result = _tune(trained_cnn, _class_loader(digits, 1))
    for key, value in before.items():  # the model given to tune_jit is never changed
        assert torch.equal(trained_cnn.state_dict()[key], value)
    assert result.best.met and result.best.feasible and result.message is None
    assert result.settings()["logit_norm_penalty"] == 10.0  # the kept improvements are on in every trial

    model = copy.deepcopy(trained_cnn)
    trainer = quiet_trainer(max_epochs=result.settings()["epochs"])
    trainer.fit(JiTUnlearning(model, **result.settings()), _class_loader(digits, 0))
    f_test = class_mask(digits.y_test, [0])
    assert accuracy(model, digits.x_test[f_test], digits.y_test[f_test]) <= 20.0
    assert accuracy(model, digits.x_test[~f_test], digits.y_test[~f_test]) >= 90.0


def test_trial_table_is_complete_and_reproducible(trained_cnn, digits):
    def tune(seed: int):
        return _tune(
            trained_cnn,
            _class_loader(digits, 1),
            n_configs=4,
            max_epochs=3,
            seed=seed,
        )

    first, again, other = tune(0), tune(0), tune(1)
    table = first.table(include_time=False)
    assert len(table.splitlines()) == 2 + 4  # header, rule, one row per trial
    for trial in first.trials:
        assert f"| {trial.index}" in table and trial.history
    assert table == again.table(include_time=False)
    assert first.to_yaml() == again.to_yaml()
    assert [(t.sigma, t.lr) for t in first.trials] != [(t.sigma, t.lr) for t in other.trials]


def test_optuna_search_is_reproducible_and_prunes_on_the_same_rungs(trained_cnn, digits):
    pytest.importorskip("optuna")

    def tune():
        return _tune(
            trained_cnn,
            _class_loader(digits, 1),
            search="optuna",
            n_configs=4,
            reduction_factor=2,
            max_epochs=4,
            finalists=1,
        )

    first, again = tune(), tune()
    assert len(first.trials) == 4 and all(t.history for t in first.trials)
    assert first.table(include_time=False) == again.table(include_time=False)
    for trial in first.trials:  # the rungs of _schedule(4, 2, 4): 1, 2 and 4 epochs
        assert trial.epochs_run <= [1, 2, 4][trial.rung]
        assert 0.02 <= trial.sigma <= 1.0 and 3e-3 <= trial.lr <= 0.3


def test_successive_halving_gives_the_survivors_the_epochs(trained_cnn, digits):
    assert _schedule(16, 3, 30) == [(16, 3), (5, 10), (1, 30)]
    assert _schedule(4, 2, 8) == [(4, 2), (2, 4), (1, 8)]
    result = _tune(
        trained_cnn,
        _class_loader(digits, 1),
        n_configs=4,
        reduction_factor=2,
        max_epochs=8,
        finalists=0,
    )
    for trial in result.trials:
        # A trial runs at most the epochs of the last rung it reached, and runs on only while the rule has not fired.
        assert trial.epochs_run <= [2, 4, 8][trial.rung]
        if trial.rung == 0 and not trial.stopped_early:
            assert trial.epochs_run == 2
    reached = sorted(t.rung for t in result.trials)
    assert reached == [0, 0, 1, 2]


def test_finalists_are_judged_by_their_worst_run(trained_cnn, digits):
    result = _tune(
        trained_cnn,
        _class_loader(digits, 3),
        n_configs=4,
        max_epochs=6,
        finalists=2,
        repeats=1,
    )
    confirmed = [t for t in result.trials if t.repeats]
    assert len(confirmed) == 2
    for trial in confirmed:
        runs = [trial.history[-1]["score"]] + [r["score"] for r in trial.repeats]
        assert trial.score == min(runs)
    # The choice: among feasible trials that met the target within `tie_tolerance` (1 point) of the best score, the
    # smallest learning rate.
    good = [t for t in result.trials if t.met and t.feasible]
    top = max(t.score for t in good)
    tied = [t for t in good if t.score >= top - 1.0]
    assert result.best in tied and result.best.lr == min(t.lr for t in tied)


def test_impossible_budget_returns_the_best_trial_so_far(trained_cnn, digits):
    with pytest.warns(UserWarning, match="time budget of 0.001 s ran out after 1 of"):
        result = _tune(trained_cnn, _class_loader(digits, 1), budget=1e-3)
    assert [t.index for t in result.trials if t.history] == [result.best.index]
    assert "best trial so far" in result.message and "--budget" in result.message
    assert math.isfinite(result.best.forget_acc)


def test_monitored_mode_measures_the_monitor_and_enforces_max_drop(trained_cnn, digits):
    kept = ~class_mask(digits.y_test, [1])
    monitor = DataLoader(TensorDataset(digits.x_test[kept], digits.y_test[kept]), batch_size=128)
    reference = accuracy(trained_cnn, digits.x_test[kept], digits.y_test[kept])
    result = _tune(
        trained_cnn,
        _class_loader(digits, 1),
        monitor=monitor,
        max_drop=0.5,
        logit_norm_penalty=0.0,  # plain JiT: some trials then lose more than 0.5 points, as the last check needs
        n_configs=4,
        max_epochs=6,
    )
    assert result.mode == "monitored" and "monitor acc" in result.table()
    for trial in result.trials:
        for value in [h["retain"] for h in trial.history]:
            assert abs(value * kept.sum().item() / 100 - round(value * kept.sum().item() / 100)) < 1e-3
        if trial.feasible:
            assert reference - trial.retain <= 0.5
    assert any(not t.feasible for t in result.trials if t.history)  # 0.5 points is strict: some trials break it


def test_random_task_needs_unseen_data_and_measures_the_confidence_gap(trained_cnn, digits):
    forget = DataLoader(TensorDataset(digits.x_train[:64], digits.y_train[:64]), batch_size=32)
    with pytest.raises(MisconfigurationException, match="`unseen`"):
        tune_jit(trained_cnn, forget, task="random")
    unseen = DataLoader(TensorDataset(digits.x_test, digits.y_test), batch_size=256)
    # A step size so small that the model does not move: the measured gap must be the original model's.
    result = _tune(
        trained_cnn,
        forget,
        task="random",
        unseen=unseen,
        sigma_range=(0.1, 0.1),
        lr_range=(1e-9, 1e-9),
        n_configs=2,
        max_epochs=1,
        finalists=0,
        confidence_tolerance=0.25,
    )
    with torch.no_grad():
        conf = lambda x: float(torch.softmax(trained_cnn(x), 1).max(1).values.mean() * 100)  # noqa: E731
        original_gap = conf(digits.x_train[:64]) - conf(digits.x_test)
    assert original_gap > 0.25  # the forget set is more confident than unseen data: a gap to close
    assert "conf. gap" in result.table() and "target_forget_accuracy" not in result.settings()
    for trial in result.trials:
        assert trial.gap == pytest.approx(original_gap, abs=1e-3)
        assert not trial.met and trial.score == pytest.approx(trial.retain - (original_gap - 0.25), abs=1e-3)
    assert "brought the forget set's confidence down" in result.message


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"sigma_range": (0.0, 1.0)}, "sigma_range"),
        ({"lr_range": (0.3, 0.1)}, "lr_range"),
        ({"n_configs": 0}, "n_configs"),
        ({"reduction_factor": 1}, "reduction_factor"),
        ({"task": "subclass"}, "task"),
        ({"budget": -1}, "budget"),
        ({"n_perturbations": [0]}, "n_perturbations"),
        ({"sigma": 0.1}, "sigma"),
        ({"finalists": -1}, "finalists"),
    ],
)
def test_bad_arguments_name_the_argument(trained_cnn, digits, kwargs, name):
    with pytest.raises(MisconfigurationException, match=f"`{name}`"):
        tune_jit(trained_cnn, _class_loader(digits, 1), progress=False, **kwargs)


def test_probes_are_classified_as_their_class_and_leave_the_model_alone(trained_cnn, digits):
    before = _state(trained_cnn)
    classes = [0, 2, 5]
    x, y = synthesize_class_probes(trained_cnn, classes, like=digits.x_train[:32], per_class=8, seed=3)
    assert x.shape == (24, 1, 8, 8) and y.tolist() == [c for c in classes for _ in range(8)]
    assert all(p.grad is None for p in trained_cnn.parameters())
    for key, value in before.items():
        assert torch.equal(trained_cnn.state_dict()[key], value)
    with torch.no_grad():
        probs = torch.softmax(trained_cnn(x), dim=1)
    assert (probs.argmax(1) == y).all()
    by_hand = sum(float(probs[i, y[i]]) for i in range(len(y))) / len(y) * 100
    assert probe_confidence(trained_cnn, (x, y)) == pytest.approx(by_hand, rel=1e-5)
    # A random model does not classify them so: the probes carry what the trained model knows.
    assert probe_confidence(DigitsCNN().eval(), (x, y)) < 50


def test_cli_tune_writes_settings_that_unlearn_accepts(_trained_state, digits, tmp_path):
    import lightning.pytorch as pl

    model = DigitsCNN()
    model.load_state_dict(_trained_state)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "digits.ckpt")
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False},
        "model": {"class_path": "lightning_jit.data.DigitsCNN"},
        "data": {"class_path": "lightning_jit.data.DigitsDataModule"},
        "jit": {"sigma": 9.0, "lr": 9.0, "normalize_logits": True, "target_forget_accuracy": 15.0},
        "forget": {"classes": [1], "batch_size": 32},
        "ckpt_path": str(tmp_path / "digits.ckpt"),
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    tune = [
        sys.executable,
        "-m",
        "lightning_jit",
        "tune",
        "--config",
        str(tmp_path / "cfg.yaml"),
        "--out",
        str(tmp_path / "tune"),
        "--n_configs",
        "4",
        "--max_epochs",
        "6",
    ]
    done = subprocess.run(tune, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    tuned_text = (tmp_path / "tune" / "tuned.yaml").read_text()
    tuned = yaml.safe_load(tuned_text)["jit"]
    assert tuned["sigma"] != 9.0 and tuned["normalize_logits"] is True and tuned["target_forget_accuracy"] == 15.0
    assert (tmp_path / "tune" / "tune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(chosen)" in (tmp_path / "tune" / "trials.md").read_text()

    again = subprocess.run(tune, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2 and "--out" in again.stderr and "--overwrite" in again.stderr
    bad = subprocess.run(
        [*tune, "--overwrite", "--n_configs", "0"], capture_output=True, text=True, env=env, timeout=300
    )
    assert bad.returncode == 2 and "--n_configs" in bad.stderr
    assert (tmp_path / "tune" / "tuned.yaml").read_text() == tuned_text  # a usage error writes nothing

    unlearn = [
        sys.executable,
        "-m",
        "lightning_jit",
        "unlearn",
        "--config",
        str(tmp_path / "cfg.yaml"),
        "--config",
        str(tmp_path / "tune" / "tuned.yaml"),
        "--output",
        str(tmp_path / "unlearned.ckpt"),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
    ]
    done = subprocess.run(unlearn, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    used = torch.load(tmp_path / "unlearned.ckpt", weights_only=True)["jit_hyper_parameters"]
    assert (used["sigma"], used["lr"]) == (tuned["sigma"], tuned["lr"])
    unlearned = DigitsCNN.load_from_checkpoint(tmp_path / "unlearned.ckpt", strict=True)
    f = class_mask(digits.y_test, [1])
    assert accuracy(unlearned, digits.x_test[f], digits.y_test[f]) <= 20.0


def test_preference_breaks_ties_towards_the_smaller_step():
    from lightning_jit.tune import Trial, _preference

    def trial(index, lr, score, met=True):
        t = Trial(index=index, sigma=0.1, lr=lr, n_perturbations=25, met=met, feasible=True, score=score)
        t.history.append({"score": score})
        return t

    a, b, c, d = trial(0, 0.1, 99.5), trial(1, 0.03, 98.9), trial(2, 0.01, 97.0), trial(3, 0.001, 99.9, met=False)
    assert [t.index for t in _preference([a, b, c, d], 1.0)] == [1, 0, 2, 3]
    assert [t.index for t in _preference([a, b, c, d], 0.0)] == [0, 1, 2, 3]
    assert [t.index for t in _preference([a, b, c, d], 5.0)] == [2, 1, 0, 3]
    assert [t.index for t in _preference([d], 1.0)] == [3]  # nothing met: the closest first
