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
from lightning_jit.objective import (
    JiTInputError,
    check_forget_input,
    jit_objective,
    logit_norm_penalty,
    select_output,
)
from lightning_jit.probes import ProbeDistillation


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
    want = policy == "train"
    modes = [(m, m.training) for m in model.modules()]
    changed = any(training != want for _, training in modes)  # usually not: then there is nothing to do per step
    try:
        if changed:
            model.train(want)
        yield
    finally:
        if changed:
            for module, training in modes:
                module.training = training


class FrozenReference:
    """The original model, frozen, for :func:`~lightning_jit.objective.logit_norm_penalty`.

    It keeps a copy of ``module``'s parameters and buffers as they are now and evaluates ``module`` with them
    (``torch.func.functional_call``) in eval mode, without autograd, however ``module`` changes later. It holds one
    extra copy of the weights; the module object itself is shared, not copied.

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> frozen = FrozenReference(net)
        >>> x = torch.ones(1, 2)
        >>> before = net(x).detach()
        >>> with torch.no_grad():
        ...     _ = net.weight.add_(1.0)
        >>> torch.equal(frozen(x), before)
        True
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.state = {
            name: tensor.detach().clone() for name, tensor in [*module.named_parameters(), *module.named_buffers()]
        }

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Any:
        return self.differentiable(x)

    def differentiable(self, x: Tensor) -> Any:
        """The same forward with autograd left as it is, so that gradients can flow to ``x`` (the weights are
        detached copies: they never receive one). Used to synthesise class probes from the original model."""
        with normalization_mode(self.module, "eval"):
            return torch.func.functional_call(self.module, self.state, (x,))


def frozen_original(module: nn.Module, config: JiTConfig) -> tuple[FrozenReference | None, ProbeDistillation | None]:
    """What a run needs of the original model under ``config``, taken from ``module`` as it is now: the frozen copy
    (for the logit-norm penalty and the probes) and the probe distillation; each ``None`` when not needed."""
    if config.logit_norm_penalty <= 0 and config.probe_distillation <= 0:
        return None, None
    reference = FrozenReference(module)
    if config.probe_distillation <= 0:
        return reference, None
    probes = ProbeDistillation(
        reference.differentiable,
        per_class=config.probes_per_class,
        seed=config.seed or 0,
        output_selector=config.output_selector,
    )
    return reference, probes


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def gradients_finite(params: list[nn.Parameter]) -> bool:
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return True
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    flags = []
    try:
        for (device, _), group in groups.items():
            # One fused pass per device and dtype, as GradScaler checks gradients (multiplying by 1 changes nothing).
            found = torch.zeros(1, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, torch.ones(1, device=device))
            flags.append(found)
    except (RuntimeError, NotImplementedError, AttributeError):  # a dtype or device the fused check does not take
        return bool(torch.stack([g.float().isfinite().all() for g in grads]).all())
    return not bool(torch.cat([f.to(grads[0].device) for f in flags]).any())


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
    each measured just before that batch's update. JiT uses it as a stopping rule computed from the forget set alone:
    stop once the forget set is no longer classified correctly. Once a full pass over the forget set has ended
    (:meth:`end_pass`), the window spans the whole last pass, so that the rule judges every forget sample as of its
    latest visit: a shorter window stopped while the samples visited earlier in the pass were still remembered (on
    the digits CNN, digit 3: 64 samples left 7.5% of the forget set and 13.8% of the digit's test images correct).

    Example:
        >>> w = ForgetAccuracyWindow(min_samples=8)
        >>> w.update(3, 4); w.ready()
        False
        >>> w.update(0, 4); w.accuracy()
        37.5
        >>> w.update(0, 4); w.accuracy()
        0.0
        >>> w.end_pass(); w.update(4, 4); w.totals()  # the window now spans the last 12 samples (a pass)
        (4, 12)
    """

    def __init__(self, min_samples: int = 64) -> None:
        self.min_samples = max(1, int(min_samples))
        self._items: list[tuple[int, int]] = []
        self._first_pass = 0
        self.saw_full_pass = False

    def end_pass(self) -> None:
        """Call at the end of each pass over the forget set; after the first, the window spans a whole pass."""
        if not self.saw_full_pass:
            self.min_samples = max(self.min_samples, self._first_pass)
        self.saw_full_pass = True

    def update(self, correct: int, count: int) -> None:
        if not self.saw_full_pass:
            self._first_pass += int(count)
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
    scaler: torch.amp.GradScaler | None = None,
    forward_context: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    shard: tuple[int, int] | None = None,
    grad_average_size: int = 1,
    agree: Callable[[bool], bool] | None = None,
    reference: Callable[[Tensor], Any] | None = None,
    probes: ProbeDistillation | None = None,
    gather: Callable[[Tensor], Tensor] | None = None,
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
        scaler: The precision plugin's ``GradScaler`` under ``"16-mixed"`` (``trainer.precision_plugin.scaler``), or
            ``None``. With a scaler, ``backward`` must scale the loss (the strategy's backward does) and the step
            always goes through the scaler, which skips a step with non-finite gradients and lowers its scale;
            ``step_optimizer`` must then run ``scaler.step`` and ``scaler.update`` (a ``LightningOptimizer``'s step
            under manual optimization does), or be ``None`` to let this function call them itself.
        forward_context: A context manager factory for the forward passes, e.g. the precision plugin's
            ``forward_context`` (the wrapper's ``training_step`` already runs under it; a callback needs it).
        shard: ``(rank, world_size)`` when every process receives the same *global* batch: this process then uses
            only its contiguous share of the batch, so the result does not depend on the number of processes.
        grad_average_size: The number of processes whose gradients the strategy averages (DDP's world size). The
            loss is scaled so that the averaged gradient equals that of one process running the global batch.
        agree: Combines this process's "the step is finite" decision with the others' (e.g.
            ``strategy.reduce_boolean_decision(..., all=True)``) so that all ranks skip together.
        reference: The original model's forward (a :class:`FrozenReference`), required when
            ``config.logit_norm_penalty > 0``.
        probes: The :class:`~lightning_jit.probes.ProbeDistillation` of this run, required when
            ``config.probe_distillation > 0``. It sees every (global) batch's classes before the step.
        gather: An all-gather across processes (``LightningModule.all_gather``) for ``probes`` when every process
            holds a different batch (``grad_average_size > 1``), so that all pool the same classes.
    """
    if config.logit_norm_penalty > 0 and reference is None:
        raise ValueError("`config.logit_norm_penalty > 0` needs `reference`, the frozen original model.")
    if config.probe_distillation > 0 and probes is None:
        raise ValueError("`config.probe_distillation > 0` needs `probes`, a ProbeDistillation of the original model.")
    x = batch_to_input(batch, config)
    labels = batch_labels(batch, config)
    if labels is not None and labels.shape[0] != x.shape[0]:
        raise JiTInputError(
            f"The forget batch has {x.shape[0]} inputs but {labels.shape[0]} labels at"
            f" `label_key={config.label_key!r}`."
            " Set `label_key` to where the labels are, so that the stopping rule can measure forget accuracy."
        )
    keys = batch_keys(batch) if config.seed is not None else None
    if config.probe_distillation > 0:
        assert probes is not None
        # Before sharding: with `shard` every process holds the same global batch, so all see the same classes.
        probes.observe(x, labels, gather=gather if shard is None and grad_average_size > 1 else None)
    global_size = int(x.shape[0]) * (1 if shard is not None else max(1, int(grad_average_size)))
    if shard is not None:
        x, labels, keys = _take_shard(x, labels, keys, *shard)
    # Under DDP each rank sums its share; the loss is rescaled below so that DDP's average is the global batch's.
    reduction = "sum" if (shard is not None or grad_average_size > 1) else config.reduction
    optimizer.zero_grad(set_to_none=True)
    target = norm_module if norm_module is not None else model
    context = forward_context() if forward_context is not None else contextlib.nullcontext()
    probe_loss = None
    with normalization_mode(target, config.norm_policy), context:
        if config.probe_distillation > 0:
            assert probes is not None
            probe_loss = probes.loss(model)
        if x.shape[0] == 0:
            # This rank's share of a small global batch is empty. It must still take part in the gradient
            # all-reduce, so it back-propagates a zero that reaches every parameter the clean pass reaches.
            full = batch_to_input(batch, config)[:1]
            clean = select_output(model(full), config.output_selector)
            loss = clean.float().sum() * 0.0
            clean = clean[:0]
        else:
            clean = select_output(model(x), config.output_selector)
            loss = jit_objective(
                model,
                x,
                config.sigma,
                config.n_perturbations,
                reduction=reduction,
                clamp=config.clamp,
                output_selector=config.output_selector,
                generator=generator,
                keys=keys,
                seed=config.seed or 0,
                epoch=epoch,
                perturbation_chunk=config.perturbation_chunk,
                clean_logits=clean,
                center_logits=config.center_logits,
                normalize_logits=config.normalize_logits,
            )
            if config.logit_norm_penalty > 0:
                assert reference is not None
                loss = loss + config.logit_norm_penalty * logit_norm_penalty(
                    model,
                    reference,
                    x,
                    config.logit_norm_sigma,
                    clean_logits=clean,
                    reduction=reduction,
                    output_selector=config.output_selector,
                    generator=generator,
                    keys=keys,
                    seed=config.seed or 0,
                    epoch=epoch,
                )
    if shard is not None or grad_average_size > 1:
        # Rule: DDP averages the W ranks' gradients, so rank r's loss is W * (its sum of ratios) / B_global
        # ("mean") or W * (its sum of ratios) ("sum"); their average is the one-process loss of the global batch.
        world = max(1, int(shard[1] if shard is not None else grad_average_size))
        loss = loss * (world / global_size if config.reduction == "mean" else world)
    if probe_loss is not None:
        # The same on every process (same probes, same weights), so DDP's average leaves it as it is.
        loss = loss + config.probe_distillation * probe_loss
    correct = None
    if labels is not None:
        correct = int((clean.detach().argmax(1) == labels.to(clean.device)).sum())
    if not loss.requires_grad:
        raise JiTInputError("The JiT loss has no gradient: the model has no trainable parameter on its output path.")
    backward(loss)
    loss_finite = bool(torch.isfinite(loss))
    if scaler is not None and scaler.is_enabled():
        applied = _scaled_step(optimizer, params, scaler, step_optimizer, agree(loss_finite) if agree else loss_finite)
    else:
        applied = loss_finite and gradients_finite(params)
        if agree is not None:
            applied = bool(agree(applied))
        if applied:
            (step_optimizer or optimizer.step)()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=loss.detach(), applied=applied, correct=correct, count=int(x.shape[0]))


def _take_shard(
    x: Tensor, labels: Tensor | None, keys: list[Any] | None, rank: int, world_size: int
) -> tuple[Tensor, Tensor | None, list[Any] | None]:
    """Rank ``rank``'s contiguous share of a global batch: ``ceil(B / world_size)`` samples (fewer for the last)."""
    per_rank = -(-int(x.shape[0]) // max(1, int(world_size)))
    start, stop = rank * per_rank, min(int(x.shape[0]), (rank + 1) * per_rank)
    start = min(start, stop)
    return (
        x[start:stop],
        labels[start:stop] if labels is not None and labels.shape[0] == x.shape[0] else labels,
        keys[start:stop] if keys is not None else None,
    )


def _scaled_step(
    optimizer: Optimizer,
    params: list[nn.Parameter],
    scaler: torch.amp.GradScaler,
    step_optimizer: Callable[[], Any] | None,
    loss_finite: bool,
) -> bool:
    """Step through a ``GradScaler``: it skips non-finite gradients itself and still updates its scale.

    Returns whether the step was applied: the scaler lowers its scale exactly when it skips a step.
    """
    if not loss_finite and gradients_finite(params):
        # A non-finite loss with finite gradients must not be applied either: make the scaler see it, so that it
        # skips the step and lowers its scale as for any overflow.
        for p in params:
            if p.grad is not None:
                p.grad.view(-1)[:1] = float("nan")
                break
    before = float(scaler.get_scale())
    if step_optimizer is not None:
        step_optimizer()
    else:
        scaler.step(optimizer)
        scaler.update()
    return float(scaler.get_scale()) >= before
