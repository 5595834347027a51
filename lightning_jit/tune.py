"""``tune_jit``: find JiT's ``sigma`` and ``lr`` for a new model and forget set, by successive halving.

JiT's two hyperparameters must be retuned for every model and data set: too small and nothing is forgotten, one step
too large and the model collapses. :func:`tune_jit` searches them (and optionally ``n_perturbations``) under a time
budget, and returns the chosen settings as a YAML snippet the ``unlearn`` command accepts, a table of trials and a
plot.

How a trial is judged:

* **zero-shot** (the default; the model and the forget set alone):

  - ``task="class"`` (the forget set is whole classes): the forget set's accuracy must fall to
    ``target_forget_accuracy``; what is kept is measured on *class probes* synthesised from the original model
    (:mod:`lightning_jit.probes`), never on retained data;
  - ``task="random"`` (a random sample of the training set): the forget set's mean confidence must come down to the
    model's confidence on data it has never seen (``unseen``, which the user gives), within ``confidence_tolerance``
    points;

* **monitored**: with ``monitor`` (a held-out loader the user owns, e.g. retained-class validation data), its
  accuracy replaces the probes, and a trial whose accuracy falls more than ``max_drop`` points is infeasible.

In both modes a trial in which the collapse guard had to intervene (or that diverged) is infeasible. Every trial starts
from the original weights; survivors of a rung go on from where their own run stopped.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_jit.config import JiTConfig
from lightning_jit.data import quiet_trainer
from lightning_jit.evaluate import predict_split
from lightning_jit.guard import JiTDivergenceError
from lightning_jit.io import atomic_write, json_safe, save_png
from lightning_jit.metrics import prediction_entropy
from lightning_jit.module import JiTUnlearning
from lightning_jit.probes import probe_confidence, synthesize_class_probes
from lightning_jit.step import batch_to_input

Task = Literal["class", "random"]
Search = Literal["halving", "random", "optuna"]

#: Settings every trial uses unless ``tune_jit`` is given others: the demo's scale-free objective and logit-norm
#: penalty (the stopping rule's target is ``tune_jit``'s ``target_forget_accuracy``).
TUNE_BASE_SETTINGS: dict[str, Any] = {"normalize_logits": True, "logit_norm_penalty": 10.0, "logit_norm_sigma": 1.0}
#: Default search ranges (log scale), for inputs standardised to unit std.
DEFAULT_SIGMA_RANGE = (0.02, 1.0)
DEFAULT_LR_RANGE = (3e-3, 0.3)


@dataclass
class Trial:
    """One point of the search and what it measured after its last rung.

    ``retain`` is the probe confidence (zero-shot; :func:`~lightning_jit.probes.probe_confidence`) or the monitor's
    accuracy (monitored), in percent; ``gap`` is, for ``task="random"``, the forget set's mean confidence minus the
    unseen data's, in points. ``repeats`` are the confirmation runs of a finalist; ``met``, ``feasible`` and ``score``
    then hold for the worst of its runs.
    """

    index: int
    sigma: float
    lr: float
    n_perturbations: int
    epochs_run: int = 0
    rung: int = 0
    stopped_early: bool = False
    outcome: str = "pending"
    forget_acc: float = math.nan
    forget_entropy: float = math.nan
    retain: float = math.nan
    gap: float = math.nan
    met: bool = False
    feasible: bool = False
    score: float = -math.inf
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    repeats: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def settings(self) -> dict[str, Any]:
        return {"sigma": self.sigma, "lr": self.lr, "n_perturbations": self.n_perturbations}

    def add_repeat(self, rerun: Trial) -> None:
        """Record a confirmation run of the same settings; the trial is then judged by its worst run."""
        self.repeats.append(
            {
                "forget_acc": rerun.forget_acc,
                "retain": rerun.retain,
                "gap": rerun.gap,
                "epochs_run": rerun.epochs_run,
                "outcome": rerun.outcome,
                "score": rerun.score,
            }
        )
        self.met = self.met and rerun.met
        self.feasible = self.feasible and rerun.feasible
        self.score = min(self.score, rerun.score)
        self.seconds += rerun.seconds


@dataclass
class TuneResult:
    """The outcome of :func:`tune_jit`: every trial, the chosen one and the settings to pass on."""

    trials: list[Trial]
    best: Trial
    base: dict[str, Any]
    task: Task
    mode: Literal["zero-shot", "monitored"]
    search: Search
    seed: int
    max_epochs: int
    seconds: float
    message: str | None = None

    def settings(self) -> dict[str, Any]:
        """Keyword arguments for :class:`~lightning_jit.module.JiTUnlearning` with the chosen trial's settings."""
        return {**self.base, **self.best.settings(), "epochs": self.max_epochs, "seed": self.seed}

    def to_yaml(self) -> str:
        """The chosen settings as the ``jit:`` group of an ``unlearn`` config (``--config tuned.yaml``)."""
        lines = [
            f"# lightning-jit tune: trial {self.best.index} of {len(self.trials)} ({self.search} search, {self.mode},"
            f" task={self.task});",
            f"# forget accuracy {self.best.forget_acc:.1f}%, {_retain_name(self.mode)} {self.best.retain:.1f}%"
            f" after {self.best.epochs_run} epoch(s).",
            "jit:",
        ]
        for key, value in self.settings().items():
            lines.append(f"  {key}: {_yaml_value(value)}")
        return "\n".join(lines) + "\n"

    def table(self, include_time: bool = True) -> str:
        """A Markdown table of all trials, best first; ``include_time=False`` leaves out the only non-reproducible
        column (seconds)."""
        gap = self.task == "random"
        head = ["trial", "sigma", "lr", "N", "epochs", "rung", "runs", "outcome", "forget acc %", "forget entropy"]
        head += ["conf. gap"] if gap else []
        head += [_retain_name(self.mode) + " %", "met", "feasible", "score"]
        head += ["seconds"] if include_time else []
        lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
        for t in sorted(self.trials, key=_rank_key, reverse=True):
            cells = [
                f"{t.index}{' (chosen)' if t is self.best else ''}",
                f"{t.sigma:.4g}",
                f"{t.lr:.4g}",
                str(t.n_perturbations),
                str(t.epochs_run),
                str(t.rung),
                str(1 + len(t.repeats)),
                t.outcome,
                f"{t.forget_acc:.1f}",
                f"{t.forget_entropy:.3f}",
            ]
            cells += [f"{t.gap:+.1f}"] if gap else []
            cells += [f"{t.retain:.1f}", "yes" if t.met else "no", "yes" if t.feasible else "no", f"{t.score:.2f}"]
            cells += [f"{t.seconds:.2f}"] if include_time else []
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "mode": self.mode,
            "search": self.search,
            "seed": self.seed,
            "seconds": self.seconds,
            "message": self.message,
            "best": self.best.index,
            "settings": self.settings(),
            "trials": [asdict(t) for t in self.trials],
        }

    def plot(self, path: str | os.PathLike) -> Path:
        """Forgetting against what is kept, for every trial and rung; the chosen trial is starred."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 5))
        ax = fig.subplots()
        for t in self.trials:
            xs = [h["forget_acc"] for h in t.history]
            ys = [h["retain"] for h in t.history]
            ax.plot(xs, ys, "-", color="0.8", lw=0.8, zorder=1)
            ax.scatter(xs[-1:], ys[-1:], c=[t.rung], cmap="viridis", vmin=0, vmax=max(1, self._rungs() - 1), s=30)
            for r in t.repeats:
                ax.scatter([r["forget_acc"]], [r["retain"]], facecolors="none", edgecolors="0.3", s=40)
        b = self.best
        ax.scatter([b.forget_acc], [b.retain], marker="*", s=250, c="red", label=f"chosen: trial {b.index}", zorder=3)
        if self.task == "class" and "target_forget_accuracy" in self.base:
            ax.axvline(self.base["target_forget_accuracy"], ls="--", color="0.5", lw=0.8, label="forgetting target")
        ax.set_xlabel("forget-set accuracy % (lower forgets more)")
        ax.set_ylabel(f"{_retain_name(self.mode)} % (higher keeps more)")
        ax.set_title(
            f"lightning-jit tune: {len(self.trials)} trials ({self.search}); colour = last rung, rings = repeats",
            fontsize=10,
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return save_png(fig, path)

    def save(self, directory: str | os.PathLike) -> dict[str, Path]:
        """Write ``tuned.yaml``, ``trials.md``, ``trials.json`` and ``tune.png`` to ``directory``."""
        out = Path(directory)
        paths = {
            "yaml": out / "tuned.yaml",
            "markdown": out / "trials.md",
            "json": out / "trials.json",
            "png": out / "tune.png",
        }
        with atomic_write(paths["yaml"]) as fh:
            fh.write(self.to_yaml())
        with atomic_write(paths["markdown"]) as fh:
            fh.write(self.table() + "\n" + (f"\n{self.message}\n" if self.message else ""))
        with atomic_write(paths["json"]) as fh:
            json.dump(json_safe(self.to_dict()), fh, indent=2)
        self.plot(paths["png"])
        return paths

    def _rungs(self) -> int:
        return max(t.rung for t in self.trials) + 1


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
    search: Search = "halving",
    finalists: int = 2,
    repeats: int = 1,
    tie_tolerance: float = 1.0,
    seed: int = 0,
    probes_per_class: int = 16,
    trainer_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    **jit_kwargs: Any,
) -> TuneResult:
    """Search JiT's ``sigma`` and ``lr`` (and optionally ``n_perturbations``) for ``model`` and a forget set.

    ``n_configs`` points are drawn from a scrambled Sobol sequence over log-scaled ranges. With
    ``search="halving"`` (the default) they all run a few epochs; the best third (``1 / reduction_factor``) goes on to
    three times as many epochs, and so on up to ``max_epochs``, so most of the budget goes to the promising settings.
    ``search="random"`` runs every point for ``max_epochs`` (the baseline it is measured against in
    ``docs/tune.md``). Each run uses :class:`~lightning_jit.module.JiTUnlearning` with its collapse guard and the
    forget-set stopping rule, on a copy of ``model``: ``model`` itself is never changed.

    Args:
        model: The trained classifier (a LightningModule or ``nn.Module``). Left unchanged.
        forget: A loader (or iterable) of labelled forget batches, ``(x, y, ...)`` or dicts.
        task: ``"class"``: the forget set is whole classes; ``"random"``: a random sample of the training data.
        monitor: Monitored mode: a held-out loader of labelled batches of data to keep (never used for gradients).
        max_drop: With ``monitor``: the largest allowed fall of its accuracy, in points.
        unseen: For ``task="random"``: labelled data the model never saw (e.g. a test split); the forget set's
            confidence should come down to the model's confidence on it.
        confidence_tolerance: For ``task="random"``: how close (points) the two confidences must get.
        sigma_range: ``(low, high)`` of ``sigma``, searched on a log scale.
        lr_range: ``(low, high)`` of ``lr``, searched on a log scale.
        n_perturbations: The values of ``N`` to search (one value: not searched).
        n_configs: Points drawn at the first rung (a power of 2 keeps the Sobol sequence balanced).
        reduction_factor: Keep the best ``1 / reduction_factor`` of the trials at each rung.
        max_epochs: Epochs of the last rung (the most any trial runs).
        target_forget_accuracy: For ``task="class"``: the forgetting target (percent) and the stopping rule of every
            run.
        budget: Wall-clock seconds. When they run out, the search ends with the best trial so far and says so in
            ``result.message`` (at least one trial always runs).
        search: ``"halving"``, ``"random"`` or ``"optuna"`` (Optuna's TPE sampler with its
            ``SuccessiveHalvingPruner`` on the same rungs; needs ``pip install "lightning-jit[optuna]"``).
        finalists: How many of the best trials are confirmed by repeat runs.
        repeats: Repeat runs per finalist, from the original weights with other noise; a finalist is judged by its
            worst run, so that a setting that looked good by luck is not chosen.
        tie_tolerance: Among the feasible trials that met the target, those within this many points of the best score
            count as tied, and the one with the smallest ``lr`` is chosen: smaller steps stop closer to the target.
        seed: Seed of the Sobol points, the probes and every run's noise: the same seed gives the same table.
        probes_per_class: Zero-shot ``task="class"``: synthesised probes per kept class.
        trainer_kwargs: Extra ``pl.Trainer`` arguments for the runs (e.g. ``accelerator``, ``precision``).
        progress: Show a progress bar over the runs.
        jit_kwargs: Other :class:`~lightning_jit.module.JiTUnlearning` arguments shared by every trial (default
            :data:`TUNE_BASE_SETTINGS`: ``normalize_logits=True, logit_norm_penalty=10.0, logit_norm_sigma=1.0``).

    Returns:
        A :class:`TuneResult`: ``result.settings()`` for ``JiTUnlearning``, ``result.to_yaml()`` for the CLI,
        ``result.table()``, ``result.plot(path)`` and ``result.save(directory)``.

    Raises:
        MisconfigurationException: naming the argument, for bad ranges, counts, tasks or data.

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        >>> x, y = torch.randn(32, 1, 4, 4), torch.zeros(32, dtype=torch.long)
        >>> forget = DataLoader(TensorDataset(x, y), batch_size=16)
        >>> result = tune_jit(net, forget, n_configs=4, max_epochs=3, progress=False)
        >>> sorted(result.settings())[:3], len(result.trials)
        (['epochs', 'logit_norm_penalty', 'logit_norm_sigma'], 4)
    """
    started = time.perf_counter()
    _check_arguments(
        task,
        monitor,
        unseen,
        sigma_range,
        lr_range,
        n_perturbations,
        n_configs,
        reduction_factor,
        max_epochs,
        target_forget_accuracy,
        budget,
        search,
        max_drop,
        confidence_tolerance,
        finalists,
        repeats,
        tie_tolerance,
    )
    base = {**TUNE_BASE_SETTINGS, **jit_kwargs}
    for reserved in ("sigma", "lr", "n_perturbations", "epochs", "seed", "guard", "logit_norm_reference"):
        if reserved in base:
            raise MisconfigurationException(
                f"`{reserved}` is set by `tune_jit` itself for each trial; remove it from the keyword arguments."
            )
    if task == "class":
        base["target_forget_accuracy"] = float(target_forget_accuracy)
    JiTConfig(sigma=1.0, lr=1.0, **{k: v for k, v in base.items() if k in JiTConfig.__dataclass_fields__})

    judge = _Judge(model, forget, task, monitor, max_drop, unseen, confidence_tolerance, base, seed, probes_per_class)
    schedule = _schedule(n_configs, reduction_factor, max_epochs) if search != "random" else [(n_configs, max_epochs)]
    total_runs = (n_configs * len(schedule) if search == "optuna" else sum(keep for keep, _ in schedule)) + min(
        finalists, n_configs
    ) * repeats
    search_state = _Search(started, budget, total_runs, _progress_bar(total_runs, progress), judge.mode)
    runner = _Runner(model, forget, base, seed, trainer_kwargs, judge, search_state)
    trials: list[Trial] = []
    try:
        if search == "optuna":
            _optuna_search(
                runner, trials, n_configs, sigma_range, lr_range, n_perturbations, schedule, reduction_factor
            )
        else:
            points = _draw(n_configs, sigma_range, lr_range, n_perturbations, seed)
            trials.extend(Trial(index=i, sigma=s, lr=lr, n_perturbations=n) for i, (s, lr, n) in enumerate(points))
            _successive_halving(runner, trials, schedule)
        _confirm(runner, _preference(trials, tie_tolerance)[:finalists], repeats, max_epochs)
    except _BudgetSpent:
        pass
    finally:
        search_state.bar.close()
    message = search_state.message
    evaluated = [t for t in trials if t.history]
    best = _preference(evaluated, tie_tolerance)[0]
    if not (best.met and best.feasible):
        why = "reached the forgetting target" if task == "class" else "brought the forget set's confidence down"
        note = (
            f"No trial {why} without the guard intervening"
            + (f" or the monitor dropping more than {max_drop:g} points" if monitor is not None else "")
            + f"; trial {best.index} came closest. Widen `lr_range` (now {lr_range}) or raise `max_epochs`"
            f" (now {max_epochs})."
        )
        message = f"{message} {note}" if message else note
    if message:
        rank_zero_warn(message)
    result = TuneResult(
        trials=trials,
        best=best,
        base=base,
        task=task,
        mode=judge.mode,
        search=search,
        seed=seed,
        max_epochs=max_epochs,
        seconds=time.perf_counter() - started,
        message=message,
    )
    rank_zero_info(
        f"tune_jit: chose trial {best.index} (sigma={best.sigma:.4g}, lr={best.lr:.4g}, N={best.n_perturbations})"
        f" of {len(evaluated)} evaluated in {result.seconds:.1f} s."
    )
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Judging a trial
# ----------------------------------------------------------------------------------------------------------------------
_FAILED = ("diverged",)


class _BudgetSpent(Exception):
    """Internal: the time budget ran out (the search ends with the best trial so far)."""


#: Seed offset between a finalist's repeat runs (larger than any trial's own seed offsets).
_REPEAT_SEED_STRIDE = 7919
#: Seed offset of the judge's probes, so that they are never the probes a run holds in place with probe distillation
#: (a run seeds its probes with its own seed: the tune seed plus the trial and repeat offsets above).
_JUDGE_PROBE_SEED_OFFSET = 104_729


class _Search:
    """The search's clock, budget and progress bar."""

    def __init__(self, started: float, budget: float | None, total: int, bar: Any, mode: str) -> None:
        self.started, self.budget, self.total, self.bar, self.mode = started, budget, total, bar, mode
        self.runs = 0
        self.message: str | None = None

    def check_budget(self) -> None:
        """Raise :class:`_BudgetSpent` once the budget is spent (never before the first run)."""
        elapsed = time.perf_counter() - self.started
        if self.budget is not None and self.runs > 0 and elapsed > self.budget:
            self.message = (
                f"The time budget of {self.budget:g} s ran out after {self.runs} of {self.total} runs ({elapsed:.1f}"
                " s); the result is the best trial so far. Give a larger `budget` (CLI: --budget), fewer `n_configs`"
                " or a smaller `max_epochs` for a complete search."
            )
            raise _BudgetSpent

    def done(self, trial: Trial, stage: str) -> None:
        self.runs += 1
        self.bar.update(1)
        self.bar.set_postfix_str(f"trial {trial.index} {stage}: {_summary(trial, self.mode)}", refresh=False)


class _Judge:
    """Measures a model against the criterion of the task and mode; holds what is fixed before the first trial."""

    def __init__(
        self,
        model: nn.Module,
        forget: Iterable[Any],
        task: Task,
        monitor: Iterable[Any] | None,
        max_drop: float,
        unseen: Iterable[Any] | None,
        tolerance: float,
        base: dict[str, Any],
        seed: int,
        probes_per_class: int,
    ) -> None:
        self.task, self.monitor, self.unseen, self.max_drop, self.tolerance = task, monitor, unseen, max_drop, tolerance
        self.original = model
        self.target = base.get("target_forget_accuracy")
        self.mode: Literal["zero-shot", "monitored"] = "monitored" if monitor is not None else "zero-shot"
        self.selector = base.get("output_selector")
        logits, labels = predict_split(model, forget, "forget")
        forget_classes = sorted(set(labels.tolist()))
        num_classes = logits.shape[1]
        if monitor is not None:
            self.reference = _accuracy(*predict_split(model, monitor, "monitor"))
            self.probes = None
        else:
            kept = (
                [c for c in range(num_classes) if c not in forget_classes]
                if task == "class"
                else list(range(num_classes))
            )
            if not kept:
                raise MisconfigurationException(
                    f"The forget set holds every class ({num_classes}); `task='class'` needs classes to keep."
                    " Use task='random' for a sample of the training data."
                )
            like = batch_to_input(next(iter(forget)), JiTConfig(sigma=1.0, lr=1.0, **_config_keys(base)))
            self.probes = synthesize_class_probes(
                model,
                kept,
                like,
                per_class=probes_per_class,
                seed=seed + _JUDGE_PROBE_SEED_OFFSET,
                output_selector=self.selector,
            )
            self.reference = probe_confidence(model, self.probes, self.selector)

    def measure(self, model: nn.Module, forget: Iterable[Any]) -> dict[str, float]:
        logits, labels = predict_split(model, forget, "forget")
        out = {
            "forget_acc": _accuracy(logits, labels),
            "forget_entropy": float(prediction_entropy(logits).mean()) / math.log(logits.shape[1]),
        }
        if self.monitor is not None:
            out["retain"] = _accuracy(*predict_split(model, self.monitor, "monitor"))
        else:
            assert self.probes is not None
            out["retain"] = probe_confidence(model, self.probes, self.selector)
        if self.task == "random":
            unseen_logits, _ = predict_split(model, self.unseen, "unseen")
            out["gap"] = _confidence(logits) - _confidence(unseen_logits)
        return out

    def verdict(self, trial: Trial) -> None:
        """Set ``met``, ``feasible`` and ``score`` (higher is better; both in percentage points)."""
        if self.task == "class":
            shortfall = max(0.0, trial.forget_acc - float(self.target))
        else:
            shortfall = max(0.0, abs(trial.gap) - self.tolerance)
        trial.met = shortfall == 0.0
        guard_ok = trial.outcome in ("completed", "stopped_early")
        monitor_ok = self.monitor is None or self.reference - trial.retain <= self.max_drop
        trial.feasible = guard_ok and monitor_ok
        trial.score = trial.retain - shortfall - (0.0 if guard_ok else 100.0)


class _Runner:
    """Runs trials from the original weights (or from where a trial stopped) on one working copy of the model."""

    def __init__(
        self,
        model: nn.Module,
        forget: Iterable[Any],
        base: dict[str, Any],
        seed: int,
        trainer_kwargs: dict[str, Any] | None,
        judge: _Judge,
        search: _Search,
    ) -> None:
        self.forget, self.base, self.seed, self.trainer_kwargs, self.judge, self.search = (
            forget,
            base,
            seed,
            trainer_kwargs,
            judge,
            search,
        )
        self.worker = copy.deepcopy(model)
        self.original = _cpu_state(model)
        self.states: dict[int, dict[str, Tensor]] = {}

    def run(self, trial: Trial, epochs: int, stage: str) -> None:
        """Run ``trial`` on to ``epochs`` in all (unless it is finished), from its own weights; count one run."""
        self.search.check_budget()
        if not trial.stopped_early and trial.epochs_run < epochs and trial.outcome not in _FAILED:
            self.worker.load_state_dict(self.states.get(trial.index, self.original))
            _advance(self.worker, trial, self.forget, epochs, self.base, self.seed, self.trainer_kwargs, self.judge)
            self.states[trial.index] = _cpu_state(self.worker)
        self.search.done(trial, stage)

    def rerun(self, trial: Trial, epochs: int, repeat: int) -> None:
        """Run ``trial``'s settings again from the original weights with other noise; record it as a repeat."""
        self.search.check_budget()
        self.worker.load_state_dict(self.original)
        rerun = Trial(index=trial.index, sigma=trial.sigma, lr=trial.lr, n_perturbations=trial.n_perturbations)
        seed = self.seed + _REPEAT_SEED_STRIDE * (repeat + 1)
        _advance(self.worker, rerun, self.forget, epochs, self.base, seed, self.trainer_kwargs, self.judge)
        trial.add_repeat(rerun)
        self.search.done(trial, f"repeat {repeat + 1}")

    def drop(self, trial: Trial) -> None:
        """Forget a pruned trial's weights."""
        self.states.pop(trial.index, None)


def _successive_halving(runner: _Runner, trials: list[Trial], schedule: list[tuple[int, int]]) -> None:
    """Every rung keeps the best trials and runs them on from where they stopped (one rung: random search)."""
    alive = trials
    for rung, (keep, epochs) in enumerate(schedule):
        if rung > 0:
            alive = sorted(alive, key=_rank_key, reverse=True)[:keep]
            for trial in trials:
                if trial not in alive:
                    runner.drop(trial)
        for trial in alive:
            trial.rung = rung
            runner.run(trial, epochs, f"rung {rung}")


def _optuna_search(
    runner: _Runner,
    trials: list[Trial],
    n_configs: int,
    sigma_range: tuple[float, float],
    lr_range: tuple[float, float],
    ns: Sequence[int],
    schedule: list[tuple[int, int]],
    reduction_factor: int,
) -> None:
    """Optuna's TPE sampler proposes each point; its ``SuccessiveHalvingPruner`` stops it at the same rungs."""
    try:
        import optuna
    except ImportError as err:
        raise MisconfigurationException(
            "`search='optuna'` needs Optuna: `pip install \"lightning-jit[optuna]\"`, or use search='halving'."
        ) from err
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(
            direction="maximize",
            sampler=optuna.samplers.TPESampler(seed=runner.seed, n_startup_trials=max(2, n_configs // 4)),
            pruner=optuna.pruners.SuccessiveHalvingPruner(
                min_resource=schedule[0][1], reduction_factor=reduction_factor
            ),
        )
        for index in range(n_configs):
            asked = study.ask()
            sigma = asked.suggest_float("sigma", sigma_range[0], sigma_range[1], log=True)
            lr = asked.suggest_float("lr", lr_range[0], lr_range[1], log=True)
            n = asked.suggest_categorical("n_perturbations", list(ns)) if len(ns) > 1 else ns[0]
            trial = Trial(index=index, sigma=float(f"{sigma:.4g}"), lr=float(f"{lr:.4g}"), n_perturbations=int(n))
            trials.append(trial)
            pruned = False
            for rung, (_, epochs) in enumerate(schedule):
                trial.rung = rung
                runner.run(trial, epochs, f"rung {rung}")
                asked.report(_objective_value(trial), step=epochs)
                if trial.stopped_early or trial.outcome in _FAILED:
                    break
                if asked.should_prune():
                    pruned = True
                    break
            if pruned:
                study.tell(asked, state=optuna.trial.TrialState.PRUNED)
                runner.drop(trial)
            else:
                study.tell(asked, _objective_value(trial))
    finally:
        optuna.logging.set_verbosity(verbosity)


def _confirm(runner: _Runner, finalists: list[Trial], repeats: int, epochs: int) -> None:
    """A single noisy run can look good by luck (large steps especially): run the finalists again from the original
    weights with other noise, and judge each by its worst run."""
    for trial in finalists:
        for repeat in range(repeats):
            runner.rerun(trial, epochs, repeat)


def _objective_value(trial: Trial) -> float:
    """:func:`_rank_key` as one number, for Optuna: feasible trials that met the target are 1000 points ahead."""
    return trial.score + (1000.0 if trial.met and trial.feasible else 0.0)


def _advance(
    worker: nn.Module,
    trial: Trial,
    forget: Iterable[Any],
    epochs: int,
    base: dict[str, Any],
    seed: int,
    trainer_kwargs: dict[str, Any] | None,
    judge: _Judge,
) -> None:
    """Run ``trial`` on ``worker`` (holding the trial's weights) up to ``epochs`` in all, then measure it.

    The run's noise is seeded from ``seed``, the trial and how far it already ran, so the same call gives the same run.
    """
    more = epochs - trial.epochs_run
    wrapper = JiTUnlearning(
        worker,
        sigma=trial.sigma,
        lr=trial.lr,
        n_perturbations=trial.n_perturbations,
        epochs=more,
        seed=seed + 1000 * trial.index + trial.epochs_run,
        monitor=judge.monitor,
        max_drop=judge.max_drop,
        logit_norm_reference=judge.original,  # runs that go on from a rung still compare with the original
        **base,
    )
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + trial.index)
        trainer = quiet_trainer(**{"accelerator": "auto", **(trainer_kwargs or {}), "max_epochs": more})
        try:
            trainer.fit(wrapper, train_dataloaders=forget)
            trial.outcome = wrapper.outcome
            trial.epochs_run += trainer.current_epoch
        except JiTDivergenceError as err:  # a trial that diverges is a finding, recorded in the table
            trial.outcome = "diverged"
            trial.error = str(err)
    trial.stopped_early = trial.stopped_early or wrapper.stopped_early
    trial.seconds += time.perf_counter() - start
    measured = judge.measure(worker, forget)
    trial.forget_acc, trial.forget_entropy, trial.retain = (
        measured["forget_acc"],
        measured["forget_entropy"],
        measured["retain"],
    )
    trial.gap = measured.get("gap", math.nan)
    judge.verdict(trial)
    trial.history.append({"epochs": float(trial.epochs_run), **measured, "score": trial.score})


def _preference(trials: list[Trial], tie_tolerance: float) -> list[Trial]:
    """Evaluated trials, most preferred first: by :func:`_rank_key`, except that feasible trials that met the target
    and score within ``tie_tolerance`` points of the best count as tied, smallest learning rate first (smaller steps
    stop closer to the target)."""
    ranked = sorted((t for t in trials if t.history), key=_rank_key, reverse=True)
    if not ranked or not (ranked[0].met and ranked[0].feasible):
        return ranked
    top = ranked[0].score
    tied = [t for t in ranked if t.met and t.feasible and t.score >= top - tie_tolerance]
    return sorted(tied, key=lambda t: (t.lr, -t.score, t.index)) + [t for t in ranked if t not in tied]


def _rank_key(trial: Trial) -> tuple[bool, float, float]:
    """Feasible trials that met the target first, then by score; untried trials last."""
    if not trial.history:
        return (False, -math.inf, -math.inf)
    return (trial.met and trial.feasible, trial.score, -trial.index)


def _summary(trial: Trial, mode: str) -> str:
    return f"forget {trial.forget_acc:.0f}%, {_retain_name(mode)} {trial.retain:.0f}%"


def _retain_name(mode: str) -> str:
    return "monitor acc" if mode == "monitored" else "probe conf."


# ----------------------------------------------------------------------------------------------------------------------
# The search space and the schedule
# ----------------------------------------------------------------------------------------------------------------------
def _draw(
    n: int, sigma_range: tuple[float, float], lr_range: tuple[float, float], ns: Sequence[int], seed: int
) -> list[tuple[float, float, int]]:
    """``n`` points of a scrambled Sobol sequence over log(sigma) x log(lr) (x N when several are given)."""
    from scipy.stats import qmc

    dims = 2 + (len(ns) > 1)
    sampler = qmc.Sobol(d=dims, scramble=True, seed=seed)
    u = sampler.random(n) if n & (n - 1) else sampler.random_base2(int(math.log2(n)))
    points = []
    for row in u:
        sigma = math.exp(math.log(sigma_range[0]) + row[0] * (math.log(sigma_range[1]) - math.log(sigma_range[0])))
        lr = math.exp(math.log(lr_range[0]) + row[1] * (math.log(lr_range[1]) - math.log(lr_range[0])))
        n_pert = int(ns[min(int(row[2] * len(ns)), len(ns) - 1)]) if dims == 3 else int(ns[0])
        points.append((float(f"{sigma:.4g}"), float(f"{lr:.4g}"), n_pert))
    return points


def _schedule(n: int, eta: int, max_epochs: int) -> list[tuple[int, int]]:
    """Successive halving: ``[(trials kept, epochs in all)]`` per rung, ending with ``max_epochs``.

    Example:
        >>> _schedule(16, 3, 30)
        [(16, 3), (5, 10), (1, 30)]
    """
    rungs = max(1, int(math.floor(math.log(n, eta) + 1e-9)) + 1) if n > 1 else 1
    rungs = min(rungs, int(math.floor(math.log(max_epochs, eta) + 1e-9)) + 1)
    out = []
    for k in range(rungs):
        keep = max(1, n // eta**k)
        epochs = max(1, round(max_epochs / eta ** (rungs - 1 - k)))
        out.append((keep, epochs))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------------
def _check_arguments(
    task: Any,
    monitor: Any,
    unseen: Any,
    sigma_range: Any,
    lr_range: Any,
    n_perturbations: Any,
    n_configs: Any,
    reduction_factor: Any,
    max_epochs: Any,
    target: Any,
    budget: Any,
    search: Any,
    max_drop: Any,
    tolerance: Any,
    finalists: Any,
    repeats: Any,
    tie_tolerance: Any,
) -> None:
    if task not in ("class", "random"):
        raise MisconfigurationException(
            f"`task` must be 'class' (forget whole classes) or 'random' (a sample of the training data), got {task!r}."
        )
    if search not in ("halving", "random", "optuna"):
        raise MisconfigurationException(f"`search` must be 'halving', 'random' or 'optuna', got {search!r}.")
    if task == "random" and unseen is None:
        raise MisconfigurationException(
            "`task='random'` needs `unseen`: labelled data the model never saw (e.g. the test split), whose"
            " confidence the forget set's should come down to."
        )
    for name, rng in (("sigma_range", sigma_range), ("lr_range", lr_range)):
        ok = isinstance(rng, Sequence) and len(rng) == 2 and all(isinstance(v, (int, float)) for v in rng)
        if not ok or not 0 < rng[0] <= rng[1] or not math.isfinite(rng[1]):
            raise MisconfigurationException(
                f"`{name}` must be a (low, high) pair with 0 < low <= high, got {rng!r}; it is searched on a log scale."
            )
    if not n_perturbations or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in n_perturbations):
        raise MisconfigurationException(f"`n_perturbations` must be a list of integers >= 1, got {n_perturbations!r}.")
    for name, value, low in (
        ("n_configs", n_configs, 1),
        ("reduction_factor", reduction_factor, 2),
        ("max_epochs", max_epochs, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise MisconfigurationException(f"`{name}` must be an integer >= {low}, got {value!r}.")
    if not isinstance(tie_tolerance, (int, float)) or tie_tolerance < 0:
        raise MisconfigurationException(f"`tie_tolerance` must be a number of points >= 0, got {tie_tolerance!r}.")
    for name, value in (("finalists", finalists), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise MisconfigurationException(f"`{name}` must be an integer >= 0, got {value!r}.")
    if not isinstance(target, (int, float)) or not 0 <= target <= 100:
        raise MisconfigurationException(f"`target_forget_accuracy` must be a percentage in [0, 100], got {target!r}.")
    if budget is not None and (not isinstance(budget, (int, float)) or not budget > 0):
        raise MisconfigurationException(f"`budget` must be a number of seconds > 0 or None, got {budget!r}.")
    if not isinstance(max_drop, (int, float)) or max_drop < 0:
        raise MisconfigurationException(f"`max_drop` must be a number of points >= 0, got {max_drop!r}.")
    if not isinstance(tolerance, (int, float)) or tolerance < 0:
        raise MisconfigurationException(f"`confidence_tolerance` must be >= 0 points, got {tolerance!r}.")
    if monitor is not None and not isinstance(monitor, Iterable):
        raise MisconfigurationException("`monitor` must be a loader (or iterable) of labelled batches.")


def _config_keys(base: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in base.items() if k in JiTConfig.__dataclass_fields__}


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).float().mean() * 100.0)


def _confidence(logits: Tensor) -> float:
    return float(torch.softmax(logits, dim=1).max(dim=1).values.mean() * 100.0)


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="lightning-jit tune", unit="run", disable=not enabled, leave=True)


def _yaml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value) if isinstance(value, str) else str(value)
