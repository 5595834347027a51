"""Checks for declared settings: each dataclass field names its check in ``metadata["check"]``.

A check takes ``(name, value)``, returns the normalised value, and raises
:class:`~lightning_jit.core.errors.JiTSettingError` naming the field. :func:`validate` runs them all; the settings
dataclasses call it from ``__post_init__``, so a setting is validated where it is declared.

Example:
    >>> from dataclasses import dataclass, field
    >>> @dataclass
    ... class Knob:
    ...     size: int = field(default=1, metadata=integer(1))
    ...     def __post_init__(self):
    ...         validate(self)
    >>> Knob(0)
    Traceback (most recent call last):
    ...
    lightning_jit.core.errors.JiTSettingError: `size` must be an integer >= 1, got 0.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from lightning_jit.core.errors import JiTSettingError

Check = Callable[[str, Any], Any]


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def positive(hint: str) -> dict[str, Check]:
    """A finite number > 0, stored as float."""

    def check(name: str, value: Any) -> Any:
        if not is_number(value) or value <= 0:
            raise JiTSettingError(name, f"must be a finite number > 0, got {value!r}. {hint}")
        return float(value)

    return {"check": check}


def non_negative(hint: str) -> dict[str, Check]:
    """A finite number >= 0, stored as float."""

    def check(name: str, value: Any) -> Any:
        if not is_number(value) or value < 0:
            raise JiTSettingError(name, f"must be a finite number >= 0, got {value!r}. {hint}")
        return float(value)

    return {"check": check}


def in_range(low: float, high: float, hint: str) -> dict[str, Check]:
    """A number in ``[low, high]``, stored as float."""

    def check(name: str, value: Any) -> Any:
        if not is_number(value) or not low <= value <= high:
            raise JiTSettingError(name, f"must be a number in [{low:g}, {high:g}], got {value!r}. {hint}")
        return float(value)

    return {"check": check}


def integer(low: int, hint: str = "") -> dict[str, Check]:
    """An int >= ``low`` (a bool is not an int here)."""

    def check(name: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise JiTSettingError(name, f"must be an integer >= {low}, got {value!r}.{' ' + hint if hint else ''}")
        return value

    return {"check": check}


def choice(options: tuple[str, ...], hint: str) -> dict[str, Check]:
    """One of ``options``."""

    def check(name: str, value: Any) -> Any:
        if value not in options:
            raise JiTSettingError(name, f"must be one of {options}, got {value!r}. {hint}")
        return value

    return {"check": check}


def optional(inner: dict[str, Check]) -> dict[str, Check]:
    """``None``, or what ``inner`` accepts."""

    def check(name: str, value: Any) -> Any:
        return None if value is None else inner["check"](name, value)

    return {"check": check}


def boolean(name: str, value: Any) -> Any:
    """``True`` or ``False``."""
    if not isinstance(value, bool):
        raise JiTSettingError(name, f"must be True or False, got {value!r}.")
    return value


def validate(declaration: Any) -> None:
    """Run every field's ``metadata["check"]`` on a dataclass instance, storing the normalised values."""
    for f in dataclasses.fields(declaration):
        check = f.metadata.get("check")
        if check is not None:
            setattr(declaration, f.name, check(f.name, getattr(declaration, f.name)))
