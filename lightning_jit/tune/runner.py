"""Runs one trial of :func:`~lightning_jit.tune.tune_jit`: a :class:`~lightning_jit.lightning.module.JiTUnlearning`
on a working copy of the model, fitted by a quiet Trainer, then measured and judged by the
:class:`~lightning_jit.tune.judge.Judge`."""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_jit.core.batch import BatchFormat
from lightning_jit.core.errors import JiTDivergenceError
from lightning_jit.core.guard import GuardSettings
from lightning_jit.core.outcome import JiTOutcomeWarning
from lightning_jit.core.settings import JiTSettings
from lightning_jit.lightning.module import JiTUnlearning
from lightning_jit.lightning.trainer import quiet_trainer
from lightning_jit.tune.judge import Judge
from lightning_jit.tune.result import Trial

#: Seed offset between the runs of different trials (larger than any trial's epochs).
TRIAL_SEED_STRIDE = 1000
#: Seed offset between a finalist's repeat runs (larger than any trial's own seed offsets).
REPEAT_SEED_STRIDE = 7919


class JiTTrialRunner:
    """Runs trials with JiT on one working copy of ``original``, from the original weights or from where a trial's
    last run stopped (a :class:`~lightning_jit.tune.search.TrialRunner`).

    Every run is a ``JiTUnlearning(worker, settings, ...)`` with the collapse guard on and the forget-set stopping
    rule, fitted by :func:`~lightning_jit.lightning.trainer.quiet_trainer`. Its retain terms (logit-norm penalty,
    probe distillation) always hold the *original* model's outputs, also for runs that go on from a rung. The noise of
    a run is seeded from ``seed``, the trial and how far it already ran, so that the same call gives the same run.
    ``original`` itself is only read (its weights are copied, and it is the frozen reference of every run).

    Args:
        original: The model before unlearning (the search's own copy of the user's model).
        forget: The forget loader.
        base: The settings every run shares; each run replaces ``sigma``, ``lr``, ``n_perturbations`` (the
            trial's), ``epochs`` (the rung's) and ``seed``.
        batch_format: How batches are read.
        guard: The collapse guard's settings.
        monitor: Optional held-out loader for the guard (monitored mode).
        judge: Measures the model after each run; its ``criterion`` judges the trial.
        seed: The search's seed.
        trainer_kwargs: Extra ``pl.Trainer`` arguments (default accelerator ``"auto"``; ``max_epochs`` is set per
            run).
    """

    def __init__(
        self,
        original: nn.Module,
        forget: Iterable[Any],
        *,
        base: JiTSettings,
        batch_format: BatchFormat,
        guard: GuardSettings,
        monitor: Iterable[Any] | None,
        judge: Judge,
        seed: int,
        trainer_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.original, self.forget, self.base, self.batch_format = original, forget, base, batch_format
        self.guard, self.monitor, self.judge, self.seed = guard, monitor, judge, seed
        self.trainer_kwargs = dict(trainer_kwargs or {})
        self.worker = copy.deepcopy(original)
        self.initial = _cpu_state(original)
        self.states: dict[int, dict[str, Tensor]] = {}

    def advance(self, trial: Trial, epochs: int) -> None:
        """Run ``trial`` on to ``epochs`` epochs in all, from its own weights; measure and judge it."""
        self.worker.load_state_dict(self.states.get(trial.index, self.initial))
        self._run(trial, epochs, self.seed)
        self.states[trial.index] = _cpu_state(self.worker)

    def repeat(self, trial: Trial, epochs: int, repeat: int) -> Trial:
        """Run ``trial``'s settings again from the original weights with other noise; return the measured run."""
        rerun = Trial(index=trial.index, sigma=trial.sigma, lr=trial.lr, n_perturbations=trial.n_perturbations)
        self.worker.load_state_dict(self.initial)
        self._run(rerun, epochs, self.seed + REPEAT_SEED_STRIDE * (repeat + 1))
        return rerun

    def drop(self, trial: Trial) -> None:
        """Forget a pruned trial's weights."""
        self.states.pop(trial.index, None)

    def _run(self, trial: Trial, epochs: int, seed: int) -> None:
        """Run ``trial`` (whose weights the worker holds) up to ``epochs`` in all, then measure and judge it."""
        more = epochs - trial.epochs_run
        settings = self.base.replace(
            **trial.settings(),
            epochs=more,
            seed=seed + TRIAL_SEED_STRIDE * trial.index + trial.epochs_run,
            on_unverified="keep",  # a trial goes on from its rung's weights, and the judge measures what it reached
        )
        unlearner = JiTUnlearning(
            self.worker,
            settings,
            batch_format=self.batch_format,
            guard=self.guard,
            monitor=self.monitor,
            original=self.original,  # runs that go on from a rung still hold the original's outputs
        )
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + trial.index)
            trainer = quiet_trainer(**{"accelerator": "auto", **self.trainer_kwargs, "max_epochs": more})
            # The frozen reference must sit where the Trainer puts the worker.
            self.original.to(trainer.strategy.root_device)
            with warnings.catch_warnings():
                # A run that has not forgotten yet is what most trials are: the table says so, not a warning each.
                warnings.filterwarnings("ignore", category=JiTOutcomeWarning)
                try:
                    trainer.fit(unlearner, train_dataloaders=self.forget)
                    outcome = str(unlearner.outcome)
                    trial.epochs_run += trainer.current_epoch
                except JiTDivergenceError as err:  # a trial that diverges is a finding, recorded in the table
                    outcome = "diverged"
                    trial.error = str(err)
        trial.stopped_early = trial.stopped_early or unlearner.stopped_early
        trial.seconds += time.perf_counter() - start
        guard_events = len(unlearner.run.guard_events) if unlearner.run is not None else 0
        self.judge.criterion.record(trial, self.judge.measure(self.worker), outcome=outcome, guard_events=guard_events)


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
