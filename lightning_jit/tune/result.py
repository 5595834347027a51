"""What :func:`~lightning_jit.tune.tune_jit` found: every trial (:class:`Trial`) and the chosen settings
(:class:`TuneResult`), as keyword arguments, a :class:`~lightning_jit.core.settings.JiTSettings`, YAML, a table and a
plot."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from lightning_jit.core.settings import JiTSettings, dump_settings, field_names
from lightning_jit.io import atomic_write, json_safe, save_png

#: ``"class"``: the forget set is whole classes; ``"random"``: a random sample of the training data.
Task = Literal["class", "random"]
#: ``"zero-shot"``: judged from the model and the forget set alone; ``"monitored"``: on a held-out loader.
Mode = Literal["zero-shot", "monitored"]
#: Outcomes after which more epochs cannot help (the weights were restored and the run raised).
FAILED_OUTCOMES = ("diverged",)


@dataclass
class Trial:
    """One point of the search and what it measured after its last rung.

    ``outcome`` is how its last run ended (the front's ``outcome``, or ``"diverged"``) and ``guard_events`` how often
    the collapse guard intervened in that run. ``retain`` is the probe confidence (zero-shot;
    :func:`~lightning_jit.core.probes.probe_confidence`) or the monitor's accuracy (monitored), in percent; ``gap`` is,
    for ``task="random"``, the forget set's mean confidence minus the unseen data's, in points. ``history`` holds one
    measurement per run. ``repeats`` are the confirmation runs of a finalist; ``met``, ``feasible`` and ``score`` then
    hold for the worst of its runs.

    Example:
        >>> Trial(index=0, sigma=0.1, lr=0.03, n_perturbations=25).settings()
        {'sigma': 0.1, 'lr': 0.03, 'n_perturbations': 25}
    """

    index: int
    sigma: float
    lr: float
    n_perturbations: int
    epochs_run: int = 0
    rung: int = 0
    stopped_early: bool = False
    outcome: str = "pending"
    guard_events: int = 0
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
        """The searched settings of this trial: ``sigma``, ``lr`` and ``n_perturbations``."""
        return {"sigma": self.sigma, "lr": self.lr, "n_perturbations": self.n_perturbations}

    @property
    def finished(self) -> bool:
        """More epochs cannot change it: its stopping rule fired, or it diverged."""
        return self.stopped_early or self.outcome in FAILED_OUTCOMES

    def add_repeat(self, rerun: Trial) -> None:
        """Record a confirmation run of the same settings; the trial is then judged by its worst run."""
        self.repeats.append(
            {
                "forget_acc": rerun.forget_acc,
                "retain": rerun.retain,
                "gap": rerun.gap,
                "epochs_run": rerun.epochs_run,
                "outcome": rerun.outcome,
                "guard_events": rerun.guard_events,
                "met": rerun.met,
                "feasible": rerun.feasible,
                "score": rerun.score,
            }
        )
        self.met = self.met and rerun.met
        self.feasible = self.feasible and rerun.feasible
        self.score = min(self.score, rerun.score)
        self.seconds += rerun.seconds


def rank_key(trial: Trial) -> tuple[bool, float, float]:
    """Sort key, best last: feasible trials that met the target first, then by score, then the lower index; trials
    that never ran rank below all others."""
    if not trial.history:
        return (False, -math.inf, -math.inf)
    return (trial.met and trial.feasible, trial.score, -trial.index)


def retain_name(mode: str) -> str:
    """The name of what is kept, as the table and the plot call it."""
    return "monitor acc" if mode == "monitored" else "probe conf."


@dataclass
class TuneResult:
    """The outcome of :func:`~lightning_jit.tune.tune_jit`: every trial, the chosen one and its settings.

    Attributes:
        trials: Every trial drawn, in the order of their index (trials the budget left unrun have no ``history``).
        best: The chosen trial.
        chosen: The chosen trial's :class:`~lightning_jit.core.settings.JiTSettings`, with ``epochs`` the search's
            ``max_epochs`` (a bound: the stopping rule ends the run earlier) and ``seed`` the search's seed.
        task: ``"class"`` or ``"random"``.
        mode: ``"zero-shot"`` or ``"monitored"``.
        seed: The search's seed.
        max_epochs: Epochs of the last rung.
        seconds: Wall-clock time of the search.
        message: Why the search fell short (the budget ran out, or no trial met the target), else ``None``.
        extra: The batch-format and collapse-guard keyword arguments given to ``tune_jit`` (used by every trial; not
            part of the ``jit:`` YAML group).
    """

    trials: list[Trial]
    best: Trial
    chosen: JiTSettings
    task: Task
    mode: Mode
    seed: int
    max_epochs: int
    seconds: float
    message: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def jit_settings(self) -> JiTSettings:
        """The chosen settings: ``JiTUnlearning(model, result.jit_settings())``."""
        return self.chosen

    def settings(self) -> dict[str, Any]:
        """Keyword arguments for :class:`~lightning_jit.lightning.module.JiTUnlearning` (or the callback): every
        field of :meth:`jit_settings`, plus :attr:`extra`."""
        return {**{name: getattr(self.chosen, name) for name in field_names(JiTSettings)}, **self.extra}

    def to_yaml(self) -> str:
        """The chosen settings as the ``jit:`` group of an ``unlearn`` config (``--config tuned.yaml``), written by
        :func:`~lightning_jit.core.settings.dump_settings`, the parser the command line's ``--jit.*`` uses.

        Raises:
            JiTSettingError: for a callable ``perturbation``, which YAML cannot name (register it with a name).
        """
        b = self.best
        lines = [
            f"# lightning-jit tune: trial {b.index} of {len(self.trials)} (successive halving, {self.mode},"
            f" task={self.task});",
            f"# forget accuracy {b.forget_acc:.1f}%, {retain_name(self.mode)} {b.retain:.1f}% after {b.epochs_run}"
            " epoch(s).",
        ]
        if self.extra:
            given = ", ".join(f"{k}={_named(v)!r}" for k, v in self.extra.items())
            lines.append(f"# every trial also ran with (not JiT settings, so not in the jit: group): {given}")
        return "\n".join(lines) + "\n" + dump_settings(self.chosen)

    def table(self, include_time: bool = True) -> str:
        """A Markdown table of all trials, best first; ``include_time=False`` leaves out the only non-reproducible
        column (seconds)."""
        gap = self.task == "random"
        head = ["trial", "sigma", "lr", "N", "epochs", "rung", "runs", "outcome", "forget acc %", "forget entropy"]
        head += ["conf. gap"] if gap else []
        head += [retain_name(self.mode) + " %", "met", "feasible", "score"]
        head += ["seconds"] if include_time else []
        lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
        for t in sorted(self.trials, key=rank_key, reverse=True):
            cells = [
                f"{t.index}{' (chosen)' if t is self.best else ''}",
                f"{t.sigma:.4g}",
                f"{t.lr:.4g}",
                str(t.n_perturbations),
                str(t.epochs_run),
                str(t.rung),
                str((1 if t.history else 0) + len(t.repeats)),
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
        """Everything, JSON-ready (callables named)."""
        return {
            "task": self.task,
            "mode": self.mode,
            "seed": self.seed,
            "max_epochs": self.max_epochs,
            "seconds": self.seconds,
            "message": self.message,
            "best": self.best.index,
            "settings": {**self.chosen.hparams(), **{k: _named(v) for k, v in self.extra.items()}},
            "trials": [asdict(t) for t in self.trials],
        }

    def plot(self, path: str | os.PathLike) -> Path:
        """Forgetting against what is kept, for every trial and rung; the chosen trial is starred."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 5))
        ax = fig.subplots()
        last_rung = max(1, max(t.rung for t in self.trials))
        for t in self.trials:
            xs = [h["forget_acc"] for h in t.history]
            ys = [h["retain"] for h in t.history]
            ax.plot(xs, ys, "-", color="0.8", lw=0.8, zorder=1)
            ax.scatter(xs[-1:], ys[-1:], c=[t.rung] * len(xs[-1:]), cmap="viridis", vmin=0, vmax=last_rung, s=30)
            for r in t.repeats:
                ax.scatter([r["forget_acc"]], [r["retain"]], facecolors="none", edgecolors="0.3", s=40)
        b = self.best
        ax.scatter([b.forget_acc], [b.retain], marker="*", s=250, c="red", label=f"chosen: trial {b.index}", zorder=3)
        if self.task == "class" and self.chosen.target_forget_accuracy is not None:
            ax.axvline(self.chosen.target_forget_accuracy, ls="--", color="0.5", lw=0.8, label="forgetting target")
        ax.set_xlabel("forget-set accuracy % (lower forgets more)")
        ax.set_ylabel(f"{retain_name(self.mode)} % (higher keeps more)")
        ax.set_title(
            f"lightning-jit tune: {len(self.trials)} trials (successive halving); colour = last rung, rings = repeats",
            fontsize=10,
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return save_png(fig, path)

    @property
    def found(self) -> bool:
        """Whether the chosen trial met the target without the guard intervening: only then are its settings worth
        running (and :meth:`save` writes ``tuned.yaml``)."""
        return self.best.met and self.best.feasible

    def save(self, directory: str | os.PathLike) -> dict[str, Path]:
        """Write ``trials.md``, ``trials.json``, ``tune.png`` and, when a trial met the target (:attr:`found`),
        ``tuned.yaml`` to ``directory`` (each atomically); returns their paths by kind (``"markdown"``, ``"json"``,
        ``"png"``, ``"yaml"``)."""
        out = Path(directory)
        paths = {"markdown": out / "trials.md", "json": out / "trials.json", "png": out / "tune.png"}
        if self.found:
            yaml_text = self.to_yaml()  # first: it is the one that can refuse (a callable perturbation)
            paths["yaml"] = out / "tuned.yaml"
            with atomic_write(paths["yaml"]) as fh:
                fh.write(yaml_text)
        with atomic_write(paths["markdown"]) as fh:
            fh.write(self.table() + "\n" + (f"\n{self.message}\n" if self.message else ""))
        with atomic_write(paths["json"]) as fh:
            json.dump(json_safe(self.to_dict()), fh, indent=2)
        self.plot(paths["png"])
        return paths


def _named(value: Any) -> Any:
    """A callable by its qualified name (for YAML comments and JSON); anything else as it is."""
    if callable(value):
        return getattr(value, "__qualname__", repr(value))
    return value
