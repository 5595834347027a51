"""How a batch is read: where the input, the labels and the sample ids are, and where the logits are in the output.

:class:`BatchFormat` is the one reader of batches in the library: the JiT step, the collapse guard's monitor, the
evaluation and the report all use it, so that a batch JiT accepts is a batch the report accepts.

A model's input is one tensor, or a dict or tuple of them as models take them (``{"input_ids": ..., "attention_mask":
...}``, ``(ids, mask)``): :func:`call_model` passes a dict as keyword arguments and a tuple as positional ones, and
:func:`batch_size`, :func:`index`, :func:`concat`, :func:`move` and :func:`map_tensors` slice, join and move every
field along the batch dimension, so that masks and other fields reach the model unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from lightning_jit.core.errors import JiTInputError, JiTSettingError

#: What ``output_selector`` may be: ``None`` (found automatically, see :func:`select_output`), an index, a key or
#: attribute name, or a callable mapping the output to the logits.
OutputSelector = int | str | Callable[..., Any] | None
#: What a model's input may be: a tensor, or a dict / tuple / list of tensors (and other values passed unchanged).
ModelInput = Any
#: Where the input is in a batch: a position or key, or several (the input is then the tuple or dict of those fields).
InputKey = int | str | list[int] | list[str] | None
#: Dict keys tried, in order, for the input and the labels when ``input_key`` / ``label_key`` are ``None``.
INPUT_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values")
#: Dict keys that mark a batch of token fields: its input is then every field but the labels and the ids.
TOKEN_KEYS = ("input_ids", "inputs_embeds")
LABEL_KEYS = ("y", "label", "labels", "target", "targets")
ID_KEYS = ("id", "ids")


# ----------------------------------------------------------------------------------------------------------------------
# Inputs of any structure
# ----------------------------------------------------------------------------------------------------------------------
def map_tensors(fn: Callable[[Tensor], Any], x: ModelInput) -> ModelInput:
    """``x`` with ``fn`` applied to every tensor in it (dicts, tuples, lists and named tuples are rebuilt; other
    values are kept).

    Example:
        >>> map_tensors(lambda t: t * 2, {"ids": torch.tensor([1, 2]), "n": 3})
        {'ids': tensor([2, 4]), 'n': 3}
    """
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, Mapping):
        return {k: map_tensors(fn, v) for k, v in x.items()}
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(map_tensors(fn, v) for v in x))
    if isinstance(x, (tuple, list)):
        return type(x)(map_tensors(fn, v) for v in x)
    return x


def tensors(x: ModelInput) -> list[Tensor]:
    """Every tensor in ``x``, in order.

    Example:
        >>> [tuple(t.shape) for t in tensors((torch.zeros(2, 3), {"mask": torch.ones(2)}))]
        [(2, 3), (2,)]
    """
    found: list[Tensor] = []
    map_tensors(found.append, x)
    return found


def describe_input(x: ModelInput) -> str:
    """The shapes and dtypes of ``x``'s tensors, for messages.

    Example:
        >>> describe_input({"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5)})
        "{'input_ids': (2, 5) torch.int64, 'attention_mask': (2, 5) torch.float32}"
    """
    if isinstance(x, Tensor):
        return f"{tuple(x.shape)} {x.dtype}"
    if isinstance(x, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe_input(v)}" for k, v in x.items()) + "}"
    if isinstance(x, (tuple, list)):
        inner = ", ".join(describe_input(v) for v in x)
        return f"({inner})" if isinstance(x, tuple) else f"[{inner}]"
    return type(x).__name__


def batch_size(x: ModelInput) -> int:
    """The batch size of ``x``: the first dimension its tensors share.

    Raises:
        JiTInputError: if ``x`` holds no tensor with a batch dimension, or its tensors disagree on it.

    Example:
        >>> batch_size({"input_ids": torch.zeros(4, 7), "attention_mask": torch.ones(4, 7)})
        4
    """
    sizes = {t.shape[0] for t in tensors(x) if t.dim() >= 1}
    if len(sizes) != 1:
        found = "no tensor with a batch dimension" if not sizes else f"batch sizes {sorted(sizes)}"
        raise JiTInputError(
            f"The input {describe_input(x)} holds {found}: every tensor of a model's input must share its first"
            " (batch) dimension. Set `input_key` or `batch_to_input` to select the model's input."
        )
    return sizes.pop()


def index(x: ModelInput, idx: Any) -> ModelInput:
    """Rows ``idx`` (an int, slice, index tensor or mask) of every batched tensor in ``x``.

    Example:
        >>> index({"ids": torch.arange(6).view(3, 2), "mask": torch.ones(3, 2)}, slice(0, 1))["ids"]
        tensor([[0, 1]])
    """
    return map_tensors(lambda t: t[idx] if t.dim() >= 1 else t, x)


def concat(xs: Sequence[ModelInput]) -> ModelInput:
    """The inputs ``xs`` (all of one structure) joined along the batch dimension.

    Raises:
        JiTInputError: if ``xs`` is empty or its items differ in structure.

    Example:
        >>> both = concat([(torch.zeros(1, 2), torch.ones(1)), (torch.ones(2, 2), torch.zeros(2))])
        >>> [tuple(t.shape) for t in both]
        [(3, 2), (3,)]
    """
    if not xs:
        raise JiTInputError("Cannot join an empty list of inputs.")
    parts = [tensors(x) for x in xs]
    if len({len(p) for p in parts}) != 1:
        raise JiTInputError(f"Cannot join inputs of different structures: {[describe_input(x) for x in xs[:3]]}.")
    joined = iter([torch.cat(column) if column[0].dim() >= 1 else column[0] for column in zip(*parts, strict=True)])
    return map_tensors(lambda _: next(joined), xs[0])


def move(x: ModelInput, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ModelInput:
    """``x`` on ``device``, its floating-point tensors cast to ``dtype`` (token ids and masks keep theirs).

    Example:
        >>> moved = move({"ids": torch.tensor([[1, 2]]), "emb": torch.zeros(1, 2)}, "cpu", torch.float64)
        >>> moved["ids"].dtype, moved["emb"].dtype
        (torch.int64, torch.float64)
    """
    return map_tensors(lambda t: t.to(device=device, dtype=dtype if torch.is_floating_point(t) else None), x)


def stack(rows: Sequence[ModelInput]) -> ModelInput:
    """The single-sample inputs ``rows`` (all of one structure, as :func:`index` with an int gives them) stacked into
    a batch.

    Example:
        >>> x = {"ids": torch.arange(6).view(3, 2), "mask": torch.ones(3, 2)}
        >>> stack([index(x, 2), index(x, 0)])["ids"].tolist()
        [[4, 5], [0, 1]]
    """
    if not rows:
        raise JiTInputError("Cannot stack an empty list of inputs.")
    if isinstance(rows[0], Tensor):
        return torch.stack(list(rows))
    columns = iter([torch.stack(column) for column in zip(*(tensors(r) for r in rows), strict=True)])
    return map_tensors(lambda _: next(columns), rows[0])


def device_of(x: ModelInput) -> torch.device:
    """The device of ``x``'s first tensor.

    Example:
        >>> device_of({"mask": torch.ones(2), "n": 3})
        device(type='cpu')
    """
    found = tensors(x)
    if not found:
        raise JiTInputError(f"The input {describe_input(x)} holds no tensor.")
    return found[0].device


def move_like(x: ModelInput, like: ModelInput) -> ModelInput:
    """``x`` on ``like``'s device, its floating-point tensors cast to ``like``'s dtype when ``like`` is a
    floating-point tensor; integer tensors (token ids) keep their dtype, and a dict or tuple is moved field by field.

    Example:
        >>> x = {"ids": torch.tensor([[1]]), "w": torch.ones(1, 1)}
        >>> moved = move_like(x, torch.zeros(1, dtype=torch.float64))
        >>> moved["ids"].dtype, moved["w"].dtype
        (torch.int64, torch.float64)
    """
    dtype = like.dtype if isinstance(like, Tensor) and torch.is_floating_point(like) else None
    return move(x, device_of(like), dtype)


def same_layout(a: ModelInput, b: ModelInput) -> bool:
    """Whether two inputs can be joined by :func:`concat`: the same structure, and per tensor the same sample shape,
    dtype and device.

    Example:
        >>> same_layout({"ids": torch.zeros(2, 3)}, {"ids": torch.zeros(5, 3)})
        True
        >>> same_layout(torch.zeros(2, 3), torch.zeros(2, 4))
        False
    """
    ta, tb = tensors(a), tensors(b)
    if len(ta) != len(tb) or type(a) is not type(b):
        return False
    if isinstance(a, Mapping) and list(a) != list(b):
        return False
    return all(
        s.shape[1:] == t.shape[1:] and s.dtype == t.dtype and s.device == t.device and s.dim() == t.dim()
        for s, t in zip(ta, tb, strict=True)
    )


def detached(x: ModelInput, clone: bool = False) -> ModelInput:
    """``x`` with every tensor detached (and cloned, with ``clone``).

    Example:
        >>> detached({"w": torch.ones(1, requires_grad=True)})["w"].requires_grad
        False
    """
    return map_tensors(lambda t: t.detach().clone() if clone else t.detach(), x)


def input_caller(model: Callable[..., Any], unpack: bool = True) -> Callable[[ModelInput], Any]:
    """``model`` as a callable of the model's input as one argument (:func:`call_model`): the form every forward of
    the JiT core takes (``forward(x)``), whatever the input's structure. A one-tensor input calls ``model(x)``.

    Example:
        >>> forward = input_caller(lambda input_ids, attention_mask: input_ids * attention_mask)
        >>> forward({"input_ids": torch.tensor([3, 4]), "attention_mask": torch.tensor([1, 0])})
        tensor([3, 0])
    """
    if getattr(model, "takes_model_input", False):  # already one (e.g. a FrozenReference)
        return model
    return InputCaller(model, unpack)


class InputCaller:
    """A model called on its input as one argument, see :func:`input_caller`."""

    #: Marks a callable that takes the model's input as one argument (:func:`input_caller` leaves it as it is).
    takes_model_input = True

    def __init__(self, model: Callable[..., Any], unpack: bool = True) -> None:
        self.model = model
        self.unpack = unpack

    def __call__(self, x: ModelInput) -> Any:
        if isinstance(x, Tensor):
            return self.model(x)
        return call_model(self.model, x, self.unpack)


def call_model(model: Callable[..., Any], x: ModelInput, unpack: bool = True) -> Any:
    """``model``'s output on ``x``: a dict is passed as keyword arguments and a tuple or list as positional ones
    (``unpack=False``: as one argument), a tensor as the one argument.

    Example:
        >>> call_model(lambda input_ids, attention_mask: input_ids * attention_mask,
        ...            {"input_ids": torch.tensor([3, 4]), "attention_mask": torch.tensor([1, 0])})
        tensor([3, 0])
    """
    if unpack and isinstance(x, Mapping):
        return model(**x)
    if unpack and isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def as_class_labels(labels: Tensor, name: str = "label_key") -> Tensor:
    """``labels`` as int64 class indices: integer labels as they are, integral floats (``2.0``) converted.

    Raises:
        JiTInputError: naming ``name`` when a floating-point label is not a whole number (or is negative, NaN or Inf).

    Example:
        >>> as_class_labels(torch.tensor([2.0, 0.0])).tolist()
        [2, 0]
    """
    if not torch.is_floating_point(labels):
        return labels.long() if labels.dtype != torch.int64 and not labels.dtype.is_complex else labels
    whole = torch.isfinite(labels) & (labels == labels.round()) & (labels >= 0)
    if not bool(whole.all()):
        bad = labels[~whole].flatten()[:3].tolist()
        raise JiTInputError(
            f"The labels at `{name}` are floating point and not all whole class numbers (e.g. {bad}): JiT needs one"
            " class index per sample. Store the class indices (e.g. `y.long()` of the class, or `y.argmax(1)` of"
            f" one-hot or soft targets), or point `{name}` at the class labels."
        )
    return labels.long()


def infer_num_classes(model: Any) -> int | None:
    """The model's class count where it says so itself: a ``num_classes`` (or ``num_labels``) attribute or
    hyperparameter, or a Hugging Face ``config.num_labels``; else ``None`` (never guessed from the layers).

    Example:
        >>> class Net(torch.nn.Linear):
        ...     num_classes = 4
        >>> infer_num_classes(Net(3, 4)), infer_num_classes(torch.nn.Linear(3, 4))
        (4, None)
    """
    for source in (model, getattr(model, "hparams", None), getattr(model, "config", None)):
        if source is None:
            continue
        for name in ("num_classes", "num_labels"):
            value = source.get(name) if isinstance(source, Mapping) else getattr(source, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 2:
                return value
    return None


def _key(name: str, value: Any, several: bool = False) -> None:
    def one(v: Any) -> bool:
        return not isinstance(v, bool) and isinstance(v, (int, str))

    if value is None or one(value):
        return
    if several and isinstance(value, (list, tuple)) and value and all(one(v) for v in value):
        if len({type(v) for v in value}) == 1:
            return
    what = "an int position, a str key, a list of positions or of keys" if several else "an int position, a str key"
    raise JiTSettingError(name, f"must be {what} or None (automatic), got {value!r}.")


@dataclass
class BatchFormat:
    """Where the input, the labels and the ids are in a batch, and where the logits are in the model's output.

    Batches may be a tensor (the input), a tuple/list ``(x, y[, id])``, a dict, or anything ``batch_to_input`` reads.
    The input is what the model takes: one tensor, or a dict or tuple of tensors (token ids with their attention mask,
    a tabular model's categorical and numeric columns); a dict is passed as keyword arguments and a tuple as positional
    ones (``unpack_input=False``: as one argument), and every field is sliced along the batch dimension.

    Args:
        input_key: Position (tuple/list) or key (dict) of the input, or a list of them (the input is then the tuple
            or the dict of those fields). ``None``: position 0; in a dict the first of ``"x"``, ``"input"``,
            ``"inputs"``, ``"image"``, ``"images"``, ``"pixel_values"``, or, when it holds ``"input_ids"`` or
            ``"inputs_embeds"``, the dict of all its fields but the labels and the ids (a tokenizer's batch).
        label_key: Position or key of the class labels, one per sample (integers, or floats holding whole numbers),
            used by the stopping rule, the monitor and the report. ``None``: position 1, or the first of ``"y"``,
            ``"label"``, ``"labels"``, ``"target"``, ``"targets"`` in a dict.
        output_selector: Where the logits are in the model's output: ``None`` finds them where that is unambiguous
            (see :func:`select_output`), else an int index, a str key or attribute, or a callable.
        batch_to_input: A callable that returns the input of any batch; overrides ``input_key``.
        num_classes: The model's class count, which lets ``output_selector=None`` pick the logits out of several
            outputs (the one ``(batch, num_classes)`` tensor). ``None``: as the model states it
            (:func:`infer_num_classes`, through :meth:`for_model`), else unknown.
        unpack_input: Pass a dict input as keyword arguments and a tuple input as positional arguments (``True``),
            or either as the model's one argument (``False``).

    Example:
        >>> fmt = BatchFormat()
        >>> batch = {"image": torch.zeros(2, 3), "label": torch.tensor([1, 0])}
        >>> tuple(fmt.input(batch).shape), fmt.labels(batch).tolist()
        ((2, 3), [1, 0])
        >>> fmt.logits((torch.ones(2, 5), "aux")).shape
        torch.Size([2, 5])
        >>> tokens = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4),
        ...           "labels": torch.tensor([1.0, 0.0])}
        >>> sorted(fmt.input(tokens)), fmt.labels(tokens).tolist()
        (['attention_mask', 'input_ids'], [1, 0])
    """

    input_key: InputKey = None
    label_key: int | str | None = None
    output_selector: OutputSelector = field(default=None, repr=False)
    batch_to_input: Callable[..., Any] | None = field(default=None, repr=False)
    num_classes: int | None = None
    unpack_input: bool = True

    def __post_init__(self) -> None:
        _key("input_key", self.input_key, several=True)
        if isinstance(self.input_key, tuple):
            self.input_key = list(self.input_key)
        _key("label_key", self.label_key)
        if self.output_selector is not None and not callable(self.output_selector):
            _key("output_selector", self.output_selector)
        if self.batch_to_input is not None and not callable(self.batch_to_input):
            raise JiTSettingError("batch_to_input", "must be a callable mapping a batch to the model's input.")
        n = self.num_classes
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 2):
            raise JiTSettingError(
                "num_classes", f"must be an integer >= 2 (the model's class count) or None, got {n!r}."
            )
        if not isinstance(self.unpack_input, bool):
            raise JiTSettingError("unpack_input", f"must be True or False, got {self.unpack_input!r}.")

    def for_model(self, model: Any) -> BatchFormat:
        """This format with ``num_classes`` taken from ``model`` (:func:`infer_num_classes`) when it is not set, and,
        with no ``output_selector``, one that finds the logits by that class count (:class:`LogitsByClassCount`), so
        that every reader of ``output_selector`` finds them.

        Example:
            >>> class Net(torch.nn.Linear):
            ...     num_classes = 5
            >>> fmt = BatchFormat().for_model(Net(3, 5))
            >>> fmt.num_classes, fmt.output_selector((torch.zeros(2, 64), torch.zeros(2, 5))).shape
            (5, torch.Size([2, 5]))
        """
        n = self.num_classes if self.num_classes is not None else infer_num_classes(model)
        if n is None:
            return self
        selector = LogitsByClassCount(n) if self.output_selector is None else self.output_selector
        return replace(self, num_classes=n, output_selector=selector)

    # -- inputs -------------------------------------------------------------------------------------------------------
    def input(self, batch: Any) -> ModelInput:
        """The model's input in ``batch`` (a tensor, or a dict or tuple of tensors), unchecked.

        Raises:
            JiTInputError: naming ``input_key`` / ``batch_to_input`` when no input is found.
        """
        if self.batch_to_input is not None:
            found = self.batch_to_input(batch)
            if not tensors(found):
                raise JiTInputError(
                    f"`batch_to_input` returned a {type(found).__name__}, not the model's input. Make it return the"
                    " tensor (or the dict or tuple of tensors) the model takes."
                )
            return found
        if isinstance(batch, Tensor):
            return batch
        if isinstance(self.input_key, list):
            found = _fields(batch, self.input_key)
        else:
            found = _lookup(batch, self.input_key, 0, INPUT_KEYS)
            if found is None and self.input_key is None and isinstance(batch, Mapping):
                found = self._token_fields(batch)
        if isinstance(found, Tensor) or (isinstance(found, (Mapping, tuple, list)) and tensors(found)):
            return found
        keys = f"`input_key={self.input_key!r}`" if self.input_key is not None else "the automatic input key"
        raise JiTInputError(
            f"Cannot find the model's input in a batch of type {type(batch).__name__} with {keys}. Set"
            " `input_key` to the position or dict key of the input (or a list of them), or pass `batch_to_input`, a"
            " callable that returns it."
        )

    def _token_fields(self, batch: Mapping[str, Any]) -> dict[str, Any] | None:
        if not any(k in batch for k in TOKEN_KEYS):
            return None
        skip = {*LABEL_KEYS, *ID_KEYS, self.label_key}
        return {k: v for k, v in batch.items() if k not in skip}

    def forget_input(self, batch: Any, structured: bool = False) -> ModelInput:
        """The input of a forget batch, checked for what the JiT objective needs (:func:`check_forget_input`;
        ``structured``: whether the caller takes a dict or tuple input)."""
        return check_forget_input(self.input(batch), structured)

    def labels(self, batch: Any) -> Tensor | None:
        """The 1-D int64 class labels of ``batch`` (whole-number floats converted), or ``None`` if it carries none.

        Raises:
            JiTInputError: naming ``label_key`` when the labels are floats that are not whole class numbers.
        """
        if isinstance(batch, Tensor):
            return None
        labels = _lookup(batch, self.label_key, 1, LABEL_KEYS)
        if isinstance(labels, Tensor) and labels.dim() == 1 and labels.dtype != torch.bool:
            return as_class_labels(labels)
        return None

    def input_and_labels(self, batch: Any, name: str, structured: bool = False) -> tuple[ModelInput, Tensor]:
        """Both, for a labelled split called ``name`` (``"monitor"``, ``"retain"``...); ``structured``: whether the
        caller takes a dict or tuple input (as in :func:`check_forget_input`).

        Raises:
            JiTInputError: naming ``label_key`` when the batch carries no labels of the input's length, or the input
                is not one tensor and ``structured`` is false.
        """
        x = self.input(batch)
        if not structured and not isinstance(x, Tensor):
            raise JiTInputError(
                f"The `{name}` batch input is a {type(x).__name__} ({describe_input(x)}); this path of JiT takes one"
                " input tensor. Set `input_key` or `batch_to_input` so that the input tensor is found in the batch."
            )
        y = self.labels(batch)
        if y is None or y.shape[0] != batch_size(x):
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
    def logits(self, output: Any, batch_size: int | None = None, input: ModelInput = None) -> Tensor:
        """The ``(batch, classes)`` logits in the model's ``output`` (checked when ``batch_size`` is given; the
        ``input`` that gave it, when given, is named in the message)."""
        logits = select_output(output, self.output_selector, self.num_classes)
        return check_logits(logits, batch_size, input) if batch_size is not None else logits

    def caller(self, model: Callable[..., Any]) -> Callable[[ModelInput], Any]:
        """``model`` as a callable of the input as one argument (:func:`input_caller`, with ``unpack_input``)."""
        return input_caller(model, self.unpack_input)

    def call(self, model: Callable[..., Any], x: ModelInput) -> Any:
        """``model``'s raw output on the input ``x`` (:func:`call_model`)."""
        return call_model(model, x, self.unpack_input)

    def model_logits(self, model: Callable[..., Any], x: ModelInput) -> Tensor:
        """``model``'s checked ``(batch, classes)`` logits on the input ``x``: one call, then :meth:`logits`.

        Example:
            >>> BatchFormat().model_logits(torch.nn.Linear(3, 4), torch.zeros(2, 3)).shape
            torch.Size([2, 4])
        """
        return self.logits(self.call(model, x), batch_size(x), x)

    def hparams(self) -> dict[str, Any]:
        """The serialisable description (a callable is named), for logs, checkpoints and audit records."""
        return {
            "input_key": self.input_key,
            "label_key": self.label_key,
            "output_selector": None
            if isinstance(self.output_selector, LogitsByClassCount)
            else _callable_name(self.output_selector),
            "batch_to_input": _callable_name(self.batch_to_input),
            "num_classes": self.num_classes,
            "unpack_input": self.unpack_input,
        }


@dataclass(frozen=True)
class LogitsByClassCount:
    """The automatic ``output_selector`` of a model whose class count is known: ``select_output(output, None,
    num_classes)``. Recorded as ``None`` (automatic) in hyperparameters, as it is derived again from ``num_classes``.

    Example:
        >>> LogitsByClassCount(3)((torch.zeros(2, 8), torch.zeros(2, 3))).shape
        torch.Size([2, 3])
    """

    num_classes: int

    def __call__(self, output: Any) -> Tensor:
        return select_output(output, None, self.num_classes)


def _fields(batch: Any, keys: list[Any]) -> Any:
    found = [_lookup(batch, k, 0, INPUT_KEYS) for k in keys]
    if any(f is None for f in found):
        return None
    return dict(zip(keys, found, strict=True)) if isinstance(batch, Mapping) else tuple(found)


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


def select_output(output: Any, selector: OutputSelector = None, num_classes: int | None = None) -> Tensor:
    """Pick the logits out of whatever the model's forward returns.

    Args:
        output: The model output: a tensor, a tuple/list, a dict (a Hugging Face ``ModelOutput`` is one), or any
            object.
        selector: ``None`` finds the logits where that is unambiguous: a tensor output; a dict's (or object's)
            ``"logits"``; a tuple/list's only tensor, or its only 2-D tensor, or its only ``(batch, num_classes)``
            tensor when ``num_classes`` is known. Else an ``int`` index into a tuple/list, a ``str`` key into a dict
            (or attribute name), or a callable that maps the output to the logits tensor.
        num_classes: The model's class count, when known (used by ``selector=None`` only).

    Raises:
        JiTInputError: naming ``output_selector`` when the logits cannot be found, or when a tuple holds several
            candidates (``(features, logits)`` with an unknown class count: which one is meant cannot be guessed).

    Example:
        >>> select_output({"logits": torch.ones(2, 3), "aux": 0}).shape
        torch.Size([2, 3])
        >>> select_output((torch.zeros(2, 5), None)).shape
        torch.Size([2, 5])
        >>> select_output((torch.zeros(2, 64), torch.zeros(2, 5)), 1).shape
        torch.Size([2, 5])
        >>> select_output((torch.zeros(2, 64), torch.zeros(2, 5)), num_classes=5).shape
        torch.Size([2, 5])
    """
    if callable(selector):
        return selector(output)
    if selector is None:
        if isinstance(output, Tensor):
            return output
        if isinstance(output, Mapping) and "logits" in output:
            return output["logits"]
        if isinstance(output, (tuple, list)) and output:
            return _only_logits(output, num_classes)
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


def _only_logits(output: Sequence[Any], num_classes: int | None) -> Tensor:
    """The one tensor of a tuple output that can be the logits, or an error naming ``output_selector``."""
    found = [i for i, item in enumerate(output) if isinstance(item, Tensor)]
    if len(found) == 1:
        return output[found[0]]
    for keep in (lambda t: t.dim() == 2, lambda t: t.dim() == 2 and t.shape[1] == num_classes):
        found = [i for i in found if keep(output[i])]
        if len(found) == 1:
            return output[found[0]]
    shapes = ", ".join(f"{i}: {tuple(t.shape)}" for i, t in enumerate(output) if isinstance(t, Tensor))
    count = sum(isinstance(t, Tensor) for t in output)
    known = (
        f"{len(found)} of them are (batch, {num_classes})"
        if num_classes is not None
        else "the class count is unknown (set `num_classes`, or give the model a `num_classes` attribute)"
    )
    raise JiTInputError(
        f"The model returns a {type(output).__name__} of {count} tensors ({shapes}) and {known}: set"
        " `output_selector` to the index of the logits (e.g. 1 for `(features, logits)`), or to a callable."
    )


def check_logits(logits: Any, batch_size: int, input: ModelInput = None) -> Tensor:
    """``logits`` if it is a ``(batch_size, classes)`` tensor.

    Raises:
        JiTInputError: naming ``output_selector`` otherwise, and the ``input``'s shape when it is given and the
            model returned a tensor with an extra dimension (an input shaped unlike the training batches).

    Example:
        >>> check_logits(torch.zeros(3, 1, 4), 3, torch.zeros(3, 1, 30))
        Traceback (most recent call last):
        ...
        lightning_jit.core.errors.JiTInputError: The model returned (3, 1, 4) ...
    """
    if isinstance(logits, Tensor) and logits.dim() == 2 and logits.shape[0] == batch_size:
        return logits
    shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
    if input is not None and isinstance(logits, Tensor) and logits.dim() > 2:
        raise JiTInputError(
            f"The model returned {shape} for an input of {describe_input(input)}, not (batch, classes) logits with"
            f" batch={batch_size}. An input with an extra dimension (e.g. (N, 1, 30) for a model that takes (N, 30))"
            " gives outputs with one too: check the forget set's input shape against the training batches (reshape"
            " it in the dataset or `batch_to_input`); if the logits are elsewhere in the output, set"
            " `output_selector`."
        )
    raise JiTInputError(
        f"The model output selected by `output_selector` must be a (batch, classes) tensor with batch={batch_size},"
        f" got {shape}. Pass an `output_selector` that returns the logits."
    )


def check_forget_input(x: Any, structured: bool = False) -> ModelInput:
    """Validate one batch of forget inputs before anything is computed from it.

    The input is one tensor or, where the caller passes ``structured=True`` (it reads the input through
    :func:`call_model`, :func:`index`, :func:`concat` and :func:`move`), a dict or tuple of tensors: every tensor
    shares the batch dimension, and the floating-point ones are finite.

    Raises:
        JiTInputError: if ``x`` is not one tensor and ``structured`` is false, holds no tensor with a batch dimension,
            its tensors disagree on the batch size, or its floating-point tensors hold NaN or Inf. Integer inputs
            (token ids) pass: the perturbation site decides whether it can perturb them
            (:mod:`lightning_jit.core.site`).

    Example:
        >>> check_forget_input(torch.zeros(2, 3)).shape
        torch.Size([2, 3])
        >>> sorted(check_forget_input({"x": torch.zeros(2, 3), "mask": torch.ones(2, 3)}, structured=True))
        ['mask', 'x']
    """
    if not isinstance(x, Tensor) and tensors(x) and not structured:
        raise JiTInputError(
            f"The forget batch input is a {type(x).__name__} ({describe_input(x)}); this path of JiT takes one input"
            " tensor. Set `input_key` or `batch_to_input` so that the input tensor is found in the batch."
        )
    if not tensors(x):
        raise JiTInputError(
            f"The forget batch input must be a tensor, got {type(x).__name__}. Set `input_key` or `batch_to_input`"
            " so that the input tensor can be found in the batch."
        )
    if isinstance(x, Tensor) and (x.dim() < 2 or x.shape[0] == 0):
        raise JiTInputError(
            f"The forget batch input must have shape (batch, ...) with batch >= 1, got {tuple(x.shape)}."
        )
    if batch_size(x) == 0:
        raise JiTInputError(f"The forget batch input must have batch >= 1, got {describe_input(x)}.")
    floating = [t for t in tensors(x) if torch.is_floating_point(t)]
    if not all(bool(torch.isfinite(t).all()) for t in floating):
        raise JiTInputError("The forget batch input contains NaN or Inf; clean the forget set before unlearning.")
    return x
