"""What a run calibrates itself from the model and the forget set, so that a new model needs no knobs.

Before the first step a run surveys the forget set once (:func:`survey_forget_set`: it reads every batch, and sends the
first batch, and any batch without labels, through the model without autograd): its size, the classes it holds, the
scale of its inputs, and the weight-carrying modules in the order the model runs them. From that it derives everything
a setting left to ``None``:

* the task (:data:`CLASS_TASK_SHARE`): forgetting whole classes, or a random sample of the training data;
* ``sigma`` and the penalty's noise, in units of the forget inputs' std (:data:`SIGMA_SCALE`,
  :data:`PENALTY_SIGMA_SCALE`), measured where the noise goes (the input, or the output of the module ``perturb_at``
  names: :mod:`lightning_jit.core.site`);
* the parameters the update touches (the last ``update_scope`` weight modules, in execution order);
* the step size, at the first step (:func:`calibrate_step`): the normalised step
  (:class:`~lightning_jit.core.optimizer.NormalizedStep`) is scaled so that it moves the batch's predictions by a fixed
  mean KL divergence (:data:`STEP_KL`).

The constants were measured across datasets and models (``docs/results/generalise.md``); none is per dataset.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_jit.core.batch import BatchFormat, ModelInput, batch_size, detached, index, move, stack
from lightning_jit.core.errors import JiTInputError, forward_failure
from lightning_jit.core.site import InputSite, PerturbationSite

#: A run is a class task when the forget set's labels cover at most this share of the model's classes.
CLASS_TASK_SHARE = 0.5
#: ``sigma`` when not given: this many stds of the forget inputs (over all their elements).
SIGMA_SCALE = 1.0
#: The logit-norm penalty's noise when ``logit_norm_sigma`` is not given, in stds of the forget inputs.
PENALTY_SIGMA_SCALE = 1.0
#: The calibrated step moves the batch's predictions by this mean KL(before || after) (nats) at the first step.
STEP_KL = 4e-3
#: The step-size search: log-space bisection of the normalised step in ``[low, high]``, this many trial steps.
STEP_SEARCH = (1e-5, 1.0, 8)
#: The normalised step of a random-forgetting task (one light pass, no calibration).
RANDOM_STEP = 1e-3
#: The target of a class task when ``target_forget_accuracy`` is not given (percent still recognised).
CLASS_TARGET = 2.5
#: The modules whose parameters the update may touch, counted from the end of the forward pass.
WEIGHT_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

Task = Literal["class", "random"]


@dataclass
class ForgetSurvey:
    """What the survey of the forget set found (pooled over processes).

    Attributes:
        n: Forget samples.
        num_classes: The model's output width.
        classes: The classes the forget set holds (its labels, or the original model's predictions without labels).
        std: Std of the forget inputs' elements, in the perturbation site's space (:mod:`lightning_jit.core.site`;
            1.0 if they are constant).
        weight_modules: The model's :data:`WEIGHT_MODULES`, in the order the forward pass ran them.
        starts: Up to ``reservoir`` forget inputs drawn uniformly (where counterfactual probes start).
        structured: Whether the forget inputs are dicts or tuples of tensors (token ids with their attention mask).
    """

    n: int
    num_classes: int
    classes: list[int]
    std: float
    weight_modules: list[nn.Module] = field(default_factory=list, repr=False)
    starts: Tensor | None = field(default=None, repr=False)
    #: Whether the model's input is a dict or tuple of tensors, not one tensor.
    structured: bool = False

    @property
    def task(self) -> Task:
        """``"class"`` when the forget set holds at most :data:`CLASS_TASK_SHARE` of the classes, else ``"random"``.

        Example:
            >>> ForgetSurvey(n=90, num_classes=10, classes=[3], std=1.0).task
            'class'
        """
        return "class" if len(self.classes) <= CLASS_TASK_SHARE * self.num_classes else "random"

    def kept_classes(self) -> list[int]:
        """The classes the forget set does not hold."""
        held = set(self.classes)
        return [c for c in range(self.num_classes) if c not in held]


@torch.no_grad()
def survey_forget_set(
    reference: Callable[[Tensor], Any],
    model: nn.Module,
    forget: Iterable[Any],
    batch_format: BatchFormat,
    *,
    device: torch.device,
    reservoir: int = 0,
    generator: torch.Generator | None = None,
    shard: Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor | None]] | None = None,
    total: Callable[[Tensor], Tensor] | None = None,
    site: PerturbationSite | None = None,
) -> ForgetSurvey:
    """One pass over ``forget``: its inputs' statistics and labels, and the original model ``reference``'s outputs on
    the first batch (the model's width and the order of its weight modules) and on every batch without labels (their
    classes are the original's predictions). Labelled batches after the first are not sent through the model.

    Args:
        reference: The original model's forward (e.g. a :class:`~lightning_jit.core.reference.FrozenReference`).
        model: The model whose weight modules are recorded in execution order: hooks on them see the reference's
            pass when it runs ``model``'s modules, and one forward of ``model`` on one forget sample when it runs
            another module object (a separate original).
        forget: The forget batches.
        batch_format: How to read them.
        device: Where the model runs.
        reservoir: How many forget inputs to keep, drawn uniformly (from whole batches, before ``shard``).
        generator: For the reservoir.
        shard: Takes this process's share of a batch (inputs, labels) for the forward pass.
        total: Sums a tensor over the processes.
        site: Where the noise goes (:mod:`lightning_jit.core.site`; ``None``: the input): ``std`` is measured in
            its space (a module site: on its output in the survey's passes).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> batches = [(torch.randn(5, 4), torch.zeros(5, dtype=torch.long))]
        >>> found = survey_forget_set(net, net, batches, BatchFormat(), device=torch.device("cpu"), reservoir=2)
        >>> found.n, found.num_classes, found.classes, found.task, tuple(found.starts.shape)
        (5, 3, [0], 'class', (2, 4))
    """
    order: list[nn.Module] = []

    def record(module: nn.Module, args: Any, output: Any) -> None:
        if module not in order:
            order.append(module)

    site = site if site is not None else InputSite(model)
    handles = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, WEIGHT_MODULES)]
    stats = torch.zeros(4, dtype=torch.float64, device=device)  # samples, elements, sum, sum of squares
    seen: Tensor | None = None
    width = 0
    first: ModelInput = None
    kept: list[ModelInput] = []
    drawn = 0
    structured = False
    try:
        for batch in forget:
            x = move(batch_format.forget_input(batch, structured=True), device)
            structured = structured or not isinstance(x, Tensor)
            site.admit(x)  # the input site refuses what it cannot perturb (a dict input, token ids), naming the fix
            labels = batch_format.labels(batch)
            first = index(x, slice(None, 1)) if first is None else first
            if reservoir:
                kept, drawn = _reservoir(kept, drawn, detached(x), reservoir, generator)
            if shard is not None:
                x, labels = shard(x, labels)
            if batch_size(x) == 0:
                continue
            with site.observe() as take:
                if seen is None or labels is None or not site.perturbs_input:
                    # The model's width and the order of its weight modules come from the first forward. After it, a
                    # labelled batch needs no forward at the input site (its classes are its labels); an unlabelled
                    # one needs the original's predictions, and a module site the activations it perturbs.
                    try:
                        logits = batch_format.logits(reference(x), batch_size(x))
                    except (RuntimeError, TypeError) as err:
                        raise forward_failure(model, x, err) from err
                    width = int(logits.shape[1])
                space = take(x)
            found = labels.to(device).long() if labels is not None else logits.argmax(1)
            outside = found[(found < 0) | (found >= width)]
            if outside.numel():
                raise JiTInputError(
                    f"The forget set has labels {sorted(set(outside.tolist()))[:5]} outside the model's"
                    f" {width} classes (0..{width - 1}). Check `label_key` and the labels: a"
                    " sample the model cannot predict can never be verified as forgotten."
                )
            if seen is None:
                seen = torch.zeros(width, dtype=torch.float64, device=device)
            seen.index_add_(0, found, torch.ones_like(found, dtype=torch.float64))
            xf = space.double()
            stats += torch.stack([xf.new_tensor(batch_size(x)), xf.new_tensor(xf.numel()), xf.sum(), xf.pow(2).sum()])
        if seen is None and first is not None:  # this process's share was empty: the model's width, from one input
            seen = torch.zeros(batch_format.logits(reference(first), 1).shape[1], dtype=torch.float64, device=device)
        if not order and first is not None:
            # The reference ran another module object (a separate `original=`, as the tuner's trials give it), so none
            # of `model`'s weight modules ran: their order from one forward of `model` on one forget sample (every
            # process takes it, so a sharded model's forward stays collective).
            with torch.no_grad():
                batch_format.caller(model)(first)
    finally:
        for handle in handles:
            handle.remove()
    if seen is None:
        raise ValueError("The forget set is empty: there is nothing to unlearn.")
    if total is not None:
        stats, seen = total(stats), total(seen)
    n, elements = int(stats[0]), max(1.0, float(stats[1]))
    mean = float(stats[2]) / elements
    std = math.sqrt(max(float(stats[3]) / elements - mean * mean, 0.0))
    return ForgetSurvey(
        n=n,
        num_classes=int(seen.shape[0]),
        classes=seen.nonzero().flatten().tolist(),
        std=std if std > 0 and math.isfinite(std) else 1.0,
        weight_modules=order,
        starts=stack(kept) if kept else None,
        structured=structured,
    )


def _reservoir(
    kept: list[ModelInput], drawn: int, x: ModelInput, size: int, generator: torch.Generator | None
) -> tuple[list[ModelInput], int]:
    """Reservoir sampling (algorithm R): after ``drawn`` items, keep each new one with probability ``size / i``
    (the rows of a dict or tuple input field by field)."""
    rows = iter(x) if isinstance(x, Tensor) else (index(x, i) for i in range(batch_size(x)))
    for row in rows:
        drawn += 1
        if len(kept) < size:
            kept.append(detached(row, clone=True))
        else:
            j = int(torch.randint(0, drawn, (1,), generator=generator))
            if j < size:
                kept[j] = detached(row, clone=True)
    return kept, drawn


def scoped_parameters(model: nn.Module, modules: list[nn.Module], scope: int | None) -> list[nn.Parameter]:
    """The trainable parameters of the last ``scope`` weight modules in execution order (every trainable parameter
    when ``scope`` is ``None`` or no weight module ran).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> [p.shape for p in scoped_parameters(net, [net[0], net[2]], 1)]
        [torch.Size([2, 4]), torch.Size([2])]
    """
    if scope is None or not modules:
        return [p for p in model.parameters() if p.requires_grad]
    chosen = [p for m in modules[-scope:] for p in m.parameters() if p.requires_grad]
    return chosen or [p for p in model.parameters() if p.requires_grad]


def kl_moved(before: Tensor, after: Tensor) -> Tensor:
    """Sum over samples of ``KL(softmax before || softmax after)``, in float64 (nats)."""
    log_p = torch.log_softmax(before.double(), dim=1)
    log_q = torch.log_softmax(after.double(), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum()


def calibrate_step(
    try_step: Callable[[float], None],
    moved: Callable[[], float],
    undo: Callable[[], None],
    *,
    target: float = STEP_KL,
    search: tuple[float, float, int] = STEP_SEARCH,
) -> float:
    """The step size that moves the predictions by ``target``: a log-space bisection over ``search``.

    Each trial applies the step (``try_step(lr)``), measures how far the predictions moved (``moved()``, e.g. the mean
    KL divergence on the batch) and undoes it (``undo()``).

    Example:
        >>> state = {"w": 0.0}
        >>> lr = calibrate_step(lambda lr: state.update(w=lr), lambda: state["w"] ** 2, lambda: state.update(w=0.0),
        ...                     target=1e-4, search=(1e-6, 1.0, 30))
        >>> round(lr, 4)  # sqrt(1e-4)
        0.01
    """
    low, high, trials = search
    lo, hi = math.log(low), math.log(high)
    for _ in range(trials):
        mid = 0.5 * (lo + hi)
        try_step(math.exp(mid))
        distance = moved()
        undo()
        if distance < target:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))
