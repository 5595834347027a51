"""Class probes synthesised from the model alone: a zero-shot stand-in for retained data.

JiT never sees retained data, so nothing measures what an unlearning run costs the classes it should keep. Class
probes fill that gap without breaking the zero-shot promise: for each kept class, a few inputs are optimised, starting
from noise shaped like the forget inputs, until the *original* model classifies them as that class with confidence
(a light form of model inversion). After unlearning, the mean probability the model still gives each probe's class
(:func:`probe_confidence`) tracks the accuracy on real retained data (measured in ``docs/results/tune.md``);
:func:`~lightning_jit.tune.tune_jit` ranks its trials with it.

With a perturbation site (``JiTSettings.perturb_at``, :mod:`lightning_jit.core.site`) the probes live in the site's
space (a token model's embedding output), not among the inputs: token ids cannot take gradient steps.

The same probes also *protect* the kept classes during unlearning:
:class:`~lightning_jit.core.distillation.DistillationSet` holds the model's predictions on them at the original's
(``JiTSettings.probe_distillation``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_jit.core.batch import OutputSelector, select_output
from lightning_jit.core.errors import MisconfigurationException
from lightning_jit.core.renamed import renamed
from lightning_jit.core.site import PerturbationSite
from lightning_jit.core.weights import normalization_mode


@torch.no_grad()
def probe_confidence(
    model: nn.Module,
    probes: tuple[Tensor, Tensor],
    output_selector: OutputSelector = None,
    site: PerturbationSite | None = None,
) -> float:
    """The mean probability (percent) that ``model``, in eval mode, gives each probe of ``probes = (x, y)`` for its
    class ``y``. Unlike the probes' accuracy it does not saturate: it falls as soon as the kept classes are damaged.
    Probes synthesised in a perturbation site's space (``site``, as :func:`synthesize_class_probes` made them) are
    evaluated from that space."""
    x, y = probes
    with normalization_mode(model, "eval"):
        logits = select_output(run_in_space(site, model, x), output_selector).float()
    return float(torch.softmax(logits, dim=1).gather(1, y.to(logits.device)[:, None]).mean() * 100.0)


def synthesize_class_probes(
    model: nn.Module | Callable[[Tensor], Any],
    classes: Sequence[int],
    like: Tensor,
    per_class: int,
    steps: int = 60,
    lr: float = 0.1,
    seed: int = 0,
    output_selector: OutputSelector = None,
    *,
    scale: tuple[float, float] | None = None,
    site: PerturbationSite | None = None,
) -> tuple[Tensor, Tensor]:
    """Synthesise ``per_class`` inputs for each class in ``classes`` that ``model`` classifies as that class.

    Each probe starts as Gaussian noise with the mean and std of ``like`` (e.g. a forget batch) and takes ``steps``
    Adam steps on the cross-entropy of its class, with a small pull back towards that mean. Only the probes move: the
    model's parameters and gradients are left untouched, and the model runs in eval mode.

    Args:
        model: The trained classifier (before unlearning), or a callable that evaluates it with gradients flowing to
            its input (e.g. :meth:`~lightning_jit.core.reference.FrozenReference.differentiable`), which then sets
            its own mode.
        classes: The classes to probe, e.g. every class but the forgotten ones.
        like: Real inputs (e.g. the forget set) that give the probes' shape, dtype, device and scale.
        per_class: Probes per class.
        steps: Optimisation steps.
        lr: Adam step size, in units of the input's std.
        seed: Seed of the starting noise.
        output_selector: How to find the logits in the model's output (as in
            :func:`~lightning_jit.core.batch.select_output`).
        scale: ``(mean, std)`` to use instead of ``like``'s (e.g. pooled over several processes' batches).
        site: Where the probes live (:mod:`lightning_jit.core.site`): ``None``, the input; a module site (e.g. a
            token model's embedding, ``site_for("embedding", model)``) synthesises them in its module's output space,
            from ``like``'s values there, and :func:`probe_confidence` must then be given the same site.

    Returns:
        ``(x, y)``: ``len(classes) * per_class`` probes and their classes.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        >>> x, y = synthesize_class_probes(net, [0, 2], like=torch.randn(8, 1, 4, 4), per_class=4, steps=30)
        >>> tuple(x.shape), y.tolist()
        ((8, 1, 4, 4), [0, 0, 0, 0, 2, 2, 2, 2])
        >>> probe_confidence(net, (x, y)) > 90
        True
    """
    if not classes:
        raise MisconfigurationException("`classes` is empty: give at least one class to synthesise probes for.")
    if per_class < 1 or steps < 0:
        raise MisconfigurationException(f"`per_class` must be >= 1 and `steps` >= 0, got {per_class} and {steps}.")
    like = like.detach()
    if site is not None:
        with torch.no_grad(), _eval_mode(model):
            like = site.space(model, like).detach()
    if scale is None:
        mean, std = float(like.float().mean()), float(like.float().std())
    else:
        mean, std = float(scale[0]), float(scale[1])
    std = max(std, 1e-6)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn((len(classes) * per_class, *like.shape[1:]), generator=generator)
    x = (mean + std * noise).to(device=like.device, dtype=like.dtype).requires_grad_(True)
    y = torch.tensor(list(classes), device=like.device).repeat_interleave(per_class)
    optimizer = torch.optim.Adam([x], lr=lr * std)
    with _eval_mode(model), torch.enable_grad():
        for _ in range(steps):
            logits = select_output(run_in_space(site, model, x), output_selector)
            loss = F.cross_entropy(logits.float(), y) + 1e-3 * ((x - mean) / std).pow(2).mean()
            (grad,) = torch.autograd.grad(loss, [x])
            x.grad = grad
            optimizer.step()
    return x.detach(), y


def _eval_mode(model: nn.Module | Callable[[Tensor], Any]) -> contextlib.AbstractContextManager[None]:
    """Eval mode for a module, restored afterwards (:func:`~lightning_jit.core.weights.normalization_mode`); nothing
    for a plain callable."""
    return normalization_mode(model, "eval") if isinstance(model, nn.Module) else contextlib.nullcontext()


#: Counterfactual probes: Adam steps on each probe, and the Adam step size in stds of the forget inputs.
PROBE_STEPS = 20
PROBE_LR = 0.1


def counterfactual_probes(
    reference: Callable[[Tensor], Any],
    starts: Tensor,
    classes: Sequence[int],
    per_class: int,
    *,
    std: float,
    steps: int = PROBE_STEPS,
    lr: float = PROBE_LR,
    generator: torch.Generator | None = None,
    output_selector: OutputSelector = None,
) -> tuple[Tensor, Tensor]:
    """Probes of each kept class that start at forget samples, pushed until the original model calls them that class.

    Each probe starts at a forget input drawn from ``starts`` and takes ``steps`` Adam steps (``lr`` stds of the
    inputs) on the cross-entropy of its class under the original model, with a small pull back to its start. They sit
    where the forget set borders each kept class: where forgetting the class would otherwise let a neighbouring class
    swallow the forget samples and their neighbours. Probes synthesised from noise do not protect real data as well
    (``docs/results/generalise.md``).

    Args:
        reference: The original model, differentiable in its input
            (:meth:`~lightning_jit.core.reference.FrozenReference.differentiable`).
        starts: Forget inputs to start from.
        classes: The kept classes.
        per_class: Probes per class.
        std: The forget inputs' std (the unit of ``lr`` and of the pull back).
        steps: Adam steps.
        lr: Adam step, in units of ``std``.
        generator: Draws the starting samples.
        output_selector: How to find the logits in the model's output.

    Returns:
        ``(x, y)``: the probes and their classes.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Linear(4, 3)
        >>> x, y = counterfactual_probes(net, torch.randn(6, 4), [1, 2], 2, std=1.0, steps=60, lr=0.3)
        >>> y.tolist(), bool((net(x).argmax(1) == y).all())
        ([1, 1, 2, 2], True)
    """
    y = torch.tensor(list(classes), device=starts.device, dtype=torch.long).repeat_interleave(per_class)
    index = torch.randint(0, starts.shape[0], (y.shape[0],), generator=generator).to(starts.device)
    start = starts[index].detach()
    x = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr * std)
    with torch.enable_grad():
        for _ in range(steps):
            logits = select_output(reference(x), output_selector).float()
            loss = F.cross_entropy(logits, y) + 1e-3 * ((x - start) / std).pow(2).mean()
            (grad,) = torch.autograd.grad(loss, [x])
            x.grad = grad
            optimizer.step()
    return x.detach(), y


def run_in_space(site: PerturbationSite | None, model: Callable[[Tensor], Any], x: Tensor) -> Any:
    """``model`` on ``x``, or from ``x`` in ``site``'s space (``None``: ``x`` are inputs).

    Example:
        >>> run_in_space(None, torch.nn.Identity(), torch.ones(2)).tolist()
        [1.0, 1.0]
    """
    return model(x) if site is None else site.run(model, x)


def __getattr__(name: str) -> Any:
    # ``ProbeDistillation``, the old name of ``DistillationSet`` (:mod:`lightning_jit.core.renamed`).
    return renamed(name, __name__)
