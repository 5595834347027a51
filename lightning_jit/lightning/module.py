"""``JiTUnlearning``: a LightningModule that takes over a trained model and unlearns a forget set with JiT."""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from torchmetrics.functional.classification import multiclass_accuracy

from lightning_jit.core.batch import BatchFormat
from lightning_jit.core.engine import JiTRun
from lightning_jit.core.guard import GuardSettings, check_monitor
from lightning_jit.core.optimizer import make_optimizer
from lightning_jit.core.outcome import JiTOutcomeWarning, Outcome, Verification
from lightning_jit.core.settings import JiTSettings, split_settings
from lightning_jit.core.weights import trainable_parameters
from lightning_jit.io import json_safe
from lightning_jit.lightning.checkpoint import (
    JIT_RUN_STATE_KEY,
    JIT_UNVERIFIED_KEY,
    AtomicCheckpointIO,
    AtomicCheckpoints,
    forget_removed_checkpoints,
    from_wrapped_format,
    settle_unverified,
    to_wrapped_format,
)
from lightning_jit.lightning.data import FirstBatches
from lightning_jit.lightning.distributed import (
    check_strategy,
    check_strategy_support,
    collectives,
    gradient_scaler,
    shard_model,
)


class JiTUnlearning(pl.LightningModule):
    r"""Unlearn a forget set from a trained classifier with JiT, by ``trainer.fit(unlearner, forget_loader)``.

    For every forget batch, JiT draws ``n_perturbations`` perturbations of std ``sigma`` and takes one step on the
    local Lipschitz estimate ``||f(x) - f(x + xi)|| / ||xi||`` (:mod:`lightning_jit.core.objective`). Only the forget
    set is needed; an optional ``retain`` loader of data you keep is used when given. Each step is
    :meth:`lightning_jit.core.engine.JiTRun.step`, the one
    :class:`~lightning_jit.lightning.callback.JiTUnlearningCallback` runs, with the Trainer's strategy, precision
    plugin and backward.

    Differences from the authors' reference implementation, which this class fixes:

    * **Gradients are zeroed at every step.** The reference calls ``zero_grad`` once before its loop, so gradients
      pile up from batch to batch.
    * **An explicit normalisation policy.** The reference never sets the model's mode, so dropout stays active and
      BatchNorm updates its running statistics on noise. ``norm_policy="eval"`` (the default) keeps them frozen.
    * The perturbed copies go through the model in batched no-grad passes instead of ``N`` separate passes.

    At the end of the run the forget set is read once more and the claim is verified on the final weights:
    ``unlearner.outcome`` is an :class:`~lightning_jit.core.outcome.Outcome` (only ``forgotten`` is success) and
    ``unlearner.verification`` holds the figures. Any other outcome is a warning (an error with ``strict=True``).

    Steps whose loss or gradients are not finite are skipped and counted in ``skipped_steps``, never applied.
    Non-finite weights, repeated non-finite steps, an exception, Ctrl+C or SIGTERM restore the weights from before
    the run bit for bit; the collapse guard (:class:`~lightning_jit.core.guard.GuardSettings`) is on by default.

    A run that does not end ``forgotten`` restores the weights from before the run (``on_unverified="restore"``,
    the default) or keeps its partial progress (``on_unverified="keep"``); ``verification.restored`` says which.

    **Nothing unverified on disk.** Once a run has ended, checkpoints are in the wrapped model's own format, with
    the verification record: ``OriginalClass.load_from_checkpoint(path, strict=True)`` loads a checkpoint written by
    ``trainer.save_checkpoint``. A checkpoint the Trainer writes while the run is in progress (a ``ModelCheckpoint``
    at the end of a pass) stays in the wrapper's own format, marked unverified, which ``OriginalClass`` refuses; it
    holds the run's state, so ``trainer.fit(unlearner, ..., ckpt_path=path)`` resumes it. When the run ends, a file
    that holds the verified weights of a ``forgotten`` run is rewritten in the model's format with the record; every
    other file written during the run is removed (one info line names them). After an interruption (an exception,
    Ctrl+C) they stay, as resume points. Only rank 0 touches the files.

    Args:
        model: The trained classifier: a LightningModule or a plain ``nn.Module`` returning logits.
        settings: The JiT settings (:class:`~lightning_jit.core.settings.JiTSettings`). Its fields may also be given
            as keyword arguments, which override it: ``JiTUnlearning(model, sigma=0.1, lr=0.03)``.
        batch_format: How batches and outputs are read (:class:`~lightning_jit.core.batch.BatchFormat`); its fields
            (``input_key``, ``label_key``, ``output_selector``, ``batch_to_input``) may be keyword arguments too.
        guard: The collapse guard: ``True`` (default), ``False``, or a configured
            :class:`~lightning_jit.core.guard.GuardSettings`; its fields (``check_every``, ``on_collapse``,
            ``max_drop``...) may be keyword arguments too.
        monitor: Optional loader of labelled held-out data the model never trained on (e.g. the validation split).
            It is only evaluated, never used for gradients: the guard watches its accuracy, and a request that names
            individual samples (``task="random"``) is verified against it: the forget samples must be
            indistinguishable from it (:mod:`lightning_jit.core.membership`). Without it such a request cannot be
            verified: the run makes no update and ends ``unverifiable`` (``strict=True`` raises before any step).
        retain: Optional loader of samples you keep (a validation split, a small sample of the training data). Never
            required: without it the run is zero-shot. With it, the model's predictions on them are held at the
            original's (``retain_distillation``). Its first ``MAX_RETAIN`` inputs are read once.
        original: The model whose outputs the retain terms hold (default: ``model`` as it is when training starts).
            Give the original when a run continues from partly unlearned weights.
        optimizer: Optional factory ``params -> Optimizer`` to replace JiT's own update (the calibrated normalised
            step, or plain SGD at a given ``lr``).
        compile_model: Run the step's forward passes through ``torch.compile(model)`` (``True``, or a dict of
            ``torch.compile`` keyword arguments). It pays off only for large batches (``docs/results/``). The
            weights, checkpoints and ``unlearner.model`` stay the uncompiled module's.
        strict: Raise :class:`~lightning_jit.core.outcome.JiTUnlearningFailed` from ``trainer.fit``, after restoring
            the weights from before the run, when the verified outcome is not ``forgotten``. By default a warning
            says so and ``unlearner.outcome`` tells.
        settings_kwargs: Fields of ``JiTSettings``, ``BatchFormat`` or ``GuardSettings``.

    Example:
        >>> import torch, lightning.pytorch as pl
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
        >>> forget = DataLoader(TensorDataset(torch.randn(8, 1, 4, 4), torch.zeros(8, dtype=torch.long)), batch_size=4)
        >>> unlearner = JiTUnlearning(net, JiTSettings(sigma=0.5, lr=0.01))
        >>> trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                      enable_model_summary=False)
        >>> trainer.fit(unlearner, train_dataloaders=forget)
        >>> unlearner.model is net, unlearner.outcome.value  # one pass and no target: nothing can be claimed
        (True, 'not_forgotten')
        >>> unlearner.verification.n_forget, unlearner.verification.measured_against
        (8, 'labels')
    """

    def __init__(
        self,
        model: nn.Module,
        settings: JiTSettings | None = None,
        *,
        batch_format: BatchFormat | None = None,
        guard: bool | GuardSettings = True,
        monitor: Iterable[Any] | None = None,
        retain: Iterable[Any] | None = None,
        original: nn.Module | None = None,
        optimizer: Callable[[Iterable[nn.Parameter]], Optimizer] | None = None,
        compile_model: bool | dict[str, Any] = False,
        strict: bool = False,
        **settings_kwargs: Any,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise MisconfigurationException(
                f"`model` must be a trained torch.nn.Module or LightningModule, got {type(model).__name__}."
            )
        if not trainable_parameters(model):
            raise MisconfigurationException(
                "`model` has no trainable parameters (all have requires_grad=False), so JiT cannot change it."
                " Unfreeze the layers JiT should update, e.g. `model.requires_grad_(True)`."
            )
        if optimizer is not None and not callable(optimizer):
            raise MisconfigurationException("`optimizer` must be a callable `params -> torch.optim.Optimizer`.")
        if original is not None and not isinstance(original, nn.Module):
            raise MisconfigurationException("`original` must be an nn.Module (the model before unlearning) or None.")
        if not isinstance(compile_model, (bool, dict)):
            raise MisconfigurationException(
                f"`compile_model` must be True, False or a dict of torch.compile arguments, got {compile_model!r}."
            )
        self.settings, self.batch_format, self.guard = split_settings(settings, batch_format, guard, settings_kwargs)
        self.batch_format = self.batch_format.for_model(model)  # the class count a tuple output's logits are found by
        self.monitor = check_monitor(monitor)
        self.retain = check_monitor(retain, "retain")
        self.model = model
        self._original = [original] if original is not None else []  # a list: no submodule, no state_dict entry
        self._optimizer_factory = optimizer
        self._compile_options = compile_model
        self.strict = bool(strict)
        self._validates = True  # whether `validation_step` is the wrapper's (decided per Trainer call)
        self._compiled: list[Callable[..., Any]] = []  # a list, so that the compiled module is no submodule
        self._modes_before_fit: list[tuple[nn.Module, bool]] = []
        self.automatic_optimization = False
        self.run: JiTRun | None = None
        #: The verification rank 0 sent back to a launching process that ran no run itself (``ddp_spawn``).
        self._from_rank_zero: Verification | None = None
        self._resume_state: dict[str, Any] | None = None
        self.save_hyperparameters(
            {**self.settings.hparams(), **self.batch_format.hparams(), "guard": dataclasses.asdict(self.guard)}
        )

    @property
    def unlearning_target(self) -> nn.Module:
        """The model being unlearned (the protocol evaluation code uses to find it)."""
        return self.model

    # ------------------------------------------------------------------------------------------------------------------
    # Results of the last run
    # ------------------------------------------------------------------------------------------------------------------
    @property
    def outcome(self) -> Outcome | None:
        """How the last run ended, verified (see :class:`~lightning_jit.core.outcome.Outcome`); ``None`` before."""
        if self.run is not None:
            return self.run.outcome
        return self._from_rank_zero.outcome if self._from_rank_zero is not None else None

    @property
    def verification(self) -> Verification | None:
        """What the end-of-run check measured (:class:`~lightning_jit.core.outcome.Verification`). Under a launcher
        that runs the fit in other processes (``ddp_spawn``), the launching process gets rank 0's."""
        return self.run.verification if self.run is not None else self._from_rank_zero

    def get_extra_state(self) -> dict[str, Any]:
        """The verified outcome of the finished run, as JSON-ready values. It travels with the weights that a
        spawning launcher sends back to the launching process (:meth:`set_extra_state`); checkpoints in the wrapped
        model's format leave it out (they hold the record under their own key)."""
        verification = self.run.verification if self.run is not None else self._from_rank_zero
        return {"verification": json_safe(verification.as_dict())} if verification is not None else {}

    def set_extra_state(self, state: Any) -> None:
        if isinstance(state, dict) and state.get("verification") is not None:
            self._from_rank_zero = Verification.from_dict(state["verification"])

    @property
    def skipped_steps(self) -> int:
        return self.run.skipped_steps if self.run is not None else 0

    @property
    def stopped_early(self) -> bool:
        return bool(self.run is not None and self.run.stopped_early)

    def safety_report(self) -> dict[str, Any]:
        """The outcome, skipped steps and the collapse guard's report (thresholds, measurements, events), for audits."""
        if self.run is None:
            return {"outcome": None, "skipped_steps": 0, "guard": None}
        return self.run.safety_report()

    # ------------------------------------------------------------------------------------------------------------------
    # Lightning hooks
    # ------------------------------------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def configure_optimizers(self) -> Optimizer:
        params = trainable_parameters(self.model)
        if self._optimizer_factory is not None:
            return self._optimizer_factory(params)
        return make_optimizer(params, self.settings.lr)

    def configure_callbacks(self) -> list[pl.Callback]:
        # Lightning calls this in every `trainer.fit/validate/...` before it checks the loops: the moment to say
        # whether there is a validation step, so that a fit without a val loader is not warned about one.
        self._validates = self._trainer is None or _val_loader_given(self.trainer)
        if self._trainer is not None:  # before the strategy sets up its processes' mesh (again in `setup`)
            check_strategy_support(self.trainer.strategy, type(self).__name__)
        return [_RollbackOnError(), AtomicCheckpoints()]

    def setup(self, stage: str) -> None:
        check_strategy(self.trainer, type(self).__name__)
        if stage == "fit" and not isinstance(self.trainer.strategy.checkpoint_io, AtomicCheckpointIO):
            rank_zero_warn(
                f"The Trainer's checkpoint IO ({type(self.trainer.strategy.checkpoint_io).__name__}) is not"
                " AtomicCheckpointIO, so the checkpoints written while the JiT run is in progress cannot be settled"
                " when it ends: they stay in the wrapper's own unverified format, which your model's class refuses."
                " Save the result with `trainer.save_checkpoint` after a `forgotten` run."
            )
        if self._compile_options is not False and not self._compiled:
            options = self._compile_options if isinstance(self._compile_options, dict) else {}
            self._compiled.append(torch.compile(self.model, **options))

    def configure_model(self) -> None:
        # Under ModelParallelStrategy (FSDP2, checked in `setup`): shard the model, unless the user already did.
        if self._trainer is not None and isinstance(self.trainer.strategy, ModelParallelStrategy):
            shard_model(self.model, self.device_mesh["data_parallel"])

    def on_fit_start(self) -> None:
        # The run sets the mode it needs for every pass (`norm_policy`); a model that arrives in eval mode (as a
        # trained one often does) would only make Lightning warn. Its modes are put back when the fit ends.
        self._modes_before_fit = [(m, m.training) for m in self.model.modules()]
        self.train()

    def _restore_modes(self) -> None:
        for module, training in self._modes_before_fit:
            module.train(training)
        self._modes_before_fit = []

    def on_fit_end(self) -> None:
        self._restore_modes()
        # Lightning skips the whole training loop (and `on_train_start`) when the loader has no batch.
        if self.trainer.num_training_batches == 0:
            raise MisconfigurationException(
                "The forget loader passed as `train_dataloaders` is empty: there is nothing to unlearn."
                " Check the forget-set selection (and `limit_train_batches`)."
            )

    def on_train_start(self) -> None:
        max_epochs, epochs = self.trainer.max_epochs, self.settings.epochs
        if max_epochs is not None and epochs is not None and 0 <= max_epochs < epochs:
            rank_zero_warn(
                f"The Trainer's max_epochs={max_epochs} is smaller than JiTUnlearning(epochs={epochs}); only"
                f" {max_epochs} pass(es) over the forget set will run. `max_epochs=-1` lets the run stop itself."
            )
        self.run = JiTRun(
            self.model,
            self.settings,
            batch_format=self.batch_format,
            guard=self.guard,
            monitor=self.monitor,
            retain=self.retain,
            original=self._original[0] if self._original else None,
            collectives=collectives(self.trainer, self.trainer.train_dataloader, type(self).__name__),
            warn=rank_zero_warn,
            info=rank_zero_info,
        )
        io = self._atomic_io()
        if io is not None:
            io.unverified_paths.clear()  # what an earlier, interrupted fit left is not this run's to settle
        if self._resume_state is not None:  # a run restarted from its own checkpoint goes on where it stopped
            self.run.resume(self._resume_state, self._forget_batches())
            self._resume_state = None
        else:
            self.run.start(self._forget_batches(), self.trainer.precision_plugin.forward_context)
        if self.run.unverifiable and self.strict:  # a sample request without held-out data: say so before any step
            self.run.finish(strict=True)

    def _forget_batches(self) -> Iterable[Any]:
        """The forget set as one pass of the Trainer reads it: ``limit_train_batches`` bounds the calibration survey
        as it bounds the pass, so a stream without end is surveyed over the batches the run will see."""
        loader, batches = self.trainer.train_dataloader, self.trainer.num_training_batches
        if math.isinf(batches):
            raise MisconfigurationException(
                "The forget loader has no length and `Trainer(limit_train_batches=...)` is not an integer, so a pass"
                " over the forget set would never end. Give a sized forget set or an integer `limit_train_batches`."
            )
        return FirstBatches(loader, int(batches))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        assert self.run is not None
        optimizer = self.optimizers()
        report = self.run.step(
            batch,
            optimizer=optimizer,
            backward=self.manual_backward,
            epoch=self.current_epoch,
            step_optimizer=optimizer.step,
            scaler=gradient_scaler(self.trainer),
            forward=self._compiled[0] if self._compiled else self.model,
        )
        self.log("jit_loss", report.loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=max(1, report.count))
        if report.forget_accuracy is not None:
            self.log(
                "jit_forget_acc",
                report.forget_accuracy,
                prog_bar=True,
                on_step=True,
                on_epoch=False,
                rank_zero_only=True,
            )
        if report.stop:
            self.trainer.should_stop = True
        elif report.rolled_back:
            self.trainer.should_stop = False
        return report.loss

    def _validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        """Validation during unlearning (``trainer.fit(unlearner, forget, val)`` or ``trainer.validate(unlearner,
        val)``): the wrapped model's own ``validation_step`` when it has one (it logs through this Trainer), else the
        accuracy of labelled batches, logged as ``val_acc`` (percent). It is the wrapper's ``validation_step`` only
        when a fit is given a val loader (or for ``trainer.validate``), so that a fit without one is not warned about
        a validation step it does not need."""
        model = self.model
        if isinstance(model, pl.LightningModule) and is_overridden("validation_step", model, pl.LightningModule):
            previous, model._current_fx_name = model._current_fx_name, self._current_fx_name
            try:
                if "dataloader_idx" in inspect.signature(model.validation_step).parameters:
                    return model.validation_step(batch, batch_idx, dataloader_idx=dataloader_idx)
                return model.validation_step(batch, batch_idx)
            finally:
                model._current_fx_name = previous
        x, y = self.batch_format.input_and_labels(batch, "validation", structured=True)
        logits = self.batch_format.model_logits(model, x)
        y = y.to(logits.device)
        accuracy = multiclass_accuracy(logits, y, logits.shape[1], average="micro", validate_args=False) * 100.0
        self.log("val_acc", accuracy, prog_bar=True, batch_size=int(y.shape[0]))
        return None

    def on_train_epoch_end(self) -> None:
        if self.run is not None:
            # Once per pass, not per step (every `self.log` call has a fixed cost in Lightning's result collection):
            # the count only grows, so its value at the end of the pass is the pass's maximum.
            self.log("jit_skipped_steps", float(self.run.skipped_steps), on_step=False, on_epoch=True)
        if self.run is not None and self.run.end_pass(self.current_epoch):
            self.trainer.should_stop = True

    def on_train_end(self) -> None:
        # Lightning calls it after every epoch-end save (ModelCheckpoint is a monitoring callback, called after this
        # module's `on_train_epoch_end`) and after the callbacks' `on_train_end` (ModelCheckpoint's `save_last`).
        if self.run is None:
            return
        try:
            verification = self.run.finish(
                self.optimizers(), self.trainer.precision_plugin.forward_context, strict=self.strict
            )
        finally:
            self._settle_checkpoints()
        self.trainer.strategy.barrier("JiTUnlearning.settle_checkpoints")  # rank 0's files are settled for all
        if verification.outcome.succeeded:
            rank_zero_info(f"JiT: {verification.verdict}.")
        else:
            rank_zero_warn(f"JiT: {verification.verdict}. {verification.advice}", category=JiTOutcomeWarning)

    def _abort_run(self, exception: BaseException) -> None:
        """Restore the weights from before the run after an exception (called by the rollback callback)."""
        self._restore_modes()
        if self.run is not None and self.run.abort():
            rank_zero_warn(
                f"JiT unlearning was interrupted by {type(exception).__name__}; the model's weights were restored to"
                " their values before the run."
            )
        self._settle_checkpoints()

    def discard_unverified_checkpoints(self) -> list[str]:
        """Remove the checkpoints the Trainer wrote while the last run was in progress and that were not settled
        (an interrupted run leaves them as resume points). Rank 0 removes them; returns what it removed.

        Example:
            >>> JiTUnlearning(torch.nn.Linear(2, 2)).discard_unverified_checkpoints()  # not attached: nothing to do
            []
        """
        io = self._atomic_io()
        if io is None or not io.unverified_paths:
            return []
        paths, io.unverified_paths = list(io.unverified_paths), []
        _, removed = settle_unverified(io, paths, None, lambda checkpoint: None)
        if removed:
            forget_removed_checkpoints(self.trainer, removed)
            rank_zero_info(f"JiT: removed {len(removed)} unverified checkpoint(s) of the interrupted run: {removed}")
        return removed

    def _atomic_io(self) -> AtomicCheckpointIO | None:
        io = self.trainer.strategy.checkpoint_io if self._trainer is not None else None
        return io if isinstance(io, AtomicCheckpointIO) else None

    def _settle_checkpoints(self) -> None:
        """Settle the checkpoints written while the run was in progress, once it has an outcome: rewrite in the
        model's format (with the verification record) those that hold the verified weights of a ``forgotten`` run,
        remove every other one. A run without an outcome (interrupted) leaves them, as resume points."""
        io, outcome = self._atomic_io(), self.outcome
        if io is None or not io.unverified_paths:
            return
        if outcome is None:
            rank_zero_info(
                "JiT: the run was interrupted; the checkpoint(s) written during it stay as resume points, in the"
                f" wrapper's unverified format (`trainer.fit(unlearner, ..., ckpt_path=...)`): {io.unverified_paths}"
            )
            return
        paths, io.unverified_paths = list(io.unverified_paths), []
        verified = self.state_dict() if outcome is Outcome.FORGOTTEN else None
        rewritten, removed = settle_unverified(io, paths, verified, self._as_result)
        if removed:
            forget_removed_checkpoints(self.trainer, removed)
            rank_zero_info(
                f"JiT: removed {len(removed)} checkpoint(s) written during the run, which do not hold verified"
                f" weights (outcome {outcome.value}): {removed}"
            )
        if rewritten:
            rank_zero_info(f"JiT: rewrote {rewritten} in the model's own format, with the verification record.")

    # ------------------------------------------------------------------------------------------------------------------
    # Checkpoints in the wrapped model's own format
    # ------------------------------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rewrite the checkpoint so that it is the wrapped model's: no ``model.`` prefix, the model's hparams, the
        safety report with the verification.

        A checkpoint saved while the run is in progress (e.g. by a ``ModelCheckpoint`` at the end of a pass) is not a
        result: it stays in the wrapper's own format (the ``model.`` prefix, which the model's class refuses), marked
        :data:`~lightning_jit.lightning.checkpoint.JIT_UNVERIFIED_KEY`, with the run's state, so that
        ``trainer.fit(..., ckpt_path=...)`` goes on bit for bit. It is settled when the run ends."""
        state = self.run.state_dict() if self.run is not None else None
        if state is not None:
            checkpoint[JIT_RUN_STATE_KEY] = state
            checkpoint[JIT_UNVERIFIED_KEY] = {
                "reason": "written while a JiT run was in progress: a resume point of the wrapper, not a result",
                "steps": self.run.steps if self.run is not None else 0,
            }
            return
        to_wrapped_format(checkpoint, self.model, self.settings, self.batch_format, self.safety_report())

    def _as_result(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint written during a ``forgotten`` run that holds its final weights, as a result: the model's
        format, the verification record, no run state and no marker."""
        checkpoint.pop(JIT_RUN_STATE_KEY, None)
        checkpoint.pop(JIT_UNVERIFIED_KEY, None)
        to_wrapped_format(checkpoint, self.model, self.settings, self.batch_format, self.safety_report())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Accept checkpoints in the wrapped model's format (as written by :meth:`on_save_checkpoint`), and keep the
        state of a run in progress to resume it."""
        from_wrapped_format(checkpoint)
        self._resume_state = checkpoint.get(JIT_RUN_STATE_KEY)


class _ValidationStep:
    """``JiTUnlearning.validation_step``: the wrapper's ``_validation_step`` when the Trainer has a val loader to run
    (or validates), else LightningModule's own (so that Lightning sees no validation step and does not warn)."""

    def __get__(self, instance: Any, owner: type) -> Any:
        if instance is None or not instance.__dict__.get("_validates", True):
            return pl.LightningModule.validation_step.__get__(instance, owner)
        return instance._validation_step


JiTUnlearning.validation_step = _ValidationStep()  # type: ignore[assignment,method-assign]


def _val_loader_given(trainer: pl.Trainer) -> bool:
    """Whether the Trainer's current call has validation to run: any call but ``fit``, or a fit with a val loader."""
    if trainer.state.fn != TrainerFn.FITTING:
        return True
    source = getattr(getattr(trainer.fit_loop.epoch_loop, "val_loop", None), "_data_source", None)
    return source is None or source.is_defined()


class _RollbackOnError(pl.Callback):
    """Restore the weights from before the run if the run raises (a bad batch, a divergence, Ctrl+C, SIGTERM), so that
    a half-updated model is never left behind. Added by :class:`JiTUnlearning` itself."""

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(pl_module, JiTUnlearning):
            pl_module._abort_run(exception)

    def state_dict(self) -> dict[str, Any]:
        return {}
