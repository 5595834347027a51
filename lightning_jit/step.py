"""One JiT update: find the input in a batch, evaluate the objective, back-propagate and step.

This is the single training step shared by :class:`~lightning_jit.module.JiTUnlearning` (which calls it from its
``training_step``) and :class:`~lightning_jit.callback.JiTUnlearningCallback` (which calls it from inside the user's
own Trainer run). Both hand it a ``backward`` function that goes through the Trainer's strategy and precision plugin.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_jit.config import JiTConfig
from lightning_jit.objective import JiTInputError, check_forget_input, jit_objective, select_output


def batch_to_input(batch: Any, config: JiTConfig) -> Tensor:
    """Find the input tensor of a forget batch.

    A tensor is the input; a tuple or list holds it at ``config.input_key`` (default 0); a dict holds it under
    ``config.input_key``; anything else needs ``config.batch_to_input``.

    Raises:
        JiTInputError: naming ``input_key`` / ``batch_to_input`` when no input tensor can be found.
    """
    if config.batch_to_input is not None:
        return check_forget_input(config.batch_to_input(batch))
    key = config.input_key
    if isinstance(batch, Tensor):
        return check_forget_input(batch)
    try:
        if isinstance(batch, (tuple, list)):
            found = batch[int(key)] if not isinstance(key, str) else None
        elif isinstance(batch, dict):
            found = batch[key]
        else:
            found = None
    except (KeyError, IndexError, ValueError, TypeError):
        found = None
    if not isinstance(found, Tensor):
        raise JiTInputError(
            f"Cannot find the input tensor in a forget batch of type {type(batch).__name__} with"
            f" `input_key={key!r}`. Set `input_key` to the position or dict key of the input, or pass"
            " `batch_to_input`, a callable that returns it."
        )
    return check_forget_input(found)


def batch_labels(batch: Any, config: JiTConfig) -> Tensor | None:
    """The integer class labels of a forget batch, if it carries any: ``batch[config.label_key]`` (default 1)."""
    key = config.label_key
    try:
        if isinstance(batch, (tuple, list)) and not isinstance(key, str):
            labels = batch[int(key)] if len(batch) > int(key) else None
        elif isinstance(batch, dict):
            labels = batch.get(key)
        else:
            labels = None
    except (TypeError, ValueError):
        labels = None
    if isinstance(labels, Tensor) and labels.dim() == 1 and not torch.is_floating_point(labels):
        return labels
    return None


def batch_keys(batch: Any) -> list[Any] | None:
    """Per-sample ids carried by a batch: the third item of ``(x, y, id)``, or ``batch["id"]``; else ``None``."""
    ids = None
    if isinstance(batch, (tuple, list)) and len(batch) >= 3:
        ids = batch[2]
    elif isinstance(batch, dict):
        ids = batch.get("id", batch.get("ids"))
    if ids is None:
        return None
    return ids.tolist() if isinstance(ids, Tensor) else list(ids)


@contextlib.contextmanager
def normalization_mode(model: nn.Module, policy: str) -> Iterator[None]:
    """Put ``model`` in the mode the normalisation policy asks for, and restore every submodule's mode afterwards.

    ``"eval"``: BatchNorm uses (and keeps) its running statistics and dropout is off, so the noise never changes
    BatchNorm buffers. ``"train"``: the model stays in train mode, as in the reference.
    """
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.train(policy == "train")
        yield
    finally:
        for module, training in modes:
            module.training = training


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def gradients_finite(params: list[nn.Parameter]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([g.detach().float().isfinite().all() for g in grads]).all())


@dataclass
class StepResult:
    """What one JiT step did.

    ``correct`` and ``count`` describe the forget batch *before* the update: how many of its ``count`` samples the
    model still classified as their label (``correct`` is ``None`` when the batch carries no labels).
    """

    loss: Tensor
    applied: bool
    correct: int | None
    count: int


class ForgetAccuracyWindow:
    """Forget-set accuracy over the most recent forget samples, from the clean logits the JiT step computes anyway.

    It costs no extra forward pass. It keeps the latest batches that together hold at least ``min_samples`` samples,
    each measured just before that batch's update, so the estimate is recent (a stale window overshoots: accuracy on
    the forget set falls steeply once it starts to fall). JiT uses it as a stopping rule computed from the forget set
    alone: stop once the forget set is no longer classified correctly.

    Example:
        >>> w = ForgetAccuracyWindow(min_samples=8)
        >>> w.update(3, 4); w.ready()
        False
        >>> w.update(0, 4); w.accuracy()
        37.5
        >>> w.update(0, 4); w.accuracy()
        0.0
    """

    def __init__(self, min_samples: int = 64) -> None:
        self.min_samples = max(1, int(min_samples))
        self._items: list[tuple[int, int]] = []
        self.saw_full_pass = False

    def update(self, correct: int, count: int) -> None:
        self._items.append((int(correct), int(count)))
        while len(self._items) > 1 and sum(n for _, n in self._items[1:]) >= self.min_samples:
            self._items.pop(0)

    def totals(self) -> tuple[int, int]:
        return sum(c for c, _ in self._items), sum(n for _, n in self._items)

    def ready(self) -> bool:
        """Whether the window holds enough samples (or the whole forget set, if it is smaller) to decide on."""
        return self.totals()[1] >= self.min_samples or self.saw_full_pass

    def accuracy(self) -> float:
        correct, count = self.totals()
        return 100.0 * correct / count if count else float("nan")


def jit_step(
    model: nn.Module | Callable[[Tensor], Any],
    batch: Any,
    config: JiTConfig,
    optimizer: Optimizer,
    backward: Callable[[Tensor], None],
    params: list[nn.Parameter],
    *,
    norm_module: nn.Module | None = None,
    epoch: int = 0,
    generator: torch.Generator | None = None,
    step_optimizer: Callable[[], Any] | None = None,
) -> StepResult:
    """Run one JiT update on one forget batch.

    Gradients are zeroed at every step (the reference zeroes them once, so they pile up across batches). A step
    whose gradients are not finite is never applied: it is skipped and reported with ``applied=False``.

    Args:
        model: What to call on inputs: the (possibly strategy-wrapped) classifier.
        batch: The forget batch, in any form :func:`batch_to_input` understands.
        config: The JiT hyperparameters.
        optimizer: The optimizer over ``params``.
        backward: Back-propagates a loss; the wrapper and the callback pass the strategy's backward.
        params: The trainable parameters, checked for finite gradients before the step.
        norm_module: The module whose train/eval mode the normalisation policy sets (default: ``model``).
        epoch: The JiT epoch, combined with ``config.seed`` and the sample ids for keyed noise.
        generator: Generator for the noise when no per-sample keys are used.
        step_optimizer: Applies the step (default ``optimizer.step``); e.g. a ``LightningOptimizer``'s step.
    """
    x = batch_to_input(batch, config)
    labels = batch_labels(batch, config)
    keys = batch_keys(batch) if config.seed is not None else None
    optimizer.zero_grad(set_to_none=True)
    target = norm_module if norm_module is not None else model
    with normalization_mode(target, config.norm_policy):
        clean = select_output(model(x), config.output_selector)
        loss = jit_objective(
            model,
            x,
            config.sigma,
            config.n_perturbations,
            reduction=config.reduction,
            clamp=config.clamp,
            output_selector=config.output_selector,
            generator=generator,
            keys=keys,
            seed=config.seed or 0,
            epoch=epoch,
            perturbation_chunk=config.perturbation_chunk,
            clean_logits=clean,
            center_logits=config.center_logits,
        )
    correct = None
    if labels is not None and labels.shape[0] == clean.shape[0]:
        correct = int((clean.detach().argmax(1) == labels.to(clean.device)).sum())
    if not loss.requires_grad:
        raise JiTInputError("The JiT loss has no gradient: the model has no trainable parameter on its output path.")
    backward(loss)
    applied = bool(torch.isfinite(loss)) and gradients_finite(params)
    if applied:
        (step_optimizer or optimizer.step)()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=loss.detach(), applied=applied, correct=correct, count=int(x.shape[0]))
