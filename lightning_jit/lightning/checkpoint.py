"""Checkpoints from a JiT run: written atomically, and in the wrapped model's own format only once verified.

:class:`AtomicCheckpointIO` makes every checkpoint a Trainer writes atomic; the wrapper installs it. The functions
below rewrite a :class:`~lightning_jit.lightning.module.JiTUnlearning` checkpoint so that it is the wrapped model's:
``OriginalClass.load_from_checkpoint(path, strict=True)`` loads it.

A checkpoint written while a run is in progress (a ``ModelCheckpoint`` at the end of a pass) is not a result: it
stays in the wrapper's own format (``model.``-prefixed keys, the run's state, the :data:`JIT_UNVERIFIED_KEY` marker),
which the user's class refuses, and :class:`AtomicCheckpointIO` records its path. When the run ends,
:func:`settle_unverified` rewrites in the user's format the files that hold the verified weights of a ``forgotten``
run and removes every other one.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor

from lightning_jit.io import atomic_torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, but every checkpoint is written through :func:`atomic_write`.

    Lightning's own save writes the bytes straight into the destination (through an fsspec transaction, without
    fsync); here they go to a temporary file in the same directory, which is fsynced and then renamed over the
    destination. A crash, SIGINT or SIGTERM therefore leaves either the previous file or the complete new one. Remote
    (non-local) paths fall back to Lightning's implementation.

    :class:`~lightning_jit.lightning.module.JiTUnlearning` installs it on the Trainer it runs in (see
    :class:`AtomicCheckpoints`); pass it yourself as ``Trainer(plugins=[AtomicCheckpointIO()])`` elsewhere.

    It also records the path of every checkpoint that carries the :data:`JIT_UNVERIFIED_KEY` marker (written while a
    run was in progress) in :attr:`unverified_paths`, for the wrapper to settle when the run ends.

    Example:
        >>> import tempfile, pathlib, torch
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "a.ckpt"
        >>> AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)
        >>> torch.load(path)["state_dict"]["w"].tolist()
        [1.0, 1.0]
    """

    def __init__(self) -> None:
        super().__init__()
        #: Paths of the checkpoints written while a JiT run was in progress, in the order they were written.
        self.unverified_paths: list[str] = []

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                "`Trainer.save_checkpoint(..., storage_options=...)` is not supported by AtomicCheckpointIO."
            )
        if not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path)
        else:
            atomic_torch_save(checkpoint, path)
        if JIT_UNVERIFIED_KEY in checkpoint and os.fspath(path) not in self.unverified_paths:
            self.unverified_paths.append(os.fspath(path))


def install_atomic_checkpoint_io(trainer: pl.Trainer) -> bool:
    """Make ``trainer`` write its checkpoints with :class:`AtomicCheckpointIO`.

    Only Lightning's default ``TorchCheckpointIO`` is replaced: a checkpoint IO the user chose is kept.

    Returns:
        Whether it was replaced (or already atomic).
    """
    strategy = trainer.strategy
    # None until first used, when Lightning would create a plain TorchCheckpointIO.
    current = getattr(strategy, "_checkpoint_io", None)
    if isinstance(current, AtomicCheckpointIO):
        return True
    if current is None or type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
        return True
    return False


class AtomicCheckpoints(pl.Callback):
    """Install :class:`AtomicCheckpointIO` on the Trainer at ``setup`` (added by ``JiTUnlearning``)."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        install_atomic_checkpoint_io(trainer)


#: Checkpoint key under which the wrapper keeps its settings next to the wrapped model's weights.
JIT_HPARAMS_KEY = "jit_hyper_parameters"
#: Checkpoint key of the run's safety report (outcome, skipped steps, collapse-guard events, the verification).
JIT_SAFETY_KEY = "jit_safety"
#: Checkpoint key of the state of a run in progress (:meth:`lightning_jit.core.engine.JiTRun.state_dict`).
JIT_RUN_STATE_KEY = "jit_run_state"
#: Checkpoint key that marks a checkpoint written while a run was in progress: a resume point, not a result.
JIT_UNVERIFIED_KEY = "jit_unverified"
_FORMAT_KEY = "jit_state_dict_format"
_FORMAT = "wrapped-model"
_PREFIX = "model."
#: The key of the wrapper's ``get_extra_state`` in its state dict.
_EXTRA_STATE = "_extra_state"


def to_wrapped_format(
    checkpoint: dict[str, Any], model: Any, settings: Any, batch_format: Any, safety: dict[str, Any]
) -> None:
    """Rewrite a wrapper's checkpoint in place so that it is ``model``'s own: no ``model.`` prefix in the state dict,
    ``model``'s hyperparameters, and the JiT settings and safety report under their own keys."""
    checkpoint["state_dict"] = {
        k[len(_PREFIX) :] if k.startswith(_PREFIX) else k: v
        for k, v in checkpoint["state_dict"].items()
        if k != _EXTRA_STATE  # the wrapper's own (its verification, under JIT_SAFETY_KEY here), not the model's
    }
    checkpoint[JIT_HPARAMS_KEY] = {**settings.hparams(), **batch_format.hparams()}
    checkpoint[JIT_SAFETY_KEY] = safety
    checkpoint[_FORMAT_KEY] = _FORMAT
    keys = (
        pl.LightningModule.CHECKPOINT_HYPER_PARAMS_KEY,
        pl.LightningModule.CHECKPOINT_HYPER_PARAMS_NAME,
        pl.LightningModule.CHECKPOINT_HYPER_PARAMS_TYPE,
    )
    for key in keys:
        checkpoint.pop(key, None)
    if isinstance(model, pl.LightningModule) and model.hparams:
        checkpoint[pl.LightningModule.CHECKPOINT_HYPER_PARAMS_KEY] = dict(model.hparams)
        if getattr(model, "_hparams_name", None):
            checkpoint[pl.LightningModule.CHECKPOINT_HYPER_PARAMS_NAME] = model._hparams_name


def from_wrapped_format(checkpoint: dict[str, Any]) -> None:
    """Undo :func:`to_wrapped_format` in place, so that a wrapper can resume from its own checkpoint (one without the
    wrapper's extra state, such as a checkpoint of 0.1 or in the wrapped model's format, loads with none)."""
    if checkpoint.get(_FORMAT_KEY) == _FORMAT:
        checkpoint["state_dict"] = {_PREFIX + k: v for k, v in checkpoint["state_dict"].items()}
    checkpoint["state_dict"].setdefault(_EXTRA_STATE, {})


def settle_unverified(
    io: TorchCheckpointIO,
    paths: list[str],
    verified: Mapping[str, Tensor] | None,
    to_result: Callable[[dict[str, Any]], None],
) -> tuple[list[str], list[str]]:
    """Settle the checkpoints a run wrote while it was in progress, once it has ended (rank 0 only).

    Args:
        io: The Trainer's checkpoint IO (it reads, writes atomically and removes).
        paths: The files, as :attr:`AtomicCheckpointIO.unverified_paths` recorded them; those already removed (e.g.
            by a ``ModelCheckpoint``'s top-k) are skipped.
        verified: The wrapper's ``state_dict()`` holding the verified weights of a ``forgotten`` run, or ``None``
            when the run did not end ``forgotten``.
        to_result: Rewrites a loaded checkpoint in place into the user's format with the verification record.

    Returns:
        The files rewritten as results (their weights equal ``verified`` bit for bit) and the files removed.

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> io = AtomicCheckpointIO()
        >>> for name, w in (("a.ckpt", 1.0), ("b.ckpt", 2.0)):
        ...     io.save_checkpoint({"state_dict": {"w": torch.full((2,), w)}, JIT_UNVERIFIED_KEY: {}}, folder / name)
        >>> verified = {"w": torch.full((2,), 2.0)}  # the verified weights: b.ckpt holds them, a.ckpt does not
        >>> as_result = lambda checkpoint: checkpoint.pop(JIT_UNVERIFIED_KEY)
        >>> rewritten, removed = settle_unverified(io, io.unverified_paths, verified, as_result)
        >>> [pathlib.Path(p).name for p in rewritten], [pathlib.Path(p).name for p in removed]
        (['b.ckpt'], ['a.ckpt'])
        >>> sorted(p.name for p in folder.iterdir()), JIT_UNVERIFIED_KEY in torch.load(folder / "b.ckpt")
        (['b.ckpt'], False)
    """
    rewritten: list[str] = []
    removed: list[str] = []
    for path in paths:
        if not get_filesystem(path).exists(path):
            continue
        if verified is not None:
            checkpoint = io.load_checkpoint(path, weights_only=False)  # written by this process, during this run
            if _same_weights(checkpoint.get("state_dict") or {}, verified):
                to_result(checkpoint)
                io.save_checkpoint(checkpoint, path)
                rewritten.append(path)
                continue
        io.remove_checkpoint(path)
        removed.append(path)
    return rewritten, removed


def _same_weights(saved: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """Whether two of the wrapper's state dicts hold the same weights (its extra state, the run's record, aside)."""
    saved = {k: v for k, v in saved.items() if k != _EXTRA_STATE}
    current = {k: v for k, v in current.items() if k != _EXTRA_STATE}
    if saved.keys() != current.keys():
        return False
    return all(isinstance(saved[k], Tensor) and torch.equal(saved[k].cpu(), current[k].detach().cpu()) for k in current)


def forget_removed_checkpoints(trainer: pl.Trainer, removed: list[str]) -> None:
    """Drop removed files from the Trainer's ``ModelCheckpoint`` bookkeeping (``best_k_models``, ``best_model_path``,
    ``last_model_path``), so that ``ckpt_path="best"``/``"last"`` never names a file that is gone."""
    gone = {os.path.abspath(p) for p in removed}
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint):
            continue
        for key in [k for k in callback.best_k_models if os.path.abspath(k) in gone]:
            del callback.best_k_models[key]
        for attribute in ("best_model_path", "last_model_path", "kth_best_model_path"):
            value = getattr(callback, attribute)
            if value and os.path.abspath(value) in gone:
                setattr(callback, attribute, "")
        if callback.best_model_path == "" and callback.best_k_models:
            best = (min if callback.mode == "min" else max)(callback.best_k_models, key=callback.best_k_models.get)
            callback.best_model_path, callback.best_model_score = best, callback.best_k_models[best]


def recorded_batch_format(batch_format: Any, checkpoint: dict[str, Any]) -> Any:
    """``batch_format`` with the ``output_selector`` recorded in an unlearned ``checkpoint`` when it sets none itself
    (an int index or a str key; a callable is recorded by name only and cannot be restored).

    Example:
        >>> from lightning_jit.core.batch import BatchFormat
        >>> recorded_batch_format(BatchFormat(), {JIT_HPARAMS_KEY: {"output_selector": 1}}).output_selector
        1
    """
    recorded = (checkpoint.get(JIT_HPARAMS_KEY) or {}).get("output_selector")
    if batch_format.output_selector is not None or isinstance(recorded, bool) or not isinstance(recorded, (int, str)):
        return batch_format
    return dataclasses.replace(batch_format, output_selector=recorded)
