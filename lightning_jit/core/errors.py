"""The library's exception types.

``core`` imports nothing from Lightning but its configuration exception, so that every bad setting raises the one
type a Lightning user already catches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import Tensor

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "JiTDivergenceError",
    "JiTInputError",
    "JiTSettingError",
    "MisconfigurationException",
    "forward_failure",
]


class JiTSettingError(MisconfigurationException):
    """A bad setting, named in :attr:`setting` (e.g. ``"sigma"``), with a hint on how to fix it.

    Every setting of :class:`~lightning_jit.core.settings.JiTSettings`,
    :class:`~lightning_jit.core.batch.BatchFormat` and :class:`~lightning_jit.core.guard.GuardSettings` is validated
    where it is declared and raises this; the command line maps :attr:`setting` to its flag.

    Example:
        >>> err = JiTSettingError("sigma", "must be > 0, got -1.")
        >>> err.setting, str(err)
        ('sigma', '`sigma` must be > 0, got -1.')
    """

    def __init__(self, setting: str, message: str) -> None:
        self.setting = setting
        super().__init__(f"`{setting}` {message}")


class JiTInputError(ValueError):
    """A forget batch (or the model's output on it) that the JiT objective cannot use: wrong dtype, NaN, shape."""


class JiTDivergenceError(RuntimeError):
    """JiT diverged (non-finite weights, losses or outputs). The weights from before the run have been restored."""


def forward_failure(model: nn.Module, x: Any, err: BaseException) -> JiTInputError:
    """A :class:`JiTInputError` saying that a forget batch input does not go through ``model``, and why.

    Example:
        >>> import torch
        >>> err = forward_failure(torch.nn.Linear(3, 2), torch.ones(2, 5), RuntimeError("x"))
        >>> "shape (2, 5)" in str(err)
        True
    """
    if isinstance(x, Tensor):
        found = f"a forget batch input of shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"
    else:  # a dict or tuple input (the batch module reads it; imported here, as it imports this one)
        from lightning_jit.core.batch import describe_input

        found = f"a forget batch input {describe_input(x)}"
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    devices = sorted({str(p.device) for p in model.parameters()})
    return JiTInputError(
        f"JiT could not run `model` (parameters {', '.join(dtypes)} on {', '.join(devices)}) on {found}: {err}."
        " Make the forget batches match what the model expects (shape, dtype, device; a half-precision model on CPU"
        " needs half inputs or `Trainer(precision=...)`), or set `input_key` / `batch_to_input`."
    )
