"""The run's calibration stage: the forget-set survey and what the run decides from it, and the step size.

It owns what the run decided itself (``calibrated``: task, sigma, the penalty's sigma, the step size...), the survey,
the update scope and whether the step size was calibrated. Everything that depends on the input's scale reads
:attr:`Calibration.sigma` here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_jit.core import calibration
from lightning_jit.core import matching as sample_matching
from lightning_jit.core.batch import BatchFormat
from lightning_jit.core.calibration import ForgetSurvey, calibrate_step, kl_moved, scoped_parameters, survey_forget_set
from lightning_jit.core.cost import CostCounter
from lightning_jit.core.optimizer import NormalizedStep
from lightning_jit.core.run.collectives import Collectives, cpu_generator, take_shard
from lightning_jit.core.settings import JiTSettings
from lightning_jit.core.site import PerturbationSite
from lightning_jit.core.weights import normalization_mode


class Calibration:
    """What a run decides at its start and at its first applied step.

    Args:
        settings: The run's settings; those left to ``None`` are decided here.
        params: The model's trainable parameters.
        collectives: How the processes agree.
        site: Where the noise goes: sigma and the dimension are read in its space (``None``: the input).

    Example:
        >>> calib = Calibration(JiTSettings(task="random", target_forget_accuracy=None), [])
        >>> calib.task, calib.target, calib.is_sample_request
        ('random', None, True)
        >>> calib.load_state_dict(calib.state_dict()); calib.state_dict()["step_calibrated"]
        False
    """

    def __init__(
        self,
        settings: JiTSettings,
        params: list[nn.Parameter],
        collectives: Collectives | None = None,
        site: PerturbationSite | None = None,
    ) -> None:
        self.settings = settings
        #: Where the noise goes: sigma and the dimension come from its space.
        self.site = site
        self.params = params
        self.collectives = collectives if collectives is not None else Collectives()
        #: The values the run decided itself (task, sigma, the step size...), for the record.
        self.calibrated: dict[str, Any] = {}
        self.survey: ForgetSurvey | None = None
        #: The parameters the update moves, when ``update_scope`` leaves some out.
        self.scope: set[nn.Parameter] | None = None
        self.step_calibrated = False

    @property
    def task(self) -> str:
        """``"class"`` or ``"random"`` (``settings.task``, or what the survey decided for ``"auto"``)."""
        return self.calibrated.get("task", self.settings.task if self.settings.task != "auto" else "class")

    @property
    def target(self) -> float | None:
        """The forget accuracy (percent) the outcome is checked against."""
        if self.settings.target_forget_accuracy is not None:
            return self.settings.target_forget_accuracy
        return calibration.CLASS_TARGET if self.task == "class" else None

    @property
    def is_sample_request(self) -> bool:
        """Whether the run forgets individual samples (``task="random"`` with no forget-accuracy target)."""
        return self.task == "random" and self.target is None

    @property
    def sigma(self) -> float:
        """The noise scale: ``settings.sigma``, or the one calibrated from the forget set's inputs."""
        return self.settings.sigma if self.settings.sigma is not None else self.calibrated["sigma"]

    @property
    def penalty_sigma(self) -> float:
        """The logit-norm penalty's noise scale."""
        return self.calibrated.get("penalty_sigma", self.settings.logit_norm_sigma or 1.0)

    def survey_forget(
        self,
        survey_model: nn.Module,
        model: nn.Module,
        forget: Iterable[Any],
        batch_format: BatchFormat,
        cost: CostCounter,
        device: torch.device,
    ) -> ForgetSurvey:
        """Read the forget set once (a no-grad pass booked as ``calibration``) and decide the task, sigma, the
        penalty's sigma and the update scope from it."""
        settings, coll = self.settings, self.collectives
        reservoir = settings.probes_per_class * 64 if settings.probe_distillation > 0 else 0

        def shard(x: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
            x, labels, _ = take_shard(x, labels, None, coll.rank, coll.world_size)
            return x, labels

        with cost.kind("calibration"), normalization_mode(model, "eval"):
            found = self.survey = survey_forget_set(
                survey_model,
                model,
                forget,
                batch_format,
                device=device,
                reservoir=reservoir,
                generator=cpu_generator(settings.seed),
                shard=shard if coll.split == "shard" else None,
                total=coll.sum if coll.world_size > 1 else None,
                site=self.site,
            )
        task = found.task if settings.task == "auto" else settings.task
        self.calibrated.update(task=task, n_forget=found.n, classes=found.classes, input_std=found.std)
        if settings.sigma is None:
            self.calibrated["sigma"] = calibration.SIGMA_SCALE * found.std
        self.calibrated["penalty_sigma"] = (
            settings.logit_norm_sigma
            if settings.logit_norm_sigma is not None
            else calibration.PENALTY_SIGMA_SCALE * found.std
        )
        return found

    def scope_to(self, model: nn.Module) -> None:
        """Keep the update to ``settings.update_scope`` (after :meth:`survey_forget`)."""
        assert self.survey is not None
        scoped = scoped_parameters(model, self.survey.weight_modules, self.settings.update_scope)
        if len(scoped) < len(self.params):
            self.scope = set(scoped)
            self.calibrated["updated_parameters"] = sum(p.numel() for p in scoped)

    def move_everything(self) -> None:
        """Drop the update scope: the update moves every parameter (a sample request's)."""
        self.scope = None
        self.calibrated.pop("updated_parameters", None)

    def drop_gradients_outside_scope(self) -> None:
        """Outside the update scope: neither stepped nor counted in the step's norms."""
        if self.scope is not None:
            for p in self.params:
                if p not in self.scope:
                    p.grad = None

    def calibrate_step(
        self,
        optimizer: Optimizer,
        moved_logits: Callable[[], Tensor],
        clean: Tensor,
        batch_size: int,
        matching: bool,
        device: torch.device,
    ) -> None:
        """At the first applied step, with ``lr`` left to calibration: the normalised step's size, by trial steps
        (a class task; ``moved_logits`` is the forget batch's logits after a trial step), or the light step of a
        random or sample request."""
        self.step_calibrated = True
        raw = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        if self.settings.lr is not None or not isinstance(raw, NormalizedStep):
            return
        if self.task == "random":
            lr = sample_matching.STEP if matching else calibration.RANDOM_STEP
        else:
            moving = [p for p in self.params if p.grad is not None]
            saved = [p.detach().clone() for p in moving]
            before = clean.detach()
            coll = self.collectives

            def try_step(lr: float) -> None:
                for group in raw.param_groups:
                    group["lr"] = lr
                raw.step()

            def moved() -> float:
                after = moved_logits()
                kl = torch.stack([kl_moved(before, after), torch.tensor(float(batch_size), dtype=torch.float64)])
                total = coll.sum(kl.to(device)) if coll.world_size > 1 else kl
                return float(total[0] / total[1].clamp_min(1))

            def undo() -> None:
                with torch.no_grad():
                    for p, value in zip(moving, saved, strict=True):
                        p.copy_(value)

            lr = calibrate_step(try_step, moved, undo)
        for group in raw.param_groups:
            group["lr"] = lr
        self.calibrated["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        survey = self.survey
        return {
            "calibrated": dict(self.calibrated),
            "survey": {k: v for k, v in vars(survey).items() if k not in ("weight_modules", "starts")}
            if survey is not None
            else None,
            "scope": [i for i, p in enumerate(self.params) if p in self.scope] if self.scope is not None else None,
            "step_calibrated": self.step_calibrated,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calibrated = dict(state["calibrated"])
        survey = state["survey"]
        # A 0.2 run state also holds the survey's mean and input size, which nothing read and the survey dropped.
        kept = {f.name for f in dataclasses.fields(ForgetSurvey)}
        self.survey = ForgetSurvey(**{k: v for k, v in survey.items() if k in kept}) if survey is not None else None
        self.scope = {self.params[i] for i in state["scope"]} if state["scope"] is not None else None
        self.step_calibrated = bool(state["step_calibrated"])


__all__ = ["Calibration"]
