"""How a trial of :func:`~lightning_jit.tune.tune_jit` is measured (:class:`Judge`) and judged (:class:`Criterion`).

* **Zero-shot** (the model and the forget set alone):

  - ``task="class"`` (the forget set is whole classes): the forget set's accuracy must fall to the target; what is
    kept is measured on *class probes* synthesised from the original model
    (:func:`~lightning_jit.core.probes.synthesize_class_probes`), never on retained data;
  - ``task="random"`` (a random sample of the training data): the forget set's mean confidence must come down to the
    model's confidence on data it never saw (``unseen``, which the user gives), within a tolerance; the probes then
    cover every class.

* **Monitored**: with a ``monitor`` loader (held-out data the user owns), its accuracy replaces the probes, and a
  trial whose accuracy falls more than ``max_drop`` points below the original model's is infeasible.

In every mode a trial in which the collapse guard had to intervene, or that diverged, is infeasible.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torchmetrics.functional.classification import multiclass_accuracy

from lightning_jit.core.batch import BatchFormat
from lightning_jit.core.errors import JiTSettingError
from lightning_jit.core.guard import GuardSettings
from lightning_jit.core.probes import probe_confidence, synthesize_class_probes
from lightning_jit.core.settings import JiTSettings
from lightning_jit.core.site import PerturbationSite, site_for
from lightning_jit.evaluation import predict_split, prediction_entropy
from lightning_jit.tune.result import Mode, Task, Trial
from lightning_jit.tune.settings import TuneSettings, forgetting_target

#: Outcomes of a run that ended with the weights from before it (the guard rolled it back, or it diverged).
RESCUED_OUTCOMES = ("rolled_back", "diverged")
#: Penalty (points) on the score of a trial the guard had to rescue, so that it ranks below every clean one.
GUARD_PENALTY = 100.0
#: Seed offset of the judge's probes from the search's seed, so that they are never the probes a run holds in place
#: with probe distillation (a run seeds its probes with its own seed: the search's seed plus the runner's offsets).
JUDGE_PROBE_SEED_OFFSET = 104_729


@dataclass(frozen=True)
class Criterion:
    """When a measured trial has met the target, whether it is feasible, and its score (higher is better).

    Args:
        task: ``"class"``: met when the forget accuracy is at most ``target_forget_accuracy``; ``"random"``: met when
            the confidence gap is within ``confidence_tolerance`` points of zero.
        target_forget_accuracy: The forgetting target, in percent (``task="class"``; see
            :func:`~lightning_jit.tune.settings.forgetting_target`).
        confidence_tolerance: How close the forget set's confidence must get to the unseen data's, in points
            (``task="random"``; :attr:`TuneSettings.confidence_tolerance <lightning_jit.tune.settings.TuneSettings>`).
        max_drop: Monitored mode: the largest allowed fall of the monitor's accuracy below ``reference``, in points;
            ``None``: zero-shot, no such limit.
        reference: The original model's ``retain`` measurement (monitor accuracy or probe confidence), in percent.

    A trial is infeasible when the collapse guard intervened in its run (``guard_events``), the run was rolled back or
    diverged, or (monitored) the monitor fell more than ``max_drop`` points. The score is ``retain - shortfall`` in
    points, where ``shortfall`` is how far the trial is from the target, less :data:`GUARD_PENALTY` when the guard
    intervened.

    Example:
        >>> criterion = Criterion(task="class", target_forget_accuracy=5.0, confidence_tolerance=2.0)
        >>> trial = Trial(index=0, sigma=0.1, lr=0.03, n_perturbations=25)
        >>> criterion.record(trial, {"forget_acc": 7.0, "forget_entropy": 0.5, "retain": 96.0}, "not_forgotten")
        >>> trial.met, trial.feasible, trial.score
        (False, True, 94.0)
    """

    task: Task
    target_forget_accuracy: float | None
    confidence_tolerance: float
    max_drop: float | None = None
    reference: float = math.nan

    def __post_init__(self) -> None:
        if self.task == "class" and self.target_forget_accuracy is None:
            raise JiTSettingError("target_forget_accuracy", "is required to judge a class task (a percentage).")

    def shortfall(self, trial: Trial) -> float:
        """How far ``trial`` is from the target, in points (0 when met; infinite when unmeasured)."""
        value = trial.forget_acc - self.target_forget_accuracy if self.task == "class" else abs(trial.gap)
        if self.task == "random":
            value -= self.confidence_tolerance
        return max(0.0, value) if math.isfinite(value) else math.inf

    def judge(self, trial: Trial) -> None:
        """Set ``trial.met``, ``trial.feasible`` and ``trial.score`` from its measurements and outcome."""
        shortfall = self.shortfall(trial)
        guard_ok = trial.guard_events == 0 and trial.outcome not in RESCUED_OUTCOMES
        monitor_ok = self.max_drop is None or self.reference - trial.retain <= self.max_drop
        trial.met = shortfall == 0.0
        trial.feasible = guard_ok and monitor_ok
        trial.score = trial.retain - shortfall - (0.0 if guard_ok else GUARD_PENALTY)

    def record(
        self, trial: Trial, measured: dict[str, float], outcome: str | None = None, guard_events: int | None = None
    ) -> None:
        """Store a measurement of ``trial`` (``forget_acc``, ``forget_entropy``, ``retain`` and, for
        ``task="random"``, ``gap``) and, if given, how its run ended; judge it, and append it to ``trial.history``."""
        if outcome is not None:
            trial.outcome = str(outcome)
        if guard_events is not None:
            trial.guard_events = int(guard_events)
        trial.forget_acc = float(measured["forget_acc"])
        trial.forget_entropy = float(measured["forget_entropy"])
        trial.retain = float(measured["retain"])
        trial.gap = float(measured.get("gap", math.nan))
        self.judge(trial)
        trial.history.append({"epochs": float(trial.epochs_run), **measured, "score": trial.score})


class Judge:
    """Measures a model against the task and mode; holds what is fixed before the first trial (the probes and the
    original model's measurements).

    Args:
        original: The model before unlearning. It is only evaluated (in eval mode, without gradients to its weights).
        forget: The forget loader (labelled batches).
        tune: The search's settings: its ``task``, ``confidence_tolerance`` and ``seed`` (the probes are seeded
            :data:`JUDGE_PROBE_SEED_OFFSET` after it).
        base: The JiT settings the trials share: ``probes_per_class`` (zero-shot: probes synthesised per kept class),
            the forgetting target (:func:`~lightning_jit.tune.settings.forgetting_target`) and ``perturb_at``
            (zero-shot probes are then synthesised in its module's output space, :mod:`lightning_jit.core.site`, as
            token ids cannot take gradient steps).
        guard: The collapse guard's settings: with a ``monitor``, its ``max_drop`` bounds the monitor's fall.
        batch_format: How the forget batches are read (for the probes' shape and scale) and where the logits are.
        monitor: Monitored mode: a loader of labelled held-out batches; ``None``: zero-shot.
        unseen: For ``task="random"``: labelled data the model never saw.

    Raises:
        MisconfigurationException: when ``task="class"`` and the forget set holds every class.
    """

    def __init__(
        self,
        original: nn.Module,
        forget: Iterable[Any],
        tune: TuneSettings,
        base: JiTSettings,
        guard: GuardSettings,
        *,
        batch_format: BatchFormat | None = None,
        monitor: Iterable[Any] | None = None,
        unseen: Iterable[Any] | None = None,
    ) -> None:
        task = tune.task
        self.forget, self.task, self.monitor, self.unseen = forget, task, monitor, unseen
        self.perturb_at = base.perturb_at
        self._carrier: Tensor | None = None
        self.batch_format = batch_format or BatchFormat()
        self.selector = self.batch_format.output_selector
        self.mode: Mode = "monitored" if monitor is not None else "zero-shot"
        self.probes: tuple[Tensor, Tensor] | None = None
        logits, labels = predict_split(original, forget, "forget", batch_format=self.batch_format)
        num_classes = logits.shape[1]
        if monitor is not None:
            reference = _accuracy(*predict_split(original, monitor, "monitor", batch_format=self.batch_format))
        else:
            forgotten = set(labels.tolist())
            kept = [c for c in range(num_classes) if task == "random" or c not in forgotten]
            if not kept:
                raise MisconfigurationException(
                    f"The forget set holds every class ({num_classes}); `task='class'` needs classes to keep."
                    " Use task='random' for a sample of the training data."
                )
            like = self.batch_format.forget_input(next(iter(forget))).to(_device_of(original))
            self._carrier = like
            self.probes = synthesize_class_probes(
                original,
                kept,
                like,
                per_class=base.probes_per_class,
                seed=tune.seed + JUDGE_PROBE_SEED_OFFSET,
                output_selector=self.selector,
                site=self._site(original),
            )
            reference = probe_confidence(original, self.probes, self.selector, self._site(original))
        self.criterion = Criterion(
            task=task,
            target_forget_accuracy=forgetting_target(task, base),
            confidence_tolerance=tune.confidence_tolerance,
            max_drop=guard.max_drop if monitor is not None else None,
            reference=reference,
        )

    def measure(self, model: nn.Module) -> dict[str, float]:
        """``forget_acc`` (%), ``forget_entropy`` (normalised to [0, 1]), ``retain`` (%: the monitor's accuracy or
        the probe confidence) and, for ``task="random"``, ``gap`` (points) of ``model``."""
        logits, labels = predict_split(model, self.forget, "forget", batch_format=self.batch_format)
        out = {
            "forget_acc": _accuracy(logits, labels),
            "forget_entropy": float(prediction_entropy(logits).mean()) / max(math.log(logits.shape[1]), 1e-12),
        }
        if self.monitor is not None:
            out["retain"] = _accuracy(*predict_split(model, self.monitor, "monitor", batch_format=self.batch_format))
        else:
            assert self.probes is not None
            x, y = self.probes
            out["retain"] = probe_confidence(model, (x.to(_device_of(model)), y), self.selector, self._site(model))
        if self.task == "random":
            assert self.unseen is not None
            unseen_logits, _ = predict_split(model, self.unseen, "unseen", batch_format=self.batch_format)
            out["gap"] = _confidence(logits) - _confidence(unseen_logits)
        return out

    def _site(self, model: nn.Module) -> PerturbationSite | None:
        """The runs' perturbation site on ``model`` (each trial's model is its own copy), or ``None`` for the input."""
        assert self._carrier is not None
        if self.perturb_at is None and torch.is_floating_point(self._carrier):
            return None  # the input, as the default runs perturb it
        site = site_for(self.perturb_at, model)
        site.admit(self._carrier.to(_device_of(model)))
        return site


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent (torchmetrics' micro average: correct predictions over samples)."""
    return float(multiclass_accuracy(logits, labels, logits.shape[1], average="micro", validate_args=False) * 100.0)


def _confidence(logits: Tensor) -> float:
    return float(torch.softmax(logits, dim=1).max(dim=1).values.mean() * 100.0)


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))
