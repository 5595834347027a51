"""Reading the checkpoints the command line is given: every problem is a :class:`JiTUsageError` naming the flag.

The command line reads checkpoints, never writes over them: :func:`check_output` refuses an output that is the input.
A checkpoint's class is compared as a class, not as a string, so that a checkpoint recording a class under an older
import path (``lightning_jit.data.DigitsCNN``, a compatibility module re-exporting
``lightning_jit.demo.data.DigitsCNN``) is the same class as the one configured.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_jit.cli.errors import JiTUsageError

__all__ = ["check_output", "import_class", "load_checkpoint", "restore_weights", "same_class"]


def load_checkpoint(path: str | os.PathLike, flag: str = "--ckpt_path") -> dict[str, Any]:
    """Read a Lightning checkpoint (on the CPU, ``weights_only``).

    Raises:
        JiTUsageError: naming ``flag`` for a missing file, an unreadable one, or one without a ``state_dict``.
    """
    path = Path(path)
    if not path.is_file():
        raise JiTUsageError(flag, f"no such checkpoint file: {str(path)!r}.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is a usage error naming the flag
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise JiTUsageError(flag, f"{str(path)!r} is not a readable checkpoint ({first}).") from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise JiTUsageError(flag, f"{str(path)!r} is not a Lightning checkpoint (no 'state_dict').")
    return checkpoint


def restore_weights(model: pl.LightningModule, checkpoint: dict[str, Any], ckpt_path: str | os.PathLike) -> None:
    """Load the checkpoint's weights strictly, as ``load_from_checkpoint`` does.

    Raises:
        JiTUsageError: naming ``--ckpt_path`` when the weights do not fit the model.
    """
    model.on_load_checkpoint(checkpoint)
    try:
        model.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise JiTUsageError(
            "--ckpt_path",
            f"{str(ckpt_path)!r} does not fit {type(model).__name__} (--model): it is a checkpoint of another class or"
            f" of other model arguments. {detail[:400]}",
        ) from err


def check_output(output: str | os.PathLike, ckpt_path: str | os.PathLike | None, overwrite: bool) -> None:
    """Refuse to write ``output`` over the input checkpoint, a directory, or (without ``overwrite``) an existing file.

    Raises:
        JiTUsageError: naming ``--output``.
    """
    out = Path(output)
    if ckpt_path is not None and (
        out.resolve() == Path(ckpt_path).resolve() or (out.exists() and os.path.samefile(out, ckpt_path))
    ):
        raise JiTUsageError("--output", f"{str(out)!r} is the input --ckpt_path; the CLI never overwrites its input.")
    if out.is_dir():
        raise JiTUsageError("--output", f"{str(out)!r} is a directory; give the path of the checkpoint file to write.")
    if out.exists() and not overwrite:
        raise JiTUsageError("--output", f"{str(out)!r} exists; pass --overwrite to replace it.")


def import_class(class_path: str, flag: str = "model.class_path", what: str = "") -> type:
    """The class at a dotted ``class_path`` (``package.module.Class``).

    Raises:
        JiTUsageError: naming ``flag`` when it cannot be imported, with the reason (e.g. ``No module named 'x'``);
            ``what`` names the setting in the message.

    Example:
        >>> import_class("lightning_jit.data.DigitsCNN") is import_class("lightning_jit.demo.data.DigitsCNN")
        True
    """
    module_name, _, name = str(class_path).rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), name) if module_name else None
    except (ImportError, AttributeError) as err:
        raise JiTUsageError(flag, f"cannot import {what}{' ' if what else ''}{class_path!r}: {err}.") from err
    if not isinstance(found, type):
        raise JiTUsageError(flag, f"{class_path!r} is not a class; give its import path, e.g. `package.MyModel`.")
    return found


def same_class(recorded: str, configured: str | type) -> bool:
    """Whether a checkpoint's recorded ``_class_path`` names the configured class (compared as classes)."""
    configured_class = configured if isinstance(configured, type) else _importable(configured)
    recorded_class = _importable(recorded)
    if recorded_class is None or configured_class is None:
        return recorded == (configured if isinstance(configured, str) else _path_of(configured))
    return recorded_class is configured_class


def _importable(class_path: str) -> type | None:
    try:
        return import_class(class_path)
    except JiTUsageError:
        return None


def _path_of(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
