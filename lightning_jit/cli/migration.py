"""Config keys and flags of the previous version (0.1) that moved or were removed: the one map, and its check.

0.1 put the batch layout and the collapse guard's switches under ``jit:``; 0.2 gives each its own group
(``batch:``, ``guard:``), read from :class:`~lightning_jit.core.batch.BatchFormat` and
:class:`~lightning_jit.core.guard.GuardSettings`. An old key is a usage error (exit code 2) whose one line says
where it went, never a silent default.
"""

from __future__ import annotations

from lightning_jit.cli.errors import JiTUsageError
from lightning_jit.tune.settings import REMOVED_ARGUMENTS

__all__ = ["MOVED", "REMOVED", "check_key"]

#: Old key -> new key (the value is unchanged).
MOVED: dict[str, str] = {
    "jit.input_key": "batch.input_key",
    "jit.label_key": "batch.label_key",
    "jit.output_selector": "batch.output_selector",
    "jit.guard": "guard.enabled",
    "jit.check_every": "guard.check_every",
    "jit.on_collapse": "guard.on_collapse",
}
#: Old key or flag -> why it is gone and what to do instead.
REMOVED: dict[str, str] = {
    "jit.center_logits": "removed in 0.2 (it measured no gain); delete it",
    "jit.momentum": (
        "removed in 0.2: delete it (the step is calibrated, or plain SGD when `lr` is given; in Python `optimizer=`"
        " takes any)"
    ),
    # `lightning-jit tune`'s flags are `tune_jit`'s arguments: its removed ones are declared with them.
    **{f"tune.{name}": why for name, why in REMOVED_ARGUMENTS.items()},
}


def check_key(key: str, flag: str) -> None:
    """Raise the migration error for an old ``key`` (dotted, e.g. ``"jit.label_key"``) given as ``flag``.

    Raises:
        JiTUsageError: naming ``flag``, saying where the key moved or that it was removed.

    Example:
        >>> check_key("jit.sigma", "--jit.sigma")  # a current key: nothing to say
        >>> check_key("jit.label_key", "--jit.label_key")
        Traceback (most recent call last):
        ...
        lightning_jit.cli.errors.JiTUsageError: --jit.label_key: moved in 0.2: jit.label_key -> batch.label_key.
    """
    if key in MOVED:
        raise JiTUsageError(flag, f"moved in 0.2: {key} -> {MOVED[key]}.")
    if key in REMOVED:
        raise JiTUsageError(flag, f"{REMOVED[key]}.")
