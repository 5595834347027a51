"""Atomic, non-destructive file output: every file the library writes goes through here.

A file is written to a temporary file in the destination's directory, flushed and fsynced, then renamed over the
destination, so a reader (or a crash, SIGINT or SIGTERM) never sees a partial file.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import tempfile
import threading
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
    with _terminate_cleanly():
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file owner-only; give it the permissions open() would
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


class _Terminated(SystemExit):
    """SIGTERM arrived while a file was being written; raised so that the temporary file is removed first."""


@contextlib.contextmanager
def _terminate_cleanly() -> Iterator[None]:
    """While writing, turn a SIGTERM with the default (kill) disposition into an exception, then die of it.

    The default SIGTERM action would end the process at once and leave the temporary file behind. Here the signal
    raises inside the write, the ``except`` clause above removes the temporary file, and the signal is delivered again
    with its default action, so the process still ends by SIGTERM (exit status -15). A handler someone else installed
    (Lightning's, during ``fit``) is left alone. Only possible in the main thread.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    received: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        raise _Terminated(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if received:
            os.kill(os.getpid(), signal.SIGTERM)


def atomic_append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line to a text file atomically (the whole file is rewritten via :func:`atomic_write`)."""
    path = Path(path)
    existing = path.read_text() if path.exists() else ""
    if existing and not existing.endswith("\n"):
        existing += "\n"
    with atomic_write(path) as fh:
        fh.write(existing + line.rstrip("\n") + "\n")


def save_png(fig: Any, path: str | os.PathLike) -> Path:
    """Write a matplotlib ``Figure`` as a PNG (110 dpi) through :func:`atomic_write`; return the path.

    The library's figures are ``matplotlib.figure.Figure`` objects, not pyplot ones, so that drawing them neither
    switches the user's matplotlib backend nor leaves figures open in pyplot's registry.
    """
    path = Path(path)
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    return path


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def json_safe(obj: Any) -> Any:
    """``obj`` for strict JSON: NaN/Inf floats as ``None``, non-string keys as strings, tuples and sets as lists, numpy
    and torch scalars as numbers and arrays as (nested) lists, paths as strings.

    Example:
        >>> import numpy as np, pathlib
        >>> json_safe({1: [float("nan"), 2.0], "a": (np.float32(0.5), torch.tensor([1, 2])), "p": pathlib.Path("x")})
        {'1': [None, 2.0], 'a': [0.5, [1, 2]], 'p': 'x'}
    """
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist") and hasattr(obj, "shape"):  # numpy / torch scalars and arrays
        return json_safe(obj.tolist())
    return obj


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes, as hex (for audit records that name a checkpoint).

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile(delete=False) as fh:
        ...     _ = fh.write(b"abc")
        >>> file_sha256(fh.name)[:12]
        'ba7816bf8f01'
    """
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
