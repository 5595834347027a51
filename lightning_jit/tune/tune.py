"""``tune_jit``: find JiT's ``sigma`` and ``lr`` for a new model and forget set, by successive halving.

JiT's two hyperparameters must be found again for every model and data set: too small and nothing is forgotten, one
step too large and the model collapses. :func:`tune_jit` searches them (and optionally ``n_perturbations``) under a
time budget and returns a :class:`~lightning_jit.tune.result.TuneResult`: the chosen settings (keyword arguments, a
:class:`~lightning_jit.core.settings.JiTSettings`, or YAML the ``unlearn`` command accepts), a table of trials and a
plot. The search is :mod:`lightning_jit.tune.search`, a trial's run :mod:`lightning_jit.tune.runner`, and how a trial
is measured and judged :mod:`lightning_jit.tune.judge`. Measured results: ``docs/results/tune.md``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_jit.core.errors import JiTSettingError
from lightning_jit.core.guard import check_monitor
from lightning_jit.core.settings import JiTSettings, field_names, split_settings
from lightning_jit.tune.judge import Judge
from lightning_jit.tune.result import Task, Trial, TuneResult
from lightning_jit.tune.runner import JiTTrialRunner
from lightning_jit.tune.search import run_search, sobol_trials

#: Default search ranges (log scale), for inputs standardised to unit std.
DEFAULT_SIGMA_RANGE = (0.02, 1.0)
DEFAULT_LR_RANGE = (3e-3, 0.3)
#: Seed offset of the judge's probes, so that they are never the probes a run holds in place with probe distillation
#: (a run seeds its probes with its own seed: the search's seed plus the runner's trial and repeat offsets).
JUDGE_PROBE_SEED_OFFSET = 104_729
#: Settings ``tune_jit`` sets itself for each trial, and so refuses as keyword arguments.
_PER_TRIAL = ("sigma", "lr", "n_perturbations", "epochs", "seed")


def tune_jit(
    model: nn.Module,
    forget: Iterable[Any],
    *,
    task: Task = "class",
    monitor: Iterable[Any] | None = None,
    max_drop: float = 2.0,
    unseen: Iterable[Any] | None = None,
    confidence_tolerance: float = 2.0,
    sigma_range: tuple[float, float] = DEFAULT_SIGMA_RANGE,
    lr_range: tuple[float, float] = DEFAULT_LR_RANGE,
    n_perturbations: Sequence[int] = (25,),
    n_configs: int = 16,
    reduction_factor: int = 3,
    max_epochs: int = 30,
    target_forget_accuracy: float = 5.0,
    budget: float | None = None,
    finalists: int = 2,
    repeats: int = 1,
    tie_tolerance: float = 1.0,
    seed: int = 0,
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

    Every trial runs with :class:`~lightning_jit.core.settings.JiTSettings`' defaults, except the searched settings and
    whatever is given in ``settings``. Measured results (cost, transfer to other classes, the searches that were
    dropped): ``docs/results/tune.md``.

    Args:
        model: The trained classifier (a LightningModule or ``nn.Module``). Left unchanged.
        forget: A loader (or iterable) of labelled forget batches, ``(x, y, ...)`` or dicts.
        task: ``"class"``: the forget set is whole classes; ``"random"``: a random sample of the training data.
        monitor: Monitored mode: a held-out loader of labelled batches of data to keep (never used for gradients).
        max_drop: With ``monitor``: the largest allowed fall of its accuracy, in points (also the guard's).
        unseen: For ``task="random"``: labelled data the model never saw (e.g. a test split); the forget set's
            confidence should come down to the model's confidence on it.
        confidence_tolerance: For ``task="random"``: how close (points) the two confidences must get.
        sigma_range: ``(low, high)`` of ``sigma``, searched on a log scale (for inputs standardised to unit std).
        lr_range: ``(low, high)`` of ``lr``, searched on a log scale.
        n_perturbations: The values of ``N`` to search (one value: not searched).
        n_configs: Points drawn at the first rung (a power of 2 keeps the Sobol sequence balanced).
        reduction_factor: Keep the best ``1 / reduction_factor`` of the trials at each rung.
        max_epochs: Epochs of the last rung (the most any trial runs), and the ``epochs`` of the chosen settings.
        target_forget_accuracy: For ``task="class"``: the forgetting target (percent), which is also every run's
            stopping rule and the chosen settings' ``target_forget_accuracy``.
        budget: Wall-clock seconds. When they run out, the search ends with the best trial so far and says so in
            ``result.message`` (at least one run always completes).
        finalists: How many of the best trials are confirmed by repeat runs (0: none).
        repeats: Repeat runs per finalist, from the original weights with other noise; a finalist is judged by its
            worst run, so that a setting that looked good by luck is not chosen.
        tie_tolerance: Among the feasible trials that met the target, those within this many points of the best score
            count as tied, and the one with the smallest ``lr`` is chosen: smaller steps stop closer to the target.
        seed: Seed of the points, the probes and every run's noise: the same seed gives the same table.
        trainer_kwargs: Extra ``pl.Trainer`` arguments for the runs (e.g. ``accelerator``, ``precision``).
        progress: Show a progress bar over the runs.
        settings: Fields of :class:`~lightning_jit.core.settings.JiTSettings` (e.g. ``logit_norm_penalty``,
            ``probes_per_class``, which also sets the judge's probes), :class:`~lightning_jit.core.batch.BatchFormat`
            or :class:`~lightning_jit.core.guard.CollapseGuard` that every trial uses. ``sigma``, ``lr``,
            ``n_perturbations``, ``epochs`` and ``seed`` are set per trial.

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
    _check_arguments(
        task=task,
        monitor=monitor,
        max_drop=max_drop,
        unseen=unseen,
        confidence_tolerance=confidence_tolerance,
        sigma_range=sigma_range,
        lr_range=lr_range,
        n_perturbations=n_perturbations,
        n_configs=n_configs,
        reduction_factor=reduction_factor,
        max_epochs=max_epochs,
        target_forget_accuracy=target_forget_accuracy,
        budget=budget,
        finalists=finalists,
        repeats=repeats,
        tie_tolerance=tie_tolerance,
        seed=seed,
        settings=settings,
    )
    if not isinstance(model, nn.Module):
        raise JiTSettingError(
            "model", f"must be a trained torch.nn.Module or LightningModule, got {type(model).__name__}."
        )
    trials = sobol_trials(n_configs, sigma_range, lr_range, n_perturbations, seed)
    # The settings every trial shares, validated before any run (with the first trial's own searched settings).
    base, batch_format, guard = split_settings(
        None,
        None,
        True,
        {
            **settings,
            **trials[0].settings(),
            "epochs": max_epochs,
            "seed": seed,
            "target_forget_accuracy": float(target_forget_accuracy) if task == "class" else None,
            "max_drop": float(max_drop),
        },
    )
    original = copy.deepcopy(model)  # everything below reads or runs copies: the user's model is never touched
    judge = Judge(
        original,
        forget,
        task=task,
        monitor=monitor,
        unseen=unseen,
        batch_format=batch_format,
        probes_per_class=base.probes_per_class,
        seed=seed + JUDGE_PROBE_SEED_OFFSET,
        target_forget_accuracy=target_forget_accuracy,
        confidence_tolerance=confidence_tolerance,
        max_drop=max_drop,
        perturb_at=base.perturb_at,
    )
    runner = JiTTrialRunner(
        original,
        forget,
        base=base,
        batch_format=batch_format,
        guard=guard,
        monitor=monitor,
        judge=judge,
        seed=seed,
        trainer_kwargs=trainer_kwargs,
    )
    outcome = run_search(
        runner,
        trials,
        reduction_factor=reduction_factor,
        max_epochs=max_epochs,
        finalists=finalists,
        repeats=repeats,
        tie_tolerance=tie_tolerance,
        budget=budget,
        started=started,
        progress=progress,
        mode=judge.mode,
    )
    best = outcome.best
    notes = [outcome.budget_message] if outcome.budget_message else []
    if not (best.met and best.feasible):
        notes.append(
            _not_met_message(
                best,
                task=task,
                monitored=monitor is not None,
                max_drop=max_drop,
                n_configs=n_configs,
                max_epochs=max_epochs,
                lr_range=lr_range,
            )
        )
    message = " ".join(notes) or None
    if message:
        rank_zero_warn(message)
    jit_fields = field_names(JiTSettings)
    result = TuneResult(
        trials=outcome.trials,
        best=best,
        chosen=base.replace(**best.settings()),
        task=task,
        mode=judge.mode,
        seed=seed,
        max_epochs=max_epochs,
        seconds=time.perf_counter() - started,
        message=message,
        extra={k: v for k, v in settings.items() if k not in jit_fields},
    )
    rank_zero_info(
        f"tune_jit: chose trial {best.index} (sigma={best.sigma:.4g}, lr={best.lr:.4g}, N={best.n_perturbations})"
        f" of {sum(1 for t in outcome.trials if t.history)} evaluated in {result.seconds:.1f} s."
    )
    return result


def _not_met_message(
    best: Trial,
    *,
    task: Task,
    monitored: bool,
    max_drop: float,
    n_configs: int,
    max_epochs: int,
    lr_range: tuple[float, float],
) -> str:
    """Why no trial is good enough, and which argument (and CLI flag) to change."""
    goal = "reached the forgetting target" if task == "class" else "brought the forget set's confidence down"
    limit = f" or the monitor dropping more than {max_drop:g} points" if monitored else ""
    head = f"No trial {goal} without the guard intervening{limit}; trial {best.index} came closest."
    if not best.met:
        return (
            f"{head} Give the trials more epochs with `max_epochs` (now {max_epochs}; CLI: --max_epochs) or try more"
            f" settings with `n_configs` (now {n_configs}; CLI: --n_configs); from Python, `lr_range` (now"
            f" {tuple(lr_range)}) sets the step sizes searched."
        )
    allowed = f", or allow a larger fall with `max_drop` (now {max_drop:g}; CLI: --max_drop)" if monitored else ""
    return (
        f"{head} The trials that got there were stopped by the collapse guard{' or the monitor' if monitored else ''}:"
        f" try more settings with `n_configs` (now {n_configs}; CLI: --n_configs){allowed}; from Python, a lower"
        f" upper end of `lr_range` (now {tuple(lr_range)}) searches smaller steps."
    )


def _check_arguments(**args: Any) -> None:
    """Raise :class:`JiTSettingError` naming the first bad argument of :func:`tune_jit`."""
    task, settings = args["task"], args["settings"]
    if task not in ("class", "random"):
        raise JiTSettingError(
            "task", f"must be 'class' (forget whole classes) or 'random' (a sample of the training data), got {task!r}."
        )
    if "search" in settings:
        raise JiTSettingError(
            "search",
            "was removed: successive halving is the only search (random search and Optuna measured no gain,"
            " docs/results/tune.md). Remove the argument.",
        )
    for name in _PER_TRIAL:
        if name in settings:
            raise JiTSettingError(name, "is set by `tune_jit` itself for each trial; remove it from the arguments.")
    for name in ("guard", "enabled"):
        if name in settings:
            raise JiTSettingError(
                name, "cannot be set: the collapse guard is on in every trial (a trial it rescues is infeasible)."
            )
    if task == "random" and args["unseen"] is None:
        raise JiTSettingError(
            "unseen",
            "is required with `task='random'`: labelled data the model never saw (e.g. the test split), whose"
            " confidence the forget set's should come down to.",
        )
    check_monitor(args["monitor"])
    for name in ("sigma_range", "lr_range"):
        rng = args[name]
        ok = isinstance(rng, Sequence) and len(rng) == 2 and all(_is_number(v) for v in rng)
        if not ok or not 0 < rng[0] <= rng[1] or not math.isfinite(rng[1]):
            raise JiTSettingError(
                name, f"must be a (low, high) pair with 0 < low <= high, got {rng!r}; it is searched on a log scale."
            )
    ns = args["n_perturbations"]
    if not isinstance(ns, Sequence) or not ns or not all(_is_int(n) and n >= 1 for n in ns):
        raise JiTSettingError("n_perturbations", f"must be a list of integers >= 1, got {ns!r}.")
    for name, low in (("n_configs", 1), ("reduction_factor", 2), ("max_epochs", 1), ("finalists", 0), ("repeats", 0)):
        if not _is_int(args[name]) or args[name] < low:
            raise JiTSettingError(name, f"must be an integer >= {low}, got {args[name]!r}.")
    if not _is_int(args["seed"]):
        raise JiTSettingError("seed", f"must be an integer, got {args['seed']!r}.")
    target = args["target_forget_accuracy"]
    if not _is_number(target) or not 0 <= target <= 100:
        raise JiTSettingError("target_forget_accuracy", f"must be a percentage in [0, 100], got {target!r}.")
    budget = args["budget"]
    if budget is not None and (not _is_number(budget) or not budget > 0):
        raise JiTSettingError("budget", f"must be a number of seconds > 0 or None, got {budget!r}.")
    for name, unit in (("max_drop", "points"), ("confidence_tolerance", "points"), ("tie_tolerance", "points")):
        if not _is_number(args[name]) or not 0 <= args[name] < math.inf:
            raise JiTSettingError(name, f"must be a number of {unit} >= 0, got {args[name]!r}.")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


__all__ = ["DEFAULT_LR_RANGE", "DEFAULT_SIGMA_RANGE", "TuneResult", "tune_jit"]
