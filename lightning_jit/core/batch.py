"""How a batch is read: where the input, the labels and the sample ids are, and where the logits are in the output.

:class:`BatchFormat` is the one reader of batches in the library: the JiT step, the collapse guard's monitor, the
evaluation and the report all use it, so that a batch JiT accepts is a batch the report accepts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_jit.core.errors import JiTInputError, JiTSettingError

#: What ``output_selector`` may be: ``None`` (a tensor, the first item of a tuple, ``"logits"`` of a dict or
#: attribute), an index, a key or attribute name, or a callable mapping the output to the logits.
OutputSelector = int | str | Callable[..., Any] | None
#: Dict keys tried, in order, for the input and the labels when ``input_key`` / ``label_key`` are ``None``.
INPUT_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values")
LABEL_KEYS = ("y", "label", "labels", "target", "targets")
ID_KEYS = ("id", "ids")


def _key(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, str))):
        raise JiTSettingError(name, f"must be an int position, a str key or None (automatic), got {value!r}.")


@dataclass
class BatchFormat:
    """Where the input, the labels and the ids are in a batch, and where the logits are in the model's output.

    Batches may be a tensor (the input), a tuple/list ``(x, y[, id])``, a dict, or anything ``batch_to_input`` reads.

    Args:
        input_key: Position (tuple/list) or key (dict) of the input. ``None``: position 0, or the first of
            ``"x"``, ``"input"``, ``"inputs"``, ``"image"``, ``"images"``, ``"pixel_values"`` in a dict.
        label_key: Position or key of the integer class labels (used by the stopping rule, the monitor and the
            report). ``None``: position 1, or the first of ``"y"``, ``"label"``, ``"labels"``, ``"target"``,
            ``"targets"`` in a dict.
        output_selector: Where the logits are in the model's output: ``None`` for a tensor (or the first item of a
            tuple, ``"logits"`` of a dict or attribute), an int index, a str key or attribute, or a callable.
        batch_to_input: A callable that returns the input of any batch; overrides ``input_key``.

    Example:
        >>> fmt = BatchFormat()
        >>> batch = {"image": torch.zeros(2, 3), "label": torch.tensor([1, 0])}
        >>> tuple(fmt.input(batch).shape), fmt.labels(batch).tolist()
        ((2, 3), [1, 0])
        >>> fmt.logits((torch.ones(2, 5), "aux")).shape
        torch.Size([2, 5])
    """

    input_key: int | str | None = None
    label_key: int | str | None = None
    output_selector: OutputSelector = field(default=None, repr=False)
    batch_to_input: Callable[..., Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        _key("input_key", self.input_key)
        _key("label_key", self.label_key)
        if self.output_selector is not None and not callable(self.output_selector):
            _key("output_selector", self.output_selector)
        if self.batch_to_input is not None and not callable(self.batch_to_input):
            raise JiTSettingError("batch_to_input", "must be a callable mapping a batch to its input tensor.")

    # -- inputs -------------------------------------------------------------------------------------------------------
    def input(self, batch: Any) -> Tensor:
        """The input tensor of ``batch``, unchecked.

        Raises:
            JiTInputError: naming ``input_key`` / ``batch_to_input`` when no tensor is found.
        """
        if self.batch_to_input is not None:
            found = self.batch_to_input(batch)
            if not isinstance(found, Tensor):
                raise JiTInputError(
                    f"`batch_to_input` returned a {type(found).__name__}, not the input tensor. Make it return the"
                    " tensor the model takes."
                )
            return found
        if isinstance(batch, Tensor):
            return batch
        found = _lookup(batch, self.input_key, 0, INPUT_KEYS)
        if not isinstance(found, Tensor):
            keys = f"`input_key={self.input_key!r}`" if self.input_key is not None else "the automatic input key"
            raise JiTInputError(
                f"Cannot find the input tensor in a batch of type {type(batch).__name__} with {keys}. Set"
                " `input_key` to the position or dict key of the input, or pass `batch_to_input`, a callable that"
                " returns it."
            )
        return found

    def forget_input(self, batch: Any) -> Tensor:
        """The input of a forget batch, checked for what the JiT objective needs (:func:`check_forget_input`)."""
        return check_forget_input(self.input(batch))

    def labels(self, batch: Any) -> Tensor | None:
        """The 1-D integer class labels of ``batch``, or ``None`` if it carries none."""
        if isinstance(batch, Tensor):
            return None
        labels = _lookup(batch, self.label_key, 1, LABEL_KEYS)
        if isinstance(labels, Tensor) and labels.dim() == 1 and not torch.is_floating_point(labels):
            return labels
        return None

    def input_and_labels(self, batch: Any, name: str) -> tuple[Tensor, Tensor]:
        """Both, for a labelled split called ``name`` (``"monitor"``, ``"retain"``...).

        Raises:
            JiTInputError: naming ``label_key`` when the batch carries no labels of the input's length.
        """
        x = self.input(batch)
        y = self.labels(batch)
        if y is None or y.shape[0] != x.shape[0]:
            raise JiTInputError(
                f"`{name}` batches must carry one integer class label per input, e.g. `(x, y)` with `y` of shape"
                f" (batch,), found at `label_key` ({self.label_key!r}; None means position 1 or a 'label' key)."
            )
        return x, y

    @staticmethod
    def ids(batch: Any) -> list[Any] | None:
        """Per-sample ids: the third item of ``(x, y, id)``, or ``batch["id"]`` / ``batch["ids"]``, when it is a 1-D
        tensor or a list of ints or strs; else ``None``."""
        ids = None
        if isinstance(batch, (tuple, list)) and len(batch) >= 3:
            ids = batch[2]
        elif isinstance(batch, Mapping):
            ids = next((batch[k] for k in ID_KEYS if k in batch), None)
        if isinstance(ids, Tensor):
            return ids.tolist() if ids.dim() == 1 else None
        if isinstance(ids, (tuple, list)) and all(isinstance(i, (int, str)) and not isinstance(i, bool) for i in ids):
            return list(ids)
        return None

    # -- outputs ------------------------------------------------------------------------------------------------------
    def logits(self, output: Any, batch_size: int | None = None) -> Tensor:
        """The ``(batch, classes)`` logits in the model's ``output`` (checked when ``batch_size`` is given)."""
        logits = select_output(output, self.output_selector)
        return check_logits(logits, batch_size) if batch_size is not None else logits

    def hparams(self) -> dict[str, Any]:
        """The serialisable description (a callable is named), for logs, checkpoints and audit records."""
        return {
            "input_key": self.input_key,
            "label_key": self.label_key,
            "output_selector": _callable_name(self.output_selector),
            "batch_to_input": _callable_name(self.batch_to_input),
        }


def _callable_name(value: Any) -> Any:
    return getattr(value, "__qualname__", repr(value)) if callable(value) else value


def _lookup(batch: Any, key: int | str | None, position: int, names: tuple[str, ...]) -> Any:
    try:
        if isinstance(batch, (tuple, list)):
            index = position if key is None else key
            return batch[index] if isinstance(index, int) and -len(batch) <= index < len(batch) else None
        if isinstance(batch, Mapping):
            if key is None:
                return next((batch[k] for k in names if k in batch), None)
            return batch.get(key)
    except (KeyError, IndexError, TypeError):
        return None
    return None


def select_output(output: Any, selector: OutputSelector = None) -> Tensor:
    """Pick the logits out of whatever the model's forward returns.

    Args:
        output: The model output: a tensor, a tuple/list, a dict, or any object.
        selector: ``None`` for a tensor output, a dict (or object) with ``"logits"``, or a tuple/list whose only tensor
            is its first item; an ``int`` index into a tuple/list; a ``str`` key into a dict (or attribute name); or a
            callable that maps the output to the logits tensor.

    Raises:
        JiTInputError: naming ``output_selector`` when the logits cannot be found, or when a tuple holds several
            tensors (``(features, logits)`` or ``(logits, aux)``: which one is meant cannot be guessed).

    Example:
        >>> select_output({"logits": torch.ones(2, 3), "aux": 0}).shape
        torch.Size([2, 3])
        >>> select_output((torch.zeros(2, 5), None)).shape
        torch.Size([2, 5])
        >>> select_output((torch.zeros(2, 64), torch.zeros(2, 5)), 1).shape
        torch.Size([2, 5])
    """
    if callable(selector):
        return selector(output)
    if selector is None:
        if isinstance(output, Tensor):
            return output
        if isinstance(output, (tuple, list)) and output:
            tensors = [i for i, item in enumerate(output) if isinstance(item, Tensor)]
            if len(tensors) > 1:
                shapes = ", ".join(f"{i}: {tuple(output[i].shape)}" for i in tensors)
                raise JiTInputError(
                    f"The model returns a {type(output).__name__} of {len(tensors)} tensors ({shapes}): set"
                    " `output_selector` to the index of the logits (e.g. 1 for `(features, logits)`), or to a callable."
                )
            return output[0]
        if isinstance(output, Mapping) and "logits" in output:
            return output["logits"]
        if hasattr(output, "logits"):
            return output.logits
        raise JiTInputError(
            f"`output_selector` is needed: the model returned a {type(output).__name__}, and JiT needs the logits"
            " tensor. Pass an int index, a dict key or a callable as `output_selector`."
        )
    try:
        if isinstance(selector, int):
            return output[selector]
        if isinstance(output, Mapping):
            return output[selector]
        return getattr(output, selector)
    except (KeyError, IndexError, TypeError, AttributeError) as err:
        have = list(output) if isinstance(output, Mapping) else type(output).__name__
        raise JiTInputError(
            f"`output_selector={selector!r}` finds nothing in the model's output ({have}): {err!r}. Pass the index or"
            " key of the logits, or a callable that returns them."
        ) from err


def check_logits(logits: Any, batch_size: int) -> Tensor:
    """``logits`` if it is a ``(batch_size, classes)`` tensor.

    Raises:
        JiTInputError: naming ``output_selector`` otherwise.
    """
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != batch_size:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise JiTInputError(
            f"The model output selected by `output_selector` must be a (batch, classes) tensor with batch={batch_size},"
            f" got {shape}. Pass an `output_selector` that returns the logits."
        )
    return logits


def check_forget_input(x: Any) -> Tensor:
    """Validate one batch of forget inputs before anything is computed from it.

    Raises:
        JiTInputError: if ``x`` is not a tensor with a batch dimension, or holds NaN or Inf. Integer inputs (token
            ids) pass: the perturbation site decides whether it can perturb them (:mod:`lightning_jit.core.site`).

    Example:
        >>> check_forget_input(torch.zeros(2, 3)).shape
        torch.Size([2, 3])
    """
    if not isinstance(x, Tensor):
        raise JiTInputError(
            f"The forget batch input must be a tensor, got {type(x).__name__}. Set `input_key` or `batch_to_input`"
            " so that the input tensor can be found in the batch."
        )
    if x.dim() < 2 or x.shape[0] == 0:
        raise JiTInputError(
            f"The forget batch input must have shape (batch, ...) with batch >= 1, got {tuple(x.shape)}."
        )
    if not torch.isfinite(x).all():
        raise JiTInputError("The forget batch input contains NaN or Inf; clean the forget set before unlearning.")
    return x
