"""Forget-set selection for the CLI and ``JiTTrainer.unlearn``: classes, indices, a file of ids, or a datamodule hook.

Every bad selection raises :class:`JiTUsageError`, which names the offending flag (``--forget.classes`` ...); the CLI
turns it into exit code 2 before anything is written.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

#: The datamodule method used when no forget selection is given: ``def forget_dataloader(self) -> DataLoader``.
FORGET_DATALOADER_HOOK = "forget_dataloader"
_SELECTORS = ("classes", "indices", "ids_file", "loader")


class JiTUsageError(MisconfigurationException):
    """A usage error that names the flag at fault. The ``lightning-jit`` script exits with code 2 on it.

    Args:
        flag: The command-line flag at fault, e.g. ``"--forget.classes"``.
        message: What is wrong and how to fix it.
    """

    def __init__(self, flag: str, message: str) -> None:
        self.flag = flag
        super().__init__(f"{flag}: {message}")


@dataclass
class ForgetSet:
    """Which training samples to forget. Give at most one of ``classes``, ``indices``, ``ids_file`` and ``loader``;
    with none, the datamodule's ``forget_dataloader()`` hook is used.

    Args:
        classes: Forget every training sample whose label is one of these classes (full-class forgetting).
        indices: Forget the training samples at these positions of the training set (``dataset[i]`` of the
            datamodule's ``train_dataloader().dataset``).
        ids_file: A text file of training-set positions (as ``indices``), whitespace or comma separated; blank lines
            and ``#`` comments are allowed.
        loader: Name of a datamodule method that takes no argument and returns the forget DataLoader, e.g.
            ``forget_dataloader`` (the default hook, used when nothing else is given).
        batch_size: Batch size of the forget loader built for ``classes``, ``indices`` and ``ids_file`` (a loader
            given by the datamodule keeps its own).

    Example:
        >>> ForgetSet(classes=[3]).selector()
        'classes'
    """

    classes: list[int] | None = None
    indices: list[int] | None = None
    ids_file: str | None = None
    loader: str | None = None
    batch_size: int = 32

    def selector(self) -> str | None:
        """The one selection given (``"classes"``, ...), or ``None``; raise :class:`JiTUsageError` for several."""
        given = [name for name in _SELECTORS if getattr(self, name) is not None]
        if len(given) > 1:
            flags = ", ".join(f"--forget.{name}" for name in given)
            raise JiTUsageError(f"--forget.{given[1]}", f"give only one forget selection, got {flags}.")
        return given[0] if given else None

    def check(self) -> None:
        """Checks that need no data: one selection at most, non-empty lists, a readable ids file, a batch size."""
        selector = self.selector()
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise JiTUsageError("--forget.batch_size", f"must be an integer >= 1, got {self.batch_size!r}.")
        if selector in ("classes", "indices"):
            values = getattr(self, selector)
            if len(values) == 0:
                raise JiTUsageError(f"--forget.{selector}", "the forget selection is empty; list at least one value.")
            _check_unique_non_negative(values, f"--forget.{selector}")
        elif selector == "ids_file":
            read_ids_file(self.ids_file)
        elif selector == "loader" and not str(self.loader).isidentifier():
            raise JiTUsageError("--forget.loader", f"must be the name of a datamodule method, got {self.loader!r}.")


def read_ids_file(path: str | os.PathLike) -> list[int]:
    """Read a file of training-set positions: integers separated by whitespace or commas, ``#`` starts a comment.

    Raises:
        JiTUsageError: naming ``--forget.ids_file`` for a missing file, a token that is not a non-negative integer
            (with its line number), a repeated id or an empty file.

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as fh:
        ...     _ = fh.write("# forget these\\n3, 5\\n8\\n")
        >>> read_ids_file(fh.name)
        [3, 5, 8]
    """
    flag = "--forget.ids_file"
    path = Path(path)
    if not path.is_file():
        raise JiTUsageError(flag, f"no such file: {str(path)!r}.")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise JiTUsageError(flag, f"cannot read {str(path)!r} as text: {err}.") from err
    ids: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        for token in line.split("#", 1)[0].replace(",", " ").split():
            if not token.isdigit():
                raise JiTUsageError(
                    flag,
                    f"line {number} of {str(path)!r} holds {token!r}, which is not a non-negative integer id;"
                    " the file must list training-set positions separated by whitespace or commas.",
                )
            ids.append(int(token))
    if not ids:
        raise JiTUsageError(flag, f"{str(path)!r} lists no ids: the forget selection is empty.")
    _check_unique_non_negative(ids, flag)
    return ids


def select_forget_loader(datamodule: Any, forget: ForgetSet, label_key: int | str = 1) -> DataLoader:
    """Build the forget loader that :class:`~lightning_jit.module.JiTUnlearning` trains on.

    ``classes``, ``indices`` and ``ids_file`` select from the datamodule's training set (``train_dataloader().dataset``,
    after ``prepare_data()`` and ``setup("fit")``) into an unshuffled loader of ``forget.batch_size``; ``loader`` (or,
    with no selection, the ``forget_dataloader`` hook) calls the datamodule's own method.

    Args:
        datamodule: The user's LightningDataModule.
        forget: The selection.
        label_key: Where the label is in a training sample (index or dict key), for ``classes``.

    Raises:
        JiTUsageError: naming the flag, for an empty selection, a class absent from the training set, an index out
            of range, a malformed ids file or a missing hook.
    """
    forget.check()
    if datamodule is None:
        raise JiTUsageError("--data", "a datamodule is needed to select the forget set; configure `--data`.")
    if forget.selector() in (None, "loader"):
        return _hook_loader(datamodule, forget.loader)
    train_loader, dataset, indices = forget_indices(datamodule, forget, label_key)
    return DataLoader(
        Subset(dataset, indices),
        batch_size=forget.batch_size,
        shuffle=False,
        collate_fn=getattr(train_loader, "collate_fn", None),
    )


def forget_indices(datamodule: Any, forget: ForgetSet, label_key: int | str = 1) -> tuple[Any, Dataset, list[int]]:
    """Resolve ``classes``, ``indices`` or ``ids_file`` to positions in the datamodule's training set.

    Returns:
        The datamodule's train loader, its dataset and the sorted-as-given positions to forget.

    Raises:
        JiTUsageError: as :func:`select_forget_loader`; also for the ``loader`` selection, which has no positions.
    """
    forget.check()
    selector = forget.selector()
    if selector in (None, "loader"):
        raise JiTUsageError("--forget.loader", "a datamodule loader selects no training-set positions.")
    datamodule.prepare_data()
    datamodule.setup("fit")
    train_loader = datamodule.train_dataloader()
    dataset = getattr(train_loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__len__"):
        raise JiTUsageError(
            f"--forget.{selector}",
            "the datamodule's train_dataloader() has no sized `.dataset` to select from; use --forget.loader.",
        )
    n = len(dataset)
    if selector == "classes":
        labels = dataset_labels(dataset, label_key)
        present = sorted(set(labels.tolist()))
        missing = [c for c in forget.classes if c not in present]
        if missing:
            raise JiTUsageError(
                "--forget.classes",
                f"class id(s) {missing} do not exist in the training set (classes present: {_compact(present)}).",
            )
        mask = torch.isin(labels, torch.as_tensor(forget.classes, dtype=labels.dtype))
        indices = torch.nonzero(mask).flatten().tolist()
    else:
        indices = list(forget.indices) if selector == "indices" else read_ids_file(forget.ids_file)
        out_of_range = [i for i in indices if i >= n]
        if out_of_range:
            raise JiTUsageError(
                f"--forget.{selector}",
                f"id(s) {out_of_range[:5]} are out of range for a training set of {n} samples (valid: 0..{n - 1}).",
            )
    return train_loader, dataset, indices


def dataset_labels(dataset: Dataset, label_key: int | str = 1) -> Tensor:
    """The integer label of every sample of ``dataset``: ``dataset.targets``, a ``TensorDataset``'s label tensor, or
    ``dataset[i][label_key]`` for each ``i``."""
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets).flatten().long()
    if isinstance(dataset, TensorDataset) and isinstance(label_key, int) and label_key < len(dataset.tensors):
        return dataset.tensors[label_key].flatten().long()
    labels = []
    for i in range(len(dataset)):  # type: ignore[arg-type]
        sample = dataset[i]
        try:
            label = sample[label_key]
        except (KeyError, IndexError, TypeError) as err:
            raise JiTUsageError(
                "--forget.classes",
                f"cannot find a label at `label_key={label_key!r}` in training sample {i}; set --jit.label_key.",
            ) from err
        labels.append(int(label))
    return torch.tensor(labels, dtype=torch.long)


def _hook_loader(datamodule: Any, name: str | None) -> Any:
    flag = "--forget.loader"
    method = getattr(datamodule, name or FORGET_DATALOADER_HOOK, None)
    if not callable(method):
        if name is None:
            raise JiTUsageError(
                "--forget",
                "the forget selection is empty: give one of --forget.classes, --forget.indices, --forget.ids_file or"
                f" --forget.loader, or define `{FORGET_DATALOADER_HOOK}()` on {type(datamodule).__name__}.",
            )
        raise JiTUsageError(flag, f"{type(datamodule).__name__} has no method {name!r}.")
    datamodule.prepare_data()
    datamodule.setup("fit")
    try:
        loader = method()
    except JiTUsageError:
        raise
    except MisconfigurationException as err:
        raise JiTUsageError(flag, f"{type(datamodule).__name__}.{method.__name__}() refused: {err}") from err
    if loader is None or (hasattr(loader, "__len__") and len(loader) == 0):
        raise JiTUsageError(
            flag, f"{type(datamodule).__name__}.{method.__name__}() returned an empty loader: nothing to forget."
        )
    return loader


def _check_unique_non_negative(values: Sequence[int], flag: str) -> None:
    seen: set[int] = set()
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise JiTUsageError(flag, f"ids must be non-negative integers, got {v!r}.")
        if v in seen:
            raise JiTUsageError(flag, f"id {v} is listed twice.")
        seen.add(v)


def _compact(values: list[int]) -> str:
    if values and values == list(range(values[0], values[-1] + 1)) and len(values) > 3:
        return f"{values[0]}..{values[-1]}"
    return ", ".join(map(str, values))
