"""Forget-set selection for the CLI and ``JiTTrainer.unlearn``: classes, indices, a file of ids, or a datamodule hook.

Every bad selection raises :class:`~lightning_jit.cli.errors.JiTUsageError`, which names the offending flag
(``--forget.classes`` ...); the CLI turns it into exit code 2 before anything is written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from lightning_jit.cli.errors import JiTUsageError
from lightning_jit.core.batch import LABEL_KEYS, BatchFormat, as_class_labels
from lightning_jit.core.errors import JiTInputError
from lightning_jit.lightning.data import forget_loader

#: The datamodule method used when no forget selection is given: ``def forget_dataloader(self) -> DataLoader``.
FORGET_DATALOADER_HOOK = "forget_dataloader"
_SELECTORS = ("classes", "indices", "ids_file", "loader")


@dataclass
class ForgetSelection:
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
            given by the datamodule keeps its own). ``None``: as :func:`~lightning_jit.lightning.data.forget_loader`
            batches it, the way the calibrated defaults were measured (a few shuffled batches per pass).
        heldout: Name of a datamodule method that returns labelled data the model never trained on, e.g.
            ``val_dataloader``. A request that names individual samples is verified against it (the wrapper's
            ``monitor=``); without it such a request is a usage error.

    Example:
        >>> ForgetSelection(classes=[3]).selector()
        'classes'
    """

    classes: list[int] | None = None
    indices: list[int] | None = None
    ids_file: str | None = None
    loader: str | None = None
    batch_size: int | None = None
    heldout: str | None = None

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
        size = self.batch_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
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
        if self.heldout is not None and not str(self.heldout).isidentifier():
            raise JiTUsageError("--forget.heldout", f"must be the name of a datamodule method, got {self.heldout!r}.")

    def heldout_loader(self, datamodule: Any) -> Any:
        """The held-out loader named by ``heldout`` (``None`` when none is named)."""
        if self.heldout is None:
            return None
        method = getattr(datamodule, self.heldout, None)
        if not callable(method):
            raise JiTUsageError(
                "--forget.heldout",
                f"the datamodule has no method {self.heldout!r}; name one that returns held-out labelled data, e.g."
                " val_dataloader.",
            )
        return method()


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


def select_forget_loader(
    datamodule: Any, forget: ForgetSelection, batch_format: BatchFormat | None = None
) -> DataLoader:
    """Build the forget loader that :class:`~lightning_jit.lightning.module.JiTUnlearning` trains on.

    ``classes``, ``indices`` and ``ids_file`` select from the datamodule's training set (``train_dataloader().dataset``,
    after ``prepare_data()`` and ``setup("fit")``) into :func:`~lightning_jit.lightning.data.forget_loader` (of
    ``forget.batch_size`` when given); ``loader`` (or,
    with no selection, the ``forget_dataloader`` hook) calls the datamodule's own method.

    Args:
        datamodule: The user's LightningDataModule.
        forget: The selection.
        batch_format: How a training sample is read (its ``label_key``, for ``classes``); default: automatic.

    Raises:
        JiTUsageError: naming the flag, for an empty selection, a class absent from the training set, an index out
            of range, a malformed ids file or a missing hook.
    """
    forget.check()
    if datamodule is None:
        raise JiTUsageError("--data", "a datamodule is needed to select the forget set; configure `--data`.")
    if forget.selector() in (None, "loader"):
        return _hook_loader(datamodule, forget.loader)
    train_loader, dataset, indices = forget_indices(datamodule, forget, batch_format)
    return forget_loader(
        Subset(dataset, indices), batch_size=forget.batch_size, collate_fn=getattr(train_loader, "collate_fn", None)
    )


def forget_indices(
    datamodule: Any, forget: ForgetSelection, batch_format: BatchFormat | None = None
) -> tuple[Any, Dataset, list[int]]:
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
        labels = dataset_labels(dataset, (batch_format or BatchFormat()).label_key)
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


def dataset_labels(dataset: Dataset, label_key: int | str | None = None) -> Tensor:
    """The integer label of every sample of ``dataset``: ``dataset.targets``, a ``TensorDataset``'s label tensor, or
    each ``dataset[i]``'s label at ``label_key`` (as :class:`~lightning_jit.core.batch.BatchFormat` reads it: ``None``
    is position 1 of a tuple, or the first of its label keys in a dict).

    Example:
        >>> data = TensorDataset(torch.zeros(3, 2), torch.tensor([2, 0, 2]))
        >>> dataset_labels(data).tolist()
        [2, 0, 2]
    """
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return _classes(torch.as_tensor(targets).flatten())
    if isinstance(dataset, TensorDataset):
        position = 1 if label_key is None else label_key
        if isinstance(position, int) and -len(dataset.tensors) <= position < len(dataset.tensors):
            return _classes(dataset.tensors[position].flatten())
    labels = []
    for i in range(len(dataset)):  # type: ignore[arg-type]
        sample = dataset[i]
        key = label_key
        if key is None:
            key = next((k for k in LABEL_KEYS if k in sample), None) if isinstance(sample, Mapping) else 1
        try:
            labels.append(float(sample[key]))
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise JiTUsageError(
                "--forget.classes",
                f"cannot find an integer label at `label_key={label_key!r}` in training sample {i}; set"
                " --batch.label_key to its position or dict key.",
            ) from err
    return _classes(torch.tensor(labels, dtype=torch.float64))


def _classes(labels: Tensor) -> Tensor:
    try:
        return as_class_labels(labels)
    except JiTInputError as err:
        raise JiTUsageError("--batch.label_key", " ".join(str(err).split())) from err


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
