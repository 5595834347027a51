"""The update JiT takes when ``lr`` is left to calibration: one normalised step over the parameters it may touch.

.. code-block:: text

    theta <- theta - lr * ||theta|| * g / ||g||        (one global norm over every parameter of the optimizer)

The step's size is relative to the weights and does not depend on the gradient's scale, so the same ``lr`` means the
same relative change on any model, any input scale and any loss scale (a GradScaler's scaling included). The run
engine sets ``lr`` at the first step (:func:`lightning_jit.core.calibration.calibrate_step`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.optim import SGD, Optimizer


class NormalizedStep(Optimizer):
    """``theta -= lr * ||theta|| * g / ||g||`` with one norm over all the optimizer's parameters that have a gradient.

    Parameters without a gradient (``grad is None``) are neither moved nor counted in the norms.

    Args:
        params: The parameters (or parameter groups; each group is normalised on its own).
        lr: The relative step: the update's norm is ``lr`` times the weights' norm.

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
        >>> w.grad = torch.tensor([0.0, 10.0])
        >>> NormalizedStep([w], lr=0.1).step()
        >>> w.data.tolist()  # moved by 0.1 * ||w|| = 0.5 along -g / ||g||
        [3.0, 3.5]
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float = 1e-3) -> None:
        if not lr > 0:
            raise ValueError(f"`lr` must be > 0, got {lr!r}.")
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().float().norm() for p in params]))
            weight_norm = torch.linalg.vector_norm(torch.stack([p.detach().float().norm() for p in params]))
            if not bool(grad_norm > 0):
                continue
            scale = group["lr"] * weight_norm / grad_norm
            for p in params:
                p.add_(p.grad.to(p.dtype) * scale.to(p.dtype), alpha=-1.0)
        return loss


#: The normalised step's size until the run calibrates it at its first step.
INITIAL_STEP = 1e-3


def make_optimizer(params: Iterable[nn.Parameter], lr: float | None) -> Optimizer:
    """JiT's optimizer over ``params``: the normalised step when ``lr`` is ``None`` (the run calibrates it), else
    plain SGD at ``lr`` (the reference's update).

    Example:
        >>> type(make_optimizer(torch.nn.Linear(2, 2).parameters(), None)).__name__
        'NormalizedStep'
    """
    if lr is not None:
        return SGD(params, lr=lr)
    return NormalizedStep(params, lr=INITIAL_STEP)
