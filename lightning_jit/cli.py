"""``JiTCLI``: LightningCLI with an ``unlearn`` subcommand, and the ``lightning-jit`` console script.

A user with a ``LightningCLI(MyModel, MyData)`` script swaps in ``JiTCLI(MyModel, MyData)`` and gets::

    python main.py unlearn --ckpt_path=trained.ckpt --jit.sigma=0.1 --jit.lr=0.003 --forget.classes=[3]

The console script runs the same subcommand for any ``class_path``-configured model and datamodule::

    lightning-jit unlearn --config cfg.yaml
    lightning-jit demo
    lightning-jit evaluate --config cfg.yaml --original a.ckpt --unlearned b.ckpt
    lightning-jit tune --config cfg.yaml --out tune/ && lightning-jit unlearn --config cfg.yaml --config tune/tuned.yaml

Exit codes: 0 on success, 2 on a usage error (the message names the flag, and nothing is written), 1 on any other
failure (one line; ``--verbose`` prints the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import sys
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_jit.config import JiTConfig
from lightning_jit.demo import DEMO_FORGET_CLASS
from lightning_jit.forget import ForgetSet, JiTUsageError, select_forget_loader
from lightning_jit.io import atomic_torch_save
from lightning_jit.module import JiTUnlearning
from lightning_jit.objective import DEFAULT_PERTURBATION_CHUNK, ClampSpec, PerturbationChunk

__all__ = ["ForgetSet", "JiTArgs", "JiTCLI", "JiTTrainer", "JiTUsageError", "main"]

#: Checkpoint key under which ``unlearn`` records where the weights came from and what was forgotten.
UNLEARN_RECORD_KEY = "jit_unlearning"
_PROG = "lightning-jit"
#: ``JiTArgs`` fields that configure ``JiTUnlearning``'s collapse guard rather than ``JiTConfig``.
_GUARD_FIELDS = ("guard", "check_every", "on_collapse")


@dataclass
class JiTArgs:
    """The JiT hyperparameters of the ``unlearn`` subcommand (the ``--jit.*`` group); see ``JiTUnlearning``.

    Args:
        sigma: Std of the Gaussian input perturbations, in the units of the (normalised) input. Must be > 0.
        lr: SGD learning rate of the JiT update. Must be > 0.
        n_perturbations: Perturbations per forget sample (N).
        epochs: Most passes over the forget set.
        reduction: "mean" over samples and perturbations, or "sum" over samples as in the reference code.
        center_logits: Compare logits after removing their mean over classes (the part softmax sees).
        normalize_logits: Compare unit-normalised outputs, so that JiT cannot lower its objective by inflating the
            logits of a neighbouring class.
        logit_norm_penalty: Weight of the penalty on logits growing beyond the original model's (0: off; 10: the
            measured setting).
        logit_norm_sigma: Std of the penalty's noisy copies of the forget inputs.
        probe_distillation: Weight of the KL term that holds the predictions on class probes, synthesised from the
            original model, at the original's, for the classes absent from the forget set (0: off; 1: the measured
            setting).
        probes_per_class: Probes per class for probe_distillation.
        clamp: null, "batch" (clamp perturbed inputs to the batch min/max, as the reference) or [low, high].
        norm_policy: "eval" keeps BatchNorm statistics and dropout frozen during JiT; "train" reproduces the reference.
        perturbation_chunk: Most perturbed samples per no-grad forward pass (bounds peak memory); "auto": 256 on a
            CPU, 1024 on CUDA; null: all at once.
        seed: Seed of the JiT noise (null: not reproducible).
        momentum: SGD momentum in [0, 1).
        target_forget_accuracy: Stop as soon as the forget set's running accuracy (percent) falls to this value;
            needs labelled batches. null: run all epochs.
        input_key: Position (or dict key) of the input in a batch.
        label_key: Position (or dict key) of the label in a batch and in a training sample.
        output_selector: Position or key of the logits in the model's output, if it is a tuple or dict.
        guard: Run the collapse guard (see ``docs/safety.md``); false turns it off.
        check_every: The collapse guard checks every this many steps.
        on_collapse: What the guard does on a collapse: "halve_lr" (restore, halve the learning rate, go on) or
            "stop" (restore and stop).

    Example:
        >>> JiTArgs(sigma=0.1, lr=0.003).to_config().n_perturbations
        25
    """

    sigma: float
    lr: float
    n_perturbations: int = 25
    epochs: int = 1
    reduction: Literal["mean", "sum"] = "mean"
    center_logits: bool = False
    normalize_logits: bool = True
    logit_norm_penalty: float = 10.0
    logit_norm_sigma: float = 1.0
    probe_distillation: float = 1.0
    probes_per_class: int = 16
    clamp: ClampSpec = None
    norm_policy: Literal["eval", "train"] = "eval"
    perturbation_chunk: PerturbationChunk = DEFAULT_PERTURBATION_CHUNK
    seed: int | None = None
    momentum: float = 0.0
    target_forget_accuracy: float | None = None
    input_key: int | str = 0
    label_key: int | str = 1
    output_selector: int | str | None = None
    guard: bool = True
    check_every: int = 1
    on_collapse: Literal["halve_lr", "stop"] = "halve_lr"

    def to_config(self) -> JiTConfig:
        """Validate into a :class:`~lightning_jit.config.JiTConfig`.

        Raises:
            JiTUsageError: naming ``--jit.<field>`` for an invalid value (e.g. ``sigma <= 0``).
        """
        values = asdict(self)
        if isinstance(self.check_every, bool) or not isinstance(self.check_every, int) or self.check_every < 1:
            raise JiTUsageError("--jit.check_every", f"must be an integer >= 1, got {self.check_every!r}.")
        try:
            return JiTConfig(**{k: v for k, v in values.items() if k not in _GUARD_FIELDS})
        except MisconfigurationException as err:
            found = re.search(r"`(\w+)`", str(err))
            raise JiTUsageError(f"--jit.{found.group(1)}" if found else "--jit", str(err)) from err


class JiTTrainer(pl.Trainer):
    """A Trainer with an :meth:`unlearn` method, the ``unlearn`` subcommand of :class:`JiTCLI`.

    Example:
        >>> trainer = JiTTrainer(logger=False, enable_progress_bar=False)
        >>> callable(trainer.unlearn)
        True
    """

    def unlearn(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        *,
        jit: JiTArgs,
        forget: ForgetSet,
        ckpt_path: str | None = None,
        output: str | None = None,
        overwrite: bool = False,
    ) -> str:
        """Unlearn a forget set from a trained model with JiT and write the result as a new checkpoint.

        The checkpoint is in the model's own format: ``MyModel.load_from_checkpoint(output)`` loads it, strictly.
        The input checkpoint is never modified.

        Args:
            model: The model (its weights are restored from ``ckpt_path``).
            datamodule: The datamodule whose training set the forget set is taken from.
            jit: The JiT hyperparameters.
            forget: Which training samples to forget.
            ckpt_path: Checkpoint of the trained model to unlearn from. Required on the command line; in Python,
                ``None`` unlearns from the model's current weights.
            output: Where to write the unlearned checkpoint (default: ``unlearned.ckpt`` in the run's log
                directory). Never the same file as ``ckpt_path``.
            overwrite: Replace ``output`` (and the run's ``config.yaml``) if they exist.

        Returns:
            The path of the unlearned checkpoint.

        Raises:
            JiTUsageError: for a missing checkpoint or one of another class, an existing ``output`` without
                ``overwrite``, bad JiT hyperparameters or a bad forget selection; nothing is written then.
        """
        config = jit.to_config()
        forget.check()
        source = _load_checkpoint(ckpt_path) if ckpt_path is not None else None
        if output is None:
            output = os.path.join(self.log_dir or self.default_root_dir, "unlearned.ckpt")
        _check_output(output, ckpt_path, overwrite)
        if source is not None:
            _restore_weights(model, source, ckpt_path)
        forget_loader = select_forget_loader(datamodule, forget, label_key=config.label_key)
        n_forget = len(forget_loader.dataset) if hasattr(getattr(forget_loader, "dataset", None), "__len__") else None
        rank_zero_info(
            f"JiT: unlearning {n_forget if n_forget is not None else 'the'} forget samples"
            f" ({forget.selector() or 'datamodule hook'}) from {ckpt_path or 'the in-memory model'}."
        )

        wrapper = JiTUnlearning(model, **asdict(jit))
        if self.fit_loop.max_epochs is None and self.max_steps == -1:
            self.fit_loop.max_epochs = config.epochs  # the wrapper stops after `epochs`; avoid Lightning's 1000 default
        self.fit(wrapper, train_dataloaders=forget_loader)
        if self.state.status != TrainerStatus.FINISHED:
            raise RuntimeError(f"JiT unlearning did not finish (status: {self.state.status.value}); nothing written.")

        checkpoint = self._checkpoint_connector.dump_checkpoint(weights_only=True)
        checkpoint[UNLEARN_RECORD_KEY] = {
            "source_checkpoint": str(ckpt_path) if ckpt_path is not None else None,
            "source_sha256": _sha256(ckpt_path) if ckpt_path is not None else None,
            "forget": asdict(forget),
            "forget_samples": n_forget,
            "epochs_run": self.current_epoch,
            "outcome": getattr(wrapper, "outcome", None),
            "stopped_early": wrapper.stopped_early,
            "skipped_steps": wrapper.skipped_steps,
        }
        if self.is_global_zero:
            atomic_torch_save(checkpoint, output, overwrite=overwrite)
        self.strategy.barrier("jit_unlearn_save")
        outcome = getattr(wrapper, "outcome", None)
        rank_zero_info(f"JiT: wrote the unlearned checkpoint to {output} (outcome: {outcome}).")
        return str(output)


class JiTCLI(LightningCLI):
    """``LightningCLI`` with an ``unlearn`` subcommand: swap ``LightningCLI`` for ``JiTCLI`` in a training script.

    ``python main.py unlearn --ckpt_path=trained.ckpt --config=unlearn.yaml`` restores the trained weights, selects
    the forget set (``--forget.*``) from the datamodule, runs JiT (``--jit.*``) and writes a new checkpoint that loads
    with ``MyModel.load_from_checkpoint(path, strict=True)``. LightningCLI's ``config.yaml`` is saved with the run.

    Unlike LightningCLI's ``fit --ckpt_path``, the checkpoint's saved hyperparameters do not silently override
    values given on the command line or in a config file: the checkpoint's values fill in only the model arguments
    that were not given, and a given value that differs from the checkpoint's is kept, with a warning.

    Every usage error (unknown flag, missing checkpoint, checkpoint of another class, ``--jit.sigma <= 0``, empty or
    invalid forget selection, existing ``--output`` without ``--overwrite``) exits with code 2 and a message naming the
    flag, before anything is written. The other subcommands behave exactly as in ``LightningCLI``.

    Args:
        args: As :class:`~lightning.pytorch.cli.LightningCLI`'s positional arguments.
        trainer_class: A :class:`JiTTrainer` subclass (default: :class:`JiTTrainer`).
        kwargs: As :class:`~lightning.pytorch.cli.LightningCLI`'s keyword arguments.

    Example:
        >>> from lightning_jit.data import DigitsCNN, DigitsDataModule
        >>> # main.py; then: python main.py unlearn --ckpt_path=digits.ckpt --config=unlearn.yaml
        >>> def cli_main():
        ...     JiTCLI(DigitsCNN, DigitsDataModule)
    """

    def __init__(self, *args: Any, trainer_class: type[JiTTrainer] = JiTTrainer, **kwargs: Any) -> None:
        if not (isinstance(trainer_class, type) and issubclass(trainer_class, JiTTrainer)):
            raise MisconfigurationException(
                f"`JiTCLI(trainer_class=...)` must be a subclass of `lightning_jit.cli.JiTTrainer`, got"
                f" {trainer_class!r}. Derive your Trainer from `JiTTrainer` to get the `unlearn` subcommand."
            )
        self._cli_args: Any = None
        super().__init__(*args, trainer_class=trainer_class, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """LightningCLI's subcommands plus ``unlearn``."""
        return {**LightningCLI.subcommands(), "unlearn": {"model", "datamodule"}}

    def parse_arguments(self, parser: Any, args: Any) -> None:
        self._cli_args = args
        super().parse_arguments(parser, args)

    # ----------------------------------------------------------------------------------------------------------------
    # Checks before anything is instantiated or written
    # ----------------------------------------------------------------------------------------------------------------
    def _parse_ckpt_path(self) -> None:
        if self.config.get("subcommand") != "unlearn":
            super()._parse_ckpt_path()
            return
        try:
            self._check_unlearn_config(self.config.unlearn)
        except JiTUsageError as err:
            self._usage_exit(err)

    def _check_unlearn_config(self, cfg: Namespace) -> None:
        ckpt_path = cfg.get("ckpt_path")
        if not ckpt_path:
            raise JiTUsageError("--ckpt_path", "is required: the checkpoint of the trained model to unlearn from.")
        checkpoint = _load_checkpoint(ckpt_path)
        _namespace_dataclass(JiTArgs, cfg.jit).to_config()
        _namespace_dataclass(ForgetSet, cfg.forget).check()
        if cfg.get("output"):
            _check_output(cfg.output, ckpt_path, bool(cfg.get("overwrite")))
        self._merge_checkpoint_hparams(cfg, checkpoint, ckpt_path)

    def _merge_checkpoint_hparams(self, cfg: Namespace, checkpoint: dict[str, Any], ckpt_path: str) -> None:
        """Fill in the model arguments that were not given from the checkpoint's hparams; never override given ones."""
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        ckpt_class = hparams.pop("_class_path", None)
        subclass_form = isinstance(cfg.model, Namespace) and "class_path" in cfg.model
        if subclass_form:
            class_path, init = cfg.model.class_path, cfg.model.get("init_args") or Namespace()
        else:
            model_class = self.model_class
            class_path = f"{model_class.__module__}.{getattr(model_class, '__qualname__', model_class)}"
            init = cfg.model
        if ckpt_class is not None and ckpt_class != class_path:
            raise JiTUsageError(
                "--ckpt_path",
                f"{ckpt_path!r} is a checkpoint of {ckpt_class}, but the model is {class_path} (--model).",
            )
        if not hparams:
            return
        accepted = {key.split(".")[0] for key in init.keys()} if isinstance(init, Namespace) else set()
        unknown = sorted(k for k in hparams if k not in accepted)
        if unknown:
            raise JiTUsageError(
                "--ckpt_path",
                f"{ckpt_path!r} has hyperparameters {unknown} that {class_path} (--model) does not take: it is a"
                " checkpoint of another class.",
            )
        given = self._given_model_args()
        fill: dict[str, Any] = {}
        for key, value in hparams.items():
            current = init.get(key)
            if key in given:
                if current != value:
                    rank_zero_warn(
                        f"--model.{key}={current!r} was given and is kept; the checkpoint {ckpt_path!r} was saved"
                        f" with {key}={value!r}."
                    )
            elif current != value:
                fill[key] = value
        if fill:
            rank_zero_info(f"Restoring model arguments from the checkpoint: {fill}")
            model_update = {"class_path": class_path, "init_args": fill} if subclass_form else fill
            self.config = self.parser.parse_object({"unlearn": {"model": model_update}}, self.config)

    def _given_model_args(self) -> set[str]:
        """The model arguments given explicitly (command line, config file or environment), not by default."""
        args = self._cli_args
        if isinstance(args, (dict, Namespace)):
            given = self.parser.parse_object(args, defaults=False)
        else:
            given = self.parser.parse_args(args, defaults=False)
        model = given.get("unlearn", Namespace()).get("model")
        if not isinstance(model, Namespace):
            return set()
        if "class_path" in model:
            model = Namespace(**{**vars(model.get("init_args") or Namespace()), **(model.get("dict_kwargs") or {})})
        return {key.split(".")[0] for key in model.keys()}

    def before_instantiate_classes(self) -> None:
        if self.subcommand == "unlearn" and self.config.unlearn.get("overwrite"):
            self.save_config_kwargs = {**self.save_config_kwargs, "overwrite": True}

    # ----------------------------------------------------------------------------------------------------------------
    # The subcommand
    # ----------------------------------------------------------------------------------------------------------------
    def unlearn(self, **kwargs: Any) -> None:
        """Run :meth:`JiTTrainer.unlearn`; a usage error found with the data exits with code 2, nothing written."""
        try:
            self._check_config_file_free(bool(kwargs.get("overwrite")))
            kwargs["jit"] = _as_dataclass(JiTArgs, kwargs["jit"])
            kwargs["forget"] = _as_dataclass(ForgetSet, kwargs["forget"])
            self.trainer.unlearn(**kwargs)
        except JiTUsageError as err:
            if self.trainer.state.fn is not None:  # raised from inside the run: not a usage error
                raise
            self._usage_exit(err)

    def _check_config_file_free(self, overwrite: bool) -> None:
        for callback in self.trainer.callbacks:
            if isinstance(callback, SaveConfigCallback) and callback.save_to_log_dir and not overwrite:
                path = os.path.join(self.trainer.log_dir or self.trainer.default_root_dir, callback.config_filename)
                if os.path.exists(path):
                    raise JiTUsageError(
                        "--overwrite",
                        f"{path!r} exists (from an earlier run in the same log directory); pass --overwrite to"
                        " replace it, or use another --trainer.default_root_dir or logger.",
                    )

    def _usage_exit(self, err: JiTUsageError) -> None:
        prog = " ".join(filter(None, [Path(sys.argv[0]).name, self.config.get("subcommand")]))
        sys.stderr.write(f"{prog}: error: {err}\n")
        raise SystemExit(2)


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------
def _load_checkpoint(ckpt_path: str | os.PathLike) -> dict[str, Any]:
    path = Path(ckpt_path)
    if not path.is_file():
        raise JiTUsageError("--ckpt_path", f"no such checkpoint file: {str(path)!r}.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is a usage error naming the flag
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise JiTUsageError("--ckpt_path", f"{str(path)!r} is not a readable checkpoint ({first}).") from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise JiTUsageError("--ckpt_path", f"{str(path)!r} is not a Lightning checkpoint (no 'state_dict').")
    return checkpoint


def _restore_weights(model: pl.LightningModule, checkpoint: dict[str, Any], ckpt_path: str) -> None:
    """Load the checkpoint's weights strictly, as ``load_from_checkpoint`` does; a mismatch is a usage error."""
    model.on_load_checkpoint(checkpoint)
    try:
        model.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise JiTUsageError(
            "--ckpt_path",
            f"{ckpt_path!r} does not fit {type(model).__name__} (--model): it is a checkpoint of another class or"
            f" of other model arguments. {detail[:400]}",
        ) from err


def _check_output(output: str | os.PathLike, ckpt_path: str | os.PathLike | None, overwrite: bool) -> None:
    out = Path(output)
    if ckpt_path is not None and (
        out.resolve() == Path(ckpt_path).resolve() or (out.exists() and os.path.samefile(out, ckpt_path))
    ):
        raise JiTUsageError("--output", f"{str(out)!r} is the input --ckpt_path; the CLI never overwrites its input.")
    if out.is_dir():
        raise JiTUsageError("--output", f"{str(out)!r} is a directory; give the path of the checkpoint file to write.")
    if out.exists() and not overwrite:
        raise JiTUsageError("--output", f"{str(out)!r} exists; pass --overwrite to replace it.")


def _sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _namespace_dataclass(cls: type, value: Any) -> Any:
    """Build a dataclass from a parsed (not yet instantiated) group without running its own validation twice."""
    if isinstance(value, cls):
        return value
    if isinstance(value, Namespace):
        value = value.as_dict()
    return cls(**(value or {}))


_as_dataclass = _namespace_dataclass


# ---------------------------------------------------------------------------------------------------------------------
# The console script
# ---------------------------------------------------------------------------------------------------------------------
def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="JiT zero-shot unlearning for Lightning. Exit codes: 0 success, 2 usage error, 1 failure.",
    )
    parser.add_argument("--verbose", action="store_true", help="Print the traceback of a failure.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,unlearn,evaluate,tune}")
    demo = sub.add_parser(
        "demo", help="Train on scikit-learn's digits, forget one class with JiT, compare to retraining."
    )
    demo.add_argument(
        "--forget-class",
        type=int,
        default=DEMO_FORGET_CLASS,
        help=f"The digit to forget (default: {DEMO_FORGET_CLASS}).",
    )
    demo.add_argument("--seed", type=int, default=0, help="Seed (default: 0).")
    sub.add_parser(
        "unlearn",
        add_help=False,
        help="Unlearn a forget set from a checkpoint (JiTCLI's unlearn subcommand: `lightning-jit unlearn --help`).",
    )
    sub.add_parser(
        "evaluate",
        add_help=False,
        help="Write the unlearning report for an original, an unlearned and an optional retrained checkpoint.",
    )
    sub.add_parser(
        "tune",
        add_help=False,
        help="Search sigma and lr for a checkpoint and forget set; write tuned.yaml for `unlearn` (`tune --help`).",
    )
    return parser


@contextlib.contextmanager
def _argv(argv: list[str]) -> Iterator[None]:
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


def _run_unlearn(rest: list[str]) -> None:
    # LightningCLI reads sys.argv itself (passing `args` as well would make it warn), so hand it the subcommand.
    with _argv([_PROG, "unlearn", *rest]):
        JiTCLI(model_class=None, datamodule_class=None, subclass_mode_model=True, subclass_mode_data=True)


def _evaluate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{_PROG} evaluate",
        description="Write the unlearning report (report.md, report.json, report.png) for an original checkpoint, an"
        " unlearned one and an optional retrained one. The model, datamodule and forget set come from the unlearn"
        " config (its `model`, `data`, `forget` and `jit.label_key`; other keys are ignored). Forget = the forget set,"
        " retain = the rest of the training set (for classes/indices/ids selections), test = the datamodule's"
        " test_dataloader().",
    )
    parser.add_argument("--config", required=True, help="The YAML config given to `lightning-jit unlearn`.")
    parser.add_argument("--unlearned", required=True, help="The unlearned checkpoint.")
    parser.add_argument(
        "--original", help="The original checkpoint (default: the source recorded in the unlearned checkpoint)."
    )
    parser.add_argument("--retrained", help="A checkpoint retrained without the forget set (the gold standard).")
    parser.add_argument("--report_dir", help="Where to write the report (default: <unlearned>_report/).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing report.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the ZRF random model (default: 0).")
    return parser


@dataclass
class _Job:
    """What an ``unlearn`` config file describes: the model class, the datamodule and the forget selection."""

    path: str
    config: dict[str, Any]
    model_class: type
    datamodule: pl.LightningDataModule
    forget: ForgetSet
    label_key: int | str

    def load(self, flag: str, ckpt_path: str) -> pl.LightningModule:
        """The model class loaded (strictly) from a checkpoint, in eval mode; a mismatch names ``flag``."""
        _load_checkpoint_for(flag, ckpt_path)
        try:
            return self.model_class.load_from_checkpoint(ckpt_path, map_location="cpu", strict=True).eval()
        except (RuntimeError, TypeError, KeyError) as err:
            raise JiTUsageError(
                flag, f"{ckpt_path!r} does not load into {self.config['model']['class_path']}: {err}"
            ) from err

    def forget_loader(self) -> Any:
        return select_forget_loader(self.datamodule, self.forget, label_key=self.label_key)

    def split_loader(self, flag: str, stage: str) -> Any:
        """The datamodule's ``val_dataloader()`` or ``test_dataloader()``; a datamodule without it names ``flag``."""
        from lightning.pytorch.utilities.model_helpers import is_overridden

        hook = f"{stage}_dataloader"
        if not is_overridden(hook, self.datamodule):
            raise JiTUsageError(flag, f"the datamodule {type(self.datamodule).__name__} has no `{hook}()`.")
        self.datamodule.setup("validate" if stage == "val" else "test")
        return getattr(self.datamodule, hook)()


def _load_job(config_path: str) -> _Job:
    """Read an ``unlearn`` config: its ``model``, ``data``, ``forget`` and ``jit.label_key`` (the rest is ignored)."""
    import yaml
    from jsonargparse import ArgumentParser

    if not Path(config_path).is_file():
        raise JiTUsageError("--config", f"no such file: {config_path!r}.")
    cfg = yaml.safe_load(Path(config_path).read_text()) or {}
    model_cfg, data_cfg = cfg.get("model"), cfg.get("data")
    if not isinstance(model_cfg, dict) or "class_path" not in model_cfg:
        raise JiTUsageError("--config", f"{config_path!r} has no `model.class_path`.")
    if not isinstance(data_cfg, dict) or "class_path" not in data_cfg:
        raise JiTUsageError("--config", f"{config_path!r} has no `data.class_path`.")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(pl.LightningDataModule, "data")
    datamodule = parser.instantiate_classes(parser.parse_object({"data": data_cfg})).data
    return _Job(
        path=config_path,
        config=cfg,
        model_class=_import_class(model_cfg["class_path"]),
        datamodule=datamodule,
        forget=ForgetSet(**(cfg.get("forget") or {})),
        label_key=(cfg.get("jit") or {}).get("label_key", 1),
    )


def _run_evaluate(rest: list[str]) -> None:
    args = _evaluate_parser().parse_args(rest)
    try:
        from lightning_jit.evaluate import evaluate_unlearning
    except ImportError as err:
        raise RuntimeError(f"`{_PROG} evaluate` is unavailable: cannot import lightning_jit.evaluate ({err}).") from err
    from torch.utils.data import DataLoader, Subset

    from lightning_jit.forget import forget_indices

    if not Path(args.config).is_file():
        raise JiTUsageError("--config", f"no such file: {args.config!r}.")
    unlearned_ckpt = _load_checkpoint_for("--unlearned", args.unlearned)
    original_path = args.original or (unlearned_ckpt.get(UNLEARN_RECORD_KEY) or {}).get("source_checkpoint")
    if not original_path:
        raise JiTUsageError("--original", "is required: the unlearned checkpoint records no source checkpoint.")
    for flag, path in (("--original", original_path), ("--retrained", args.retrained)):
        if path is not None:
            _load_checkpoint_for(flag, path)
    report_dir = Path(args.report_dir or f"{Path(args.unlearned).with_suffix('')}_report")
    existing = [p for p in ("report.json", "report.md", "report.png") if (report_dir / p).exists()]
    if existing and not args.overwrite:
        raise JiTUsageError("--report_dir", f"{str(report_dir)!r} already holds {existing}; pass --overwrite.")

    job = _load_job(args.config)
    models = {}
    for flag, path in (("--original", original_path), ("--unlearned", args.unlearned), ("--retrained", args.retrained)):
        if path is not None:
            models[flag] = job.load(flag, path)
    forget_loader = job.forget_loader()
    retain = None
    if job.forget.selector() not in (None, "loader"):
        train_loader, dataset, indices = forget_indices(job.datamodule, job.forget, job.label_key)
        keep = sorted(set(range(len(dataset))) - set(indices))
        retain = DataLoader(Subset(dataset, keep), batch_size=256, collate_fn=getattr(train_loader, "collate_fn", None))
    from lightning.pytorch.utilities.model_helpers import is_overridden

    test = job.split_loader("--config", "test") if is_overridden("test_dataloader", job.datamodule) else None
    report = evaluate_unlearning(
        models["--original"],
        models["--unlearned"],
        forget_loader,
        retain=retain,
        test=test,
        retrained=models.get("--retrained"),
        seed=args.seed,
    )
    paths = report.save(report_dir)
    print(report.to_markdown())
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")


def _tune_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{_PROG} tune",
        description="Search JiT's sigma and lr for a model and forget set (successive halving, see docs/tune.md) and"
        " write tuned.yaml (the `jit:` group for `unlearn --config ... --config tuned.yaml`), trials.md, trials.json"
        " and tune.png. The model, datamodule, forget set, checkpoint and fixed JiT settings come from the unlearn"
        " config; its jit.sigma / jit.lr are ignored.",
    )
    parser.add_argument("--config", required=True, help="The YAML config given to `lightning-jit unlearn`.")
    parser.add_argument("--ckpt_path", help="The trained checkpoint (default: the config's ckpt_path).")
    parser.add_argument("--out", default="lightning_jit_tune", help="Output directory (default: lightning_jit_tune).")
    parser.add_argument(
        "--task",
        choices=("class", "random"),
        help="class: the forget set is whole classes; random: a sample of the training data, judged against the"
        " test split's confidence (default: class with forget.classes, else random).",
    )
    parser.add_argument(
        "--monitor",
        choices=("val", "test"),
        help="Monitored mode: the datamodule's val or test split, without the forgotten classes, must keep its"
        " accuracy within --max_drop points (default: zero-shot, no held-out data).",
    )
    parser.add_argument("--max_drop", type=float, default=2.0, help="With --monitor: allowed fall, points.")
    parser.add_argument("--budget", type=float, help="Time budget in seconds (default: none).")
    parser.add_argument("--n_configs", type=int, default=16, help="Settings drawn at the first rung (default: 16).")
    parser.add_argument("--max_epochs", type=int, default=30, help="Epochs of the last rung (default: 30).")
    parser.add_argument("--search", choices=("halving", "random"), default="halving", help="(default: halving)")
    parser.add_argument("--seed", type=int, default=0, help="Seed (default: 0).")
    parser.add_argument("--overwrite", action="store_true", help="Replace existing files in --out.")
    return parser


#: ``jit:`` keys of an unlearn config that ``tune`` searches or sets itself, and so does not pass on.
_TUNED_KEYS = ("sigma", "lr", "n_perturbations", "epochs", "seed", "target_forget_accuracy", "guard")


def _run_tune(rest: list[str]) -> None:
    from lightning_jit.tune import tune_jit

    args = _tune_parser().parse_args(rest)
    for flag, value, ok in (
        ("--n_configs", args.n_configs, args.n_configs >= 1),
        ("--max_epochs", args.max_epochs, args.max_epochs >= 1),
        ("--budget", args.budget, args.budget is None or args.budget > 0),
        ("--max_drop", args.max_drop, args.max_drop >= 0),
    ):
        if not ok:
            raise JiTUsageError(flag, f"must be > 0 (>= 0 for --max_drop, >= 1 for counts), got {value!r}.")
    job = _load_job(args.config)
    ckpt_path = args.ckpt_path or job.config.get("ckpt_path")
    if not ckpt_path:
        raise JiTUsageError("--ckpt_path", "is required (or `ckpt_path` in the config): the trained checkpoint.")
    out = Path(args.out)
    existing = [p for p in ("tuned.yaml", "trials.md", "trials.json", "tune.png") if (out / p).exists()]
    if existing and not args.overwrite:
        raise JiTUsageError("--out", f"{str(out)!r} already holds {existing}; pass --overwrite.")
    model = job.load("--ckpt_path", ckpt_path)
    task = args.task or ("class" if job.forget.classes else "random")
    jit_cfg = dict(job.config.get("jit") or {})
    fixed = {k: v for k, v in jit_cfg.items() if k not in _TUNED_KEYS and k in JiTArgs.__dataclass_fields__}
    fixed = {k: v for k, v in fixed.items() if k not in _GUARD_FIELDS}
    kwargs: dict[str, Any] = {}
    if jit_cfg.get("target_forget_accuracy") is not None:
        kwargs["target_forget_accuracy"] = float(jit_cfg["target_forget_accuracy"])
    if args.monitor is not None:
        kwargs["monitor"] = _without_classes(job.split_loader("--monitor", args.monitor), job.forget.classes)
        kwargs["max_drop"] = args.max_drop
    if task == "random":
        kwargs["unseen"] = job.split_loader("--task", "test")
    result = tune_jit(
        model,
        job.forget_loader(),
        task=task,
        budget=args.budget,
        n_configs=args.n_configs,
        max_epochs=args.max_epochs,
        search=args.search,
        seed=args.seed,
        **kwargs,
        **fixed,
    )
    paths = result.save(out)
    print(result.table())
    if result.message:
        print(f"\n{result.message}")
    print(f"\n{result.to_yaml()}")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    print(f"next: {_PROG} unlearn --config {args.config} --config {paths['yaml']}")


def _without_classes(loader: Any, classes: list[int] | None) -> list[tuple[Tensor, Tensor]]:
    """The ``(x, y)`` batches of ``loader`` without the samples of ``classes`` (the forgotten ones)."""
    from lightning_jit.evaluate import _batch_xy

    batches = []
    for batch in loader:
        x, y = _batch_xy(batch, "monitor")
        keep = ~torch.isin(y, torch.tensor(classes or [], dtype=y.dtype))
        if keep.any():
            batches.append((x[keep], y[keep]))
    if not batches:
        raise JiTUsageError("--monitor", "the monitor split holds no sample of a kept class.")
    return batches


def _load_checkpoint_for(flag: str, path: str) -> dict[str, Any]:
    try:
        return _load_checkpoint(path)
    except JiTUsageError as err:
        raise JiTUsageError(flag, str(err).split(": ", 1)[1]) from err


def _import_class(class_path: str) -> type:
    import importlib

    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise JiTUsageError("--config", f"cannot import model.class_path {class_path!r}: {err}") from err


def main(argv: list[str] | None = None) -> int:
    """The ``lightning-jit`` console script. Returns the exit code: 0 success, 2 usage error, 1 failure.

    Args:
        argv: The arguments (default: ``sys.argv[1:]``). ``--verbose`` anywhere prints the traceback of a failure.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    try:
        if argv and argv[0] == "unlearn":
            _run_unlearn(argv[1:])
            return 0
        if argv and argv[0] == "evaluate":
            _run_evaluate(argv[1:])
            return 0
        if argv and argv[0] == "tune":
            _run_tune(argv[1:])
            return 0
        args = _top_parser().parse_args(argv)
        if args.command == "demo":
            from lightning_jit.demo import run_demo

            run_demo(forget_class=args.forget_class, seed=args.seed)
        return 0
    except SystemExit as exit_:
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except JiTUsageError as err:
        sys.stderr.write(f"{_PROG}: error: {err}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{_PROG}: interrupted\n")
        return 130
    except Exception as err:  # noqa: BLE001 - the console script reports every failure as one line
        if verbose:
            traceback.print_exc()
        message = " ".join(str(err).split()) or "(no message)"
        hint = "" if verbose else " (run with --verbose for the traceback)"
        sys.stderr.write(f"{_PROG}: error: {type(err).__name__}: {message}{hint}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
