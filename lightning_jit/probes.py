"""Class probes synthesised from the model alone: a zero-shot stand-in for retained data.

JiT never sees retained data, so nothing measures what an unlearning run costs the classes it should keep. Class
probes fill that gap without breaking the zero-shot promise: for each kept class, a few inputs are optimised, starting
from noise shaped like the forget inputs, until the *original* model classifies them as that class with confidence
(a light form of model inversion). After unlearning, the mean probability the model still gives each probe's class
(:func:`probe_confidence`) tracks the accuracy on real retained data. On the digits CNN, over 27 unlearning runs
(digits 3, 4 and 8, nine sigma/lr settings each; ``normalize_logits``, stopping at 15%, no logit-norm penalty), its
Spearman correlation with the retained-class test accuracy was 0.81 overall and 0.95-1.00 within each forgotten class;
the probes' plain accuracy saturates and did worse (0.78), and noise inputs did not track it at all (0.23). With the
logit-norm penalty on, it stays near 100% for easy classes (digit 1), so it separates settings less there.
:func:`~lightning_jit.tune.tune_jit` ranks its trials with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_jit.objective import OutputSelector, select_output


@torch.no_grad()
def probe_confidence(model: nn.Module, probes: tuple[Tensor, Tensor], output_selector: OutputSelector = None) -> float:
    """The mean probability (percent) that ``model``, in eval mode, gives each probe of ``probes = (x, y)`` for its
    class ``y``. Unlike the probes' accuracy it does not saturate: it falls as soon as the kept classes are damaged."""
    x, y = probes
    was_training = model.training
    model.eval()
    try:
        logits = select_output(model(x), output_selector).float()
    finally:
        model.train(was_training)
    return float(torch.softmax(logits, dim=1).gather(1, y.to(logits.device)[:, None]).mean() * 100.0)


def synthesize_class_probes(
    model: nn.Module,
    classes: Sequence[int],
    like: Tensor,
    per_class: int = 16,
    steps: int = 60,
    lr: float = 0.1,
    seed: int = 0,
    output_selector: OutputSelector = None,
) -> tuple[Tensor, Tensor]:
    """Synthesise ``per_class`` inputs for each class in ``classes`` that ``model`` classifies as that class.

    Each probe starts as Gaussian noise with the mean and std of ``like`` (e.g. a forget batch) and takes ``steps``
    Adam steps on the cross-entropy of its class, with a small pull back towards that mean. Only the probes move: the
    model's parameters and gradients are left untouched, and the model runs in eval mode.

    Args:
        model: The trained classifier (before unlearning).
        classes: The classes to probe, e.g. every class but the forgotten ones.
        like: Real inputs (e.g. the forget set) that give the probes' shape, dtype, device and scale.
        per_class: Probes per class.
        steps: Optimisation steps.
        lr: Adam step size, in units of the input's std.
        seed: Seed of the starting noise.
        output_selector: How to find the logits in the model's output (as in
            :func:`~lightning_jit.objective.select_output`).

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
    mean, std = like.float().mean(), like.float().std().clamp_min(1e-6)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn((len(classes) * per_class, *like.shape[1:]), generator=generator)
    x = (mean.cpu() + std.cpu() * noise).to(device=like.device, dtype=like.dtype).requires_grad_(True)
    y = torch.tensor(list(classes), device=like.device).repeat_interleave(per_class)
    optimizer = torch.optim.Adam([x], lr=lr * float(std))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for _ in range(steps):
                logits = select_output(model(x), output_selector)
                loss = F.cross_entropy(logits.float(), y) + 1e-3 * ((x - mean) / std).pow(2).mean()
                (grad,) = torch.autograd.grad(loss, [x])
                x.grad = grad
                optimizer.step()
    finally:
        model.train(was_training)
    return x.detach(), y
