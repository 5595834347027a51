"""The search of :func:`~lightning_jit.tune.tune_jit`: Sobol points, successive halving, confirmation and the choice.

* **Points** (:func:`sobol_trials`): a scrambled Sobol sequence over log(sigma) x log(lr) (x N when several values of
  ``n_perturbations`` are given), which covers the log-scaled square evenly from the first point.
* **Successive halving** over epochs (:func:`halving_schedule`): every trial runs a few epochs; the best
  ``1 / reduction_factor`` go on, from where their own run stopped, to ``reduction_factor`` times as many epochs, and so
  on up to ``max_epochs``. A trial whose stopping rule fired (or that diverged) is finished and keeps its result.
* **Confirmation**: a single noisy run can look good by luck, so the ``finalists`` best trials are run again
  ``repeats`` times from the original weights with other noise, and each is judged by its worst run.
* **The choice** (:func:`preference`): feasible trials that met the target first, by score; among those within
  ``tie_tolerance`` points of the best, the smallest learning rate (smaller steps stop closer to the target).
* **Budget**: when the time budget is spent the search ends with the best trial so far (at least one run always
  completes).

The search only decides *which* trial runs *how far*; running and measuring a trial is a :class:`TrialRunner`'s job
(:class:`~lightning_jit.tune.runner.JiTTrialRunner` runs JiT). :func:`run_search` takes any runner, so that the search
logic can be checked without running JiT. Why successive halving and no other search: ``docs/results/tune.md``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from lightning_jit.tune.result import Trial, rank_key, retain_name


class TrialRunner(Protocol):
    """What :func:`run_search` needs to run trials. A runner measures and judges every run it makes (with
    :meth:`lightning_jit.tune.judge.Criterion.record`), so that the trial's ``history`` grows by one entry per run."""

    def advance(self, trial: Trial, epochs: int) -> None:
        """Run ``trial`` on, from the weights its last run left (the original weights at first), until it has run
        ``epochs`` epochs in all or its stopping rule fires; then measure and judge it."""

    def repeat(self, trial: Trial, epochs: int, repeat: int) -> Trial:
        """Run ``trial``'s settings again for up to ``epochs`` epochs from the original weights, with noise of its
        own for each ``repeat`` (0, 1, ...); return that run as a new, measured and judged :class:`Trial`."""

    def drop(self, trial: Trial) -> None:
        """``trial`` will not run again: release what is kept to continue it."""


@dataclass
class SearchOutcome:
    """What :func:`run_search` returns: the trials (as given, now run), the chosen one, and how the search ended."""

    trials: list[Trial]
    best: Trial
    runs: int
    total_runs: int
    budget_message: str | None = None


class BudgetSpent(Exception):
    """The time budget ran out (internal to :func:`run_search`: the search ends with the best trial so far)."""


def sobol_trials(
    n: int,
    sigma_range: tuple[float, float],
    lr_range: tuple[float, float],
    n_perturbations: Sequence[int],
    seed: int,
) -> list[Trial]:
    """``n`` trials at the points of a scrambled Sobol sequence over log(sigma) x log(lr) (x N when
    ``n_perturbations`` has several values), rounded to 4 significant digits. A power of 2 keeps the sequence
    balanced.

    Example:
        >>> trials = sobol_trials(4, (0.02, 1.0), (3e-3, 0.3), [25], seed=0)
        >>> [t.index for t in trials], all(0.02 <= t.sigma <= 1.0 and 3e-3 <= t.lr <= 0.3 for t in trials)
        ([0, 1, 2, 3], True)
    """
    from scipy.stats import qmc

    dims = 2 + (len(n_perturbations) > 1)
    sampler = qmc.Sobol(d=dims, scramble=True, seed=seed)
    u = sampler.random(n) if n & (n - 1) else sampler.random_base2(int(math.log2(n)))
    trials = []
    for index, row in enumerate(u):
        sigma = _log_scale(row[0], sigma_range)
        lr = _log_scale(row[1], lr_range)
        choice = min(int(row[2] * len(n_perturbations)), len(n_perturbations) - 1) if dims == 3 else 0
        trials.append(
            Trial(index=index, sigma=_round(sigma), lr=_round(lr), n_perturbations=int(n_perturbations[choice]))
        )
    return trials


def halving_schedule(n: int, reduction_factor: int, max_epochs: int) -> list[tuple[int, int]]:
    """Successive halving: ``[(trials kept, epochs in all)]`` per rung, ending with ``max_epochs``.

    There are as many rungs as ``reduction_factor`` divides both ``n`` and ``max_epochs`` (plus one); each keeps
    ``1 / reduction_factor`` of the previous rung's trials (at least one) and gives them ``reduction_factor`` times
    the epochs.

    Example:
        >>> halving_schedule(16, 3, 30)
        [(16, 3), (5, 10), (1, 30)]
        >>> halving_schedule(4, 2, 8)
        [(4, 2), (2, 4), (1, 8)]
        >>> halving_schedule(16, 3, 2)  # too few epochs to divide: a single rung
        [(16, 2)]
    """
    rungs = max(1, int(math.floor(math.log(n, reduction_factor) + 1e-9)) + 1) if n > 1 else 1
    rungs = min(rungs, int(math.floor(math.log(max_epochs, reduction_factor) + 1e-9)) + 1)
    out = []
    for k in range(rungs):
        keep = max(1, n // reduction_factor**k)
        epochs = max(1, round(max_epochs / reduction_factor ** (rungs - 1 - k)))
        out.append((keep, epochs))
    return out


def preference(trials: Sequence[Trial], tie_tolerance: float) -> list[Trial]:
    """The trials that ran, most preferred first.

    By :func:`~lightning_jit.tune.result.rank_key` (feasible trials that met the target first, then by score),
    except that the feasible trials that met the target within ``tie_tolerance`` points of the best score count as
    tied, and among them the smallest learning rate comes first: smaller steps stop closer to the target.

    Example:
        >>> def ran(index, lr, score):
        ...     t = Trial(index=index, sigma=0.1, lr=lr, n_perturbations=25, met=True, feasible=True, score=score)
        ...     t.history.append({"score": score})
        ...     return t
        >>> [t.index for t in preference([ran(0, 0.1, 99.5), ran(1, 0.03, 98.9), ran(2, 0.01, 97.0)], 1.0)]
        [1, 0, 2]
    """
    ranked = sorted((t for t in trials if t.history), key=rank_key, reverse=True)
    if not ranked or not (ranked[0].met and ranked[0].feasible):
        return ranked
    top = ranked[0].score
    tied = [t for t in ranked if t.met and t.feasible and t.score >= top - tie_tolerance]
    tied_ids = {id(t) for t in tied}
    return sorted(tied, key=lambda t: (t.lr, -t.score, t.index)) + [t for t in ranked if id(t) not in tied_ids]


def run_search(
    runner: TrialRunner,
    trials: list[Trial],
    *,
    reduction_factor: int = 3,
    max_epochs: int = 30,
    finalists: int = 2,
    repeats: int = 1,
    tie_tolerance: float = 1.0,
    budget: float | None = None,
    started: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
    progress: bool = False,
    mode: str = "zero-shot",
) -> SearchOutcome:
    """Successive halving over ``trials``, then the confirmation of the finalists, then the choice.

    Args:
        runner: Runs, measures and judges the trials (:class:`TrialRunner`).
        trials: The trials to search (e.g. :func:`sobol_trials`), not run yet.
        reduction_factor: Keep the best ``1 / reduction_factor`` of the trials at each rung.
        max_epochs: Epochs of the last rung and of the confirmation runs.
        finalists: How many of the best trials are confirmed.
        repeats: Confirmation runs per finalist.
        tie_tolerance: See :func:`preference`.
        budget: Seconds from ``started``; when spent, no further run starts (at least one run always completes).
        started: When the budget started, on ``clock`` (default: now).
        clock: The clock the budget is measured on.
        progress: Show a progress bar over the runs.
        mode: ``"zero-shot"`` or ``"monitored"``, for the progress bar.

    Returns:
        A :class:`SearchOutcome`; ``budget_message`` says how far the search got when the budget ran out.
    """
    started = clock() if started is None else started
    schedule = halving_schedule(len(trials), reduction_factor, max_epochs)
    total = sum(keep for keep, _ in schedule) + min(finalists, len(trials)) * repeats
    tracker = _Tracker(clock, started, budget, total, progress, mode)
    try:
        alive = list(trials)
        for rung, (keep, epochs) in enumerate(schedule):
            if rung > 0:
                alive = sorted(alive, key=rank_key, reverse=True)[:keep]
                kept = {id(t) for t in alive}
                for trial in trials:
                    if id(trial) not in kept:
                        runner.drop(trial)
            for trial in alive:
                trial.rung = rung
                if not trial.finished and trial.epochs_run < epochs:
                    tracker.check_budget()
                    runner.advance(trial, epochs)
                tracker.done(trial, f"rung {rung}")
        for trial in preference(trials, tie_tolerance)[:finalists]:
            for repeat in range(repeats):
                tracker.check_budget()
                trial.add_repeat(runner.repeat(trial, max_epochs, repeat))
                tracker.done(trial, f"repeat {repeat + 1}")
    except BudgetSpent:
        pass
    finally:
        tracker.close()
    ran = [t for t in trials if t.history]
    if not ran:
        raise RuntimeError("No trial ran: the search needs at least one trial and the runner must measure each run.")
    return SearchOutcome(
        trials=trials,
        best=preference(ran, tie_tolerance)[0],
        runs=tracker.runs,
        total_runs=total,
        budget_message=tracker.message,
    )


class _Tracker:
    """The search's clock, budget and progress bar."""

    def __init__(
        self, clock: Callable[[], float], started: float, budget: float | None, total: int, progress: bool, mode: str
    ) -> None:
        from tqdm.auto import tqdm

        self.clock, self.started, self.budget, self.total, self.mode = clock, started, budget, total, mode
        self.runs = 0
        self.message: str | None = None
        self.bar: Any = tqdm(total=total, desc="lightning-jit tune", unit="run", disable=not progress, leave=True)

    def check_budget(self) -> None:
        """Raise :class:`BudgetSpent` once the budget is spent (never before the first run)."""
        elapsed = self.clock() - self.started
        if self.budget is not None and self.runs > 0 and elapsed > self.budget:
            self.message = (
                f"The time budget of {self.budget:g} s ran out after {self.runs} of {self.total} runs ({elapsed:.1f}"
                " s); the result is the best trial so far. For a complete search give a larger `budget` (CLI:"
                " --budget), fewer `n_configs` (CLI: --n_configs) or a smaller `max_epochs` (CLI: --max_epochs)."
            )
            raise BudgetSpent

    def done(self, trial: Trial, stage: str) -> None:
        self.runs += 1
        self.bar.update(1)
        summary = f"forget {trial.forget_acc:.0f}%, {retain_name(self.mode)} {trial.retain:.0f}%"
        self.bar.set_postfix_str(f"trial {trial.index} {stage}: {summary}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def _log_scale(u: float, bounds: tuple[float, float]) -> float:
    low, high = math.log(bounds[0]), math.log(bounds[1])
    return math.exp(low + u * (high - low))


def _round(value: float) -> float:
    return float(f"{value:.4g}")
