"""The deletion-request ledger: sample ids, content hashes, which ids were forgotten and when, and the audit file.

A production pipeline keeps receiving deletion requests: sample ids whose influence must be removed from a model. The
:class:`DeletionLedger` remembers which ids have already been forgotten, in which run, at what time, with which
settings and with which forget-set metrics before and after. It is plain Python data (it pickles, and it is saved in
checkpoints through :class:`~lightning_jit.lightning.callback.JiTUnlearningCallback`'s ``state_dict``), so a
resumed job never forgets the same id twice and a new request batch forgets only the new ids.

Each run of the hook also becomes one JSON line of an audit file, appended atomically through
:func:`lightning_jit.io.atomic_append_line` so a reader never sees a half-written record.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_jit._version import __version__
from lightning_jit.io import atomic_append_line, json_safe

SampleId = int | str

#: Version of the ledger's ``state_dict`` layout (each audit record carries its own ``record_version``).
LEDGER_VERSION = 1
#: The audit file's default name, next to the checkpoints.
AUDIT_FILENAME = "jit_audit.jsonl"
#: Prefix of ids derived from a sample's content.
CONTENT_ID_PREFIX = "sha256:"


def normalize_id(value: Any) -> SampleId:
    """An id as a plain ``int`` or ``str`` (0-d tensors and numpy scalars are unwrapped).

    Raises:
        MisconfigurationException: for anything else (floats, booleans, ``None``, containers).

    Example:
        >>> normalize_id(torch.tensor(7)), normalize_id(np.int64(3)), normalize_id("user-42")
        (7, 3, 'user-42')
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or torch.is_floating_point(value) or value.dtype == torch.bool:
            raise MisconfigurationException(f"A sample id must be an integer or a string, got a tensor {value!r}.")
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise MisconfigurationException(
            f"A sample id must be an integer or a string, got {type(value).__name__} {value!r}."
            " Pass `ids` as a sequence of ints or strings, or yield `(x, y, id)` with such ids."
        )
    return value


def id_key(value: SampleId) -> str:
    """The key under which an id is compared: its string form, as the keyed noise uses (``7`` and ``"7"`` match)."""
    return str(value)


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        h.update(f"A{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    elif isinstance(obj, dict):
        h.update(b"D")
        for key in sorted(obj, key=str):
            h.update(repr(key).encode())
            _feed(h, obj[key])
    elif isinstance(obj, (tuple, list)):
        h.update(f"L{len(obj)}".encode())
        for item in obj:
            _feed(h, item)
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes, np.generic)):
        h.update(f"S{type(obj).__name__}{obj!r}".encode())
    else:
        raise MisconfigurationException(
            f"Cannot derive a content id from a sample part of type {type(obj).__name__}. Pass `ids` explicitly, or"
            " make the dataset yield `(x, y, id)`."
        )


def content_id(sample: Any) -> str:
    """A content-derived id: SHA-256 over every tensor, array and scalar of the sample (dtype, shape and bytes).

    Two samples get the same id exactly when their contents (input *and* label) are identical.

    Example:
        >>> a = content_id((torch.zeros(2), torch.tensor(1)))
        >>> a == content_id((torch.zeros(2), torch.tensor(1))), a == content_id((torch.zeros(2), torch.tensor(2)))
        (True, False)
        >>> a.startswith("sha256:")
        True
    """
    h = hashlib.sha256()
    _feed(h, sample)
    return CONTENT_ID_PREFIX + h.hexdigest()


def item_id(item: Any) -> Any:
    """The id a dataset item carries, or ``None``: the third element of ``(x, y, id)``, or ``item["id"]``."""
    if isinstance(item, (tuple, list)) and len(item) >= 3:
        return item[2]
    if isinstance(item, dict):
        return item.get("id", item.get("ids"))
    return None


def check_unique(ids: Sequence[SampleId], source: str) -> None:
    """Raise :class:`MisconfigurationException` naming the repeated ids (at most five) if ``ids`` has duplicates."""
    seen: dict[str, int] = {}
    repeated: list[SampleId] = []
    for value in ids:
        key = id_key(value)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] == 2:
            repeated.append(value)
    if repeated:
        hint = (
            " Content ids repeat only for identical samples (same input and label): drop the duplicates from the forget"
            " set, or pass `ids`."
            if source == "content_hash"
            else " Every forget sample needs its own id; `7` and `'7'` count as the same id."
        )
        raise MisconfigurationException(
            f"The forget set's ids (from {source}) are not unique: {len(repeated)} id(s) occur more than once,"
            f" e.g. {repeated[:5]!r}.{hint}"
        )


def utc_now() -> str:
    """The current UTC time in ISO 8601, to the millisecond."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def environment_versions() -> dict[str, str]:
    """The versions an audit record names: lightning-jit, torch, lightning, Python and the platform."""
    import lightning

    return {
        "lightning_jit": __version__,
        "torch": str(torch.__version__),
        "lightning": str(lightning.__version__),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


class DeletionLedger:
    """Which sample ids have been forgotten, in which run and when, and the record of every run.

    ``forgotten`` maps :func:`id_key` of each forgotten id to ``{"id", "run", "time"}``; ``unverifiable`` does the
    same for the ids of sample requests that came without held-out data to verify them against (they are not retried
    until there is some); ``runs`` holds one record (a JSON-serialisable dict with ids, counts, settings and metrics)
    per run of the hook, in order.

    Example:
        >>> ledger = DeletionLedger()
        >>> ledger.pending([1, 2, 3])
        [1, 2, 3]
        >>> record = ledger.add_run({"ids": [1, 2]}, forgotten=[1, 2])
        >>> record["run"], ledger.pending([1, 2, 3]), ledger.is_forgotten("2")
        (0, [3], True)
        >>> restored = DeletionLedger()
        >>> restored.load_state_dict(ledger.state_dict())
        >>> restored.pending([1, 2, 3])
        [3]
        >>> _ = restored.add_run({"ids": [3]}, forgotten=[], unverifiable=[3])
        >>> restored.pending([1, 2, 3]), restored.is_unverifiable(3)
        ([], True)
    """

    def __init__(self) -> None:
        self.forgotten: dict[str, dict[str, Any]] = {}
        self.unverifiable: dict[str, dict[str, Any]] = {}
        self.runs: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return len(self.forgotten)

    def is_forgotten(self, value: SampleId) -> bool:
        return id_key(value) in self.forgotten

    def is_unverifiable(self, value: SampleId) -> bool:
        return id_key(value) in self.unverifiable

    def pending(self, ids: Iterable[SampleId]) -> list[SampleId]:
        """The ids neither forgotten nor recorded as unverifiable, in their order."""
        return [i for i in ids if id_key(i) not in self.forgotten and id_key(i) not in self.unverifiable]

    def add_run(
        self,
        record: dict[str, Any],
        forgotten: Sequence[SampleId],
        unverifiable: Sequence[SampleId] = (),
        with_heldout: bool = False,
    ) -> dict[str, Any]:
        """Append a run's record (given its run index), mark ``forgotten`` as forgotten and ``unverifiable`` as
        unverifiable at the record's time (``with_heldout``: whether held-out data was at hand, so that the request
        was too small rather than without data to test against)."""
        record = dict(record)
        record["run"] = len(self.runs)
        record.setdefault("time", utc_now())
        for value in forgotten:
            entry = {"id": value, "run": record["run"], "time": record["time"]}
            self.forgotten[id_key(value)] = entry
            self.unverifiable.pop(id_key(value), None)
        for value in unverifiable:
            entry = {"id": value, "run": record["run"], "time": record["time"], "with_heldout": bool(with_heldout)}
            self.unverifiable[id_key(value)] = entry
        self.runs.append(record)
        return record

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": LEDGER_VERSION,
            "forgotten": copy.deepcopy(self.forgotten),
            "unverifiable": copy.deepcopy(self.unverifiable),
            "runs": copy.deepcopy(self.runs),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version = state.get("version")
        if version != LEDGER_VERSION:
            raise MisconfigurationException(
                f"Cannot load a deletion ledger of version {version!r}; this lightning-jit reads version"
                f" {LEDGER_VERSION}."
            )
        self.forgotten = copy.deepcopy(dict(state["forgotten"]))
        self.unverifiable = copy.deepcopy(dict(state.get("unverifiable", {})))  # ledgers written before 0.3 had none
        self.runs = copy.deepcopy(list(state["runs"]))


def write_audit_record(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append ``record`` as one strict JSON line (:func:`~lightning_jit.io.json_safe`) to the audit file at ``path``,
    atomically."""
    atomic_append_line(path, json.dumps(json_safe(record), sort_keys=True, allow_nan=False))


def read_audit(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of an audit file, oldest first.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / AUDIT_FILENAME
        >>> write_audit_record(target, {"run": 0, "ids": [3, 5]})
        >>> write_audit_record(target, {"run": 1, "ids": []})
        >>> [r["ids"] for r in read_audit(target)]
        [[3, 5], []]
    """
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
