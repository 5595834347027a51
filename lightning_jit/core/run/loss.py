"""The loss of one JiT step: the objective (or a sample request's matching loss), the penalty and redistribution
terms, the DDP scaling, and the distillation terms of the held samples.

The lines that use the input's scale and dimension (sigma, ``E||xi||``) are :func:`noise_norm` and the calls that
pass :attr:`~lightning_jit.core.run.survey.Calibration.sigma` / ``penalty_sigma`` in :meth:`LossAssembly.loss`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_jit.core.batch import BatchFormat, ModelInput, batch_size, index
from lightning_jit.core.cost import CostCounter
from lightning_jit.core.errors import JiTInputError
from lightning_jit.core.objective import jit_objective
from lightning_jit.core.penalties import logit_norm_penalty, redistribution_loss
from lightning_jit.core.run.collectives import Collectives, ForwardContext, take_shard, within
from lightning_jit.core.run.held import HeldSamples
from lightning_jit.core.run.sample_request import SampleRequest
from lightning_jit.core.run.survey import Calibration
from lightning_jit.core.settings import JiTSettings
from lightning_jit.core.site import InputSite, PerturbationSite
from lightning_jit.core.weights import normalization_mode


def noise_norm(sigma: float, x: ModelInput, site: PerturbationSite | None = None) -> float:
    """``E||xi||`` of the noise on one input of ``x`` (a batch): ``sigma * sqrt(d)``, ``d`` the elements per sample
    in the site's space (the input's by default).

    Example:
        >>> noise_norm(0.5, torch.zeros(3, 1, 4, 4))
        2.0
    """
    site = site if site is not None else InputSite()
    return sigma * math.sqrt(site.dimension(x))


@dataclass
class StepLoss:
    """One step's loss, this process's clean logits and share of the batch, and its labels (``None`` without)."""

    loss: Tensor
    clean: Tensor
    x: ModelInput
    labels: Tensor | None


class LossAssembly:
    """Assembles the loss of a step. It owns the noise generator (``settings.seed`` without per-sample keys).

    Args:
        settings: The run's settings.
        batch_format: How to read batches and outputs.
        cost: The run's counter (each pass is booked under its kind).
        collectives: How the processes split the batch.
        calibration: The calibrated values (sigma, the penalty's sigma, the task, the forgotten classes).
        held: The frozen original and the held samples.
        request: A sample request's update (its matching loss replaces the objective), or ``None``.
        site: Where the noise goes (:mod:`lightning_jit.core.site`; ``None``: the input).

    Example:
        >>> settings = JiTSettings.plain(sigma=0.5, lr=0.1, n_perturbations=2)
        >>> net = torch.nn.Linear(4, 3)
        >>> calib = Calibration(settings, list(net.parameters()))
        >>> assembly = LossAssembly(settings, BatchFormat(), CostCounter(), calib, HeldSamples(settings, BatchFormat(),
        ...                         CostCounter()))
        >>> assembly.seed(torch.device("cpu"))  # no seed: the global generator
        >>> step = assembly.loss((torch.randn(5, 4), torch.zeros(5, dtype=torch.long)), net, net, epoch=0)
        >>> step.loss.requires_grad, step.clean.shape, step.labels.tolist()
        (True, torch.Size([5, 3]), [0, 0, 0, 0, 0])
    """

    def __init__(
        self,
        settings: JiTSettings,
        batch_format: BatchFormat,
        cost: CostCounter,
        calibration: Calibration,
        held: HeldSamples,
        request: SampleRequest | None = None,
        collectives: Collectives | None = None,
        site: PerturbationSite | None = None,
    ) -> None:
        self.settings = settings
        self.site = site if site is not None else InputSite()
        self.batch_format = batch_format
        self.cost = cost
        self.calibration = calibration
        self.held = held
        self.request = request
        self.collectives = collectives if collectives is not None else Collectives()
        self.generator: torch.Generator | None = None

    def seed(self, device: torch.device) -> None:
        """Seed the noise generator with ``settings.seed`` (on the model's device when it is a GPU)."""
        if self.settings.seed is not None:
            self.generator = torch.Generator(device=device if device.type == "cuda" else "cpu")
            self.generator.manual_seed(self.settings.seed)

    def loss(
        self,
        batch: Any,
        model: torch.nn.Module,
        forward: Callable[[Any], Any],
        *,
        epoch: int,
        forward_context: ForwardContext = None,
    ) -> StepLoss:
        """This process's loss on ``batch``: under DDP (``world_size > 1``) scaled so that DDP's average of the
        processes' gradients is the one-process gradient of the global batch."""
        settings, fmt, coll = self.settings, self.batch_format, self.collectives
        x = fmt.forget_input(batch, structured=True)  # the site refuses what it cannot perturb
        labels = fmt.labels(batch)
        if labels is not None and labels.shape[0] != batch_size(x):
            raise JiTInputError(
                f"The forget batch has {batch_size(x)} inputs but {labels.shape[0]} labels at"
                f" `label_key={fmt.label_key!r}`. Set `label_key` to where the labels are, so that the stopping rule"
                " can measure forget accuracy."
            )
        keys = fmt.ids(batch) if settings.seed is not None else None
        sharded = coll.split == "shard"
        distributed = coll.world_size > 1
        size = batch_size(x)  # the global batch under "shard": every process takes the same probes
        global_size = size * (1 if sharded or not distributed else coll.world_size)
        if sharded:
            x, labels, keys = take_shard(x, labels, keys, coll.rank, coll.world_size)
        # Under DDP each rank sums its share; the loss is rescaled below so that DDP's average is the global batch's.
        reduction = "sum" if distributed else settings.reduction
        seed = settings.seed or 0
        calib, held, request = self.calibration, self.held, self.request
        sigma = calib.sigma
        with normalization_mode(model, settings.norm_policy), within(forward_context):
            probe_loss, retain_loss = held.losses(forward, size)
            if batch_size(x) == 0:
                # This rank's share of a small global batch is empty. It must still take part in the gradient
                # all-reduce, so it back-propagates a zero that reaches every parameter the clean pass reaches.
                full = index(fmt.forget_input(batch, structured=True), slice(None, 1))
                with self.cost.kind("clean"):
                    clean = fmt.logits(forward(full))
                loss = clean.float().sum() * 0.0
                clean = clean[:0]
            elif request is not None and request.matching is not None:
                with self.cost.kind("clean"):
                    clean = fmt.logits(forward(x))
                assert held.reference is not None
                with self.cost.kind("penalty"), torch.no_grad():
                    reference = fmt.logits(held.reference(x), batch_size(x))
                loss = request.loss(clean, reference, labels)  # a sum over the samples, as `reduction="sum"`
                if reduction == "mean":
                    loss = loss / batch_size(x)
            else:
                with self.cost.kind("clean"):
                    clean = fmt.logits(forward(x))
                with self.cost.kind("perturbed"):
                    loss = jit_objective(
                        forward,
                        x,
                        sigma,
                        settings.n_perturbations,
                        reduction=reduction,
                        clamp=settings.clamp,
                        output_selector=fmt.output_selector,
                        generator=self.generator,
                        keys=keys,
                        seed=seed,
                        epoch=epoch,
                        perturbation_chunk=settings.perturbation_chunk,
                        clean_logits=clean,
                        normalize_logits=settings.normalize_logits,
                        perturbation=settings.perturbation,
                        site=self.site,
                    )
                if settings.unitless_ratio:  # E||xi||, in the site's space: the ratio becomes scale-free
                    loss = loss * noise_norm(sigma, x, self.site)
                reference_logits, forget_classes = None, calib.calibrated.get("classes")
                if settings.redistribution > 0 and calib.task == "class" and forget_classes:
                    assert held.reference is not None
                    with self.cost.kind("penalty"), torch.no_grad():
                        reference_logits = fmt.logits(held.reference(x), batch_size(x))
                    loss = loss + settings.redistribution * redistribution_loss(
                        clean, reference_logits, forget_classes, reduction=reduction
                    )
                if settings.logit_norm_penalty > 0:
                    assert held.reference is not None
                    with self.cost.kind("penalty"):
                        penalty = logit_norm_penalty(
                            forward,
                            held.reference,
                            x,
                            calib.penalty_sigma,
                            clean_logits=clean,
                            reference_logits=reference_logits,
                            reduction=reduction,
                            output_selector=fmt.output_selector,
                            generator=self.generator,
                            keys=keys,
                            seed=seed,
                            epoch=epoch,
                            perturbation=settings.perturbation,
                            site=self.site,
                        )
                    loss = loss + settings.logit_norm_penalty * penalty
        if distributed:
            # DDP averages the W ranks' gradients, so rank r's loss is W * (its sum) / B_global ("mean") or
            # W * (its sum) ("sum"); their average is then the one-process loss of the global batch.
            world = coll.world_size
            loss = loss * (world / global_size if settings.reduction == "mean" else world)
        if probe_loss is not None:
            # The same on every process (same probes, same weights), so DDP's average leaves it as it is.
            loss = loss + settings.probe_distillation * probe_loss
        if retain_loss is not None:
            loss = loss + settings.retain_distillation * retain_loss
        return StepLoss(loss, clean, x, labels)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state() if self.generator is not None else None}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        if state["generator"] is not None:
            self.generator = torch.Generator(device=device if device.type == "cuda" else "cpu")
            self.generator.set_state(state["generator"])


__all__ = ["LossAssembly", "StepLoss", "noise_norm"]
