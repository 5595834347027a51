"""Atomic, non-destructive file output: every file the library writes goes through here.

A file is written to a temporary file in the destination's directory, flushed and fsynced, then renamed over the
destination, so a reader (or a crash, SIGINT or SIGTERM) never sees a partial file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", overwrite: bool = True) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on success fsync it and rename it to ``path``.

    Args:
        path: The destination.
        mode: ``"w"`` (text) or ``"wb"`` (binary).
        overwrite: If ``False``, refuse to replace an existing ``path`` (``FileExistsError``).

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "out.txt"
        >>> with atomic_write(target) as fh:
        ...     _ = fh.write("hello")
        >>> target.read_text()
        'hello'
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"`mode` must be 'w' or 'wb', got {mode!r}.")
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists; pass overwrite=True (or --overwrite) to replace it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line to a text file atomically (the whole file is rewritten via :func:`atomic_write`)."""
    path = Path(path)
    existing = path.read_text() if path.exists() else ""
    if existing and not existing.endswith("\n"):
        existing += "\n"
    with atomic_write(path) as fh:
        fh.write(existing + line.rstrip("\n") + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike, overwrite: bool = True) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    with atomic_write(path, "wb", overwrite=overwrite) as fh:
        torch.save(obj, fh)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
