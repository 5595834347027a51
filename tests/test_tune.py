"""``tune_jit``: the search logic with a stub runner, the judge on real digits, one tiny real search end to end, and
(slow) the acceptance test and ``lightning-jit tune``."""

from __future__ import annotations

import copy
import inspect
import json
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

from lightning_jit.core.calibration import CLASS_TARGET
from lightning_jit.core.guard import GuardSettings
from lightning_jit.core.probes import probe_confidence, synthesize_class_probes
from lightning_jit.core.settings import JiTSettings, field_names, load_settings
from lightning_jit.demo.data import DigitsCNN, accuracy, class_mask
from lightning_jit.lightning.module import JiTUnlearning
from lightning_jit.tune import TuneResult, tune_jit
from lightning_jit.tune.judge import GUARD_PENALTY, Criterion, Judge
from lightning_jit.tune.result import Trial
from lightning_jit.tune.runner import TRIAL_SEED_STRIDE
from lightning_jit.tune.search import halving_schedule, preference, run_search, sobol_trials
from lightning_jit.tune.settings import TuneSettings, split_tune_settings
from lightning_jit.tune.tune import _not_met_message


def _class_loader(digits, cls: int, batch_size: int = 32) -> DataLoader:
    f = class_mask(digits.y_train, [cls])
    return DataLoader(TensorDataset(digits.x_train[f], digits.y_train[f]), batch_size=batch_size)


def _tune(model: torch.nn.Module, forget, **kwargs):
    """``tune_jit`` as the tests run it: on the CPU, without a progress bar."""
    return tune_jit(model, forget, progress=False, trainer_kwargs={"accelerator": "cpu"}, **kwargs)


def _declarations(**kwargs):
    """What a ``Judge`` takes from ``tune_jit``'s keyword arguments: the search's settings, the trials' JiT settings and
    the guard's."""
    tune, base, _, guard = split_tune_settings(kwargs)
    return tune, base, guard


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------------
# The search logic, with a stub runner
# ----------------------------------------------------------------------------------------------------------------------
class StubRunner:
    """A deterministic stand-in for JiT, in closed form: per epoch the forget accuracy falls by ``1000 * lr`` points
    and what is kept by ``100 * sigma``; the stopping rule fires at the first epoch that reaches the target; a run
    with ``lr >= rescue_lr`` is rescued by the guard. Each run costs one second per epoch on ``self.now``.

    It keeps each trial's "weights" (how many epochs they hold) and checks that every run goes on from them.
    """

    def __init__(
        self,
        criterion: Criterion,
        *,
        rescue_lr: float = math.inf,
        repeat_loss: dict[int, float] | None = None,
        rescued_repeats: set[int] | None = None,
    ) -> None:
        self.criterion = criterion
        self.rescue_lr = rescue_lr
        self.rescued_repeats = rescued_repeats or set()
        self.repeat_loss = repeat_loss or {}  # index -> points of what is kept that a repeat run loses (bad luck)
        self.states: dict[int, int] = {}
        self.calls: list[tuple[str, int, int]] = []
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def _simulate(self, trial: Trial, epochs: int, loss: float = 0.0, rescued: bool = False) -> None:
        target = self.criterion.target_forget_accuracy
        for epoch in range(trial.epochs_run + 1, epochs + 1):  # one epoch at a time, as the stopping rule sees them
            self.now += 1.0
            trial.epochs_run = epoch
            if 100.0 - 1000.0 * trial.lr * epoch <= target:
                trial.stopped_early = True
                break
        e = trial.epochs_run
        rescued = rescued or trial.lr >= self.rescue_lr
        outcome = "forgotten" if trial.stopped_early else "not_forgotten"
        measured = {
            "forget_acc": max(0.0, 100.0 - 1000.0 * trial.lr * e),
            "forget_entropy": 0.5,
            "retain": 100.0 - 100.0 * trial.sigma * e - loss,
        }
        self.criterion.record(trial, measured, outcome=outcome, guard_events=1 if rescued else 0)

    def advance(self, trial: Trial, epochs: int) -> None:
        assert self.states.get(trial.index, 0) == trial.epochs_run < epochs  # goes on from its own weights
        self.calls.append(("advance", trial.index, epochs))
        self._simulate(trial, epochs)
        self.states[trial.index] = trial.epochs_run

    def repeat(self, trial: Trial, epochs: int, repeat: int) -> Trial:
        self.calls.append(("repeat", trial.index, epochs))
        rerun = Trial(index=trial.index, sigma=trial.sigma, lr=trial.lr, n_perturbations=trial.n_perturbations)
        loss = self.repeat_loss.get(trial.index, 0.0)
        self._simulate(rerun, epochs, loss=loss, rescued=trial.index in self.rescued_repeats)
        return rerun

    def drop(self, trial: Trial) -> None:
        self.calls.append(("drop", trial.index, trial.epochs_run))
        self.states.pop(trial.index, None)


def _trials(*lr_sigma: tuple[float, float]) -> list[Trial]:
    return [Trial(index=i, sigma=s, lr=lr, n_perturbations=25) for i, (lr, s) in enumerate(lr_sigma)]


def _search(runner: StubRunner, trials: list[Trial], **kwargs):
    options = {"reduction_factor": 2, "max_epochs": 4, "finalists": 0, "repeats": 1, "clock": runner.clock}
    return run_search(runner, trials, **{**options, **kwargs})


def test_schedule_gives_the_survivors_the_epochs():
    assert halving_schedule(16, 3, 30) == [(16, 3), (5, 10), (1, 30)]
    assert halving_schedule(4, 2, 8) == [(4, 2), (2, 4), (1, 8)]
    assert halving_schedule(9, 3, 9) == [(9, 1), (3, 3), (1, 9)]
    assert halving_schedule(1, 3, 30) == [(1, 30)]  # one trial: one rung of max_epochs
    assert halving_schedule(16, 3, 2) == [(16, 2)]  # too few epochs to divide: one rung


def test_halving_advances_the_best_from_where_they_stopped_and_drops_the_rest():
    # Scores by hand (score = kept - (forget acc - 5)), schedule [(4, 1), (2, 2), (1, 4)]:
    #   after 1 epoch: #0 99-85 = 14, #1 98-65 = 33, #2 95-45 = 50, #3 99.9-75 = 24.9  -> #2 and #1 go on to 2 epochs;
    #   after 2: #2 reaches 0% (its stopping rule fires: finished, 90 kept, met), #1 96-35 = 61 -> #2 goes on, done.
    trials = _trials((0.01, 0.01), (0.03, 0.02), (0.05, 0.05), (0.02, 0.001))
    runner = StubRunner(Criterion(task="class", target_forget_accuracy=5.0, confidence_tolerance=2.0))
    outcome = _search(runner, trials)
    advances = [c for c in runner.calls if c[0] == "advance"]
    assert advances == [("advance", i, 1) for i in range(4)] + [("advance", 2, 2), ("advance", 1, 2)]
    dropped = {c[1] for c in runner.calls if c[0] == "drop"}
    assert dropped == {0, 1, 3} and set(runner.states) == {2}
    assert [t.rung for t in trials] == [0, 1, 2, 0] and [t.epochs_run for t in trials] == [1, 2, 2, 1]
    assert [len(t.history) for t in trials] == [1, 2, 2, 1]
    assert trials[2].stopped_early and trials[2].met and trials[2].score == pytest.approx(90.0)
    assert trials[1].score == pytest.approx(61.0) and not trials[1].met
    assert outcome.best is trials[2] and outcome.runs == outcome.total_runs == 4 + 2 + 1
    assert outcome.budget_message is None


def test_finalists_are_confirmed_from_the_original_weights_and_judged_by_their_worst_run():
    # All three reach the target in one epoch; #1 keeps the most but its repeat loses 10 points of what it keeps.
    trials = _trials((0.1, 0.05), (0.12, 0.01), (0.15, 0.03))
    runner = StubRunner(
        Criterion(task="class", target_forget_accuracy=5.0, confidence_tolerance=2.0), repeat_loss={1: 10.0}
    )
    outcome = _search(runner, trials, finalists=2, repeats=2, tie_tolerance=0.0)
    repeats = [c for c in runner.calls if c[0] == "repeat"]
    assert repeats == [("repeat", 1, 4), ("repeat", 1, 4), ("repeat", 2, 4), ("repeat", 2, 4)]  # best two, max_epochs
    assert [len(t.repeats) for t in trials] == [0, 2, 2]
    for trial in trials[1:]:
        runs = [trial.history[-1]["score"]] + [r["score"] for r in trial.repeats]
        assert trial.score == min(runs)
    assert trials[1].score == pytest.approx(99.0 - 10.0) and trials[2].score == pytest.approx(97.0)
    assert outcome.best is trials[2]  # the lucky single run of #1 is not chosen
    assert outcome.runs == outcome.total_runs == 3 + 1 + 2 * 2


def test_a_finalist_the_guard_rescues_in_a_repeat_is_infeasible():
    # #0 reaches the target in its first epoch and keeps 99; its repeat is rescued by the guard. #1 never gets there.
    trials = _trials((0.1, 0.01), (0.005, 0.001))
    runner = StubRunner(
        Criterion(task="class", target_forget_accuracy=5.0, confidence_tolerance=2.0), rescued_repeats={0}
    )
    outcome = _search(runner, trials, finalists=1)
    assert trials[0].met and not trials[0].feasible and trials[0].score == pytest.approx(99.0 - GUARD_PENALTY)
    assert outcome.best is trials[1] and not outcome.best.met


def test_the_advice_when_no_trial_meets_the_target_names_the_argument_and_the_flag():
    tune = TuneSettings(task="class", n_configs=16, max_epochs=30, lr_range=(3e-3, 0.3))
    slow = Trial(index=3, sigma=0.1, lr=0.01, n_perturbations=25, met=False)
    message = _not_met_message(slow, tune, monitored=False, max_drop=2.0)
    assert "trial 3 came closest" in message
    for name in (
        "`max_epochs` (now 30; CLI: --max_epochs)",
        "`n_configs` (now 16; CLI: --n_configs)",
        "`lr_range` (now (0.003, 0.3); CLI: --lr_range)",
    ):
        assert name in message
    rescued = Trial(index=5, sigma=0.1, lr=0.3, n_perturbations=25, met=True, feasible=False)
    message = _not_met_message(rescued, tune, monitored=True, max_drop=0.5)
    assert "more than 0.5 points" in message and "`max_drop` (now 0.5; CLI: --max_drop)" in message
    assert "`n_configs` (now 16; CLI: --n_configs)" in message and "--max_epochs" not in message


def test_ties_go_to_the_smaller_step():
    # All reach the target in one epoch; scores 99.0 (#0, lr 0.2), 98.5 (#1, lr 0.15), 96.0 (#2, lr 0.1).
    trials = _trials((0.2, 0.01), (0.15, 0.015), (0.1, 0.04))
    runner = StubRunner(Criterion(task="class", target_forget_accuracy=5.0, confidence_tolerance=2.0))
    assert _search(runner, copy.deepcopy(trials), tie_tolerance=1.0).best.index == 1
    assert _search(StubRunner(runner.criterion), copy.deepcopy(trials), tie_tolerance=0.0).best.index == 0
    assert _search(StubRunner(runner.criterion), copy.deepcopy(trials), tie_tolerance=5.0).best.index == 2
    # A trial the guard rescued never wins, however much it keeps.
    rescued = _search(StubRunner(runner.criterion, rescue_lr=0.12), copy.deepcopy(trials), tie_tolerance=1.0)
    assert rescued.best.index == 2


def test_preference_orders_ties_by_step_and_the_rest_by_rank():
    def ran(index, lr, score, met=True):
        t = Trial(index=index, sigma=0.1, lr=lr, n_perturbations=25, met=met, feasible=True, score=score)
        t.history.append({"score": score})
        return t

    a, b, c, d = ran(0, 0.1, 99.5), ran(1, 0.03, 98.9), ran(2, 0.01, 97.0), ran(3, 0.001, 99.9, met=False)
    never = Trial(index=4, sigma=0.1, lr=1e-4, n_perturbations=25)
    assert [t.index for t in preference([a, b, c, d, never], 1.0)] == [1, 0, 2, 3]
    assert [t.index for t in preference([a, b, c, d], 0.0)] == [0, 1, 2, 3]
    assert [t.index for t in preference([a, b, c, d], 5.0)] == [2, 1, 0, 3]
    assert [t.index for t in preference([d], 1.0)] == [3]  # nothing met: the closest first


@pytest.mark.parametrize(("budget", "runs"), [(2.5, 3), (1e-9, 1)])
def test_the_budget_ends_the_search_with_the_best_trial_so_far(budget, runs):
    # Each run of the first rung takes one second on the stub's clock; the budget is checked before each run, and the
    # first run always happens.
    trials = _trials((0.01, 0.01), (0.03, 0.02), (0.05, 0.05), (0.02, 0.001))
    runner = StubRunner(Criterion(task="class", target_forget_accuracy=5.0, confidence_tolerance=2.0))
    outcome = _search(runner, trials, budget=budget, started=0.0, finalists=1)
    assert [c[0] for c in runner.calls] == ["advance"] * runs
    assert [t.index for t in trials if t.history] == list(range(runs))
    assert outcome.best is max(trials[:runs], key=lambda t: t.score)
    assert outcome.runs == runs and outcome.total_runs == 4 + 2 + 1 + 1
    assert f"ran out after {runs} of 8 runs" in outcome.budget_message and "--budget" in outcome.budget_message


def test_trial_table_is_complete_and_reproducible():
    def search(seed: int) -> TuneResult:
        trials = sobol_trials(8, (0.02, 1.0), (3e-3, 0.3), [10, 25], seed=seed)
        outcome = run_search(
            StubRunner(Criterion(task="class", target_forget_accuracy=5.0, confidence_tolerance=2.0)),
            trials,
            reduction_factor=2,
            max_epochs=4,
            finalists=2,
        )
        chosen = JiTSettings(**outcome.best.settings(), epochs=4, seed=seed, target_forget_accuracy=5.0)
        return TuneResult(outcome.trials, outcome.best, chosen, "class", "zero-shot", seed, 4, 0.0)

    first, again, other = search(0), search(0), search(1)
    table = first.table(include_time=False)
    rows = table.splitlines()[2:]
    assert len(rows) == 8 and sum("(chosen)" in r for r in rows) == 1
    assert sorted(int(r.split("|")[1].split()[0]) for r in rows) == list(range(8))
    assert f"| {first.best.index} (chosen) |" in rows[0]
    assert table == again.table(include_time=False) and first.to_yaml() == again.to_yaml()
    assert [(t.sigma, t.lr, t.n_perturbations) for t in first.trials] != [
        (t.sigma, t.lr, t.n_perturbations) for t in other.trials
    ]
    assert {t.n_perturbations for t in first.trials} == {10, 25}
    assert all(0.02 <= t.sigma <= 1.0 and 3e-3 <= t.lr <= 0.3 for t in first.trials + other.trials)


# ----------------------------------------------------------------------------------------------------------------------
# How a trial is judged (the judge on the real digits CNN, and the criterion by hand)
# ----------------------------------------------------------------------------------------------------------------------
def test_criterion_by_hand():
    trial = Trial(index=0, sigma=0.1, lr=0.01, n_perturbations=25)
    monitored = Criterion(
        task="class", target_forget_accuracy=5.0, confidence_tolerance=2.0, max_drop=0.5, reference=98.0
    )
    clean = {"outcome": "forgotten", "guard_events": 0}
    monitored.record(trial, {"forget_acc": 3.0, "forget_entropy": 0.1, "retain": 97.4}, **clean)
    assert trial.met and not trial.feasible and trial.score == pytest.approx(97.4)  # fell 0.6 > 0.5 points
    monitored.record(trial, {"forget_acc": 8.0, "forget_entropy": 0.1, "retain": 97.6}, outcome="not_forgotten")
    assert not trial.met and trial.feasible and trial.score == pytest.approx(97.6 - 3.0)
    # The guard halved the step once and the run went on to forget: rescued, so infeasible and ranked below.
    monitored.record(trial, {"forget_acc": 0.0, "forget_entropy": 0.1, "retain": 97.9}, "forgotten", guard_events=1)
    assert trial.met and not trial.feasible and trial.score == pytest.approx(97.9 - GUARD_PENALTY)
    for outcome in ("rolled_back", "diverged"):
        monitored.record(trial, {"forget_acc": 0.0, "forget_entropy": 0.1, "retain": 97.9}, outcome, guard_events=0)
        assert not trial.feasible and trial.score == pytest.approx(97.9 - GUARD_PENALTY)
    assert [h["forget_acc"] for h in trial.history] == [3.0, 8.0, 0.0, 0.0, 0.0]
    gap = Criterion(task="random", target_forget_accuracy=None, confidence_tolerance=2.0)
    measured = {"forget_acc": 90.0, "forget_entropy": 0.1, "retain": 99.0}
    gap.record(trial, {**measured, "gap": -4.5}, outcome="not_forgotten")
    assert not trial.met and trial.score == pytest.approx(99.0 - 2.5)
    gap.record(trial, {**measured, "gap": 1.5}, outcome="not_forgotten")
    assert trial.met and trial.feasible and trial.score == pytest.approx(99.0)


def test_judge_measures_the_forget_set_and_the_probes(trained_cnn, digits):
    forget = _class_loader(digits, 1)
    judge = Judge(trained_cnn, forget, *_declarations(probes_per_class=4, seed=5))
    x, y = judge.probes
    assert sorted(set(y.tolist())) == [c for c in range(10) if c != 1] and x.shape[1:] == (1, 8, 8)
    measured = judge.measure(trained_cnn)
    f = class_mask(digits.y_train, [1])
    assert measured["forget_acc"] == pytest.approx(accuracy(trained_cnn, digits.x_train[f], digits.y_train[f]))
    with torch.no_grad():
        p = torch.softmax(trained_cnn(digits.x_train[f]).double(), 1)
        entropy = float(-(p * p.log()).sum(1).mean()) / math.log(10)
        by_hand = float(torch.softmax(trained_cnn(x), 1)[torch.arange(len(y)), y].mean() * 100)
    assert measured["forget_entropy"] == pytest.approx(entropy, rel=1e-5)
    assert measured["retain"] == pytest.approx(by_hand, rel=1e-5) == pytest.approx(judge.criterion.reference)
    with pytest.raises(MisconfigurationException, match="every class"):
        Judge(trained_cnn, DataLoader(TensorDataset(digits.x_test, digits.y_test), batch_size=256), *_declarations())


def test_judge_monitored_and_random_measure_held_out_data(trained_cnn, digits):
    kept = ~class_mask(digits.y_test, [1])
    monitor = DataLoader(TensorDataset(digits.x_test[kept], digits.y_test[kept]), batch_size=128)
    judge = Judge(trained_cnn, _class_loader(digits, 1), *_declarations(max_drop=0.5), monitor=monitor)
    reference = accuracy(trained_cnn, digits.x_test[kept], digits.y_test[kept])
    assert judge.mode == "monitored" and judge.probes is None
    assert judge.measure(trained_cnn)["retain"] == pytest.approx(reference)
    assert judge.criterion.reference == pytest.approx(reference) and judge.criterion.max_drop == 0.5

    forget = DataLoader(TensorDataset(digits.x_train[:64], digits.y_train[:64]), batch_size=32)
    unseen = DataLoader(TensorDataset(digits.x_test, digits.y_test), batch_size=256)
    judge = Judge(trained_cnn, forget, *_declarations(task="random", probes_per_class=2), unseen=unseen)
    with torch.no_grad():
        conf = lambda x: float(torch.softmax(trained_cnn(x), 1).max(1).values.mean() * 100)  # noqa: E731
        gap = conf(digits.x_train[:64]) - conf(digits.x_test)
    assert sorted(set(judge.probes[1].tolist())) == list(range(10))  # random forgetting: probes of every class
    assert judge.measure(trained_cnn)["gap"] == pytest.approx(gap, abs=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# tune_jit for real: one tiny search, the random task, bad arguments
# ----------------------------------------------------------------------------------------------------------------------
def test_a_trial_given_the_original_updates_what_the_run_without_it_updates(_trained_state, digits):
    """A trial runs JiT on a working copy with ``original=`` the user's model (another module object), so the frozen
    passes run the original. The no-knob run must still update only its ``update_scope`` (the last two weight modules
    of the digits CNN, in the order the forward runs them): the weights equal, bit for bit, those of the same run
    without ``original=``, which the tuned settings are used for. (The survey once recorded that order on the original's
    modules, found none of the copy's, and updated every parameter.)"""
    forget = _class_loader(digits, 3)
    finals = []
    for separate in (False, True):
        model = DigitsCNN()
        model.load_state_dict(_trained_state)
        original = copy.deepcopy(model) if separate else None
        quiet_trainer(max_epochs=-1).fit(JiTUnlearning(model, seed=0, on_unverified="keep", original=original), forget)
        finals.append({k: v.clone() for k, v in model.state_dict().items()})
        moved = sorted(k for k, v in model.state_dict().items() if not torch.equal(v, _trained_state[k]))
        assert moved == ["head.1.bias", "head.1.weight", "head.3.bias", "head.3.weight"], (separate, moved)
    for name, value in finals[0].items():
        assert torch.equal(value, finals[1][name]), name


def test_a_tiny_search_runs_jit_from_the_original_weights_and_leaves_the_model_alone(trained_cnn, digits, tmp_path):
    before = _state(trained_cnn)
    forget = _class_loader(digits, 1)
    tiny = {"n_configs": 4, "reduction_factor": 2, "max_epochs": 2, "finalists": 1, "n_perturbations": [5]}
    result = _tune(trained_cnn, forget, **tiny, probes_per_class=2, seed=3)
    for key, value in before.items():  # bit for bit
        assert torch.equal(trained_cnn.state_dict()[key], value), key
    assert not trained_cnn.training and all(p.requires_grad for p in trained_cnn.parameters())
    assert len(result.trials) == 4 and all(t.history for t in result.trials)
    assert sum(1 + len(t.repeats) for t in result.trials) >= 4 + 1
    assert len(result.table().splitlines()) == 2 + 4

    # The last trial of the first rung, run again independently from the original weights with the same settings and
    # seed, forgets exactly as much: every trial starts from the original weights, and its run is reproducible.
    trial = result.trials[-1]
    model = copy.deepcopy(trained_cnn)
    # The run is given no target: the one it calibrates for a class task is the search's default target.
    settings = result.jit_settings().replace(
        **trial.settings(),
        epochs=int(trial.history[0]["epochs"]),
        seed=3 + TRIAL_SEED_STRIDE * trial.index,
        target_forget_accuracy=None,
    )
    unlearner = JiTUnlearning(model, settings)
    quiet_trainer(max_epochs=settings.epochs).fit(unlearner, forget)
    f = class_mask(digits.y_train, [1])
    assert trial.history[0]["forget_acc"] == pytest.approx(accuracy(model, digits.x_train[f], digits.y_train[f]))
    assert unlearner.verification.target == result.jit_settings().target_forget_accuracy == CLASS_TARGET

    # One source of truth: the JiTSettings defaults plus what was given, as kwargs, a JiTSettings and YAML.
    chosen = result.jit_settings()
    assert chosen == JiTSettings(
        **result.best.settings(), epochs=2, seed=3, target_forget_accuracy=CLASS_TARGET, probes_per_class=2
    )
    assert JiTSettings(**result.settings()) == chosen
    assert load_settings(result.to_yaml()) == chosen
    assert JiTUnlearning(copy.deepcopy(trained_cnn), **result.settings()).settings == chosen

    paths = result.save(tmp_path)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(paths["json"].read_text())["best"] == result.best.index
    assert "(chosen)" in paths["markdown"].read_text()
    # tuned.yaml only when the chosen trial met the target: settings that did not forget are never offered.
    assert result.found == (result.best.met and result.best.feasible)
    assert ("yaml" in paths) == result.found == (tmp_path / "tuned.yaml").exists()
    if result.found:
        assert paths["yaml"].read_text() == result.to_yaml()


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
        probes_per_class=2,
    )
    with torch.no_grad():
        conf = lambda x: float(torch.softmax(trained_cnn(x), 1).max(1).values.mean() * 100)  # noqa: E731
        original_gap = conf(digits.x_train[:64]) - conf(digits.x_test)
    assert original_gap > 0.25  # the forget set is more confident than unseen data: a gap to close
    assert "conf. gap" in result.table() and result.settings()["target_forget_accuracy"] is None
    for trial in result.trials:
        assert trial.gap == pytest.approx(original_gap, abs=1e-3)
        assert not trial.met and trial.score == pytest.approx(trial.retain - (original_gap - 0.25), abs=1e-3)
    assert "brought the forget set's confidence down" in result.message
    assert "`max_epochs`" in result.message and "--max_epochs" in result.message


def test_every_setting_of_the_search_has_one_declaration():
    """The search's own settings are ``TuneSettings``; the trials' are ``JiTSettings`` and ``GuardSettings``. No
    function of the tuner restates a default of theirs, and ``tune_jit``'s keywords reach the declaration of their
    name."""
    declared = {*field_names(TuneSettings), *field_names(JiTSettings), *field_names(GuardSettings)}
    for function in (tune_jit, Judge.__init__, Criterion, split_tune_settings):
        restated = [
            name
            for name, parameter in inspect.signature(function).parameters.items()
            if name in declared and parameter.default not in (inspect.Parameter.empty, None)  # None: not given
        ]
        assert restated == [], (function, restated)
    tune, base, batch_format, guard = split_tune_settings(
        {"n_configs": 4, "seed": 7, "max_drop": 1.5, "probes_per_class": 3, "confidence_tolerance": 0.5}
    )
    assert (tune.n_configs, tune.seed, tune.confidence_tolerance) == (4, 7, 0.5)
    assert (base.seed, base.epochs, base.probes_per_class) == (7, TuneSettings().max_epochs, 3)
    assert guard.max_drop == 1.5 and guard.enabled and batch_format == batch_format.__class__()
    # the forgetting target: the run's class target unless given; a random task has none unless given
    assert base.target_forget_accuracy == CLASS_TARGET
    assert split_tune_settings({"task": "random"})[1].target_forget_accuracy is None
    assert split_tune_settings({"task": "random", "target_forget_accuracy": 7})[1].target_forget_accuracy == 7.0


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
        ({"search": "random"}, "search"),
        ({"logit_norm_penalty": -1.0}, "logit_norm_penalty"),
        ({"sigmaa": 0.1}, "sigmaa"),
        ({"guard": False}, "guard"),
        ({"monitor": torch.zeros(3)}, "monitor"),
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


# ----------------------------------------------------------------------------------------------------------------------
# Slow: acceptance, and the command line
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_settings_tuned_on_one_class_forget_another(trained_cnn, digits):
    """The issue's acceptance test: tune (zero-shot) on digit 1, then unlearn digit 0 with the chosen settings."""
    before = _state(trained_cnn)
    result = _tune(trained_cnn, _class_loader(digits, 1))
    for key, value in before.items():  # the model given to tune_jit is never changed
        assert torch.equal(trained_cnn.state_dict()[key], value)
    assert result.best.met and result.best.feasible and result.message is None
    assert result.settings()["logit_norm_penalty"] == JiTSettings(sigma=1.0, lr=1.0).logit_norm_penalty

    model = copy.deepcopy(trained_cnn)
    trainer = quiet_trainer(max_epochs=result.settings()["epochs"])
    trainer.fit(JiTUnlearning(model, **result.settings()), _class_loader(digits, 0))
    f_test = class_mask(digits.y_test, [0])
    assert accuracy(model, digits.x_test[f_test], digits.y_test[f_test]) <= 20.0
    assert accuracy(model, digits.x_test[~f_test], digits.y_test[~f_test]) >= 90.0


@pytest.mark.slow
def test_cli_tune_writes_settings_that_unlearn_accepts(_trained_state, digits, tmp_path, capsys):
    """``tune`` and its usage errors through the console script's ``main`` in this process (one thread, as a shell
    would run it), then ``unlearn`` with the tuned settings as ``python -m lightning_jit`` in a subprocess."""
    import lightning.pytorch as pl

    from lightning_jit.cli import main
    from lightning_jit.data import DigitsCNN  # the pre-0.2 path the config and the checkpoint name

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
        "tune",
        "--config",
        str(tmp_path / "cfg.yaml"),
        "--out",
        str(tmp_path / "tune"),
        "--n_configs",
        "8",
        "--max_epochs",
        "6",
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(tune) == 0, capsys.readouterr().err[-3000:]
        capsys.readouterr()
        tuned_text = (tmp_path / "tune" / "tuned.yaml").read_text()
        again = main(tune)
        again_err = capsys.readouterr().err
        bad = main([*tune, "--overwrite", "--n_configs", "0"])
        bad_err = capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)
    tuned = yaml.safe_load(tuned_text)["jit"]
    assert tuned["sigma"] != 9.0 and tuned["normalize_logits"] is True and tuned["target_forget_accuracy"] == 15.0
    assert (tmp_path / "tune" / "tune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(chosen)" in (tmp_path / "tune" / "trials.md").read_text()

    assert again == 2 and "--out" in again_err and "--overwrite" in again_err
    assert bad == 2 and "--n_configs" in bad_err
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
    done = subprocess.run([*unlearn, "--keep_unverified", "true"], capture_output=True, text=True, env=env, timeout=300)
    # The tuned settings reach the run; the run is verified on its own (a trial's success is no promise): exit 0 with
    # the checkpoint, or exit 3 with only the `*.unverified.ckpt`.
    verified = tmp_path / "unlearned.ckpt"
    written = verified if done.returncode == 0 else tmp_path / "unlearned.unverified.ckpt"
    assert done.returncode in (0, 3), done.stderr
    assert written.exists() and verified.exists() == (done.returncode == 0)
    used = torch.load(written, weights_only=True)["jit_hyper_parameters"]
    assert (used["sigma"], used["lr"]) == (tuned["sigma"], tuned["lr"])
    if done.returncode == 0:
        unlearned = DigitsCNN.load_from_checkpoint(verified, strict=True)
        f = class_mask(digits.y_test, [1])
        assert accuracy(unlearned, digits.x_test[f], digits.y_test[f]) <= 20.0
