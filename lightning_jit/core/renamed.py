"""Public names that were renamed: each old name still works for now, and says once that it moved.

``lightning_jit``, :mod:`lightning_jit.core` and the module that defines the new name look an old name up here (their
module ``__getattr__``), so ``from lightning_jit import CollapseGuard`` and
``from lightning_jit.core.guard import CollapseGuard`` both give the new class, with one deprecation warning per
process.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Any

import torch.distributed as dist

#: Old name -> (the module that defines the new one, the new name).
RENAMED: dict[str, tuple[str, str]] = {
    "CollapseGuard": ("lightning_jit.core.guard", "GuardSettings"),
    "ProbeDistillation": ("lightning_jit.core.distillation", "DistillationSet"),
}

_warned: set[str] = set()
#: The warning points at the line that used the old name: :func:`renamed` and the module ``__getattr__`` lie between.
_STACKLEVEL = 3


def _rank_zero() -> bool:
    """Whether this is the first process (the core imports no Lightning, so this is Lightning's rule written small:
    the process group's rank once there is one, else the launcher's ``RANK``/``LOCAL_RANK``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return all(int(os.environ.get(key, "0") or 0) == 0 for key in ("RANK", "LOCAL_RANK"))


def renamed(name: str, module: str) -> Any:
    """The object the old public ``name`` now refers to; the first use in a process warns (a ``FutureWarning``, which
    Python shows users by default; on the first process only).

    Args:
        name: The name looked up.
        module: The module it was looked up in (for the ``AttributeError`` of a name that never existed).

    Raises:
        AttributeError: when ``name`` is not an old public name.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     renamed("CollapseGuard", "lightning_jit").__name__
        'GuardSettings'
    """
    if name not in RENAMED:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    home, new = RENAMED[name]
    if name not in _warned:
        _warned.add(name)
        if _rank_zero():
            warnings.warn(
                f"`{name}` was renamed `{new}` in lightning-jit 0.3 (`from {home} import {new}`); the old name"
                " still works but will be removed in a future release.",
                FutureWarning,
                stacklevel=_STACKLEVEL,
            )
    return getattr(importlib.import_module(home), new)


__all__ = ["RENAMED", "renamed"]
