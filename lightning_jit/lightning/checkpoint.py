"""Checkpoints from a JiT run: written atomically, and in the wrapped model's own format.

:class:`AtomicCheckpointIO` makes every checkpoint a Trainer writes atomic; the wrapper installs it. The functions
below rewrite a :class:`~lightning_jit.lightning.module.JiTUnlearning` checkpoint so that it is the wrapped model's:
``OriginalClass.load_from_checkpoint(path, strict=True)`` loads it.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH

from lightning_jit.io import atomic_torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, but every checkpoint is written through :func:`atomic_write`.

    Lightning's own save writes the bytes straight into the destination (through an fsspec transaction, without
    fsync); here they go to a temporary file in the same directory, which is fsynced and then renamed over the
    destination. A crash, SIGINT or SIGTERM therefore leaves either the previous file or the complete new one. Remote
    (non-local) paths fall back to Lightning's implementation.

    :class:`~lightning_jit.lightning.module.JiTUnlearning` installs it on the Trainer it runs in (see
    :class:`AtomicCheckpoints`); pass it yourself as ``Trainer(plugins=[AtomicCheckpointIO()])`` elsewhere.

    Example:
        >>> import tempfile, pathlib, torch
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "a.ckpt"
        >>> AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)
        >>> torch.load(path)["state_dict"]["w"].tolist()
        [1.0, 1.0]
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                "`Trainer.save_checkpoint(..., storage_options=...)` is not supported by AtomicCheckpointIO."
            )
        if not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, path)


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
_FORMAT_KEY = "jit_state_dict_format"
_FORMAT = "wrapped-model"
_PREFIX = "model."


def to_wrapped_format(
    checkpoint: dict[str, Any], model: Any, settings: Any, batch_format: Any, safety: dict[str, Any]
) -> None:
    """Rewrite a wrapper's checkpoint in place so that it is ``model``'s own: no ``model.`` prefix in the state dict,
    ``model``'s hyperparameters, and the JiT settings and safety report under their own keys."""
    checkpoint["state_dict"] = {
        k[len(_PREFIX) :] if k.startswith(_PREFIX) else k: v for k, v in checkpoint["state_dict"].items()
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
    """Undo :func:`to_wrapped_format` in place, so that a wrapper can resume from its own checkpoint."""
    if checkpoint.get(_FORMAT_KEY) == _FORMAT:
        checkpoint["state_dict"] = {_PREFIX + k: v for k, v in checkpoint["state_dict"].items()}
