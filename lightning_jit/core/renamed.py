"""Public names that were renamed: each old name still works for now, and says once that it moved.

``lightning_jit``, :mod:`lightning_jit.core` and the module that defines the new name look an old name up here (their
module ``__getattr__``), so ``from lightning_jit import CollapseGuard`` and
``from lightning_jit.core.guard import CollapseGuard`` both give the new class, with one deprecation warning per
process.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning.fabric.utilities.rank_zero import rank_zero_deprecation

#: Old name -> (the module that defines the new one, the new name).
RENAMED: dict[str, tuple[str, str]] = {
    "CollapseGuard": ("lightning_jit.core.guard", "GuardSettings"),
    "ProbeDistillation": ("lightning_jit.core.distillation", "DistillationSet"),
}

_warned: set[str] = set()
#: The warning points at the line that used the old name: warnings.warn, Lightning's three wrappers, :func:`renamed`
#: and the module ``__getattr__`` lie between.
_STACKLEVEL = 7


def renamed(name: str, module: str) -> Any:
    """The object the old public ``name`` now refers to; the first use in a process warns (on rank zero).

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
        rank_zero_deprecation(
            f"`{name}` was renamed `{new}` in lightning-jit 0.3 (`from {home} import {new}`); the old name still"
            " works but will be removed in a future release.",
            stacklevel=_STACKLEVEL,
        )
    return getattr(importlib.import_module(home), new)


__all__ = ["RENAMED", "renamed"]
