"""``JiTUnlearning``: a LightningModule that takes over a trained model and unlearns a forget set with JiT."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.optim import SGD, Optimizer

from lightning_jit.config import JiTConfig
from lightning_jit.guard import (
    NONFINITE_PATIENCE,
    CollapseGuard,
    JiTDivergenceError,
    OnCollapse,
    Outcome,
    RollbackOnError,
    divergence_hint,
    forward_failure,
    restore_pre_run,
    weights_finite,
)
from lightning_jit.io import AtomicCheckpoints
from lightning_jit.objective import DEFAULT_PERTURBATION_CHUNK, ClampSpec, OutputSelector, PerturbationChunk, Reduction
from lightning_jit.probes import ProbeDistillation
from lightning_jit.scale import check_strategy, distributed_step_kwargs, gradient_scaler
from lightning_jit.step import (
    ForgetAccuracyWindow,
    FrozenReference,
    frozen_original,
    jit_step,
    trainable_parameters,
)

_PREFIX = "model."
#: Checkpoint key under which the wrapper keeps its own hyperparameters next to the wrapped model's.
JIT_HPARAMS_KEY = "jit_hyper_parameters"
#: Checkpoint key of :meth:`JiTUnlearning.safety_report` (outcome and collapse-guard events).
JIT_SAFETY_KEY = "jit_safety"
_FORMAT_KEY = "jit_state_dict_format"
_FORMAT = "wrapped-model"


class JiTUnlearning(pl.LightningModule):
    r"""Unlearn a forget set from a trained classifier with JiT, by ``trainer.fit(wrapper, forget_loader)``.

    For every forget batch, JiT draws ``n_perturbations`` Gaussian perturbations of std ``sigma`` and takes one SGD
    step on the local Lipschitz estimate ``||f(x) - f(x + xi)|| / ||xi||`` (see :mod:`lightning_jit.objective`).
    Only the forget set is used: no retain data is ever needed.

    Differences from the authors' reference implementation, which this class fixes:

    * **Gradients are zeroed at every step.** The reference calls ``zero_grad`` once before its loop, so gradients
      pile up from batch to batch.
    * **An explicit normalisation policy.** The reference never sets the model's mode, so dropout stays active and
      BatchNorm updates its running statistics on noise. ``norm_policy="eval"`` (the default) runs JiT with
      BatchNorm and dropout in eval mode, so BatchNorm buffers are not changed; ``"train"`` reproduces the reference.
    * The perturbed copies go through the model in batched no-grad passes instead of ``N`` separate passes.

    Steps whose loss or gradients are not finite are skipped and counted in ``skipped_steps``, never applied. If the
    run fails, the weights are restored bit for bit to what they were before it started.

    The wrapper saves checkpoints in the wrapped model's own format: ``OriginalClass.load_from_checkpoint(path)``
    loads a checkpoint written by ``trainer.save_checkpoint`` or a ``ModelCheckpoint``, with ``strict=True``.

    Args:
        model: The trained classifier: a LightningModule or a plain ``nn.Module`` returning logits.
        sigma: Std of the Gaussian input perturbations, in the units of the (normalised) input.
        lr: SGD learning rate of the JiT update.
        n_perturbations: ``N``, perturbations per forget sample.
        epochs: Passes over the forget set. The run stops after this many epochs whatever the Trainer's
            ``max_epochs`` (which must not be smaller).
        reduction: ``"mean"`` over samples and perturbations (default), or ``"sum"`` over samples as in the reference.
            A reference learning rate ``eta_sum`` at batch size ``B`` equals ``lr = eta_sum * B`` with ``"mean"``.
        center_logits: Measure the outputs' differences after removing their mean over classes, i.e. only the part
            of the logits that softmax sees (``False``, the reference, uses raw logits).
        normalize_logits: Compare unit-normalised outputs (default), so that JiT cannot lower its objective by
            inflating the logits of a neighbouring class (which then swallows retained samples: the usual collapse).
            On the digits benchmark this keeps several points more retained accuracy at the same forgetting; see the
            README. ``False`` is the reference.
        logit_norm_penalty: Weight of :func:`~lightning_jit.objective.logit_norm_penalty`, which stops the logits
            from growing beyond the original model's around the forget samples (the "sink class" that swallows
            retained samples). 10 (default) is the measured setting of the README's quality section, where it kept
            0.5-14 points more retained accuracy on full-class forgetting; 0 is plain JiT. It keeps one frozen copy of
            the weights (twice the model's memory) and costs about a quarter more time per step.
        logit_norm_sigma: Std of the penalty's noisy copies of the forget inputs, in input units (default 1.0, the
            measured best for full-class forgetting; 0.5 for sub-class, see ``lightning_jit.demo``).
        probe_distillation: Weight of :class:`~lightning_jit.probes.ProbeDistillation`: the KL divergence that holds
            the model's predictions on class probes, synthesised from the original model, at the original's, for
            every class absent from the forget set's labels. It uses no retained data. 1 (default) is the measured
            setting (README quality section), where it kept 0.2-4 points more retained accuracy on every full-class
            case; 0 turns it off. It needs the frozen copy of the weights (as ``logit_norm_penalty``) and costs one
            forward/backward of ``probes_per_class`` x classes probes (at most 256) per step, plus their synthesis
            (60 steps) at the first batch.
        probes_per_class: Probes per class for ``probe_distillation`` (default 16; fewer when there are more than 128
            classes: at most 2048 probes in all, kept on the model's device).
        logit_norm_reference: The model whose logit norms bound the unlearned model's (default: ``model`` as it is
            when training starts). Give the original when a run continues from partly unlearned weights.
        clamp: ``None``, ``"batch"`` (clamp perturbed inputs to the batch min/max, as the reference) or
            ``(low, high)``.
        norm_policy: ``"eval"`` (default) or ``"train"``; see above.
        perturbation_chunk: Most perturbed samples per no-grad forward; bounds peak memory independently of ``N``.
            ``"auto"`` (default): 256 on a CPU, 1024 on CUDA (measured, see ``docs/benchmarks.md``); ``None``: all.
        seed: If set, noise is reproducible: per-sample ids in the batch (``(x, y, id)`` or ``{"id": ...}``) key each
            sample's noise with ``(seed, id, epoch)``; without ids a generator seeded with ``seed`` is used.
        momentum: SGD momentum (default 0, plain SGD as in the reference). Ignored if ``optimizer`` is given.
        target_forget_accuracy: A stopping rule computed from the forget set alone. If set (in percent), the run
            stops as soon as the forget set's accuracy over its most recent 64 samples falls to this value, measured
            for free from the clean logits of each step; ``epochs`` is then the most passes allowed. It needs
            labelled batches.
            Small steps plus this rule avoid the overshoot that makes plain JiT collapse.
        input_key: Where the input is in a tuple/list (index) or dict (key) batch.
        label_key: Where the labels are in a tuple/list (index) or dict (key) batch, for the stopping rule.
        output_selector: How to find the logits in the model's output (index, key or callable).
        batch_to_input: Callable mapping any batch to its input tensor; overrides ``input_key``.
        optimizer: Optional factory ``params -> Optimizer`` to replace plain SGD.
        guard: The collapse guard (:class:`~lightning_jit.guard.CollapseGuard`), on by default; ``False`` turns it
            off, or pass a configured ``CollapseGuard``. Divergence protection is always on: non-finite weights or
            ``NONFINITE_PATIENCE`` consecutive non-finite steps restore the weights from before the run bit for bit
            and raise :class:`~lightning_jit.guard.JiTDivergenceError`; an isolated non-finite step is skipped.
        monitor: Optional held-out loader of labelled batches the user owns (e.g. retained-class test data). It is
            only evaluated, never used for gradients. Without it the guard uses a check computed from the model and
            the forget set alone (see ``docs/safety.md``).
        max_drop: With ``monitor``: the largest allowed fall of its accuracy (points) before the guard intervenes.
        check_every: The guard checks every this many steps.
        on_collapse: ``"halve_lr"`` (restore, halve the learning rate, go on) or ``"stop"`` (restore and stop).
        compile_model: Run the JiT step's forward passes through ``torch.compile(model)`` (``True``, or a dict of
            ``torch.compile`` keyword arguments). Off by default: compilation costs time up front and pays off only
            for large batches (measured in ``docs/benchmarks.md``: 1.56x at batch 128 on the digits CNN on a CPU,
            0.90x at batch 1). The weights, checkpoints and ``wrapper.model`` stay the uncompiled module's.

    Example:
        >>> import torch, lightning.pytorch as pl
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
        >>> forget = DataLoader(TensorDataset(torch.randn(8, 1, 4, 4), torch.zeros(8, dtype=torch.long)), batch_size=4)
        >>> wrapper = JiTUnlearning(net, sigma=0.5, lr=0.01)
        >>> trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                      enable_model_summary=False)
        >>> trainer.fit(wrapper, train_dataloaders=forget)
        >>> wrapper.model is net
        True
    """

    def __init__(
        self,
        model: nn.Module,
        sigma: float,
        lr: float,
        n_perturbations: int = 25,
        epochs: int = 1,
        reduction: Reduction = "mean",
        center_logits: bool = False,
        normalize_logits: bool = True,
        logit_norm_penalty: float = 10.0,
        logit_norm_sigma: float = 1.0,
        probe_distillation: float = 1.0,
        probes_per_class: int = 16,
        logit_norm_reference: nn.Module | None = None,
        clamp: ClampSpec = None,
        norm_policy: str = "eval",
        perturbation_chunk: PerturbationChunk = DEFAULT_PERTURBATION_CHUNK,
        seed: int | None = None,
        momentum: float = 0.0,
        target_forget_accuracy: float | None = None,
        input_key: int | str = 0,
        label_key: int | str = 1,
        output_selector: OutputSelector = None,
        batch_to_input: Callable[[Any], Any] | None = None,
        optimizer: Callable[[Iterable[nn.Parameter]], Optimizer] | None = None,
        guard: bool | CollapseGuard = True,
        monitor: Iterable[Any] | None = None,
        max_drop: float = 2.0,
        check_every: int = 1,
        on_collapse: OnCollapse = "halve_lr",
        compile_model: bool | dict[str, Any] = False,
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
        self.config = JiTConfig(
            sigma=sigma,
            lr=lr,
            n_perturbations=n_perturbations,
            epochs=epochs,
            reduction=reduction,
            center_logits=center_logits,
            normalize_logits=normalize_logits,
            logit_norm_penalty=logit_norm_penalty,
            logit_norm_sigma=logit_norm_sigma,
            probe_distillation=probe_distillation,
            probes_per_class=probes_per_class,
            clamp=clamp,
            norm_policy=norm_policy,
            perturbation_chunk=perturbation_chunk,
            seed=seed,
            momentum=momentum,
            target_forget_accuracy=target_forget_accuracy,
            input_key=input_key,
            label_key=label_key,
            output_selector=output_selector,
            batch_to_input=batch_to_input,
        )
        self.model = model
        self._optimizer_factory = optimizer
        self.automatic_optimization = False
        self.skipped_steps = 0
        self.stopped_early = False
        self._generator: torch.Generator | None = None
        self._window: ForgetAccuracyWindow | None = None
        self._step_kwargs: dict[str, Any] = {}
        if not isinstance(compile_model, (bool, dict)):
            raise MisconfigurationException(
                f"`compile_model` must be True, False or a dict of torch.compile arguments, got {compile_model!r}."
            )
        self._compile_options = compile_model
        self._compiled: list[Callable[..., Any]] = []  # a list, so that the compiled module is no submodule
        if logit_norm_reference is not None and not isinstance(logit_norm_reference, nn.Module):
            raise MisconfigurationException("`logit_norm_reference` must be an nn.Module (the original model) or None.")
        self._reference_module = [logit_norm_reference] if logit_norm_reference is not None else []
        self._reference: FrozenReference | None = None
        self._probes: ProbeDistillation | None = None
        if isinstance(guard, CollapseGuard):
            if monitor is not None:
                raise MisconfigurationException("Pass `monitor` to the CollapseGuard you give as `guard`, not to both.")
            self.guard: CollapseGuard | None = guard
        elif isinstance(guard, bool):
            self.guard = (
                CollapseGuard(monitor=monitor, max_drop=max_drop, check_every=check_every, on_collapse=on_collapse)
                if guard
                else None
            )
        else:
            raise MisconfigurationException(
                f"`guard` must be True, False or a CollapseGuard, got {type(guard).__name__}."
            )
        self.diverged = False
        self._nonfinite_streak = 0
        self.save_hyperparameters(
            ignore=[
                "model",
                "output_selector",
                "batch_to_input",
                "optimizer",
                "guard",
                "monitor",
                "logit_norm_reference",
            ]
        )

    # ----------------------------------------------------------------------------------------------------------------
    # Lightning hooks
    # ----------------------------------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def configure_optimizers(self) -> Optimizer:
        params = trainable_parameters(self.model)
        if self._optimizer_factory is not None:
            return self._optimizer_factory(params)
        return SGD(params, lr=self.config.lr, momentum=self.config.momentum)

    def configure_callbacks(self) -> list[pl.Callback]:
        callbacks: list[pl.Callback] = [RollbackOnError(), AtomicCheckpoints()]
        if self.guard is not None:
            callbacks.append(self.guard)
        return callbacks

    def on_fit_end(self) -> None:
        # Lightning skips the whole training loop (and `on_train_start`) when the loader has no batch.
        if self.trainer.num_training_batches == 0:
            raise MisconfigurationException(
                "The forget loader passed as `train_dataloaders` is empty: there is nothing to unlearn."
                " Check the forget-set selection (and `limit_train_batches`)."
            )

    def setup(self, stage: str) -> None:
        check_strategy(self.trainer, type(self).__name__)
        if self._compile_options is not False and not self._compiled:
            options = self._compile_options if isinstance(self._compile_options, dict) else {}
            self._compiled.append(torch.compile(self.model, **options))

    def on_train_start(self) -> None:
        # Under DDP: how batches are split between processes, and the loss scale for DDP's gradient average.
        self._step_kwargs = distributed_step_kwargs(self.trainer, self.trainer.train_dataloader, type(self).__name__)
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and 0 <= max_epochs < self.config.epochs:
            rank_zero_warn(
                f"The Trainer's max_epochs={max_epochs} is smaller than JiTUnlearning(epochs={self.config.epochs});"
                f" only {max_epochs} epoch(s) will run."
            )
        self._window = ForgetAccuracyWindow()
        self.stopped_early = False
        self.diverged = False
        self._nonfinite_streak = 0
        original = self._reference_module[0] if self._reference_module else self.model
        self._reference, self._probes = frozen_original(original, self.config)
        if self.config.seed is not None:
            self._generator = torch.Generator(device=self.device if self.device.type == "cuda" else "cpu")
            self._generator.manual_seed(self.config.seed)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        params = trainable_parameters(self.model)
        try:
            result = jit_step(
                self._compiled[0] if self._compiled else self.model,
                batch,
                self.config,
                optimizer,
                self.manual_backward,
                params,
                norm_module=self.model,
                epoch=self.current_epoch,
                generator=self._generator,
                step_optimizer=optimizer.step,
                scaler=gradient_scaler(self.trainer),
                reference=self._reference,
                probes=self._probes,
                gather=self.all_gather,
                **self._step_kwargs,
            )
        except (RuntimeError, TypeError) as err:  # e.g. a shape or dtype the model cannot take: name the cause
            raise forward_failure(self.model, batch, self.config, err) from err
        if not result.applied:
            self.skipped_steps += 1
            rank_zero_warn(
                f"JiT step {self.global_step} skipped: the loss or gradients were not finite"
                f" ({self.skipped_steps} skipped so far). A smaller `lr` or a larger `sigma` may help."
            )
        self._check_divergence(result.applied, bool(torch.isfinite(result.loss)))
        if result.applied and self.global_step <= 1 and float(result.loss) == 0.0:
            rank_zero_warn(
                "The JiT loss is exactly 0, so JiT changes nothing: every perturbation was rounded or clamped away."
                f" Increase `sigma` (now {self.config.sigma:g}) or relax `clamp` (now {self.config.clamp!r})."
            )
        self.log("jit_loss", result.loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=max(1, result.count))
        if result.correct is not None and self._window is not None:
            self._window.update(result.correct, result.count)
            self._check_stopping_rule()
        self.log("jit_skipped_steps", float(self.skipped_steps), on_step=False, on_epoch=True, reduce_fx="max")
        return result.loss

    def _check_divergence(self, applied: bool, loss_finite: bool) -> None:
        """Tell an isolated overflow (skip the step, go on) from a divergence (restore the original weights, raise).

        Diverged: the weights are no longer finite after a step, or ``NONFINITE_PATIENCE`` consecutive steps had a
        non-finite loss (without a ``GradScaler``: or non-finite gradients; with one, skipped steps are its normal
        scale search and do not count).
        """
        scaler = gradient_scaler(self.trainer)
        counts = not loss_finite if (scaler is not None and scaler.is_enabled()) else not applied
        self._nonfinite_streak = self._nonfinite_streak + 1 if counts else 0
        if applied and not weights_finite(self.model):
            reason = "the weights became NaN/Inf after an update"
        elif self._nonfinite_streak >= NONFINITE_PATIENCE:
            reason = f"{self._nonfinite_streak} consecutive steps had a non-finite loss or gradients"
        else:
            return
        self.diverged = True
        restore_pre_run(self.trainer, self)
        raise JiTDivergenceError(
            f"JiT diverged at step {self.global_step}: {reason}. The weights from before the run were restored bit for"
            f" bit. {divergence_hint(self.config)}"
        )

    def on_guard_rollback(self) -> None:
        """Called by :class:`~lightning_jit.guard.CollapseGuard` after it restored earlier weights."""
        # Its samples were measured on the discarded weights; it keeps its size (a pass, once one has been seen).
        self._window = ForgetAccuracyWindow(self._window.min_samples if self._window is not None else 64)
        self.stopped_early = False
        self._nonfinite_streak = 0

    @property
    def outcome(self) -> Outcome:
        """How the last run ended: ``"completed"``, ``"stopped_early"``, ``"rolled_back"`` or ``"diverged"``."""
        if self.diverged or (self.guard is not None and self.guard.diverged):
            return "diverged"
        if self.guard is not None and self.guard.events:
            return "rolled_back"
        return "stopped_early" if self.stopped_early else "completed"

    def safety_report(self) -> dict[str, Any]:
        """The outcome, skipped steps and the collapse guard's report (thresholds, measurements, events), for audits."""
        return {
            "outcome": self.outcome,
            "skipped_steps": self.skipped_steps,
            "guard": self.guard.report() if self.guard is not None else None,
        }

    def _check_stopping_rule(self) -> None:
        assert self._window is not None
        correct, count = self._window.totals()
        totals = self.trainer.strategy.reduce(
            torch.tensor([correct, count], dtype=torch.float64, device=self.device), reduce_op="sum"
        )
        accuracy = float(100.0 * totals[0] / totals[1]) if totals[1] > 0 else float("nan")
        self.log("jit_forget_acc", accuracy, prog_bar=True, on_step=True, on_epoch=False, rank_zero_only=True)
        target = self.config.target_forget_accuracy
        if target is not None and self._window.ready() and accuracy <= target:
            self.stopped_early = True
            self.trainer.should_stop = True

    def on_train_epoch_end(self) -> None:
        if self._window is not None:
            self._window.end_pass()
        if self.current_epoch + 1 >= self.config.epochs:
            self.trainer.should_stop = True

    # ----------------------------------------------------------------------------------------------------------------
    # Checkpoints in the wrapped model's own format
    # ----------------------------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rewrite the checkpoint so that it is the wrapped model's: no ``model.`` prefix, the model's hparams."""
        checkpoint["state_dict"] = {
            k[len(_PREFIX) :] if k.startswith(_PREFIX) else k: v for k, v in checkpoint["state_dict"].items()
        }
        checkpoint[JIT_HPARAMS_KEY] = self.config.hparams()
        checkpoint[JIT_SAFETY_KEY] = self.safety_report()
        checkpoint[_FORMAT_KEY] = _FORMAT
        for key in (
            self.CHECKPOINT_HYPER_PARAMS_KEY,
            self.CHECKPOINT_HYPER_PARAMS_NAME,
            self.CHECKPOINT_HYPER_PARAMS_TYPE,
        ):
            checkpoint.pop(key, None)
        if isinstance(self.model, pl.LightningModule) and self.model.hparams:
            checkpoint[self.CHECKPOINT_HYPER_PARAMS_KEY] = dict(self.model.hparams)
            if getattr(self.model, "_hparams_name", None):
                checkpoint[self.CHECKPOINT_HYPER_PARAMS_NAME] = self.model._hparams_name

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Accept checkpoints in the wrapped model's format (as written by :meth:`on_save_checkpoint`)."""
        if checkpoint.get(_FORMAT_KEY) == _FORMAT:
            checkpoint["state_dict"] = {_PREFIX + k: v for k, v in checkpoint["state_dict"].items()}
