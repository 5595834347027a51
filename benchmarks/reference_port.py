"""A faithful port of the authors' public JiT code (``Lipschitz.modify_weight``), for the benchmarks only.

It keeps everything the authors' code does, bugs included (listed below), so that the benchmarks compare the library
with what users of the reference actually run:

* raw logits; the perturbed outputs under ``no_grad``;
* noise drawn on the CPU and copied to the device, one copy at a time, ``N`` separate forward passes;
* ``x + xi`` clamped to the min/max of the whole batch; the denominator is the realised change;
* per-sample ratios summed over the batch and divided by ``N`` (the "sum" reduction);
* plain SGD, one unshuffled pass; ``zero_grad`` called **once** before the loop (gradients pile up);
* the model's mode is never set (it stays in train mode after training).

This is not part of the library: :mod:`lightning_jit.core.objective` is the only implementation of the JiT math there.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def reference_step(model: nn.Module, x: torch.Tensor, sigma: float, n_perturbations: int) -> torch.Tensor:
    """The reference's loss for one batch (without backward/step): a Python loop of N perturbed forward passes."""
    out = model(x)
    lo, hi = x.min(), x.max()
    loss = 0.0
    for _ in range(n_perturbations):
        noise = (torch.randn(x.shape) * sigma).to(x.device)  # drawn on the CPU, copied each time
        x_p = torch.clamp(x + noise, lo, hi)
        with torch.no_grad():
            out_p = model(x_p)
        ratio = torch.linalg.vector_norm(out - out_p, dim=1) / torch.linalg.vector_norm((x - x_p).flatten(1), dim=1)
        loss = loss + ratio.sum()
    return loss / n_perturbations


def reference_unlearn(
    model: nn.Module,
    forget_loader: Iterable[Any],
    sigma: float,
    eta: float,
    n_perturbations: int = 25,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Run the reference's ``modify_weight`` over ``forget_loader`` (batches ``(x, y, ...)`` or tensors)."""
    model.train()  # the reference never sets the mode; its models come out of training in train mode
    optimizer = torch.optim.SGD(model.parameters(), lr=eta)
    optimizer.zero_grad()  # once, before the loop: the reference's bug
    for batch in forget_loader:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        x = x.to(device)
        loss = reference_step(model, x, sigma, n_perturbations)
        loss.backward()
        optimizer.step()
    return model
