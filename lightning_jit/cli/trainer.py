"""``JiTTrainer``: a Trainer with an ``unlearn`` method, the subcommand of :class:`~lightning_jit.cli.JiTCLI`.

The method's signature is the subcommand's interface: LightningCLI builds ``--jit.*``, ``--batch.*``, ``--guard.*``
and ``--forget.*`` (and their ``--help``) from the typed dataclasses it takes, each declared once
(:class:`~lightning_jit.core.settings.JiTSettings`, :class:`~lightning_jit.core.batch.BatchFormat`,
:class:`~lightning_jit.core.guard.GuardSettings`, :class:`~lightning_jit.cli.forget.ForgetSelection`).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import typing
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_jit.cli.checkpoints import check_output, load_checkpoint, restore_weights
from lightning_jit.cli.errors import JiTUsageError, setting_usage_error
from lightning_jit.cli.forget import ForgetSelection, select_forget_loader
from lightning_jit.cli.run_files import RunFiles
from lightning_jit.core.batch import BatchFormat
from lightning_jit.core.errors import JiTInputError, JiTSettingError, forward_failure
from lightning_jit.core.guard import GuardSettings
from lightning_jit.core.outcome import JiTUnlearningFailed, Outcome
from lightning_jit.core.settings import JiTSettings
from lightning_jit.core.weights import normalization_mode
from lightning_jit.io import atomic_torch_save, file_sha256, json_safe
from lightning_jit.lightning.module import JiTUnlearning

__all__ = ["UNLEARN_RECORD_KEY", "JiTTrainer", "build_groups", "unlearn_groups", "unverified_path"]

#: Checkpoint key under which ``unlearn`` records where the weights came from and what was forgotten.
UNLEARN_RECORD_KEY = "jit_unlearning"


class JiTTrainer(pl.Trainer):
    """A Trainer with an :meth:`unlearn` method, the ``unlearn`` subcommand of :class:`~lightning_jit.cli.JiTCLI`.

    Example:
        >>> trainer = JiTTrainer(logger=False, enable_progress_bar=False)
        >>> sorted(unlearn_groups())
        ['batch', 'forget', 'guard', 'jit']
    """

    def unlearn(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        *,
        jit: JiTSettings,
        batch: BatchFormat = BatchFormat(),
        guard: GuardSettings = GuardSettings(),
        forget: ForgetSelection,
        ckpt_path: str | None = None,
        output: str | None = None,
        overwrite: bool = False,
        keep_unverified: bool = False,
    ) -> str:
        """Unlearn a forget set from a trained model with JiT and write the result as a new checkpoint.

        The checkpoint is in the model's own format: ``MyModel.load_from_checkpoint(output)`` loads it, strictly.
        The input checkpoint is never modified. It is written only when the run's verified outcome is ``forgotten``;
        any other outcome raises :class:`~lightning_jit.core.outcome.JiTUnlearningFailed` (the command line's exit
        code 3) and writes nothing, or with ``keep_unverified`` writes the weights as ``<output>.unverified.ckpt``.
        A run that fails leaves no file: what the fit wrote before the run had an outcome (``config.yaml``, the
        loggers' files, checkpoints) is removed (:class:`~lightning_jit.cli.run_files.RunFiles`), unless
        ``keep_unverified`` wrote the weights, which it then keeps beside them.

        Args:
            model: The model (its weights are restored from ``ckpt_path``).
            datamodule: The datamodule whose training set the forget set is taken from.
            jit: The JiT settings.
            batch: How batches are read: where the input and the labels are, and where the logits are in the output.
            guard: The collapse guard's settings.
            forget: Which training samples to forget.
            ckpt_path: Checkpoint of the trained model to unlearn from. Required on the command line; in Python,
                ``None`` unlearns from the model's current weights.
            output: Where to write the unlearned checkpoint (default: ``unlearned.ckpt`` in the run's log
                directory). Never the same file as ``ckpt_path``.
            overwrite: Replace ``output`` (and the run's ``config.yaml``) if they exist.
            keep_unverified: When the outcome is not ``forgotten``, still write the weights, under the name
                ``<output stem>.unverified.ckpt``, for inspection. They are not a deletion. It implies
                ``jit.on_unverified="keep"`` (the run's partial weights are what is written).

        Returns:
            The path of the unlearned checkpoint.

        Raises:
            JiTUsageError: for a missing checkpoint or one of another class, an existing ``output`` without
                ``overwrite``, a bad forget selection, or a ``batch.output_selector`` that does not find the
                ``(batch, classes)`` logits in the model's output on the first forget batch; nothing is written then.
            JiTUnlearningFailed: when the verified outcome is not ``forgotten``; its message is the verdict and what
                to do next.
            MisconfigurationException: if ``jit``, ``batch``, ``guard`` or ``forget`` is not of its declared type.
        """
        groups = unlearn_groups()
        for name, value in (("jit", jit), ("batch", batch), ("guard", guard), ("forget", forget)):
            expected = groups[name]
            if not isinstance(value, expected):
                raise MisconfigurationException(
                    f"`JiTTrainer.unlearn({name}=...)` must be a {expected.__name__}, got {type(value).__name__}."
                )
        forget.check()
        source = load_checkpoint(ckpt_path) if ckpt_path is not None else None
        if output is None:
            output = os.path.join(self.log_dir or self.default_root_dir, "unlearned.ckpt")
        check_output(output, ckpt_path, overwrite)
        if source is not None:
            restore_weights(model, source, ckpt_path)
        forget_loader = select_forget_loader(datamodule, forget, batch)
        _preflight(model, forget_loader, batch)
        n_forget = len(forget_loader.dataset) if hasattr(getattr(forget_loader, "dataset", None), "__len__") else None
        rank_zero_info(
            f"JiT: unlearning {n_forget if n_forget is not None else 'the'} forget samples"
            f" ({forget.selector() or 'datamodule hook'}) from {ckpt_path or 'the in-memory model'}."
        )

        if keep_unverified and jit.on_unverified != "keep":
            jit = jit.replace(on_unverified="keep")  # the partial weights are what `*.unverified.ckpt` holds
        heldout = forget.heldout_loader(datamodule)
        wrapper = JiTUnlearning(model, jit, batch_format=batch, guard=guard, monitor=heldout)
        if self.fit_loop.max_epochs is None and self.max_steps == -1:
            self.fit_loop.max_epochs = jit.epochs  # the wrapper stops after `epochs`; avoid Lightning's 1000 default
        run_files = RunFiles(self)  # what the fit writes besides the result: a run that fails leaves none of it
        written: list[str] = []  # what this method wrote itself
        try:
            try:
                self.fit(wrapper, train_dataloaders=forget_loader)
            except BaseException as err:
                # The command line has no resume: the resume points of an interrupted run are not kept either.
                wrapper.discard_unverified_checkpoints()
                if isinstance(err, SystemExit) and self.state.status == TrainerStatus.INTERRUPTED:
                    raise KeyboardInterrupt from None  # Lightning exits 1 after Ctrl+C; say what it was
                raise
            if self.state.status != TrainerStatus.FINISHED:
                raise RuntimeError(
                    f"JiT unlearning did not finish (status: {self.state.status.value}); nothing written."
                )

            checkpoint = self._checkpoint_connector.dump_checkpoint(weights_only=True)
            verification = wrapper.verification
            checkpoint[UNLEARN_RECORD_KEY] = {
                "source_checkpoint": str(ckpt_path) if ckpt_path is not None else None,
                "source_sha256": file_sha256(ckpt_path) if ckpt_path is not None else None,
                "forget": asdict(forget),
                "forget_samples": n_forget,
                "epochs_run": self.current_epoch,
                "outcome": str(wrapper.outcome) if wrapper.outcome is not None else None,
                "verification": json_safe(verification.as_dict()) if verification is not None else None,
                "stopped_early": wrapper.stopped_early,
                "skipped_steps": wrapper.skipped_steps,
            }
            assert verification is not None
            if verification.outcome is Outcome.UNVERIFIABLE and heldout is None:  # the run made no update
                raise JiTUsageError(
                    "--forget.heldout",
                    "the forget set names individual samples, which are verified against held-out data the model never"
                    " trained on: name the datamodule method that returns it, e.g. --forget.heldout=val_dataloader.",
                )
            succeeded = verification.outcome.succeeded
            target = output if succeeded else unverified_path(output)
            if self.is_global_zero and (succeeded or keep_unverified):
                atomic_torch_save(checkpoint, target, overwrite=overwrite)
                written.append(target)
            self.strategy.barrier("jit_unlearn_save")
            if not succeeded:
                kept = f" The weights were written to {target} for inspection." if keep_unverified else ""
                rank_zero_warn(f"JiT: {verification.verdict}; nothing was written as {output}.{kept}")
                raise JiTUnlearningFailed(verification)
        except BaseException:
            # Nothing of a failed run stays on disk (config.yaml, the loggers' files), unless `keep_unverified` wrote
            # the weights: then the run's files stay with them, for inspection.
            if self.is_global_zero and not written:
                removed = run_files.remove()
                if removed:
                    rank_zero_info(f"JiT: removed the files the failed run wrote: {removed}")
            raise
        rank_zero_info(f"JiT: {verification.verdict}. Wrote the unlearned checkpoint to {output}.")
        return str(output)


def _preflight(model: pl.LightningModule, loader: Any, batch: BatchFormat) -> None:
    """Read the first forget batch and run it through the model once (no gradient, eval mode, weights untouched),
    before the run writes anything (``config.yaml``, the logger's files, checkpoints).

    Raises:
        JiTUsageError: naming ``--batch.output_selector`` when the logits are not found in the model's output.
        JiTInputError: when the batch's input cannot be read, or the model does not take it.
    """
    first = next(iter(loader), None)
    if first is None:
        return  # the run refuses an empty forget loader with its own message
    x = batch.forget_input(first)
    device = next((p.device for p in model.parameters()), x.device)
    x = x.to(device)
    with torch.no_grad(), normalization_mode(model, "eval"):
        try:
            output = model(x)
        except (RuntimeError, TypeError) as err:  # the batch does not fit the model: name the cause
            raise forward_failure(model, x, err) from err
    try:
        batch.for_model(model).logits(output, x.shape[0], x)
    except JiTInputError as err:
        # An output with an extra dimension comes from the input's shape, not from where the logits are.
        flag = "--forget" if "for an input of" in str(err) else "--batch.output_selector"
        raise JiTUsageError(flag, " ".join(str(err).split())) from err


def unverified_path(output: str | os.PathLike) -> str:
    """Where ``--keep_unverified`` writes the weights of a run that did not verify: ``<stem>.unverified.ckpt``.

    Example:
        >>> unverified_path("runs/unlearned.ckpt")
        'runs/unlearned.unverified.ckpt'
    """
    root, _ = os.path.splitext(os.fspath(output))
    return f"{root}.unverified.ckpt"


def unlearn_groups() -> dict[str, type]:
    """The argument groups of ``unlearn`` (``jit``, ``batch``, ``guard``, ``forget``) and their declarations: the
    dataclass-typed parameters of :meth:`JiTTrainer.unlearn`, read from its signature."""
    hints = typing.get_type_hints(JiTTrainer.unlearn)
    return {name: hint for name, hint in hints.items() if isinstance(hint, type) and dataclasses.is_dataclass(hint)}


def build_groups(values: Mapping[str, Any]) -> dict[str, Any]:
    """Build each group's declaration from parsed values (a dict or instance per group), validated.

    Raises:
        JiTUsageError: naming the flag of the first bad setting (``--jit.sigma``, ``--guard.check_every``...).

    Example:
        >>> groups = build_groups({"jit": {"sigma": 0.1, "lr": 0.03}, "forget": {"classes": [3]}})
        >>> groups["jit"].lr, groups["batch"].label_key, groups["guard"].enabled
        (0.03, None, True)
        >>> build_groups({"jit": {"sigma": 0.1, "lr": 0.03}, "guard": {"check_every": 0}})
        Traceback (most recent call last):
        ...
        lightning_jit.cli.errors.JiTUsageError: --guard.check_every: must be an integer >= 1, got 0.
    """
    built = {}
    defaults = {name: p.default for name, p in inspect.signature(JiTTrainer.unlearn).parameters.items()}
    for group, declaration in unlearn_groups().items():
        value = values.get(group)
        if isinstance(value, declaration):
            built[group] = value
            continue
        given = dict(value or {})
        try:
            if not given and isinstance(defaults.get(group), declaration):
                built[group] = defaults[group]
            else:
                built[group] = declaration(**given)
        except JiTSettingError as err:
            raise setting_usage_error(group, err) from err
        except TypeError as err:  # a missing required setting, or a key the declaration does not take
            raise _missing_or_unknown(group, declaration, given) from err
    return built


def _missing_or_unknown(group: str, declaration: type, given: dict[str, Any]) -> JiTUsageError:
    fields = dataclasses.fields(declaration)
    unknown = [key for key in given if key not in {f.name for f in fields}]
    if unknown:
        return JiTUsageError(f"--{group}.{unknown[0]}", f"is not a setting of {declaration.__name__}.")
    missing = [
        f.name
        for f in fields
        if f.name not in given and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    flag = f"--{group}.{missing[0]}" if missing else f"--{group}"
    return JiTUsageError(flag, "is required.")
