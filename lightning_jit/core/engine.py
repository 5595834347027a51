"""The run's life cycle: :class:`JiTRun` composes the stages of :mod:`lightning_jit.core.run`, whichever front drives
it.

:class:`JiTRun` owns a run between its first and last forget batch. Each stage owns its own state: the calibration
(:mod:`~lightning_jit.core.run.survey`), the held samples (:mod:`~lightning_jit.core.run.held`), the loss
(:mod:`~lightning_jit.core.run.loss`), divergence (:mod:`~lightning_jit.core.run.divergence`), the stopping rule and
the cost bound (:mod:`~lightning_jit.core.run.stopping`, :mod:`~lightning_jit.core.run.budget`), the collapse guard
(:mod:`~lightning_jit.core.run.rollback`), verification (:mod:`~lightning_jit.core.run.verification`) and a sample
request (:mod:`~lightning_jit.core.run.sample_request`). It knows nothing of Lightning: a front hands it the
``backward`` to call (the strategy's), the optimizer step, a forward-context factory (autocast) and the
:class:`Collectives` of its processes. :class:`~lightning_jit.lightning.module.JiTUnlearning` calls :meth:`JiTRun.step`
from ``training_step``; :class:`~lightning_jit.lightning.callback.JiTUnlearningCallback` runs :meth:`JiTRun.run_passes`.

A run::

    run = JiTRun(model, settings)
    run.start(forget_loader)                     # surveys the forget set once and calibrates what is left to it
    optimizer = run.make_optimizer()             # the calibrated normalised step, or SGD at a given `lr`
    run.run_passes(forget_loader, optimizer=optimizer, backward=lambda loss: loss.backward())  # step, end_pass, ...
    verification = run.finish(optimizer)         # the outcome, verified on the final weights
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_jit.core import matching as sample_matching
from lightning_jit.core.batch import BatchFormat, ModelInput, batch_size, index
from lightning_jit.core.cost import CostCounter
from lightning_jit.core.errors import JiTDivergenceError, JiTInputError, JiTSettingError, forward_failure
from lightning_jit.core.guard import GuardSettings
from lightning_jit.core.membership import SampleTest
from lightning_jit.core.optimizer import make_optimizer
from lightning_jit.core.outcome import JiTUnlearningFailed, Outcome, Verification
from lightning_jit.core.run import resume as run_state
from lightning_jit.core.run.budget import CostBound
from lightning_jit.core.run.collectives import Collectives, ForwardContext, within
from lightning_jit.core.run.divergence import NONFINITE_PATIENCE, Divergence, divergence_hint
from lightning_jit.core.run.held import HeldSamples
from lightning_jit.core.run.loss import LossAssembly
from lightning_jit.core.run.rollback import Rollback
from lightning_jit.core.run.sample_request import UNVERIFIABLE_REASON, SampleRequest
from lightning_jit.core.run.stopping import STOP_WINDOW, ForgetAccuracyWindow, StoppingRule
from lightning_jit.core.run.survey import Calibration
from lightning_jit.core.run.update import Update
from lightning_jit.core.run.verification import RunFigures, Verifier, outcome_of, rolled_back
from lightning_jit.core.settings import JiTSettings
from lightning_jit.core.site import site_for
from lightning_jit.core.weights import WeightSnapshot, normalization_mode, trainable_parameters
from lightning_jit.core.weights import weights_finite as _weights_finite


@dataclass
class StepReport:
    """What one step did.

    ``count`` is the size of this process's share of the forget batch; ``forget_accuracy`` is the stopping rule's
    accuracy over all processes (``None`` for unlabelled batches); ``stop`` asks the front to end the run;
    ``rolled_back`` says the guard restored earlier weights after this step.
    """

    loss: Tensor
    count: int
    forget_accuracy: float | None = None
    stop: bool = False
    rolled_back: bool = False


class JiTRun:
    """One JiT run of ``model`` on a forget set: calibration, steps, stopping rule, divergence, collapse guard, cost
    and the verified outcome.

    Args:
        model: The classifier being unlearned (updated in place). Its train/eval mode is set per step by
            ``settings.norm_policy`` and restored.
        settings: The JiT settings; those left to ``None`` are calibrated at :meth:`start`.
        batch_format: How to read the forget (and monitor) batches and the model's output.
        guard: The collapse guard's settings (``GuardSettings(enabled=False)`` turns it off).
        monitor: Held-out labelled batches the model never trained on (a validation split), never used for
            gradients: the guard watches their accuracy, and a sample request (``task="random"``) is verified against
            them (:mod:`lightning_jit.core.membership`). Without them a sample request cannot be verified: the run
            does no work and ends ``unverifiable``.
        retain: Optional batches of samples the user keeps: the model's predictions on them are held at the
            original's (``settings.retain_distillation``). Never required.
        original: The model whose outputs the retain terms hold (default: ``model`` as it is at :meth:`start`).
        collectives: How the processes split batches and agree (default: one process).
        warn: Where warnings go (the fronts pass ``rank_zero_warn``).
        info: Where notices go, e.g. which module the default site picked for token ids (the fronts pass
            ``rank_zero_info``; default: the ``lightning_jit`` logger at INFO level).

    Example:
        >>> from lightning_jit.core.settings import JiTSettings
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        >>> forget = [(torch.randn(8, 1, 4, 4), torch.zeros(8, dtype=torch.long))]
        >>> run = JiTRun(net, JiTSettings(n_perturbations=4, epochs=1))
        >>> run.start(forget)
        >>> opt = run.make_optimizer()
        >>> run.run_passes(forget, optimizer=opt, backward=lambda loss: loss.backward())
        1
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
        guard: GuardSettings | None = None,
        monitor: Iterable[Any] | None = None,
        retain: Iterable[Any] | None = None,
        original: nn.Module | None = None,
        collectives: Collectives | None = None,
        warn: Callable[[str], None] | None = None,
        info: Callable[[str], None] | None = None,
    ) -> None:
        self.model = model
        self.settings = settings
        self.batch_format = fmt = batch_format if batch_format is not None else BatchFormat()
        self.guard = guard if guard is not None else GuardSettings()
        self.monitor = monitor
        self.retain_source = retain
        self.original = original
        self.collectives = coll = collectives if collectives is not None else Collectives()
        self.warn = warn if warn is not None else _warn
        self.params = trainable_parameters(model)
        self.site = site = site_for(
            settings.perturb_at, model, announce=info
        )  # where the noise goes: the input or a module's output
        if original is not None and original is not model:
            site.follow(original)  # the frozen original's passes are perturbed and observed at the same place
        self.cost = cost = CostCounter()
        self.forget: Iterable[Any] | None = None
        # The stages, each owning its state.
        self.calibration = Calibration(settings, self.params, coll, site)
        self.held = HeldSamples(settings, fmt, cost, site)
        self.verifier = Verifier(model, fmt, cost, coll, self.params[0] if self.params else None)
        self.request = SampleRequest(monitor, self.verifier, coll)
        self.assembly = LossAssembly(settings, fmt, cost, self.calibration, self.held, self.request, coll, site)
        self.divergence = Divergence()
        self.stopping = StoppingRule()
        self.budget = CostBound(settings.max_cost, cost, watches_monitor=monitor is not None, collectives=coll)
        self.rollback = Rollback(self.guard, fmt, monitor, cost, coll, self.warn, site)
        self.update = Update(
            model, self.params, settings, fmt, cost, self.assembly, self.calibration, self.request, coll
        )
        # The life cycle's own state.
        self.steps = 0
        self.passes = 0
        self.verification: Verification | None = None
        self._pre_run: WeightSnapshot | None = None

    # ------------------------------------------------------------------------------------------------------------------
    # What the stages decided, for the fronts and the record
    # ------------------------------------------------------------------------------------------------------------------
    calibrated = property(lambda self: self.calibration.calibrated, doc="The values the run decided itself.")
    survey = property(lambda self: self.calibration.survey, doc="What the survey of the forget set found.")
    task = property(lambda self: self.calibration.task, doc="``class`` or ``random``.")
    target = property(lambda self: self.calibration.target, doc="The forget accuracy the outcome is checked against.")
    is_sample_request = property(lambda self: self.calibration.is_sample_request, doc="Whether it forgets samples.")
    sigma = property(lambda self: self.calibration.sigma, doc="The noise scale.")
    reference = property(lambda self: self.held.reference, doc="The frozen original.")
    probes = property(lambda self: self.held.probes, doc="The class probes.")
    retain = property(lambda self: self.held.retain, doc="The retain samples held at the original's predictions.")
    siblings = property(lambda self: self.held.siblings, doc="Retain samples of a forgotten label.")
    generator = property(lambda self: self.assembly.generator, doc="The noise generator.")
    check = property(lambda self: self.rollback.check, doc="The collapse guard's check.")
    guard_events = property(lambda self: self.rollback.events, doc="The collapse guard's interventions.")
    skipped_steps = property(lambda self: self.divergence.skipped_steps, doc="Steps not applied.")
    diverged = property(lambda self: self.divergence.diverged, doc="Whether the run diverged.")
    stopped_early = property(lambda self: self.stopping.stopped, doc="Whether the run stopped itself.")
    bound_reached = property(lambda self: self.budget.reached, doc="Whether ``max_cost`` ended the run.")
    window = property(lambda self: self.stopping.window, doc="The stopping rule's window.")
    matching = property(lambda self: self.request.matching, doc="A sample request's targets and projection.")
    unverifiable = property(lambda self: self.request.unverifiable, doc="A sample request that cannot be verified.")
    sample_test_before = property(lambda self: self.request.test_before, doc="The held-out test before the run.")

    @property
    def max_passes(self) -> int | None:
        """The passes over the forget set the run may make (``None``: until it stops itself)."""
        if self.settings.epochs is not None:
            return self.settings.epochs
        if self.request.matching is not None:
            return sample_matching.MAX_PASSES
        return 1 if self.task == "random" else None

    def _device(self) -> torch.device:
        return self.verifier.device

    # ------------------------------------------------------------------------------------------------------------------
    # Life cycle
    # ------------------------------------------------------------------------------------------------------------------
    def start(self, forget: Iterable[Any] | None = None, forward_context: ForwardContext = None) -> None:
        """Take the pre-run snapshot, survey the forget set and calibrate, synthesise the probes, seed the noise.

        Args:
            forget: The forget batches. They are read once here (a no-grad pass) and again to verify the outcome.
                Without them nothing can be calibrated (``sigma`` must then be given) and the outcome rests on the
                stopping rule's window.
            forward_context: As in :meth:`step`: the set-up's forward passes run under it too.
        """
        with within(forward_context):
            self._start(forget)

    def _start(self, forget: Iterable[Any] | None) -> None:
        settings, calib, held = self.settings, self.calibration, self.held
        self._pre_run = WeightSnapshot(self.model)
        self.forget = forget
        device = self._device()
        self.assembly.seed(device)
        self.cost.attach(self.model)
        original = self.original if self.original is not None else self.model
        held.setup(original, self.retain_source, device)
        if held.retain is not None:
            self.budget.retain_setup = self.cost.counts["retain"]
            calib.calibrated["retain_samples"] = batch_size(held.retain.probes)
        if forget is not None:
            survey_model = held.reference if held.reference is not None else self.batch_format.caller(self.model)
            found = calib.survey_forget(survey_model, self.model, forget, self.batch_format, self.cost, device)
            if found.structured and self.is_sample_request:
                raise JiTInputError(
                    "A sample request (`task='random'` without a target) moves the weights off held-out margin"
                    " gradients computed per sample, which take one input tensor, and the forget input is a dict or"
                    " tuple of tensors. Sample requests on such inputs are not supported yet: set `input_key` or"
                    " `batch_to_input` so that the input is one tensor, or forget whole classes (`task='class'`)."
                )
            self.stopping.resize(found.n)
            calib.scope_to(self.model)
            probes = held.synthesise(found, calib.task, device)
            if probes is not None:
                calib.calibrated["probes"] = probes
        elif settings.sigma is None:
            raise JiTSettingError("sigma", "cannot be calibrated without the forget set: give `sigma` or `forget`.")
        calib.calibrated.setdefault("task", self.task)
        calib.calibrated["target_forget_accuracy"] = self.target
        if self.is_sample_request and self.request.prepare(forget or (), self._pre_run.state, calib.calibrated):
            self._start_matching(original)
        if held.retain is not None and self.task == "class" and calib.calibrated.get("classes"):
            siblings = held.hold_out_siblings(calib.calibrated["classes"])
            if siblings is not None:
                calib.calibrated["retain_siblings"] = siblings

    def _start_matching(self, original: nn.Module) -> None:
        """A sample request's update: it moves every parameter (memorisation lives throughout the network)."""
        basis = self.request.basis_samples(self.batch_format, self.params[0])
        self.calibration.move_everything()
        directions = self.request.start_matching(
            self.model, self.params, self.batch_format, self.cost, self.settings.norm_policy, basis
        )
        self.calibration.calibrated["heldout_directions"] = directions
        self.held.ensure_reference(original)

    def make_optimizer(self) -> Optimizer:
        """The run's optimizer over every trainable parameter (the run drops the gradients outside its update scope):
        the normalised step when ``lr`` is calibrated, else plain SGD at ``lr``
        (:func:`~lightning_jit.core.optimizer.make_optimizer`)."""
        return make_optimizer(self.params, self.settings.lr)

    def run_passes(
        self,
        batches: Iterable[Any],
        *,
        optimizer: Optimizer,
        backward: Callable[[Tensor], None],
        prepare: Callable[[Any], Any] | None = None,
        on_step: Callable[[StepReport], None] | None = None,
        **step_options: Any,
    ) -> int:
        """The pass loop: :meth:`step` on each batch, :meth:`end_pass` after each pass, until the run ends.

        Args:
            batches: The forget batches, readable once per pass.
            optimizer: As in :meth:`step`.
            backward: As in :meth:`step`.
            prepare: Applied to each batch before its step (e.g. moving it to the device).
            on_step: Called with each step's report (logging, a progress bar).
            step_options: Passed to :meth:`step` (``step_optimizer``, ``scaler``, ``forward``, ``forward_context``).

        Returns:
            The passes that ran (the last may have stopped part-way).
        """
        for epoch in itertools.count():
            stop = False
            for batch in batches:
                report = self.step(
                    prepare(batch) if prepare is not None else batch,
                    optimizer=optimizer,
                    backward=backward,
                    epoch=epoch,
                    **step_options,
                )
                if on_step is not None:
                    on_step(report)
                if report.stop:
                    stop = True
                    break
            if self.end_pass(epoch) or stop:
                return epoch + 1
        raise AssertionError("unreachable")  # pragma: no cover

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
        forward_context: ForwardContext = None,
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
        if self.request.settled:
            # Settled at the start (no held-out data, or the held-out test already passes): no update.
            return StepReport(loss=torch.zeros(()), count=0, stop=True)
        # Every forward of the core takes the model's input as one argument: a dict or tuple input is unpacked here.
        forward = self.batch_format.caller(forward if forward is not None else self.model)
        x = self.batch_format.forget_input(batch, structured=True)
        self.site.admit(x)  # the input site refuses an input it cannot perturb (a dict, token ids), naming the fix
        try:
            if self.rollback.check is not None and not self.rollback.check.begun:
                self.rollback.watch_probes(self.held.probes)
                self.rollback.begin(self.model, x, forward_context, self._pre_run)
            loss, applied, correct, count = self.update(
                batch,
                forward=forward,
                optimizer=optimizer,
                backward=backward,
                epoch=epoch,
                step_optimizer=step_optimizer,
                scaler=scaler,
                forward_context=forward_context,
            )
        except (RuntimeError, TypeError) as err:
            self._raise_if_batch_does_not_fit(x, forward_context, err)
            raise
        self.steps += 1
        report = StepReport(loss=loss, count=count)
        if not applied:
            self.warn(
                f"JiT step {self.steps} skipped: the loss or gradients were not finite"
                f" ({self.divergence.skipped_steps + 1} skipped so far). A smaller `lr` or a larger `sigma` may help."
            )
        scaled = scaler is not None and scaler.is_enabled()
        finite_weights = not applied or _weights_finite(self.model)
        reason = self.divergence.after_step(
            applied=applied, loss_finite=bool(torch.isfinite(loss)), scaled=scaled, weights_finite=finite_weights
        )
        if reason is not None:
            self._diverge(f"JiT diverged at step {self.steps}: {reason}.")
        if applied and self.steps == 1 and float(loss) == 0.0:
            self.warn(
                "The JiT loss is exactly 0, so JiT changes nothing: every perturbation was rounded or clamped away."
                f" Increase `sigma` (now {self.sigma:g}) or relax `clamp` (now {self.settings.clamp!r})."
            )
        if correct is not None:
            step = self.collectives.sum(torch.tensor([correct, count], dtype=torch.float64, device=self._device()))
            measure = (
                (lambda: self._measure_forget(forward_context, "stopping_rule")) if self.forget is not None else None
            )
            report.forget_accuracy = self.stopping.update(
                int(step[0]), int(step[1]), target=self.target, measure=measure, step=self.steps
            )
            report.stop = self.stopping.stopped
        if not report.stop and self.budget.over(self.survey.n if self.survey is not None else None, self._device()):
            self.budget.reached = report.stop = True
        if self.rollback.due(self.steps):
            rolled, stop = self._guard_check(optimizer, forward_context, final=False)
            if rolled:
                report.rolled_back, report.stop = True, stop
        return report

    def _guard_check(
        self, optimizer: Optimizer | None, forward_context: ForwardContext, final: bool
    ) -> tuple[bool, bool]:
        """The guard's check; after a rollback, what was measured on the discarded weights is discarded too."""
        verdict = self.rollback.run_check(self.model, optimizer, forward_context, self.steps, final)
        if verdict.diverged:
            self._diverge(f"JiT diverged at step {self.steps}: the model's outputs or weights became NaN/Inf.")
        if verdict.rolled_back:
            self.stopping.discard()
            self.divergence.streak = 0
        return verdict.rolled_back, verdict.stop

    def _diverge(self, message: str) -> None:
        self.divergence.diverged = True
        self.abort()
        raise JiTDivergenceError(
            f"{message} The weights from before the run were restored bit for bit. {divergence_hint(self.settings)}"
        )

    def end_pass(self, epoch: int) -> bool:
        """Call after each pass over the forget set. Returns whether the run must end: its pass bound is reached, or
        (a sample request) the forget set passed the held-out test on the scores measured during the pass."""
        self.passes += 1
        if self.request.matching is not None and self.request.matched_during_pass():
            self.stopping.stopped = True
            return True
        return self.max_passes is not None and epoch + 1 >= self.max_passes

    def finish(
        self, optimizer: Optimizer | None = None, forward_context: ForwardContext = None, *, strict: bool = False
    ) -> Verification:
        """End the run: the guard's last check (unless the last step was checked), then the verification.

        The forget set given to :meth:`start` is read once more to verify the final weights (unless the stopping rule
        just did so on these weights; a sample request reads it once, for its held-out test, and not at all when it
        made no update). Without it the claim rests on the stopping rule's window, measured before each update
        (weaker: the record says so).

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
        check = self.rollback.check
        if check is not None and check.begun and self.steps % self.guard.check_every != 0:
            self._guard_check(optimizer, forward_context, final=True)
        # An error or an interruption up to here leaves the run unfinished: the front's `abort` restores the weights.
        sample = None
        if self.is_sample_request and self.monitor is not None:
            original = self._pre_run.state if self._pre_run is not None else None
            measured, sample = self.request.verify(self.forget or (), forward_context, original)
        else:
            measured = self._measure_forget(forward_context, "verification")
        verification = self._outcome(measured, sample)
        if verification.outcome is Outcome.FORGOTTEN and self.held.siblings is not None:
            reason = self.verifier.siblings_lost(self.held.siblings, forward_context)
            if reason is not None:
                assert self._pre_run is not None
                self._pre_run.restore(self.model)
                verification = rolled_back(verification, reason)
        retain = self.held.retain
        if retain is not None and retain.labels is not None:
            hits, n = self.verifier.recognised(retain.probes, retain.labels, forward_context)
            verification.retain_accuracy = 100.0 * hits / n if n > 0 else float("nan")
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

    def _measure_forget(self, forward_context: ForwardContext, kind: str) -> Verification:
        """The forget set measured on the current weights (:meth:`Verifier.measure_forget`); the stopping rule's
        measurement when it measured these same weights; the stopping rule's window without a forget set."""
        measured = self.stopping.measured_at(self.steps)
        if measured is not None:
            return measured
        if self.forget is None:
            return Verifier.from_window(*self.stopping.window.totals(), self.target)  # already over all processes
        original = self._pre_run.state if self._pre_run is not None else None
        return self.verifier.measure_forget(self.forget, original, forward_context, kind, target=self.target)

    def _outcome(self, measured: Verification, sample: SampleTest | None = None) -> Verification:
        """The outcome the measurement (and, for a sample request, the held-out test) supports, with the run's
        figures, settings and cost in one record."""
        request = self.request
        figures = RunFigures(
            diverged=self.diverged,
            unverifiable=request.unverifiable,
            unverifiable_reason=request.unverifiable_reason,
            guard_events=len(self.guard_events),
        )
        figures.rolled_back_to_start = bool(figures.guard_events) and self._is_pre_run()
        outcome, reason = outcome_of(measured, figures, sample)
        n = self.survey.n if self.survey is not None else measured.n_forget
        check = self.rollback.check
        return Verification(
            outcome=outcome,
            n_forget=measured.n_forget,
            forget_accuracy=measured.forget_accuracy,
            forget_confidence=measured.forget_confidence,
            forget_entropy=measured.forget_entropy,
            target=measured.target,
            measured_against=measured.measured_against,
            passes=self.passes,
            guard_events=figures.guard_events,
            monitor_accuracy=check.last.get("monitor_acc") if check is not None else None,
            cost=self.cost.report(n or None, self.settings.n_perturbations),
            settings={**self.settings.hparams(), **self.batch_format.hparams()},
            extra={"calibrated": dict(self.calibrated), "bound_reached": self.bound_reached},
            reason=reason,
            heldout_test=sample.as_dict() if sample is not None else None,
        )

    def _is_pre_run(self) -> bool:
        """Whether the model holds the weights from before the run."""
        return self._pre_run is not None and self._pre_run.equals(self.model)

    def abort(self) -> bool:
        """Restore the weights from before the run (after an error or an interruption), unless the run has
        finished. Returns whether it did."""
        self.cost.detach()
        if self._pre_run is None:
            return False
        self._pre_run.restore(self.model)
        return True

    # ------------------------------------------------------------------------------------------------------------------
    # Resuming
    # ------------------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any] | None:
        """Everything a run in progress needs to go on bit for bit after a restart: each stage's own state, the
        weights from before the run, the counters and the cost. ``None`` when no run is in progress (before
        :meth:`start`, after :meth:`finish`)."""
        if self._pre_run is None:
            return None
        return {
            "version": run_state.RUN_STATE_VERSION,
            "life_cycle": {
                "pre_run": self._pre_run.state,
                "steps": self.steps,
                "passes": self.passes,
                "cost": dict(self.cost.counts),
            },
            "calibration": self.calibration.state_dict(),
            "held": self.held.state_dict(),
            "loss": self.assembly.state_dict(),
            "divergence": self.divergence.state_dict(),
            "stopping": self.stopping.state_dict(),
            "budget": self.budget.state_dict(),
            "rollback": self.rollback.state_dict(),
            "sample_request": self.request.state_dict() if self.is_sample_request else None,
        }

    def resume(self, state: dict[str, Any], forget: Iterable[Any] | None = None) -> None:
        """Go on with a run from its :meth:`state_dict` (instead of :meth:`start`; a state of lightning-jit 0.2 is
        read too): nothing is surveyed or synthesised again, and the weights from before the run stay those of the
        first start."""
        state = run_state.upgrade(state)
        device = self._device()
        life = state["life_cycle"]
        self.forget = forget
        self._pre_run = WeightSnapshot.from_state(life["pre_run"], device)
        original = self.original if self.original is not None else self.model
        self.held.load_state_dict(state["held"], original, device)
        self.calibration.load_state_dict(state["calibration"])
        self.assembly.load_state_dict(state["loss"], device)
        self.steps, self.passes = int(life["steps"]), int(life["passes"])
        self.divergence.load_state_dict(state["divergence"])
        self.stopping.load_state_dict(state["stopping"])
        self.budget.load_state_dict(state["budget"])
        self.cost.counts.update(life["cost"])
        self.rollback.watch_probes(self.held.probes)
        self.rollback.load_state_dict(state["rollback"], self._pre_run, device)
        if state["sample_request"] is not None:
            self.request.load_state_dict(state["sample_request"], self.params, device)
        self.cost.attach(self.model)

    # ------------------------------------------------------------------------------------------------------------------
    # Results
    # ------------------------------------------------------------------------------------------------------------------
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
            "guard": self.rollback.report(),
            "verification": self.verification.as_dict() if self.verification is not None else None,
        }

    def _raise_if_batch_does_not_fit(self, x: ModelInput, forward_context: ForwardContext, err: BaseException) -> None:
        """After an error inside the step: if the batch alone does not go through the model, say so (naming the
        batch and the model); otherwise the error was not the batch's and keeps its own type and message."""
        try:
            with (
                torch.no_grad(),
                normalization_mode(self.model, "eval"),
                within(forward_context),
                self.cost.kind("other"),
            ):
                self.batch_format.logits(self.batch_format.call(self.model, index(x, slice(0, 1))), 1)
        except (RuntimeError, TypeError, JiTInputError) as fit_error:
            raise forward_failure(self.model, x, fit_error) from err
        except Exception:  # noqa: BLE001 - any other failure of the probe leaves the original error to speak
            return


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


__all__ = [
    "NONFINITE_PATIENCE",
    "STOP_WINDOW",
    "UNVERIFIABLE_REASON",
    "Collectives",
    "ForgetAccuracyWindow",
    "JiTRun",
    "StepReport",
    "divergence_hint",
]
