"""Applying a step: assemble the loss, back-propagate, keep the update scope's gradients, calibrate the step size at
the first applied step, and step through the optimizer, or through a ``GradScaler`` that skips non-finite gradients
itself. A step whose loss or gradients are not finite is never applied."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_jit.core.accuracy import top1_hits
from lightning_jit.core.batch import BatchFormat, batch_size
from lightning_jit.core.cost import CostCounter
from lightning_jit.core.errors import JiTInputError
from lightning_jit.core.run.collectives import Collectives, ForwardContext, same, within
from lightning_jit.core.run.loss import LossAssembly
from lightning_jit.core.run.sample_request import SampleRequest
from lightning_jit.core.run.survey import Calibration
from lightning_jit.core.settings import JiTSettings
from lightning_jit.core.weights import gradients_finite, normalization_mode


class Update:
    """One JiT update (no state of its own: the loss, the calibration and a sample request's projection are the
    stages it is given).

    Example:
        >>> from lightning_jit.core.run.held import HeldSamples
        >>> settings = JiTSettings.plain(sigma=0.5, lr=0.1, n_perturbations=2)
        >>> net, fmt, cost = torch.nn.Linear(4, 3), BatchFormat(), CostCounter()
        >>> params = list(net.parameters())
        >>> calib = Calibration(settings, params)
        >>> update = Update(net, params, settings, fmt, cost, LossAssembly(settings, fmt, cost, calib,
        ...                 HeldSamples(settings, fmt, cost)), calib)
        >>> before = net.weight.detach().clone()
        >>> batch = (torch.randn(5, 4), torch.zeros(5, dtype=torch.long))
        >>> optimizer = torch.optim.SGD(params, lr=0.1)
        >>> loss, applied, correct, count = update(batch, forward=net, optimizer=optimizer,
        ...                                        backward=lambda loss: loss.backward(), epoch=0)
        >>> applied, count, not torch.equal(net.weight, before)
        (True, 5, True)
    """

    def __init__(
        self,
        model: nn.Module,
        params: list[nn.Parameter],
        settings: JiTSettings,
        batch_format: BatchFormat,
        cost: CostCounter,
        assembly: LossAssembly,
        calibration: Calibration,
        request: SampleRequest | None = None,
        collectives: Collectives | None = None,
    ) -> None:
        self.model = model
        self.params = params
        self.settings = settings
        self.batch_format = batch_format
        self.cost = cost
        self.assembly = assembly
        self.calibration = calibration
        self.request = request
        self.collectives = collectives if collectives is not None else Collectives()

    def __call__(
        self,
        batch: Any,
        *,
        forward: Callable[[Any], Any],
        optimizer: Optimizer,
        backward: Callable[[Tensor], None],
        epoch: int,
        step_optimizer: Callable[[], Any] | None = None,
        scaler: torch.amp.GradScaler | None = None,
        forward_context: ForwardContext = None,
    ) -> tuple[Tensor, bool, int | None, int]:
        """Returns the loss, whether the step was applied, how many of this process's forget samples the model
        recognised before the update (``None`` without labels), and how many it holds.

        Gradients are zeroed at every step (the reference zeroes them once, so they pile up across batches).
        """
        optimizer.zero_grad(set_to_none=True)
        step = self.assembly.loss(batch, self.model, forward, epoch=epoch, forward_context=forward_context)
        loss, clean, x, labels = step.loss, step.clean, step.x, step.labels
        correct = None
        if labels is not None:
            correct = int(top1_hits(clean.detach(), labels.to(clean.device)).sum())
        if not loss.requires_grad:
            raise JiTInputError(
                "The JiT loss has no gradient: the model has no trainable parameter on its output path."
            )
        backward(loss)
        self.calibration.drop_gradients_outside_scope()
        if self.request is not None:
            self.request.project()
        loss_finite = bool(torch.isfinite(loss))
        coll = self.collectives
        agree = coll.all_true if coll.world_size > 1 else same

        def calibrate() -> None:
            def moved_logits() -> Tensor:
                mode = normalization_mode(self.model, self.settings.norm_policy)  # as the clean pass it compares to
                with torch.no_grad(), mode, within(forward_context), self.cost.kind("calibration"):
                    return self.batch_format.logits(forward(x), batch_size(x))

            matching = self.request is not None and self.request.matching is not None
            device = self.params[0].device if self.params else torch.device("cpu")
            self.calibration.calibrate_step(optimizer, moved_logits, clean, batch_size(x), matching, device)

        if scaler is not None and scaler.is_enabled():
            if not self.calibration.step_calibrated and loss_finite and gradients_finite(self.params):
                calibrate()  # the normalised step is scale-free
            applied = scaled_step(optimizer, self.params, scaler, step_optimizer, agree(loss_finite))
        else:
            applied = bool(agree(loss_finite and gradients_finite(self.params)))
            if applied:
                if not self.calibration.step_calibrated:
                    calibrate()
                (step_optimizer or optimizer.step)()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach(), applied, correct, batch_size(x)


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


__all__ = ["Update", "scaled_step"]
