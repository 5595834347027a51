"""The command line's usage error: :class:`JiTUsageError` names the flag at fault, and the CLI exits with code 2 on it.

A bad value of a declared setting is a :class:`~lightning_jit.core.errors.JiTSettingError` naming the field
(``err.setting == "sigma"``); :func:`setting_usage_error` turns it into the flag of the group it was given in
(``--jit.sigma``), so that no flag is ever recovered from an error message.
"""

from __future__ import annotations

from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_jit.core.errors import JiTSettingError

__all__ = ["JiTUsageError", "setting_usage_error"]


class JiTUsageError(MisconfigurationException):
    """A usage error that names the flag at fault. The ``lightning-jit`` script exits with code 2 on it.

    Args:
        flag: The command-line flag (or config key) at fault, e.g. ``"--forget.classes"``.
        message: What is wrong and how to fix it.

    Example:
        >>> err = JiTUsageError("--forget.classes", "the forget selection is empty.")
        >>> err.flag, str(err)
        ('--forget.classes', '--forget.classes: the forget selection is empty.')
    """

    def __init__(self, flag: str, message: str) -> None:
        self.flag = flag
        self.message = message
        super().__init__(f"{flag}: {message}")


def setting_usage_error(group: str, err: JiTSettingError) -> JiTUsageError:
    """The usage error for a bad setting of the ``group`` declaration (``jit``, ``batch``, ``guard``...).

    Example:
        >>> from lightning_jit.core.settings import JiTSettings
        >>> try:
        ...     JiTSettings(sigma=0.0, lr=0.1)
        ... except JiTSettingError as err:
        ...     print(setting_usage_error("jit", err).flag)
        --jit.sigma
    """
    prefix = f"`{err.setting}` "
    text = str(err)
    return JiTUsageError(f"--{group}.{err.setting}", text[len(prefix) :] if text.startswith(prefix) else text)
