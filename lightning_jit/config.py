"""The JiT hyperparameters, shared by the wrapper, the callback and the CLI, and the validation of each."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_jit.objective import DEFAULT_PERTURBATION_CHUNK, ClampSpec, OutputSelector, PerturbationChunk, Reduction

NORM_POLICIES = ("eval", "train")

#: Plain JiT: the reference's objective (with its bugs fixed) and none of the measured improvements that are on by
#: default (normalised logits, the logit-norm penalty, probe distillation). For comparisons with the reference and for
#: studying the method itself: ``JiTUnlearning(model, sigma=..., lr=..., **PLAIN_JIT)``.
PLAIN_JIT: dict[str, Any] = {"normalize_logits": False, "logit_norm_penalty": 0.0, "probe_distillation": 0.0}


@dataclass
class JiTConfig:
    """Everything that defines one JiT run. See :class:`~lightning_jit.module.JiTUnlearning` for each field.

    Example:
        >>> JiTConfig(sigma=0.5, lr=0.01).n_perturbations
        25
    """

    sigma: float
    lr: float
    n_perturbations: int = 25
    epochs: int = 1
    reduction: Reduction = "mean"
    center_logits: bool = False
    normalize_logits: bool = True
    logit_norm_penalty: float = 10.0
    logit_norm_sigma: float = 1.0
    probe_distillation: float = 1.0
    probes_per_class: int = 16
    clamp: ClampSpec = None
    norm_policy: str = "eval"
    perturbation_chunk: PerturbationChunk = DEFAULT_PERTURBATION_CHUNK
    seed: int | None = None
    momentum: float = 0.0
    target_forget_accuracy: float | None = None
    input_key: int | str = 0
    label_key: int | str = 1
    output_selector: OutputSelector = field(default=None, repr=False)
    batch_to_input: Callable[[Any], Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`MisconfigurationException` naming the first bad argument and how to fix it."""
        _positive("sigma", self.sigma, "It is the std of the input noise; try 0.1-1x the input's std.")
        _positive("lr", self.lr, "It is the SGD step size of the JiT update; try 1e-3 to 1e-1 with reduction='mean'.")
        _integer_at_least("n_perturbations", self.n_perturbations, 1)
        penalty = self.logit_norm_penalty
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not 0 <= penalty < math.inf:
            raise MisconfigurationException(
                f"`logit_norm_penalty` must be a finite number >= 0, got {penalty!r}. 0 turns it off; 10 is the"
                " measured setting (see the README's quality section)."
            )
        _positive(
            "logit_norm_sigma",
            self.logit_norm_sigma,
            "It is the std of the penalty's noisy copies of the forget inputs; 1.0 measured best (0.5 for sub-class).",
        )
        distill = self.probe_distillation
        if isinstance(distill, bool) or not isinstance(distill, (int, float)) or not 0 <= distill < math.inf:
            raise MisconfigurationException(
                f"`probe_distillation` must be a finite number >= 0, got {distill!r}. 0 turns it off; 1 is the"
                " measured setting (see the README's quality section)."
            )
        _integer_at_least("probes_per_class", self.probes_per_class, 1)
        _integer_at_least("epochs", self.epochs, 1)
        if self.perturbation_chunk is not None and self.perturbation_chunk != "auto":
            _integer_at_least("perturbation_chunk", self.perturbation_chunk, 1)
        if self.reduction not in ("mean", "sum"):
            raise MisconfigurationException(
                f'`reduction` must be "mean" or "sum", got {self.reduction!r}. "sum" is the reference\'s per-batch sum;'
                ' its learning rate equals the "mean" learning rate divided by the batch size.'
            )
        if self.norm_policy not in NORM_POLICIES:
            raise MisconfigurationException(
                f"`norm_policy` must be one of {NORM_POLICIES}, got {self.norm_policy!r}. 'eval' (the default) keeps"
                " BatchNorm statistics and dropout frozen; 'train' reproduces the reference."
            )
        if self.clamp is not None and self.clamp != "batch":
            ok = isinstance(self.clamp, Sequence) and not isinstance(self.clamp, str) and len(self.clamp) == 2
            if not ok or not float(self.clamp[0]) < float(self.clamp[1]):
                raise MisconfigurationException(
                    f'`clamp` must be None, "batch" or a (low, high) pair with low < high, got {self.clamp!r}.'
                )
            self.clamp = (float(self.clamp[0]), float(self.clamp[1]))
        if not (isinstance(self.momentum, (int, float)) and 0.0 <= self.momentum < 1.0):
            raise MisconfigurationException(f"`momentum` must be in [0, 1), got {self.momentum!r}.")
        if self.target_forget_accuracy is not None and not (
            isinstance(self.target_forget_accuracy, (int, float)) and 0 <= self.target_forget_accuracy <= 100
        ):
            raise MisconfigurationException(
                "`target_forget_accuracy` must be a percentage in [0, 100] or None,"
                f" got {self.target_forget_accuracy!r}."
            )
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise MisconfigurationException(f"`seed` must be an int or None, got {self.seed!r}.")
        if self.batch_to_input is not None and not callable(self.batch_to_input):
            raise MisconfigurationException("`batch_to_input` must be a callable mapping a batch to the input tensor.")

    def hparams(self) -> dict[str, Any]:
        """The serialisable fields (callables are left out), for logs, checkpoints and audit records."""
        out = {k: v for k, v in asdict(self).items() if k not in ("output_selector", "batch_to_input")}
        if callable(self.output_selector):
            out["output_selector"] = getattr(self.output_selector, "__name__", repr(self.output_selector))
        else:
            out["output_selector"] = self.output_selector
        return out


def _positive(name: str, value: Any, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise MisconfigurationException(f"`{name}` must be a finite number > 0, got {value!r}. {hint}")


def _integer_at_least(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise MisconfigurationException(f"`{name}` must be an integer >= {low}, got {value!r}.")
