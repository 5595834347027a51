"""The run engine: one object that owns a JiT run, whichever front drives it.

:class:`JiTRun` owns everything a run does between its first and last forget batch: the JiT step, skipped and
divergent steps, the forget-set stopping rule, the collapse guard's checks and rollbacks, the cost counters and the
outcome. It knows nothing of Lightning. A front hands it what only the front knows: the ``backward`` to call (the
strategy's, with its precision plugin and DDP reducer), the optimizer step, a forward-context factory (autocast), and
the :class:`Collectives` of its processes. :class:`~lightning_jit.lightning.module.JiTUnlearning` calls it from
``training_step``; :class:`~lightning_jit.lightning.callback.JiTUnlearningCallback` calls it from its own loop inside
the user's Trainer. So both fronts get the same steps, the same guard and the same outcome.

A run::

    run = JiTRun(model, settings)
    run.start(forget_loader)                     # surveys the forget set once and calibrates what is left to it
    optimizer = run.make_optimizer()             # the calibrated normalised step, or SGD at a given `lr`
    for epoch in itertools.count():
        for batch in forget_loader:
            report = run.step(batch, optimizer=optimizer, backward=lambda loss: loss.backward(), epoch=epoch)
            if report.stop:
                break
        if report.stop or run.end_pass(epoch):
            break
    verification = run.finish(optimizer)         # the outcome, verified on the final weights
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_jit.core import calibration
from lightning_jit.core import matching as sample_matching
from lightning_jit.core.batch import BatchFormat
from lightning_jit.core.calibration import ForgetSurvey, calibrate_step, kl_moved, scoped_parameters, survey_forget_set
from lightning_jit.core.cost import CostCounter
from lightning_jit.core.errors import JiTDivergenceError, JiTInputError, JiTSettingError, forward_failure
from lightning_jit.core.guard import CollapseCheck, CollapseGuard, GuardEvent, monitor_logits
from lightning_jit.core.matching import (
    MAX_BASIS,
    HeldoutProjection,
    MarginTargets,
    label_margin,
    matching_loss,
)
from lightning_jit.core.membership import SampleTest, sample_test
from lightning_jit.core.objective import jit_objective
from lightning_jit.core.outcome import JiTUnlearningFailed, Outcome, Verification
from lightning_jit.core.penalties import FrozenReference, logit_norm_penalty, redistribution_loss
from lightning_jit.core.probes import ProbeDistillation
from lightning_jit.core.settings import JiTSettings
from lightning_jit.core.state import (
    WeightSnapshot,
    gradients_finite,
    normalization_mode,
    trainable_parameters,
    weights_finite,
)
from lightning_jit.core.step import NormalizedStep, make_optimizer

#: Why a sample request without held-out data ends ``unverifiable``.
UNVERIFIABLE_REASON = (
    "a request that names individual samples is verified against held-out data the model never trained on, and none"
    " was given: pass `monitor=` a labelled loader such as your validation split"
)

#: Consecutive steps with a non-finite loss (or, without a ``GradScaler``, non-finite gradients) after which a run is
#: declared diverged. A single such step is an isolated overflow: it is skipped and the run goes on.
NONFINITE_PATIENCE = 3


def _same(value: Any) -> Any:
    return value


@dataclass
class Collectives:
    """How the processes of a run split the batches and agree; the defaults are those of one process.

    Args:
        world_size: Number of processes.
        rank: This process's rank.
        split: ``"shard"``: every process receives the same global batch and uses its contiguous share of it, so the
            result does not depend on the number of processes. ``"local"``: each process holds its own batch (a
            ``DistributedSampler``); the global batch is their union. ``None`` for one process.
        all_true: Whether a condition holds on every process (e.g. ``reduce_boolean_decision(ok, all=True)``).
        any_true: Whether it holds on some process.
        sum: Sums a tensor over the processes.
        gather: All-gathers a tensor (for the probes' classes and scale with ``split="local"``).
    """

    world_size: int = 1
    rank: int = 0
    split: Literal["shard", "local"] | None = None
    all_true: Callable[[bool], bool] = _same
    any_true: Callable[[bool], bool] = _same
    sum: Callable[[Tensor], Tensor] = _same
    gather: Callable[[Tensor], Tensor] | None = None


@dataclass
class StepReport:
    """What one step did.

    ``correct``/``count`` describe this process's forget batch before the update; ``forget_accuracy`` is the
    stopping rule's accuracy over all processes (``None`` for unlabelled batches); ``stop`` asks the front to end the
    run; ``rolled_back`` says the guard restored earlier weights after this step.
    """

    loss: Tensor
    applied: bool
    count: int
    correct: int | None = None
    forget_accuracy: float | None = None
    stop: bool = False
    rolled_back: bool = False


class ForgetAccuracyWindow:
    """Forget-set accuracy over the most recent forget samples, from the clean logits the JiT step computes anyway.

    It costs no extra forward pass: it keeps the latest batches that together hold at least ``min_samples`` samples,
    each measured just before that batch's update. It only says when to look: once it reads at most the target, the
    run checks the whole forget set on the current weights (a no-grad pass) before it stops.

    Example:
        >>> w = ForgetAccuracyWindow(min_samples=8)
        >>> w.update(3, 4); w.ready()
        False
        >>> w.update(0, 4); w.accuracy()
        37.5
        >>> w.update(0, 4); w.totals()  # the oldest batch left the window
        (0, 8)
    """

    def __init__(self, min_samples: int = 64) -> None:
        self.min_samples = max(1, int(min_samples))
        self._items: list[tuple[int, int]] = []

    def update(self, correct: int, count: int) -> None:
        self._items.append((int(correct), int(count)))
        while len(self._items) > 1 and sum(n for _, n in self._items[1:]) >= self.min_samples:
            self._items.pop(0)

    def totals(self) -> tuple[int, int]:
        return sum(c for c, _ in self._items), sum(n for _, n in self._items)

    def ready(self) -> bool:
        """Whether the window holds at least ``min_samples`` samples."""
        return self.totals()[1] >= self.min_samples

    def accuracy(self) -> float:
        correct, count = self.totals()
        return 100.0 * correct / count if count else float("nan")

    def reset(self) -> None:
        """Forget the measurements (e.g. they were made on weights the guard discarded)."""
        self._items = []


#: The stopping rule looks at the whole forget set once this many recent samples (or all, if fewer) read the target.
STOP_WINDOW = 64


def divergence_hint(settings: JiTSettings | None = None) -> str:
    """The advice given with every :class:`~lightning_jit.core.errors.JiTDivergenceError`.

    Example:
        >>> "smaller `lr` (e.g. 10x smaller, now 0.5" in divergence_hint(JiTSettings(lr=0.5))
        True
    """

    def now(value: float | None) -> str:
        return f"now {value:g}" if value is not None else "now calibrated"

    lr = f" (e.g. 10x smaller, {now(settings.lr)}; None calibrates it)" if settings is not None else ""
    sigma = f" ({now(settings.sigma)})" if settings is not None else ""
    return f"Try a smaller `lr`{lr} or a larger `sigma`{sigma}; a `sigma` far above the inputs' scale overflows too."


class JiTRun:
    """One JiT run of ``model`` on a forget set: calibration, steps, stopping rule, divergence, collapse guard, cost
    and the verified outcome.

    Args:
        model: The classifier being unlearned (updated in place). Its train/eval mode is set per step by
            ``settings.norm_policy`` and restored.
        settings: The JiT settings; those left to ``None`` are calibrated at :meth:`start`.
        batch_format: How to read the forget (and monitor) batches and the model's output.
        guard: The collapse guard's settings (``CollapseGuard(enabled=False)`` turns it off).
        monitor: Held-out labelled batches the model never trained on (a validation split), never used for
            gradients: the guard watches their accuracy, and a sample request (``task="random"``) is verified against
            them (:mod:`lightning_jit.core.membership`). Without them a sample request cannot be verified: the run
            does no work and ends ``unverifiable``.
        retain: Optional batches of samples the user keeps: the model's predictions on them are held at the
            original's (``settings.retain_distillation``). Never required.
        original: The model whose outputs the retain terms hold (default: ``model`` as it is at :meth:`start`).
        collectives: How the processes split batches and agree (default: one process).
        warn: Where warnings go (the fronts pass ``rank_zero_warn``).

    Example:
        >>> from lightning_jit.core.settings import JiTSettings
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        >>> forget = [(torch.randn(8, 1, 4, 4), torch.zeros(8, dtype=torch.long))]
        >>> run = JiTRun(net, JiTSettings(n_perturbations=4, epochs=1))
        >>> run.start(forget)
        >>> opt = run.make_optimizer()
        >>> report = run.step(forget[0], optimizer=opt, backward=lambda loss: loss.backward(), epoch=0)
        >>> verification = run.finish(opt)
        >>> run.calibrated["task"], run.cost.counts["perturbed"], verification.outcome.value
        ('class', 32, 'not_forgotten')
    """

    def __init__(
        self,
        model: nn.Module,
        settings: JiTSettings,
        *,
        batch_format: BatchFormat | None = None,
        guard: CollapseGuard | None = None,
        monitor: Iterable[Any] | None = None,
        retain: Iterable[Any] | None = None,
        original: nn.Module | None = None,
        collectives: Collectives | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.model = model
        self.retain_source = retain
        self.settings = settings
        self.batch_format = batch_format if batch_format is not None else BatchFormat()
        self.guard = guard if guard is not None else CollapseGuard()
        self.monitor = monitor
        self.original = original
        self.collectives = collectives if collectives is not None else Collectives()
        self.warn = warn if warn is not None else _warn
        self.params = trainable_parameters(model)
        self.cost = CostCounter()
        self.check: CollapseCheck | None = None
        self.reference: FrozenReference | None = None
        self.probes: ProbeDistillation | None = None
        self.retain: ProbeDistillation | None = None
        #: Retain samples of a forgotten label that the original recognised, checked at the end (see :meth:`finish`).
        self.siblings: tuple[Tensor, Tensor] | None = None
        self.survey: ForgetSurvey | None = None
        self.forget: Iterable[Any] | None = None
        #: The values the run decided itself (task, sigma, the step size...), for the record.
        self.calibrated: dict[str, Any] = {}
        self.window = ForgetAccuracyWindow()
        self.generator: torch.Generator | None = None
        self.steps = 0
        self.passes = 0
        self.skipped_steps = 0
        self.stopped_early = False
        self.bound_reached = False
        self.diverged = False
        self.verification: Verification | None = None
        self._scope: set[nn.Parameter] | None = None
        self._retain_setup = 0
        self._step_calibrated = False
        self._verified_at: tuple[int, Verification] | None = None
        self._nonfinite_streak = 0
        self._pre_run: WeightSnapshot | None = None
        self._last_good: WeightSnapshot | None = None
        #: A sample request without held-out data, or too small for the held-out test to tell a memorised set: nothing
        #: can be verified, so the run does no work.
        self.unverifiable = False
        self._unverifiable_reason: str | None = None
        #: The held-out test on the original weights, for a sample request (see :meth:`_prepare_sample_request`).
        self.sample_test_before: SampleTest | None = None
        self._nothing_to_do = False
        #: The update of a sample request: its margin targets and held-out projection (:mod:`.matching`).
        self.matching: tuple[MarginTargets, HeldoutProjection] | None = None
        self._scores: tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]] | None = None
        self._pass_scores: list[tuple[Tensor, Tensor]] = []

    # ------------------------------------------------------------------------------------------------------------------
    # What the run resolves at its start
    # ------------------------------------------------------------------------------------------------------------------
    @property
    def task(self) -> str:
        """``"class"`` or ``"random"`` (``settings.task``, or what the survey decided for ``"auto"``)."""
        return self.calibrated.get("task", self.settings.task if self.settings.task != "auto" else "class")

    @property
    def target(self) -> float | None:
        """The forget accuracy (percent) the outcome is checked against."""
        if self.settings.target_forget_accuracy is not None:
            return self.settings.target_forget_accuracy
        return calibration.CLASS_TARGET if self.task == "class" else None

    @property
    def is_sample_request(self) -> bool:
        """Whether the run forgets individual samples (``task="random"`` with no forget-accuracy target): its
        outcome is then the held-out test's (:mod:`lightning_jit.core.membership`)."""
        return self.task == "random" and self.target is None

    @property
    def sigma(self) -> float:
        return self.settings.sigma if self.settings.sigma is not None else self.calibrated["sigma"]

    @property
    def max_passes(self) -> int | None:
        if self.settings.epochs is not None:
            return self.settings.epochs
        if self.matching is not None:
            return sample_matching.MAX_PASSES
        return 1 if self.task == "random" else None

    # ------------------------------------------------------------------------------------------------------------------
    # Life cycle
    # ------------------------------------------------------------------------------------------------------------------
    def start(
        self,
        forget: Iterable[Any] | None = None,
        forward_context: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    ) -> None:
        """Take the pre-run snapshot, survey the forget set and calibrate, synthesise the probes, seed the noise.

        Args:
            forget: The forget batches. They are read once here (a no-grad pass) and again to verify the outcome.
                Without them nothing can be calibrated (``sigma`` must then be given) and the outcome rests on the
                stopping rule's window.
            forward_context: As in :meth:`step`: the set-up's forward passes run under it too.
        """
        with forward_context() if forward_context is not None else contextlib.nullcontext():
            self._start(forget)

    def _start(self, forget: Iterable[Any] | None) -> None:
        settings = self.settings
        self._pre_run = WeightSnapshot(self.model)
        self.forget = forget
        self.check = CollapseCheck(self.guard, self.batch_format, self.monitor) if self.guard.enabled else None
        device = self._device()
        if settings.seed is not None:
            self.generator = torch.Generator(device=device if device.type == "cuda" else "cpu")
            self.generator.manual_seed(settings.seed)
        self.cost.attach(self.model)
        original = self.original if self.original is not None else self.model
        holds_retain = self.retain_source is not None and settings.retain_distillation > 0
        needs_reference = settings.logit_norm_penalty > 0 or settings.redistribution > 0
        if needs_reference or settings.probe_distillation > 0 or holds_retain:
            self.reference = FrozenReference(original)
        if holds_retain:
            assert self.reference is not None
            with self.cost.kind("retain"):
                self.retain = ProbeDistillation.from_retain(
                    self.reference, self.retain_source, self.batch_format, device=device
                )
            self._retain_setup = self.cost.counts["retain"]
            self.calibrated["retain_samples"] = int(self.retain.probes.shape[0])
        if forget is not None:
            self._calibrate(forget, device)
        elif settings.sigma is None:
            raise JiTSettingError("sigma", "cannot be calibrated without the forget set: give `sigma` or `forget`.")
        self.calibrated.setdefault("task", self.task)
        self.calibrated["target_forget_accuracy"] = self.target
        if self.is_sample_request:
            self._prepare_sample_request()
        if self.retain is not None and self.task == "class" and self.calibrated.get("classes"):
            self.siblings = self.retain.hold_out(self.calibrated["classes"])
            if self.siblings is not None:
                self.calibrated["retain_siblings"] = int(self.siblings[1].shape[0])
            if self.retain.probes.shape[0] == 0:
                self.retain = None

    def _calibrate(self, forget: Iterable[Any], device: torch.device) -> None:
        settings, coll = self.settings, self.collectives
        reservoir = settings.probes_per_class * 64 if settings.probe_distillation > 0 else 0
        survey_model = self.reference if self.reference is not None else self.model
        with self.cost.kind("calibration"), normalization_mode(self.model, "eval"):
            found = self.survey = survey_forget_set(
                survey_model,
                self.model,
                forget,
                self.batch_format,
                device=device,
                reservoir=reservoir,
                generator=_cpu_generator(settings.seed),
                shard=self._shard_pair if coll.split == "shard" else None,
                total=coll.sum if coll.world_size > 1 else None,
            )
        task = found.task if settings.task == "auto" else settings.task
        self.calibrated.update(task=task, n_forget=found.n, classes=found.classes, input_std=found.std)
        if settings.sigma is None:
            self.calibrated["sigma"] = calibration.SIGMA_SCALE * found.std
        self.calibrated["penalty_sigma"] = (
            settings.logit_norm_sigma
            if settings.logit_norm_sigma is not None
            else calibration.PENALTY_SIGMA_SCALE * found.std
        )
        self.window = ForgetAccuracyWindow(min(max(1, found.n), STOP_WINDOW))
        scoped = scoped_parameters(self.model, found.weight_modules, settings.update_scope)
        if len(scoped) < len(self.params):
            self._scope = set(scoped)
            self.calibrated["updated_parameters"] = sum(p.numel() for p in scoped)
        kept = found.kept_classes()
        if settings.probe_distillation > 0 and task == "class" and kept and found.starts is not None:
            assert self.reference is not None
            with self.cost.kind("synthesis"):
                self.probes = ProbeDistillation.synthesise(
                    self.reference,
                    found.starts.to(device),
                    kept,
                    settings.probes_per_class,
                    std=found.std,
                    generator=_cpu_generator(settings.seed),
                    output_selector=self.batch_format.output_selector,
                )
            self.calibrated["probes"] = int(self.probes.probes.shape[0])

    def make_optimizer(self) -> Optimizer:
        """The run's optimizer over every trainable parameter (the run drops the gradients outside its update scope):
        the normalised step when ``lr`` is calibrated, else plain SGD at ``lr``
        (:func:`~lightning_jit.core.step.make_optimizer`)."""
        return make_optimizer(self.params, self.settings.lr)

    def step(
        self,
        batch: Any,
        *,
        optimizer: Optimizer,
        backward: Callable[[Tensor], None],
        epoch: int,
        step_optimizer: Callable[[], Any] | None = None,
        scaler: torch.amp.GradScaler | None = None,
        forward: Callable[[Any], Any] | None = None,
        forward_context: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    ) -> StepReport:
        """One JiT update on one forget batch, then the divergence, stopping-rule, cost-bound and guard checks.

        Args:
            batch: The forget batch, in any form ``batch_format`` reads.
            optimizer: The run's optimizer (:meth:`make_optimizer`, or the front's own).
            backward: Back-propagates a loss (the strategy's backward in the fronts).
            epoch: The pass over the forget set, combined with ``seed`` and the sample ids for keyed noise.
            step_optimizer: Applies the step (default ``optimizer.step``).
            scaler: The precision plugin's ``GradScaler`` under ``"16-mixed"``, or ``None``. With a scaler the step
                always goes through it (it skips a step with non-finite gradients and lowers its scale);
                ``step_optimizer`` must then run ``scaler.step`` and ``scaler.update``, or be ``None``.
            forward: What to call on inputs (default ``model``): e.g. the strategy-wrapped or compiled model.
            forward_context: A context manager factory for the forward passes, e.g. the precision plugin's.

        Returns:
            The :class:`StepReport`; ``stop`` asks the front to end the run.

        Raises:
            JiTInputError: for a batch JiT cannot use, or that does not fit the model.
            JiTDivergenceError: after restoring the weights from before the run, when the run diverged.
        """
        if self._pre_run is None:
            raise RuntimeError("JiTRun.step() before start(), or after finish().")
        if self.unverifiable or self._nothing_to_do:
            # Settled at the start (no held-out data, or the held-out test already passes): no update.
            return StepReport(loss=torch.zeros(()), applied=False, count=0, stop=True)
        forward = forward if forward is not None else self.model
        fmt = self.batch_format
        x = fmt.forget_input(batch)
        try:
            if self.check is not None and not self.check.begun:
                self._give_guard_the_probes()
                with self.cost.kind("guard"):
                    self.check.begin(self.model, x, forward_context)
                self._last_good = WeightSnapshot(self.model) if self.monitor is not None else self._pre_run
            loss, applied, correct, count = self._update(
                batch, x, forward, optimizer, backward, epoch, step_optimizer, scaler, forward_context
            )
        except (RuntimeError, TypeError) as err:
            self._raise_if_batch_does_not_fit(batch, x, forward_context, err)
            raise
        self.steps += 1
        report = StepReport(loss=loss, applied=applied, count=count, correct=correct)
        if not applied:
            self.skipped_steps += 1
            self.warn(
                f"JiT step {self.steps} skipped: the loss or gradients were not finite ({self.skipped_steps} skipped"
                " so far). A smaller `lr` or a larger `sigma` may help."
            )
        self._check_divergence(applied, bool(torch.isfinite(loss)), scaler)
        if applied and self.steps == 1 and float(loss) == 0.0:
            self.warn(
                "The JiT loss is exactly 0, so JiT changes nothing: every perturbation was rounded or clamped away."
                f" Increase `sigma` (now {self.sigma:g}) or relax `clamp` (now {self.settings.clamp!r})."
            )
        if correct is not None:
            report.forget_accuracy = self._stopping_rule(correct, count, forward_context)
            report.stop = self.stopped_early
        if not report.stop and self._over_budget():
            self.bound_reached = report.stop = True
        if self.check is not None and self.steps % self.guard.check_every == 0:
            rolled_back, stop = self._guard_check(optimizer, forward_context, final=False)
            if rolled_back:
                report.rolled_back, report.stop = True, stop
        return report

    def end_pass(self, epoch: int) -> bool:
        """Call after each pass over the forget set. Returns whether the run must end: its pass bound is reached, or
        (a sample request) the forget set passed the held-out test on the scores measured during the pass."""
        self.passes += 1
        if self.matching is not None and self._matched_during_pass():
            self.stopped_early = True
            return True
        return self.max_passes is not None and epoch + 1 >= self.max_passes

    def _matched_during_pass(self) -> bool:
        """Whether the forget samples, as measured by the clean passes of this pass (before each update), look like
        the held-out data did on the original weights: the held-out test passes, and the forget accuracy is not above
        the held-out accuracy or the membership AUC is down to chance (going on would make them stand out the other
        way). The outcome is decided on the final weights, not here."""
        assert self._scores is not None
        scored, self._pass_scores = self._pass_scores, []
        if not scored:
            return False
        loss = self._gather(torch.cat([s[0] for s in scored]))
        hits = self._gather(torch.cat([s[1] for s in scored]).double()).bool()
        _, (heldout_loss, heldout_hits, _) = self._scores
        test = sample_test(loss, hits, heldout_loss, heldout_hits)
        return test.passed and (test.forget_accuracy <= test.heldout_accuracy or test.auc <= 0.5)

    def _matching_loss(self, x: Tensor, clean: Tensor, labels: Tensor | None) -> Tensor:
        """The one-sided pull of each forget sample's margin to its target (summed over this process's samples), and
        the scores the stopping rule reads at the end of the pass."""
        assert self.matching is not None and self.reference is not None
        targets, _ = self.matching
        with self.cost.kind("penalty"), torch.no_grad():
            reference = self.batch_format.logits(self.reference(x), x.shape[0]).float()
        labels = labels.to(clean.device).long() if labels is not None else reference.argmax(1)
        logits = clean.float()
        with torch.no_grad():
            self._pass_scores.append(
                (
                    torch.nn.functional.cross_entropy(logits, labels, reduction="none").double(),
                    logits.argmax(1) == labels,
                )
            )
        return matching_loss(label_margin(logits, labels), targets(label_margin(reference, labels)))

    def finish(
        self,
        optimizer: Optimizer | None = None,
        forward_context: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
        *,
        strict: bool = False,
    ) -> Verification:
        """End the run: the guard's last check (unless the last step was checked), then the verification.

        The forget set given to :meth:`start` is read once more to verify the final weights (unless the stopping rule
        just did so on these weights). Without it the claim rests on the stopping rule's window, measured before each
        update (weaker: the record says so).

        Args:
            optimizer: The run's optimizer (the guard's last check may restore weights and clear its state).
            forward_context: As in :meth:`step`.
            strict: Restore the weights from before the run and raise
                :class:`~lightning_jit.core.outcome.JiTUnlearningFailed` unless the outcome is ``forgotten``.
                Without it, an outcome other than ``forgotten`` restores them when ``settings.on_unverified`` is
                ``"restore"`` (the default) and keeps the run's weights when it is ``"keep"``;
                ``verification.restored`` says which.

        Returns:
            The :class:`~lightning_jit.core.outcome.Verification`, also kept as :attr:`verification`.
        """
        if self.check is not None and self.check.begun and self.steps % self.guard.check_every != 0:
            self._guard_check(optimizer, forward_context, final=True)
        # An error or an interruption up to here leaves the run unfinished: the front's `abort` restores the weights.
        measured = self._measure_forget(forward_context, "verification")
        sample = None
        if self.is_sample_request and self.monitor is not None:
            sample = self.sample_test_before if self._nothing_to_do else self._sample_test(forward_context)
        verification = self._outcome(measured, sample)
        if verification.outcome is Outcome.FORGOTTEN and self.siblings is not None:
            verification = self._check_siblings(verification, forward_context)
        if self.retain is not None and self.retain.labels is not None:
            verification.retain_accuracy = self._retain_accuracy(forward_context)
        self.cost.detach()
        # The cost again, now that every pass is done: the retain pass and the sibling check count too.
        n = self.survey.n if self.survey is not None else verification.n_forget
        verification.cost = self.cost.report(n or None, self.settings.n_perturbations)
        # What a run that did not verify leaves in memory: `settings.on_unverified` (strict always restores).
        restore = not verification.outcome.succeeded and (strict or self.settings.on_unverified == "restore")
        if restore and self._pre_run is not None:
            self._pre_run.restore(self.model)
        verification.restored = restore or verification.outcome in (Outcome.ROLLED_BACK, Outcome.DIVERGED)
        self.verification = verification
        self._pre_run = None  # the run is over: a later error must not undo it
        if strict and not verification.outcome.succeeded:
            raise JiTUnlearningFailed(verification)
        return verification

    # ------------------------------------------------------------------------------------------------------------------
    # Resuming
    # ------------------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any] | None:
        """Everything a run in progress needs to go on bit for bit after a restart: the weights from before the run,
        the frozen original, the probes, what was calibrated, the noise generator, the counters, the stopping rule's
        window and the guard's state. ``None`` when no run is in progress (before :meth:`start`, after
        :meth:`finish`)."""
        if self._pre_run is None:
            return None
        held = {
            name: (d.probes, d.classes, d.targets, d._offset, d.labels) if d is not None else None
            for name, d in (("probes", self.probes), ("retain", self.retain))
        }
        return {
            "version": 1,
            "siblings": self.siblings,
            "pre_run": self._pre_run.state,
            "reference": self.reference.state if self.reference is not None else None,
            "held": held,
            "calibrated": dict(self.calibrated),
            "survey": {k: v for k, v in vars(self.survey).items() if k not in ("weight_modules", "starts")}
            if self.survey is not None
            else None,
            "scope": [i for i, p in enumerate(self.params) if p in self._scope] if self._scope is not None else None,
            "generator": self.generator.get_state() if self.generator is not None else None,
            "counters": {
                "steps": self.steps,
                "passes": self.passes,
                "skipped_steps": self.skipped_steps,
                "nonfinite_streak": self._nonfinite_streak,
                "step_calibrated": self._step_calibrated,
                "retain_setup": self._retain_setup,
            },
            "window": list(self.window._items),
            "window_size": self.window.min_samples,
            "cost": dict(self.cost.counts),
            "guard": self.check.state_dict() if self.check is not None else None,
            "sample_request": self._sample_state(),
            "last_good": self._last_good.state if self._last_good is not None and self.monitor is not None else None,
        }

    def resume(self, state: dict[str, Any], forget: Iterable[Any] | None = None) -> None:
        """Go on with a run from its :meth:`state_dict` (instead of :meth:`start`): nothing is surveyed or
        synthesised again, and the weights from before the run stay those of the first start."""
        if state.get("version") != 1:
            raise JiTSettingError("state", f"cannot resume a run state of version {state.get('version')!r}.")
        device = self._device()
        self.forget = forget
        self._pre_run = WeightSnapshot.from_state(state["pre_run"], device)
        if state["reference"] is not None:
            self.reference = FrozenReference.from_state(
                self.original if self.original is not None else self.model, state["reference"], device
            )
        for name, held in state["held"].items():
            if held is not None:
                distill = ProbeDistillation(*(t.to(device) for t in held[:3]))
                distill._offset = int(held[3])
                distill.labels = held[4].to(device) if len(held) > 4 and held[4] is not None else None
                setattr(self, name, distill)
        self.calibrated = dict(state["calibrated"])
        siblings = state.get("siblings")
        self.siblings = (siblings[0].to(device), siblings[1].to(device)) if siblings is not None else None
        if state["survey"] is not None:
            self.survey = ForgetSurvey(**state["survey"])
        if state["scope"] is not None:
            self._scope = {self.params[i] for i in state["scope"]}
        if state["generator"] is not None:
            self.generator = torch.Generator(device=device if device.type == "cuda" else "cpu")
            self.generator.set_state(state["generator"])
        counters = state["counters"]
        self.steps, self.passes = int(counters["steps"]), int(counters["passes"])
        self.skipped_steps, self._nonfinite_streak = int(counters["skipped_steps"]), int(counters["nonfinite_streak"])
        self._step_calibrated, self._retain_setup = bool(counters["step_calibrated"]), int(counters["retain_setup"])
        self.window = ForgetAccuracyWindow(int(state["window_size"]))
        self.window._items = [tuple(item) for item in state["window"]]
        self.cost.counts.update(state["cost"])
        self.check = CollapseCheck(self.guard, self.batch_format, self.monitor) if self.guard.enabled else None
        self._give_guard_the_probes()
        if self.check is not None and state["guard"] is not None:
            self.check.load_state_dict(state["guard"], device)
            if self.check.begun:
                self._last_good = (
                    WeightSnapshot.from_state(state["last_good"], device)
                    if state["last_good"] is not None
                    else self._pre_run
                )
        self._load_sample_state(state.get("sample_request"), device)
        self.cost.attach(self.model)

    def _sample_state(self) -> dict[str, Any] | None:
        """What a sample request carries across a restart: its settlement, the scores of the held-out test on the
        original weights, and its update's targets and projection."""
        if not self.is_sample_request:
            return None
        targets, projection = self.matching if self.matching is not None else (None, None)
        return {
            "unverifiable": self.unverifiable,
            "unverifiable_reason": self._unverifiable_reason,
            "nothing_to_do": self._nothing_to_do,
            "test_before": self.sample_test_before.as_dict() if self.sample_test_before is not None else None,
            "scores": self._scores,
            "targets": (targets.forget, targets.heldout) if targets is not None else None,
            "basis": projection.basis if projection is not None else None,
        }

    def _load_sample_state(self, state: dict[str, Any] | None, device: torch.device) -> None:
        if state is None:
            return
        self.unverifiable, self._unverifiable_reason = state["unverifiable"], state["unverifiable_reason"]
        self._nothing_to_do = state["nothing_to_do"]
        self.sample_test_before = SampleTest(**state["test_before"]) if state["test_before"] is not None else None
        if state["scores"] is not None:
            self._scores = tuple(tuple(t.to(device) for t in side) for side in state["scores"])  # type: ignore[assignment]
        if state["targets"] is not None:
            self.matching = (
                MarginTargets(*state["targets"]),
                HeldoutProjection(state["basis"].to(device), self.params),
            )

    def abort(self) -> bool:
        """Restore the weights from before the run (after an error or an interruption), unless the run has
        finished. Returns whether it did."""
        self.cost.detach()
        if self._pre_run is None:
            return False
        self._pre_run.restore(self.model)
        return True

    # ------------------------------------------------------------------------------------------------------------------
    # Results
    # ------------------------------------------------------------------------------------------------------------------
    @property
    def guard_events(self) -> list[GuardEvent]:
        return self.check.events if self.check is not None else []

    @property
    def outcome(self) -> Outcome | None:
        """How the run ended, once :meth:`finish` verified it (``diverged`` as soon as it diverged); else ``None``."""
        if self.diverged:
            return Outcome.DIVERGED
        return self.verification.outcome if self.verification is not None else None

    def safety_report(self) -> dict[str, Any]:
        """The outcome, skipped steps and the collapse guard's report (thresholds, measurements, events)."""
        return {
            "outcome": self.outcome.value if self.outcome is not None else None,
            "skipped_steps": self.skipped_steps,
            "guard": self.check.report() if self.check is not None else None,
            "verification": self.verification.as_dict() if self.verification is not None else None,
        }

    # ------------------------------------------------------------------------------------------------------------------
    # The update
    # ------------------------------------------------------------------------------------------------------------------
    def _update(
        self,
        batch: Any,
        x: Tensor,
        forward: Callable[[Any], Any],
        optimizer: Optimizer,
        backward: Callable[[Tensor], None],
        epoch: int,
        step_optimizer: Callable[[], Any] | None,
        scaler: torch.amp.GradScaler | None,
        forward_context: Callable[[], contextlib.AbstractContextManager[Any]] | None,
    ) -> tuple[Tensor, bool, int | None, int]:
        """The JiT step: zero the gradients, evaluate the objective and the retain terms, back-propagate, keep the
        gradients of the update scope, calibrate the step size at the first step, and step if finite.

        Gradients are zeroed at every step (the reference zeroes them once, so they pile up across batches). A step
        whose loss or gradients are not finite is never applied.
        """
        settings, fmt, coll = self.settings, self.batch_format, self.collectives
        labels = fmt.labels(batch)
        if labels is not None and labels.shape[0] != x.shape[0]:
            raise JiTInputError(
                f"The forget batch has {x.shape[0]} inputs but {labels.shape[0]} labels at"
                f" `label_key={fmt.label_key!r}`. Set `label_key` to where the labels are, so that the stopping rule"
                " can measure forget accuracy."
            )
        keys = fmt.ids(batch) if settings.seed is not None else None
        sharded = coll.split == "shard"
        distributed = coll.world_size > 1
        batch_size = int(x.shape[0])  # the global batch under "shard": every process takes the same probes
        global_size = batch_size * (1 if sharded or not distributed else coll.world_size)
        if sharded:
            x, labels, keys = _take_shard(x, labels, keys, coll.rank, coll.world_size)
        # Under DDP each rank sums its share; the loss is rescaled below so that DDP's average is the global batch's.
        reduction = "sum" if distributed else settings.reduction
        optimizer.zero_grad(set_to_none=True)
        context = forward_context() if forward_context is not None else contextlib.nullcontext()
        probe_loss = retain_loss = None
        seed = settings.seed or 0
        sigma = self.sigma
        with normalization_mode(self.model, settings.norm_policy), context:
            if self.probes is not None:
                with self.cost.kind("probes"):
                    probe_loss = self.probes.loss(forward, batch_size, fmt.output_selector)
            if self.retain is not None:
                with self.cost.kind("retain"):
                    retain_loss = self.retain.loss(forward, batch_size, fmt.output_selector)
            if x.shape[0] == 0:
                # This rank's share of a small global batch is empty. It must still take part in the gradient
                # all-reduce, so it back-propagates a zero that reaches every parameter the clean pass reaches.
                full = fmt.forget_input(batch)[:1]
                with self.cost.kind("clean"):
                    clean = fmt.logits(forward(full))
                loss = clean.float().sum() * 0.0
                clean = clean[:0]
            elif self.matching is not None:
                with self.cost.kind("clean"):
                    clean = fmt.logits(forward(x))
                loss = self._matching_loss(x, clean, labels)  # a sum over the samples, as `reduction="sum"`
                if reduction == "mean":
                    loss = loss / x.shape[0]
            else:
                with self.cost.kind("clean"):
                    clean = fmt.logits(forward(x))
                with self.cost.kind("perturbed"):
                    loss = jit_objective(
                        forward,
                        x,
                        sigma,
                        settings.n_perturbations,
                        reduction=reduction,
                        clamp=settings.clamp,
                        output_selector=fmt.output_selector,
                        generator=self.generator,
                        keys=keys,
                        seed=seed,
                        epoch=epoch,
                        perturbation_chunk=settings.perturbation_chunk,
                        clean_logits=clean,
                        normalize_logits=settings.normalize_logits,
                        perturbation=settings.perturbation,
                    )
                if settings.unitless_ratio:
                    loss = loss * (sigma * math.sqrt(x[0].numel()))  # E||xi||: the ratio becomes scale-free
                reference_logits, forget_classes = None, self.calibrated.get("classes")
                if settings.redistribution > 0 and self.task == "class" and forget_classes:
                    assert self.reference is not None
                    with self.cost.kind("penalty"), torch.no_grad():
                        reference_logits = fmt.logits(self.reference(x), x.shape[0])
                    loss = loss + settings.redistribution * redistribution_loss(
                        clean, reference_logits, forget_classes, reduction=reduction
                    )
                if settings.logit_norm_penalty > 0:
                    assert self.reference is not None
                    with self.cost.kind("penalty"):
                        penalty = logit_norm_penalty(
                            forward,
                            self.reference,
                            x,
                            self.calibrated.get("penalty_sigma", settings.logit_norm_sigma or 1.0),
                            clean_logits=clean,
                            reference_logits=reference_logits,
                            reduction=reduction,
                            output_selector=fmt.output_selector,
                            generator=self.generator,
                            keys=keys,
                            seed=seed,
                            epoch=epoch,
                            perturbation=settings.perturbation,
                        )
                    loss = loss + settings.logit_norm_penalty * penalty
        if distributed:
            # DDP averages the W ranks' gradients, so rank r's loss is W * (its sum) / B_global ("mean") or
            # W * (its sum) ("sum"); their average is then the one-process loss of the global batch.
            world = coll.world_size
            loss = loss * (world / global_size if settings.reduction == "mean" else world)
        if probe_loss is not None:
            # The same on every process (same probes, same weights), so DDP's average leaves it as it is.
            loss = loss + settings.probe_distillation * probe_loss
        if retain_loss is not None:
            loss = loss + settings.retain_distillation * retain_loss
        correct = None
        if labels is not None:
            correct = int((clean.detach().argmax(1) == labels.to(clean.device)).sum())
        if not loss.requires_grad:
            raise JiTInputError(
                "The JiT loss has no gradient: the model has no trainable parameter on its output path."
            )
        backward(loss)
        if self._scope is not None:
            for p in self.params:
                if p not in self._scope:
                    p.grad = None  # outside the update scope: neither stepped nor counted in the step's norms
        if self.matching is not None:
            self.matching[1].project_()  # off the directions held-out margins use (the same on every process)
        loss_finite = bool(torch.isfinite(loss))
        agree = coll.all_true if distributed else _same
        if scaler is not None and scaler.is_enabled():
            if not self._step_calibrated and loss_finite and gradients_finite(self.params):
                self._calibrate_step(optimizer, x, clean, forward, forward_context)  # the normalised step is scale-free
            applied = _scaled_step(optimizer, self.params, scaler, step_optimizer, agree(loss_finite))
        else:
            applied = bool(agree(loss_finite and gradients_finite(self.params)))
            if applied:
                if not self._step_calibrated:
                    self._calibrate_step(optimizer, x, clean, forward, forward_context)
                (step_optimizer or optimizer.step)()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach(), applied, correct, int(x.shape[0])

    def _calibrate_step(
        self,
        optimizer: Optimizer,
        x: Tensor,
        clean: Tensor,
        forward: Callable[[Any], Any],
        forward_context: Callable[[], contextlib.AbstractContextManager[Any]] | None,
    ) -> None:
        """At the first applied step, with ``lr`` left to calibration: the normalised step's size, by trial steps
        (a class task), or the light random-forgetting step."""
        self._step_calibrated = True
        raw = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        if self.settings.lr is not None or not isinstance(raw, NormalizedStep):
            return
        if self.task == "random":
            lr = sample_matching.STEP if self.matching is not None else calibration.RANDOM_STEP
        else:
            moving = [p for p in self.params if p.grad is not None]
            saved = [p.detach().clone() for p in moving]
            before = clean.detach()
            coll, device = self.collectives, self._device()

            def try_step(lr: float) -> None:
                for group in raw.param_groups:
                    group["lr"] = lr
                raw.step()

            def moved() -> float:
                context = forward_context() if forward_context is not None else contextlib.nullcontext()
                mode = normalization_mode(self.model, self.settings.norm_policy)  # as the clean pass it compares to
                with torch.no_grad(), mode, context, self.cost.kind("calibration"):
                    after = self.batch_format.logits(forward(x), x.shape[0])
                kl = torch.stack([kl_moved(before, after), torch.tensor(float(x.shape[0]), dtype=torch.float64)])
                total = coll.sum(kl.to(device)) if coll.world_size > 1 else kl
                return float(total[0] / total[1].clamp_min(1))

            def undo() -> None:
                with torch.no_grad():
                    for p, value in zip(moving, saved, strict=True):
                        p.copy_(value)

            lr = calibrate_step(try_step, moved, undo)
        for group in raw.param_groups:
            group["lr"] = lr
        self.calibrated["lr"] = lr

    # ------------------------------------------------------------------------------------------------------------------
    # After the update
    # ------------------------------------------------------------------------------------------------------------------
    def _check_divergence(self, applied: bool, loss_finite: bool, scaler: torch.amp.GradScaler | None) -> None:
        """Tell an isolated overflow (skip the step, go on) from a divergence (restore the original weights, raise).

        Diverged: the weights are no longer finite after a step, or ``NONFINITE_PATIENCE`` consecutive steps had a
        non-finite loss (without a ``GradScaler``: or non-finite gradients; with one, skipped steps are its normal
        scale search and do not count).
        """
        counts = not loss_finite if (scaler is not None and scaler.is_enabled()) else not applied
        self._nonfinite_streak = self._nonfinite_streak + 1 if counts else 0
        if applied and not weights_finite(self.model):
            reason = "the weights became NaN/Inf after an update"
        elif self._nonfinite_streak >= NONFINITE_PATIENCE:
            reason = f"{self._nonfinite_streak} consecutive steps had a non-finite loss or gradients"
        else:
            return
        self._diverge(f"JiT diverged at step {self.steps}: {reason}.")

    def _diverge(self, message: str) -> None:
        self.diverged = True
        self.abort()
        raise JiTDivergenceError(
            f"{message} The weights from before the run were restored bit for bit. {divergence_hint(self.settings)}"
        )

    def _stopping_rule(
        self,
        correct: int,
        count: int,
        forward_context: Callable[[], contextlib.AbstractContextManager[Any]] | None,
    ) -> float:
        """Update the recent window with this step's counts over all processes (so that it spans the same steps
        whatever their number); once it reads the target, check the whole forget set on the current weights, and set
        :attr:`stopped_early` if that check reads the target too. Returns the window's accuracy."""
        step = self.collectives.sum(torch.tensor([correct, count], dtype=torch.float64, device=self._device()))
        self.window.update(int(step[0]), int(step[1]))
        accuracy = self.window.accuracy()
        target = self.target
        ready = self.window.ready()
        if target is None or not ready or not accuracy <= target:
            return accuracy
        self.window.reset()
        if self.forget is None:  # nothing to read again: the window's word is all there is
            self.stopped_early = True
            return accuracy
        measured = self._measure_forget(forward_context, "stopping_rule")
        self._verified_at = (self.steps, measured)
        if measured.forget_accuracy is not None and measured.forget_accuracy <= target:
            self.stopped_early = True
        return accuracy

    def _over_budget(self) -> bool:
        """Whether the run has spent ``max_cost`` samples through the model per forget sample (over all processes),
        beyond its fixed set-up (the survey, the step-size calibration and the probes' synthesis, which a small
        request would otherwise spend its whole bound on)."""
        bound, survey = self.settings.max_cost, self.survey
        if bound is None or survey is None or survey.n == 0:
            return False
        # Not the forget set's work: the set-up, and the passes over held-out data (the held-out test, and the
        # guard's checks when it watches a monitor), which a large held-out split would otherwise spend the bound on.
        fixed = ("calibration", "synthesis", "heldout", *(("guard",) if self.monitor is not None else ()))
        setup = sum(self.cost.counts[kind] for kind in fixed) + self._retain_setup
        spent = torch.tensor(float(self.cost.total - setup), dtype=torch.float64, device=self._device())
        if self.collectives.world_size > 1:
            spent = self.collectives.sum(spent)
        return float(spent) >= bound * survey.n

    def _guard_check(
        self,
        optimizer: Optimizer | None,
        forward_context: Callable[[], contextlib.AbstractContextManager[Any]] | None,
        final: bool,
    ) -> tuple[bool, bool]:
        """Measure the model; on a collapse restore earlier weights and halve the step or stop.

        Returns ``(rolled_back, stop)``.
        """
        check = self.check
        assert check is not None
        with self.cost.kind("guard"):
            measures = check.measure(self.model, forward_context)
        check.checks += 1
        reason = check.verdict(measures)
        coll = self.collectives
        diverged = coll.any_true(reason == "non_finite")
        failed = coll.any_true(reason is not None)
        check.last = {k: v for k, v in measures.items() if k != "non_finite"}
        detail = {k: round(v, 4) for k, v in check.last.items() if math.isfinite(v)}
        if diverged:
            check.events.append(GuardEvent(self.steps, "non_finite", "diverged", detail))
            self._diverge(f"JiT diverged at step {self.steps}: the model's outputs or weights became NaN/Inf.")
        if not failed:
            if self.monitor is not None and self._last_good is not None:
                self._last_good.update(self.model)
            return False, False
        reason = reason or "other_rank"
        assert self._last_good is not None
        self._last_good.restore(self.model)
        raw = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        if raw is not None:
            raw.state.clear()  # momentum buffers point the way that collapsed
        # The window's samples, and any check of the forget set, were measured on the discarded weights.
        self.window.reset()
        self._verified_at = None
        self.stopped_early = False
        self._nonfinite_streak = 0
        guard = self.guard
        if guard.on_collapse == "halve_lr" and check.halvings < guard.max_halvings and not final and raw is not None:
            action, stop = "halve_lr", False
            check.halvings += 1
            for group in raw.param_groups:
                group["lr"] = group["lr"] * 0.5
        else:
            action, stop = "stop", True
        check.events.append(GuardEvent(self.steps, reason, action, detail))
        target = "the last weights that passed" if self.monitor is not None else "the weights from before the run"
        then = (
            f"the learning rate was halved (halving {check.halvings} of {guard.max_halvings})"
            if action == "halve_lr"
            else "the run was stopped"
        )
        self.warn(
            f"JiT collapse guard at step {self.steps}: {check.describe(reason, measures)}. Restored {target}; {then}."
        )
        return True, stop

    # ------------------------------------------------------------------------------------------------------------------
    # Measuring the forget set, and the outcome
    # ------------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _measure_forget(
        self,
        forward_context: Callable[[], contextlib.AbstractContextManager[Any]] | None,
        kind: str,
    ) -> Verification:
        """The share of the forget set the current weights still recognise (a no-grad pass, booked under ``kind``;
        consecutive small batches go through the model together, up to
        :data:`~lightning_jit.core.calibration.MAX_BATCH` samples at a time).

        A sample is *recognised* when the model predicts its label (or, for unlabelled batches, the class the model
        predicted before the run). Under DDP each process measures its share of the batches and the counts are summed.
        When the stopping rule measured these same weights, that measurement is used again.
        """
        if self._verified_at is not None and self._verified_at[0] == self.steps:
            return self._verified_at[1]
        fmt, coll = self.batch_format, self.collectives
        device = self._device()
        totals = torch.zeros(4, dtype=torch.float64, device=device)  # recognised, confidence sum, n, labelled
        measured_against = "labels"
        if self.forget is not None:
            original = self._pre_run.state if self._pre_run is not None else None
            with normalization_mode(self.model, "eval"), self.cost.kind(kind):
                shares = (self._forget_share(batch, device) for batch in self.forget)
                for x, labels in _coalesced(shares, calibration.MAX_BATCH):
                    context = forward_context() if forward_context is not None else contextlib.nullcontext()
                    with context:
                        logits = fmt.logits(self.model(x), x.shape[0]).float()
                        if labels is None and original is not None:
                            measured_against = "original predictions"
                            labels = fmt.logits(torch.func.functional_call(self.model, original, (x,))).argmax(1)
                    if labels is None:
                        continue
                    labels = labels.to(logits.device)
                    probs = torch.softmax(logits, dim=1)
                    valid = (labels >= 0) & (labels < logits.shape[1])
                    labels = labels.clamp(0, logits.shape[1] - 1)
                    hit = (logits.argmax(1) == labels) & valid
                    confidence = (probs.gather(1, labels[:, None]).squeeze(1) * valid).sum().double()
                    size = torch.tensor(float(x.shape[0]), dtype=torch.float64, device=confidence.device)
                    totals += torch.stack([hit.sum().double(), confidence, size, valid.sum().double()]).to(totals)
            if coll.world_size > 1:
                totals = coll.sum(totals)
        else:
            measured_against = "last pass"
            correct, count = self.window.totals()  # already over all processes
            totals = torch.tensor([correct, float("nan"), count, count], dtype=torch.float64, device=device)
        recognised, confidence, n, labelled = (float(v) for v in totals)
        return Verification(
            outcome=Outcome.NOT_FORGOTTEN,
            n_forget=int(n),
            forget_accuracy=100.0 * recognised / labelled if labelled else None,
            forget_confidence=100.0 * confidence / labelled if labelled and math.isfinite(confidence) else None,
            target=self.target,
            measured_against=measured_against,
        )

    def _forget_share(self, batch: Any, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """This process's inputs and labels of a forget batch, on ``device``."""
        batch = _to_device(batch, device)
        x, labels = self.batch_format.forget_input(batch), self.batch_format.labels(batch)
        return self._shard_pair(x, labels) if self.collectives.split == "shard" else (x, labels)

    def _give_guard_the_probes(self) -> None:
        """Let the collapse guard watch the class probes the run holds, with the original's class of each."""
        if self.check is not None and self.probes is not None:
            self.check.class_probes = (self.probes.probes, self.probes.targets.argmax(1))

    def _recognised(
        self, x: Tensor, labels: Tensor, forward_context: Callable[[], contextlib.AbstractContextManager[Any]] | None
    ) -> tuple[float, float]:
        """How many of the held samples ``x`` the current weights give their ``labels``, and how many there are, over
        all processes (a no-grad pass in eval mode, :data:`~lightning_jit.core.calibration.MAX_BATCH` at a time,
        counted as retain cost)."""
        context = forward_context() if forward_context is not None else contextlib.nullcontext()
        hits = torch.zeros(2, dtype=torch.float64, device=x.device)
        with torch.no_grad(), normalization_mode(self.model, "eval"), context, self.cost.kind("retain"):
            for i in range(0, x.shape[0], calibration.MAX_BATCH):
                chunk = x[i : i + calibration.MAX_BATCH]
                logits = self.batch_format.logits(self.model(chunk), chunk.shape[0])
                hits[0] += (logits.argmax(1) == labels[i : i + calibration.MAX_BATCH]).sum()
                hits[1] += chunk.shape[0]
        if self.collectives.world_size > 1:
            hits = self.collectives.sum(hits)
        return float(hits[0]), float(hits[1])

    def _retain_accuracy(self, forward_context: Callable[[], contextlib.AbstractContextManager[Any]] | None) -> float:
        """The final weights' accuracy (percent) on the retain loader's samples the run held (read once at the start;
        siblings of a forgotten label excluded), over all processes."""
        assert self.retain is not None and self.retain.labels is not None
        hits, n = self._recognised(self.retain.probes, self.retain.labels, forward_context)
        return 100.0 * hits / n if n > 0 else float("nan")

    def _check_siblings(
        self,
        verification: Verification,
        forward_context: Callable[[], contextlib.AbstractContextManager[Any]] | None,
    ) -> Verification:
        """Sub-class forgetting: if a retained sample of a forgotten label (recognised by the original) is no longer
        recognised, the forgetting took the whole label with it. The weights from before the run are restored and
        the outcome is ``rolled_back``, with the reason."""
        assert self.siblings is not None and self._pre_run is not None
        hits, n = self._recognised(*self.siblings, forward_context)
        if hits == n:
            return verification
        self._pre_run.restore(self.model)
        reason = (
            f"{int(n - hits)} of {int(n)} retained sample(s) of the forgotten label(s) were no longer recognised,"
            " so the forgetting took the whole label with it (sub-class forgetting)"
        )
        return dataclasses.replace(verification, outcome=Outcome.ROLLED_BACK, reason=reason)

    def _outcome(self, measured: Verification, sample: SampleTest | None = None) -> Verification:
        """The outcome the measurement (and, for a sample request, the held-out test) supports, with the run's
        figures, settings and cost in one record."""
        target, accuracy = measured.target, measured.forget_accuracy
        guard_events = len(self.guard_events)
        reason = None
        if self.diverged:
            outcome = Outcome.DIVERGED
        elif self.unverifiable:
            outcome, reason = Outcome.UNVERIFIABLE, self._unverifiable_reason
        elif sample is not None and sample.verified:
            outcome = Outcome.FORGOTTEN
        elif sample is None and target is not None and accuracy is not None and accuracy <= target:
            outcome = Outcome.FORGOTTEN
        elif guard_events and self._pre_run is not None and self._pre_run.equals(self.model):
            outcome = Outcome.ROLLED_BACK
        else:
            outcome = Outcome.NOT_FORGOTTEN
            reason = sample.failure if sample is not None else None
        n = self.survey.n if self.survey is not None else measured.n_forget
        return Verification(
            outcome=outcome,
            n_forget=measured.n_forget,
            forget_accuracy=accuracy,
            forget_confidence=measured.forget_confidence,
            target=target,
            measured_against=measured.measured_against,
            passes=self.passes,
            guard_events=guard_events,
            monitor_accuracy=self.check.last.get("monitor_acc") if self.check is not None else None,
            cost=self.cost.report(n or None, self.settings.n_perturbations),
            settings={**self.settings.hparams(), **self.batch_format.hparams()},
            extra={"calibrated": dict(self.calibrated), "bound_reached": self.bound_reached},
            reason=reason,
            heldout_test=sample.as_dict() if sample is not None else None,
        )

    # ------------------------------------------------------------------------------------------------------------------
    # Sample requests: the held-out test
    # ------------------------------------------------------------------------------------------------------------------
    def _prepare_sample_request(self) -> None:
        """Before any update of a sample request: without held-out data, or with too few forget samples for the
        held-out test to tell a memorised set, it cannot be verified, so the run settles as ``unverifiable`` and does
        no work; otherwise, if the forget samples already look like held-out data on the original weights, there is
        nothing to undo."""
        if self.monitor is None:
            self.unverifiable = True  # the fronts say so: the wrapper raises under `strict`, the callback once
            self._unverifiable_reason = UNVERIFIABLE_REASON
            return
        test = self.sample_test_before = self._sample_test(None, keep=True)
        self.calibrated["heldout_test_before"] = test.as_dict()
        if not test.powered:  # even a memorised set would pass: nothing the run does could be verified
            self.unverifiable, self._unverifiable_reason = True, test.too_small
        self._nothing_to_do = test.passed
        if not self.unverifiable and not self._nothing_to_do:
            self._start_matching()

    def _start_matching(self) -> None:
        """The update of a sample request (:mod:`lightning_jit.core.matching`): margin targets from the scores of the
        held-out test on the original weights, and the projection off held-out margin gradients."""
        assert self._scores is not None and self.monitor is not None
        (_, _, forget_margins), (_, _, heldout_margins) = self._scores
        x, labels = self._basis_samples()
        # Memorisation lives throughout the network, not in its last layers: this update moves every parameter.
        self._scope = None
        self.calibrated.pop("updated_parameters", None)
        moving = self.params
        self.cost.detach()  # the per-sample gradients go through torch.func, which the forward hook cannot count
        with normalization_mode(self.model, self.settings.norm_policy):
            projection = HeldoutProjection.build(self.model, moving, x, labels, self.batch_format.logits)
        self.cost.attach(self.model)
        self.cost.counts["heldout"] += 3 * int(projection.basis.shape[0])
        self.matching = (MarginTargets(forget_margins, heldout_margins), projection)
        self.calibrated["heldout_directions"] = int(projection.basis.shape[0])
        if self.reference is None:
            self.reference = FrozenReference(self.original if self.original is not None else self.model)

    def _basis_samples(self) -> tuple[Tensor, Tensor]:
        """The first :data:`~lightning_jit.core.matching.MAX_BASIS` held-out samples, on the model's device (the
        same on every process)."""
        xs, ys, count = [], [], 0
        like = self.params[0]
        for batch in self.monitor or ():
            x, y = self.batch_format.input_and_labels(batch, "monitor")
            xs.append(x.to(device=like.device, dtype=like.dtype))
            ys.append(y.to(like.device).long())
            count += int(x.shape[0])
            if count >= MAX_BASIS:
                break
        return torch.cat(xs)[:MAX_BASIS], torch.cat(ys)[:MAX_BASIS]

    def _sample_test(
        self, forward_context: Callable[[], contextlib.AbstractContextManager[Any]] | None, keep: bool = False
    ) -> SampleTest:
        """The held-out test on the current weights: per-sample losses and hits of the forget set and of the
        held-out (``monitor``) data, over all processes. With ``keep``, the scores are kept for the update of a
        sample request (its margin targets and its stopping rule)."""
        assert self.forget is not None and self.monitor is not None
        original = self._pre_run.state if self._pre_run is not None else None
        forget = self._per_sample(self.forget, "forget", forward_context, original)
        heldout = self._per_sample(self.monitor, "monitor", forward_context, None)
        if keep:
            self._scores = (forget, heldout)
        return sample_test(forget[0], forget[1], heldout[0], heldout[1])

    @torch.no_grad()
    def _per_sample(
        self,
        batches: Iterable[Any],
        name: str,
        forward_context: Callable[[], contextlib.AbstractContextManager[Any]] | None,
        original: dict[str, Tensor] | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Each sample's loss (cross-entropy of its label), whether it is given its label, and its label margin, in
        eval mode (a no-grad pass booked as ``heldout``), gathered over the processes. Forget batches without labels
        are measured against the original's predictions (``original``: its weights)."""
        fmt, device = self.batch_format, self._device()
        like = self.params[0]
        losses, hits, margins = [], [], []
        with normalization_mode(self.model, "eval"), self.cost.kind("heldout"):
            coll = self.collectives
            same_everywhere = name == "monitor" or coll.split == "shard"  # else each process holds its own batches
            for index, batch in enumerate(batches):
                if coll.world_size > 1 and same_everywhere and index % coll.world_size != coll.rank:
                    continue  # every process reads the same batches and scores its share of them
                context = forward_context() if forward_context is not None else contextlib.nullcontext()
                with context:
                    if name == "monitor":
                        logits, labels = monitor_logits(self.model, fmt, batch, like)
                    else:
                        batch = _to_device(batch, device)
                        x, labels = fmt.forget_input(batch), fmt.labels(batch)
                        logits = fmt.logits(self.model(x), x.shape[0])
                        if labels is None:
                            if original is None:
                                raise JiTInputError("The forget batches carry no labels; the held-out test needs them.")
                            labels = fmt.logits(torch.func.functional_call(self.model, original, (x,))).argmax(1)
                logits = logits.float()
                labels = labels.to(logits.device).long()
                losses.append(torch.nn.functional.cross_entropy(logits, labels, reduction="none").double())
                hits.append((logits.argmax(1) == labels).double())
                margins.append(label_margin(logits, labels).double())
        scores = []
        for values in (losses, hits, margins):
            joined = torch.cat(values) if values else torch.zeros(0, dtype=torch.float64, device=device)
            scores.append(self._gather(joined))
        return scores[0], scores[1].bool(), scores[2]

    def _gather(self, values: Tensor) -> Tensor:
        """Every process's ``values`` (1-D), concatenated in rank order, on every process (through ``sum``)."""
        coll = self.collectives
        if coll.world_size <= 1:
            return values
        counts = torch.zeros(coll.world_size, dtype=torch.float64, device=values.device)
        counts[coll.rank] = values.numel()
        counts = coll.sum(counts)
        offset = int(counts[: coll.rank].sum())
        out = torch.zeros(int(counts.sum()), dtype=torch.float64, device=values.device)
        out[offset : offset + values.numel()] = values.double()
        return coll.sum(out)

    # ------------------------------------------------------------------------------------------------------------------
    # Helpers
    # ------------------------------------------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        return next((p.device for p in self.params), torch.device("cpu"))

    def _shard_pair(self, x: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
        x, labels, _ = _take_shard(x, labels, None, self.collectives.rank, self.collectives.world_size)
        return x, labels

    def _raise_if_batch_does_not_fit(
        self,
        batch: Any,
        x: Tensor,
        forward_context: Callable[[], contextlib.AbstractContextManager[Any]] | None,
        err: BaseException,
    ) -> None:
        """After an error inside the step: if the batch alone does not go through the model, say so (naming the
        batch and the model); otherwise the error was not the batch's and keeps its own type and message."""
        context = forward_context() if forward_context is not None else contextlib.nullcontext()
        try:
            with torch.no_grad(), normalization_mode(self.model, "eval"), context, self.cost.kind("other"):
                self.batch_format.logits(self.model(x[:1]), 1)
        except (RuntimeError, TypeError, JiTInputError) as fit_error:
            raise forward_failure(self.model, x, fit_error) from err
        except Exception:  # noqa: BLE001 - any other failure of the probe leaves the original error to speak
            return


def _cpu_generator(seed: int | None) -> torch.Generator | None:
    return torch.Generator().manual_seed(seed) if seed is not None else None


def _to_device(batch: Any, device: torch.device) -> Any:
    """Move the tensors of a batch to ``device`` (tuples, lists and dicts are rebuilt)."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return (
            type(batch)(_to_device(b, device) for b in batch)
            if isinstance(batch, list)
            else tuple(_to_device(b, device) for b in batch)
        )
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _coalesced(pairs: Iterable[tuple[Tensor, Tensor | None]], limit: int) -> Iterable[tuple[Tensor, Tensor | None]]:
    """Join consecutive ``(inputs, labels)`` batches into batches of up to ``limit`` samples, so that a no-grad pass
    over a loader of small batches (batch 1) takes few forward passes. Batches join only when their inputs have the same
    sample shape and dtype and all or none have labels (one per input); a batch of ``limit`` or more samples, or whose
    labels do not match its inputs one to one, goes as it is; empty ones are dropped. Every sample is scored on its
    own, so the grouping changes no result beyond float rounding.

    Example:
        >>> pairs = [(torch.zeros(1, 2), torch.zeros(1)), (torch.ones(1, 2), torch.ones(1)), (torch.ones(3, 2), None)]
        >>> [(tuple(x.shape), None if y is None else tuple(y.shape)) for x, y in _coalesced(pairs, 4)]
        [((2, 2), (2,)), ((3, 2), None)]
    """
    xs: list[Tensor] = []
    ys: list[Tensor | None] = []
    count = 0

    def joined() -> tuple[Tensor, Tensor | None]:
        labels = ys if all(y is not None for y in ys) else None
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        y = (labels[0] if len(labels) == 1 else torch.cat(labels)) if labels is not None else None  # type: ignore[arg-type]
        return x, y

    for x, labels in pairs:
        if x.shape[0] == 0:
            continue
        if labels is not None and (labels.dim() == 0 or labels.shape[0] != x.shape[0]):
            if xs:  # labels that do not match the inputs one to one are scored as the batch gave them
                yield joined()
                xs, ys, count = [], [], 0
            yield x, labels
            continue
        fits = (
            xs
            and x.shape[1:] == xs[0].shape[1:]
            and x.dtype == xs[0].dtype
            and x.device == xs[0].device
            and (labels is None) == (ys[0] is None)
            and (labels is None or labels.shape[1:] == ys[0].shape[1:])  # type: ignore[union-attr]
            and count + x.shape[0] <= limit
        )
        if xs and not fits:
            yield joined()
            xs, ys, count = [], [], 0
        xs.append(x)
        ys.append(labels)
        count += int(x.shape[0])
    if xs:
        yield joined()


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def _take_shard(
    x: Tensor, labels: Tensor | None, keys: list[Any] | None, rank: int, world_size: int
) -> tuple[Tensor, Tensor | None, list[Any] | None]:
    """Rank ``rank``'s contiguous share of a global batch: ``ceil(B / world_size)`` samples (fewer for the last)."""
    per_rank = -(-int(x.shape[0]) // max(1, int(world_size)))
    start, stop = rank * per_rank, min(int(x.shape[0]), (rank + 1) * per_rank)
    start = min(start, stop)
    return (
        x[start:stop],
        labels[start:stop] if labels is not None and labels.shape[0] == x.shape[0] else labels,
        keys[start:stop] if keys is not None else None,
    )


def _scaled_step(
    optimizer: Optimizer,
    params: list[nn.Parameter],
    scaler: torch.amp.GradScaler,
    step_optimizer: Callable[[], Any] | None,
    loss_finite: bool,
) -> bool:
    """Step through a ``GradScaler``: it skips non-finite gradients itself and still updates its scale.

    Returns whether the step was applied: the scaler lowers its scale exactly when it skips a step.
    """
    if not loss_finite and gradients_finite(params):
        # A non-finite loss with finite gradients must not be applied either: make the scaler see it, so that it
        # skips the step and lowers its scale as for any overflow.
        for p in params:
            if p.grad is not None:
                p.grad.view(-1)[:1] = float("nan")
                break
    before = float(scaler.get_scale())
    if step_optimizer is not None:
        step_optimizer()
    else:
        scaler.step(optimizer)
        scaler.update()
    return float(scaler.get_scale()) >= before


__all__ = [
    "NONFINITE_PATIENCE",
    "Collectives",
    "ForgetAccuracyWindow",
    "JiTRun",
    "StepReport",
    "divergence_hint",
]
