"""``JiTCLI``: LightningCLI with an ``unlearn`` subcommand. Swap ``LightningCLI`` for ``JiTCLI`` in a training script.

Every usage error of ``unlearn`` is one line naming the flag, exit code 2, before anything is written: a bad value
(``--jit.sigma=0``, ``--jit.sigma=abc``), an unknown flag, a key of the previous version's config (with where it moved),
a ``class_path`` that does not import, a missing or foreign checkpoint, a bad forget selection, an existing output.
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_jit.cli.checkpoints import check_output, load_checkpoint, same_class
from lightning_jit.cli.diagnose import explain, given_values
from lightning_jit.cli.errors import JiTUsageError
from lightning_jit.cli.trainer import JiTTrainer, build_groups, unlearn_groups
from lightning_jit.core.errors import JiTDivergenceError
from lightning_jit.core.outcome import JiTUnlearningFailed

#: The exit code of an ``unlearn`` whose verified outcome is not ``forgotten`` (and of a ``tune`` that met no target).
EXIT_NOT_FORGOTTEN = 3

__all__ = ["JiTCLI"]

_SUBCOMMAND = "unlearn"


class JiTCLI(LightningCLI):
    """``LightningCLI`` with an ``unlearn`` subcommand: swap ``LightningCLI`` for ``JiTCLI`` in a training script.

    ``python main.py unlearn --ckpt_path=trained.ckpt --config=unlearn.yaml`` restores the trained weights, selects
    the forget set (``--forget.*``) from the datamodule, runs JiT (``--jit.*``, ``--batch.*``, ``--guard.*``: the
    arguments of :meth:`JiTTrainer.unlearn <lightning_jit.cli.trainer.JiTTrainer.unlearn>`) and writes a new checkpoint
    that loads with ``MyModel.load_from_checkpoint(path, strict=True)``. LightningCLI's ``config.yaml`` is saved with
    the run.

    Unlike LightningCLI's ``fit --ckpt_path``, the checkpoint's saved hyperparameters do not silently override
    values given on the command line or in a config file: the checkpoint's values fill in only the model arguments
    that were not given, and a given value that differs from the checkpoint's is kept, with a warning.

    ``unlearn`` exits with code 0 only when the deletion is verified ``forgotten``; any other outcome exits with code 3
    and one line (the verdict and what to do next), writing no checkpoint unless ``--keep_unverified``.

    Every usage error of ``unlearn`` (a bad or unknown flag, a moved or removed key of the previous version's config,
    a ``class_path`` that cannot be imported, a missing checkpoint or one of another class, an empty or invalid forget
    selection, an existing ``--output`` without ``--overwrite``) exits with code 2 and one line naming the flag, before
    anything is written. The other subcommands behave exactly as in ``LightningCLI``.

    Args:
        args: As :class:`~lightning.pytorch.cli.LightningCLI`'s positional arguments.
        trainer_class: A :class:`~lightning_jit.cli.trainer.JiTTrainer` subclass (default: ``JiTTrainer``).
        kwargs: As :class:`~lightning.pytorch.cli.LightningCLI`'s keyword arguments.

    Example:
        >>> from lightning_jit.demo.data import DigitsCNN, DigitsDataModule
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
        parser_class = kwargs.pop("parser_class", _RaisingParser)
        if not issubclass(parser_class, _RaisingParser):  # a user's parser class, with the one-line errors added
            parser_class = type(parser_class.__name__, (_RaisingParser, parser_class), {})
        self._cli_args: Any = None
        super().__init__(*args, trainer_class=trainer_class, parser_class=parser_class, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """LightningCLI's subcommands plus ``unlearn``."""
        return {**LightningCLI.subcommands(), _SUBCOMMAND: {"model", "datamodule"}}

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        self._cli_args = args
        try:
            super().parse_arguments(parser, args)
        except _ParseFailure as failure:
            given = sys.argv[1:] if args is None else args
            subcommand, rest = _split_subcommand(given, set(self.subcommands()))
            if subcommand != _SUBCOMMAND:
                failure.report()  # LightningCLI's own report: usage and message, exit code 2
            groups = unlearn_groups()
            options = getattr(self, "_subcommand_parsers", {}).get(_SUBCOMMAND)
            options = set(getattr(options, "_option_string_actions", ()))  # argparse's table of the flags it takes
            found = explain(given_values(rest, groups), groups, _scalar_parameters(), options)
            self._usage_exit(str(found) if found is not None else _one_line(failure.message), subcommand)

    # ------------------------------------------------------------------------------------------------------------------
    # Checks before anything is instantiated or written
    # ------------------------------------------------------------------------------------------------------------------
    def _parse_ckpt_path(self) -> None:
        if self.config.get("subcommand") != _SUBCOMMAND:
            super()._parse_ckpt_path()
            return
        try:
            self._check_unlearn_config(self.config[_SUBCOMMAND])
        except JiTUsageError as err:
            self._usage_exit(str(err))

    def _check_unlearn_config(self, cfg: Namespace) -> None:
        ckpt_path = cfg.get("ckpt_path")
        if not ckpt_path:
            raise JiTUsageError("--ckpt_path", "is required: the checkpoint of the trained model to unlearn from.")
        checkpoint = load_checkpoint(ckpt_path)
        groups = build_groups({name: _plain(cfg.get(name)) for name in unlearn_groups()})
        groups["forget"].check()
        if cfg.get("output"):
            check_output(cfg.output, ckpt_path, bool(cfg.get("overwrite")))
        self._merge_checkpoint_hparams(cfg, checkpoint, ckpt_path)

    def _merge_checkpoint_hparams(self, cfg: Namespace, checkpoint: dict[str, Any], ckpt_path: str) -> None:
        """Fill in the model arguments that were not given from the checkpoint's hparams; never override given ones."""
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        ckpt_class = hparams.pop("_class_path", None)
        subclass_form = isinstance(cfg.model, Namespace) and "class_path" in cfg.model
        if subclass_form:
            configured: str | type = cfg.model.class_path
            class_path, init = cfg.model.class_path, cfg.model.get("init_args") or Namespace()
        else:
            configured = self.model_class
            class_path = f"{configured.__module__}.{getattr(configured, '__qualname__', configured)}"
            init = cfg.model
        if ckpt_class is not None and not same_class(ckpt_class, configured):
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
            self.config = self.parser.parse_object({_SUBCOMMAND: {"model": model_update}}, self.config)

    def _given_model_args(self) -> set[str]:
        """The model arguments given explicitly (command line, config file or environment), not by default."""
        args = self._cli_args
        if isinstance(args, (dict, Namespace)):
            given = self.parser.parse_object(args, defaults=False)
        else:
            given = self.parser.parse_args(args, defaults=False)
        model = given.get(_SUBCOMMAND, Namespace()).get("model")
        if not isinstance(model, Namespace):
            return set()
        if "class_path" in model:
            model = Namespace(**{**vars(model.get("init_args") or Namespace()), **(model.get("dict_kwargs") or {})})
        return {key.split(".")[0] for key in model.keys()}

    def before_instantiate_classes(self) -> None:
        if self.subcommand == _SUBCOMMAND and self.config[_SUBCOMMAND].get("overwrite"):
            self.save_config_kwargs = {**self.save_config_kwargs, "overwrite": True}

    # ------------------------------------------------------------------------------------------------------------------
    # The subcommand
    # ------------------------------------------------------------------------------------------------------------------
    def unlearn(self, **kwargs: Any) -> None:
        """Run :meth:`JiTTrainer.unlearn`; a usage error found with the data exits with code 2, nothing written."""
        try:
            self._check_config_file_free(bool(kwargs.get("overwrite")))
            kwargs.update(build_groups({name: _plain(kwargs.get(name)) for name in unlearn_groups()}))
            self.trainer.unlearn(**kwargs)
        except JiTUsageError as err:
            if self.trainer.state.fn is not None:  # raised from inside the run: not a usage error
                raise
            self._usage_exit(str(err))

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

    def _run_subcommand(self, subcommand: str) -> None:
        """Run the subcommand; an ``unlearn`` whose outcome is not ``forgotten`` exits with code 3 and one line."""
        try:
            super()._run_subcommand(subcommand)
        except (JiTUnlearningFailed, JiTDivergenceError) as err:
            if subcommand != _SUBCOMMAND:
                raise
            prog = " ".join([Path(sys.argv[0]).name, subcommand])
            sys.stderr.write(f"{prog}: {' '.join(str(err).split())}\n")
            raise SystemExit(EXIT_NOT_FORGOTTEN) from err

    def _usage_exit(self, message: str, subcommand: str | None = None) -> NoReturn:
        subcommand = subcommand or (self.config.get("subcommand") if hasattr(self, "config") else None)
        prog = " ".join(filter(None, [Path(sys.argv[0]).name, subcommand]))
        sys.stderr.write(f"{prog}: error: {message}\n")
        raise SystemExit(2)


# ----------------------------------------------------------------------------------------------------------------------
# The parser: a failure is raised to JiTCLI, which names the flag
# ----------------------------------------------------------------------------------------------------------------------
class _ParseFailure(Exception):
    """The parser failed; :meth:`report` prints it as LightningCLI would (usage, message, exit code 2)."""

    def __init__(self, parser: Any, message: str, cause: Exception | None) -> None:
        super().__init__(message)
        self.parser, self.message, self.cause = parser, message, cause

    def report(self) -> NoReturn:
        super(_RaisingParser, self.parser).error(self.message, self.cause)
        raise SystemExit(2)  # not reached: the parser exits


class _RaisingParser(LightningArgumentParser):
    """Raises a parse failure to :class:`JiTCLI` instead of printing the usage of every flag and exiting."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if self.exit_on_error:
            raise _ParseFailure(self, message, ex)
        super().error(message, ex)


def _split_subcommand(args: Any, subcommands: set[str]) -> tuple[str | None, Any]:
    """The subcommand and what was given to it, from a command line (or a LightningCLI ``args`` dict)."""
    if isinstance(args, (dict, Namespace)):
        name = args.get("subcommand") or next((k for k in args if k in subcommands), None)
        given = args.get(name) if name else None
        return name, (given.as_dict() if isinstance(given, Namespace) else dict(given or {}))
    tokens = list(args)
    i = 0
    while i < len(tokens):
        if tokens[i] in ("-c", "--config"):
            i += 2
            continue
        if tokens[i] in subcommands:
            return tokens[i], tokens[i + 1 :]
        i += 1
    return None, []


def _scalar_parameters() -> dict[str, inspect.Parameter]:
    """The arguments of ``unlearn`` outside the groups (``ckpt_path``, ``output``, ``overwrite``), resolved."""
    import typing

    hints = typing.get_type_hints(JiTTrainer.unlearn)
    groups = unlearn_groups()
    params = inspect.signature(JiTTrainer.unlearn).parameters
    return {
        name: param.replace(annotation=hints[name])
        for name, param in params.items()
        if name not in groups and name not in ("self", "model", "datamodule") and name in hints
    }


def _plain(value: Any) -> Any:
    return value.as_dict() if isinstance(value, Namespace) else value


def _one_line(message: str) -> str:
    text = " ".join(message.split())
    return text if len(text) <= 400 else text[:400] + " ... (see --help)"
