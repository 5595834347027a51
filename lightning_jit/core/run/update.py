"""Applying a step: through the optimizer, or through a ``GradScaler`` that skips non-finite gradients itself."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_jit.core.state import gradients_finite


def scaled_step(
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


__all__ = ["scaled_step"]
