"""``tune_jit``: find JiT's ``sigma`` and ``lr`` for a new model and forget set, by successive halving.

JiT's two hyperparameters must be found again for every model and data set: too small and nothing is forgotten, one
step too large and the model collapses. :func:`tune_jit` searches them (and optionally ``n_perturbations``) under a
time budget and returns a :class:`~lightning_jit.tune.result.TuneResult`: the chosen settings (keyword arguments, a
:class:`~lightning_jit.core.settings.JiTSettings`, or YAML the ``unlearn`` command accepts), a table of trials and a
plot. The search's settings are :class:`~lightning_jit.tune.settings.TuneSettings`, the search
:mod:`lightning_jit.tune.search`, a trial's run :mod:`lightning_jit.tune.runner`, and how a trial is measured and
judged :mod:`lightning_jit.tune.judge`. Measured results: ``docs/results/tune.md``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_jit.core.errors import JiTSettingError
from lightning_jit.core.guard import check_monitor
from lightning_jit.core.settings import JiTSettings, field_names
from lightning_jit.tune.judge import Judge
from lightning_jit.tune.result import Trial, TuneResult
from lightning_jit.tune.runner import JiTTrialRunner
from lightning_jit.tune.search import run_search, sobol_trials
from lightning_jit.tune.settings import TuneSettings, split_tune_settings


def tune_jit(
    model: nn.Module,
    forget: Iterable[Any],
    *,
    monitor: Iterable[Any] | None = None,
    unseen: Iterable[Any] | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    **settings: Any,
) -> TuneResult:
    """Search JiT's ``sigma`` and ``lr`` (and optionally ``n_perturbations``) for ``model`` and a forget set.

    ``n_configs`` points are drawn from a scrambled Sobol sequence over log-scaled ranges. They all run a few epochs;
    the best ``1 / reduction_factor`` go on to ``reduction_factor`` times as many epochs, and so on up to
    ``max_epochs`` (successive halving), so that most of the time goes to the promising settings. The ``finalists``
    best are then run again from the original weights with other noise and judged by their worst run
    (:mod:`lightning_jit.tune.search`). Each run is a :class:`~lightning_jit.lightning.module.JiTUnlearning` with its
    collapse guard and the forget-set stopping rule, on a copy of ``model``; every trial starts from the original
    weights, and ``model`` itself is left bit for bit as it was.

    How a trial is judged (:mod:`lightning_jit.tune.judge`): zero-shot by default (the forget set's accuracy must
    reach ``target_forget_accuracy`` while class probes synthesised from the model measure what is kept), or on a
    held-out ``monitor`` loader, whose accuracy may fall at most ``max_drop`` points. A trial the guard had to rescue,
    or that diverged, is infeasible.

    The search's own settings are the fields of :class:`~lightning_jit.tune.settings.TuneSettings` (``task``,
    ``sigma_range``, ``lr_range``, ``n_perturbations``, ``n_configs``, ``reduction_factor``, ``max_epochs``,
    ``budget``, ``finalists``, ``repeats``, ``tie_tolerance``, ``confidence_tolerance``, ``seed``), declared and
    documented there once. Every trial runs with :class:`~lightning_jit.core.settings.JiTSettings`' defaults, except
    the searched settings and the fields of ``JiTSettings``, ``BatchFormat`` or ``GuardSettings`` given here.
    Measured results (cost, transfer to other classes, the searches that were dropped): ``docs/results/tune.md``.

    Args:
        model: The trained classifier (a LightningModule or ``nn.Module``). Left unchanged.
        forget: A loader (or iterable) of labelled forget batches, ``(x, y, ...)`` or dicts.
        monitor: Monitored mode: a held-out loader of labelled batches of data to keep (never used for gradients);
            its accuracy may fall at most ``max_drop`` points (the collapse guard's setting).
        unseen: For ``task="random"``: labelled data the model never saw (e.g. a test split); the forget set's
            confidence should come down to the model's confidence on it.
        trainer_kwargs: Extra ``pl.Trainer`` arguments for the runs (e.g. ``accelerator``, ``precision``).
        progress: Show a progress bar over the runs.
        settings: Fields of :class:`~lightning_jit.tune.settings.TuneSettings` (the search), and fields of
            :class:`~lightning_jit.core.settings.JiTSettings` (e.g. ``target_forget_accuracy``, the forgetting target
            and every run's stopping rule, by default a class task's calibrated target; ``logit_norm_penalty``;
            ``probes_per_class``, which also sets the judge's probes), :class:`~lightning_jit.core.batch.BatchFormat`
            or :class:`~lightning_jit.core.guard.GuardSettings` (e.g. ``max_drop``) that every trial uses.
            ``sigma``, ``lr`` and ``epochs`` are set per trial.

    Returns:
        A :class:`~lightning_jit.tune.result.TuneResult`: ``result.settings()`` (keyword arguments) or
        ``result.jit_settings()`` for ``JiTUnlearning``, ``result.to_yaml()`` for the CLI, ``result.table()``,
        ``result.plot(path)`` and ``result.save(directory)``.

    Raises:
        JiTSettingError: (a ``MisconfigurationException``) naming the argument or setting, for bad ranges, counts,
            tasks or settings.
        MisconfigurationException: for data the search cannot use (e.g. a class forget set holding every class).

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        >>> x, y = torch.randn(32, 1, 4, 4), torch.zeros(32, dtype=torch.long)
        >>> forget = DataLoader(TensorDataset(x, y), batch_size=16)
        >>> result = tune_jit(net, forget, n_configs=2, max_epochs=2, finalists=1, progress=False,
        ...                   trainer_kwargs={"accelerator": "cpu"})
        >>> len(result.trials), result.jit_settings().epochs, result.settings()["sigma"] == result.best.sigma
        (2, 2, True)
    """
    started = time.perf_counter()
    tune, base, batch_format, guard = split_tune_settings(settings)
    if tune.task == "random" and unseen is None:
        raise JiTSettingError(
            "unseen",
            "is required with `task='random'`: labelled data the model never saw (e.g. the test split), whose"
            " confidence the forget set's should come down to.",
        )
    check_monitor(monitor)
    if not isinstance(model, nn.Module):
        raise JiTSettingError(
            "model", f"must be a trained torch.nn.Module or LightningModule, got {type(model).__name__}."
        )
    trials = sobol_trials(tune.n_configs, tune.sigma_range, tune.lr_range, tune.n_perturbations, tune.seed)
    original = copy.deepcopy(model)  # everything below reads or runs copies: the user's model is never touched
    judge = Judge(original, forget, tune, base, guard, batch_format=batch_format, monitor=monitor, unseen=unseen)
    runner = JiTTrialRunner(
        original,
        forget,
        base=base,
        batch_format=batch_format,
        guard=guard,
        monitor=monitor,
        judge=judge,
        seed=tune.seed,
        trainer_kwargs=trainer_kwargs,
    )
    outcome = run_search(
        runner,
        trials,
        reduction_factor=tune.reduction_factor,
        max_epochs=tune.max_epochs,
        finalists=tune.finalists,
        repeats=tune.repeats,
        tie_tolerance=tune.tie_tolerance,
        budget=tune.budget,
        started=started,
        progress=progress,
        mode=judge.mode,
    )
    best = outcome.best
    notes = [outcome.budget_message] if outcome.budget_message else []
    if not (best.met and best.feasible):
        notes.append(_not_met_message(best, tune, monitored=monitor is not None, max_drop=guard.max_drop))
    message = " ".join(notes) or None
    if message:
        rank_zero_warn(message)
    jit_fields = field_names(JiTSettings)
    own = field_names(TuneSettings)
    result = TuneResult(
        trials=outcome.trials,
        best=best,
        chosen=base.replace(**best.settings()),
        task=tune.task,
        mode=judge.mode,
        seed=tune.seed,
        max_epochs=tune.max_epochs,
        seconds=time.perf_counter() - started,
        message=message,
        extra={k: v for k, v in settings.items() if k not in jit_fields and k not in own},
    )
    rank_zero_info(
        f"tune_jit: chose trial {best.index} (sigma={best.sigma:.4g}, lr={best.lr:.4g}, N={best.n_perturbations})"
        f" of {sum(1 for t in outcome.trials if t.history)} evaluated in {result.seconds:.1f} s."
    )
    return result


def _not_met_message(best: Trial, tune: TuneSettings, *, monitored: bool, max_drop: float) -> str:
    """Why no trial is good enough, and which argument (and CLI flag) to change."""
    goal = "reached the forgetting target" if tune.task == "class" else "brought the forget set's confidence down"
    limit = f" or the monitor dropping more than {max_drop:g} points" if monitored else ""
    head = f"No trial {goal} without the guard intervening{limit}; trial {best.index} came closest."
    n_configs = f"`n_configs` (now {tune.n_configs}; CLI: --n_configs)"
    lr_range = f"`lr_range` (now {tune.lr_range}; CLI: --lr_range)"
    if not best.met:
        return (
            f"{head} Give the trials more epochs with `max_epochs` (now {tune.max_epochs}; CLI: --max_epochs) or try"
            f" more settings with {n_configs}; {lr_range} sets the step sizes searched."
        )
    allowed = f", or allow a larger fall with `max_drop` (now {max_drop:g}; CLI: --max_drop)" if monitored else ""
    return (
        f"{head} The trials that got there were stopped by the collapse guard{' or the monitor' if monitored else ''}:"
        f" try more settings with {n_configs}{allowed}; a lower upper end of {lr_range} searches smaller steps."
    )


__all__ = ["TuneResult", "TuneSettings", "tune_jit"]
