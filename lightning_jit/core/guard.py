"""The collapse guard: its settings (:class:`GuardSettings`) and its measurements (:class:`CollapseCheck`).

JiT can destroy a model in a few steps: a learning rate slightly too high, or a ``sigma`` too small for the data. The
run engine (:class:`~lightning_jit.core.engine.JiTRun`) checks the model every ``check_every`` steps with a
:class:`CollapseCheck`; on a collapse it restores earlier weights and halves the step size or stops; on non-finite
outputs it restores the weights from before the run and raises. The checks never take a gradient: the monitor and the
probes are only evaluated, under ``torch.no_grad`` and in eval mode, so every gradient still comes from the forget
set alone. ``docs/safety.md`` describes the policy in prose.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_jit.core.accuracy import top1_hits
from lightning_jit.core.batch import BatchFormat, move
from lightning_jit.core.checks import boolean, choice, in_range, integer, validate
from lightning_jit.core.errors import JiTInputError, JiTSettingError, MisconfigurationException
from lightning_jit.core.noise import resolve_perturbation
from lightning_jit.core.renamed import renamed
from lightning_jit.core.site import InputSite, PerturbationSite
from lightning_jit.core.weights import normalization_mode, weights_finite

OnCollapse = Literal["halve_lr", "stop"]


def _growth(name: str, value: Any) -> Any:
    value = in_range(1.0, math.inf, "The default 2.0 lets the logits double.")["check"](name, value)
    if not value > 1.0:
        raise JiTSettingError(name, f"must be > 1, got {value!r}.")
    return value


@dataclass
class GuardSettings:
    r"""How the collapse guard checks a run. On by default in every front.

    Every ``check_every`` optimizer steps (and once at the end of the run) the model is evaluated:

    * **with a monitor loader** (held-out data the user owns, given to the front as ``monitor=``): the check fails
      when the monitor accuracy falls more than ``max_drop`` points below its value before the run, and the guard
      restores the last weights that passed a check;
    * **without a monitor**, from the model and the forget set alone: at the first step the first forget batch is kept
      as probes, with ``n_noise_probes`` Gaussian inputs of that batch's mean and std (drawn where the run's noise
      goes: with ``perturb_at``, in the output space of that module). A check fails when the probes'
      mean logit norm exceeds ``max_logit_growth`` times its value before the run (``"logit_blowup"``), or when at
      least ``single_class_share`` of the noise probes (or of the forget probes) fall into one class where they did
      not before (``"single_class"``), or when the run holds class probes (``probe_distillation``) and the model
      gives fewer than ``min_probe_agreement`` times as many of them the original's class as before the run
      (``"probe_drift"``: the kept classes are being lost). These signals lag behind the damage, so the guard then
      restores the weights from **before the run**.

    With ``on_collapse="halve_lr"`` the run then goes on at half the step size; after ``max_halvings`` halvings a
    further collapse stops it. A NaN or Inf in the outputs or weights is a divergence: the weights from before the run
    are restored bit for bit and :class:`~lightning_jit.core.errors.JiTDivergenceError` is raised.

    Args:
        enabled: Run the guard at all.
        max_drop: With a monitor: the largest allowed fall of its accuracy, in percentage points.
        check_every: Check every this many optimizer steps (8: about once per pass when the library batches the forget
            set). Checking every step restores the least progress, at the cost of a check per step.
        on_collapse: ``"halve_lr"`` (restore, halve the learning rate, go on) or ``"stop"`` (restore and end the run).
        max_halvings: With ``"halve_lr"``: after this many halvings a further collapse stops the run.
        max_logit_growth: Without a monitor: the largest allowed growth factor of the probes' mean logit norm.
        single_class_share: Without a monitor: the share of probes predicted as one class that counts as a collapse.
        min_probe_agreement: Without a monitor: the least share of the class probes that must keep the original's
            class, relative to before the run.
        n_noise_probes: Without a monitor: how many noise probes to evaluate.
        probe_seed: Seed of the noise probes.

    Example:
        >>> GuardSettings(check_every=5).on_collapse
        'halve_lr'
    """

    enabled: bool = field(default=True, metadata={"check": boolean})
    max_drop: float = field(default=2.0, metadata=in_range(0.0, 100.0, "It is in accuracy points; the default is 2."))
    check_every: int = field(default=8, metadata=integer(1))
    on_collapse: OnCollapse = field(
        default="halve_lr", metadata=choice(("halve_lr", "stop"), "'halve_lr' goes on at half the step size.")
    )
    max_halvings: int = field(default=5, metadata=integer(0))
    max_logit_growth: float = field(default=2.0, metadata={"check": _growth})
    single_class_share: float = field(default=0.95, metadata=in_range(0.0, 1.0, "The default is 0.95."))
    min_probe_agreement: float = field(default=0.8, metadata=in_range(0.0, 1.0, "The default is 0.8."))
    n_noise_probes: int = field(default=32, metadata=integer(0))
    probe_seed: int = field(default=0, metadata=integer(0))

    def __post_init__(self) -> None:
        validate(self)


@dataclass
class GuardEvent:
    """One intervention of the guard: at which step, why, what it did, and the measurements behind it."""

    step: int
    reason: str  # "monitor_drop", "logit_blowup", "single_class", "probe_drift", "other_rank" or "non_finite"
    action: str  # "halve_lr", "stop" or "diverged"
    detail: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def monitor_logits(model: nn.Module, batch_format: BatchFormat, batch: Any, like: Tensor) -> tuple[Tensor, Tensor]:
    """The model's logits and the labels of one ``monitor`` batch, moved to ``like``'s device and its floating-point
    tensors to ``like``'s dtype (token ids keep theirs); a batch that cannot be read or does not fit the model raises
    ``MisconfigurationException`` naming ``monitor``."""
    try:
        x, y = batch_format.input_and_labels(batch, "monitor")
    except JiTInputError as err:
        raise MisconfigurationException(f"`monitor` yielded a batch JiT cannot read: {err}") from err
    try:
        return batch_format.logits(model(move(x, like.device, like.dtype))), y
    except (RuntimeError, TypeError) as err:
        raise MisconfigurationException(
            f"`monitor` batch of shape {tuple(x.shape)} does not fit `model`: {err}"
        ) from err


class CollapseCheck:
    """The guard's measurements and verdicts for one run (the engine decides what to do with them).

    Args:
        guard: The settings.
        batch_format: How to read the forget and monitor batches.
        monitor: Optional held-out loader of labelled batches.
        site: The run's perturbation site (:mod:`lightning_jit.core.site`; ``None``: the input): the noise probes are
            drawn in its space, with the mean and std the forget inputs have there.
    """

    def __init__(
        self,
        guard: GuardSettings,
        batch_format: BatchFormat,
        monitor: Iterable[Any] | None = None,
        site: PerturbationSite | None = None,
    ) -> None:
        self.guard = guard
        #: Where the noise probes (and the class probes) live: the input, or a module's output space.
        self.site: PerturbationSite = site if site is not None else InputSite()
        self.batch_format = batch_format
        self.monitor = monitor
        self.events: list[GuardEvent] = []
        self.reference: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.halvings = 0
        self.checks = 0
        self._probes: tuple[Tensor, Tensor] | None = None
        #: The run's class probes and the original's class for each (set by the engine when it holds probes).
        self.class_probes: tuple[Tensor, Tensor] | None = None

    @property
    def begun(self) -> bool:
        return self._probes is not None

    def begin(self, model: nn.Module, x: Tensor, forward_context: Callable[[], Any] | None = None) -> None:
        """Keep the probes (``x``, the first forget inputs, and noise like them) and measure the model before the run.

        Raises:
            MisconfigurationException: if the model's outputs or weights are already non-finite.
        """
        x = x.detach()
        generator = torch.Generator().manual_seed(self.guard.probe_seed)
        self.site.admit(x)
        context = forward_context() if forward_context is not None else contextlib.nullcontext()
        with torch.no_grad(), normalization_mode(model, "eval"), context:
            space = self.site.space(model, x).detach()
        mean = float(space.float().mean())
        std = float(space.float().std()) if space.numel() > 1 else 0.0
        std = std if math.isfinite(std) and std > 0 else 1.0
        draw = resolve_perturbation("gaussian")
        unit = draw(
            torch.Size((self.guard.n_noise_probes, *space.shape[1:])), generator, torch.device("cpu"), torch.float32
        )
        noise = mean + std * unit
        self._probes = (x.clone(), noise.to(device=space.device, dtype=space.dtype))
        try:
            measures = self.measure(model, forward_context)
        except BaseException:
            self._probes = None
            raise
        if measures["non_finite"]:
            self._probes = None
            where = "on the `monitor` data" if self.monitor is not None else "on the forget set"
            raise MisconfigurationException(
                f"The model's outputs (or weights) are already NaN/Inf before unlearning {where}: check the `model`"
                " checkpoint and the input normalisation."
            )
        self.reference = {k: v for k, v in measures.items() if k != "non_finite"}
        self.last = dict(self.reference)

    @torch.no_grad()
    def measure(self, model: nn.Module, forward_context: Callable[[], Any] | None = None) -> dict[str, float]:
        """The logit norm and top-class shares on the probes (and the monitor accuracy), in eval mode."""
        assert self._probes is not None
        forget_x, noise_x = self._probes
        fmt = self.batch_format
        out: dict[str, float] = {"non_finite": float(not weights_finite(model))}
        context = forward_context() if forward_context is not None else contextlib.nullcontext()
        held = self.class_probes if self.monitor is None else None
        with normalization_mode(model, "eval"), context:
            logits = [fmt.logits(model(forget_x), forget_x.shape[0]).float()]
            if noise_x.shape[0]:
                logits.append(fmt.logits(self.site.run(model, noise_x), noise_x.shape[0]).float())
            if held is not None:
                held_logits = fmt.logits(self.site.run(model, held[0]), held[0].shape[0])
                agreement = top1_hits(held_logits, held[1]).float().mean()
        if not all(bool(t.isfinite().all()) for t in logits):
            out["non_finite"] = 1.0
        out["logit_norm"] = float(torch.cat([t.norm(dim=1) for t in logits]).mean())
        out["forget_share"] = _top_share(logits[0])
        out["noise_share"] = _top_share(logits[1]) if len(logits) > 1 else float("nan")
        if held is not None:
            out["probe_agreement"] = float(agreement)
        if self.monitor is not None:
            accuracy, finite = self._monitor_accuracy(model, forget_x)
            out["monitor_acc"] = accuracy
            if not finite:
                out["non_finite"] = 1.0
        return out

    def _monitor_accuracy(self, model: nn.Module, like: Tensor) -> tuple[float, bool]:
        correct, total, finite = 0, 0, True
        with normalization_mode(model, "eval"):
            for batch in self.monitor:  # type: ignore[union-attr]
                logits, y = monitor_logits(model, self.batch_format, batch, like)
                finite = finite and bool(logits.isfinite().all())
                correct += int(top1_hits(logits, y.to(logits.device)).sum())
                total += int(y.shape[0])
        if total == 0:
            raise MisconfigurationException("`monitor` is empty: pass a loader with at least one labelled batch.")
        return 100.0 * correct / total, finite

    def verdict(self, m: dict[str, float]) -> str | None:
        """Why ``m`` is a collapse (``"non_finite"``, ``"monitor_drop"``, ``"logit_blowup"``, ``"single_class"``,
        ``"probe_drift"``), or ``None``."""
        if m["non_finite"]:
            return "non_finite"
        ref = self.reference
        if self.monitor is not None:
            return "monitor_drop" if m["monitor_acc"] < ref["monitor_acc"] - self.guard.max_drop else None
        if m["logit_norm"] > self.guard.max_logit_growth * ref["logit_norm"]:
            return "logit_blowup"
        share = self.guard.single_class_share
        for key in ("noise_share", "forget_share"):
            if ref[key] < share <= m[key]:  # NaN-safe: a missing probe group never triggers
                return "single_class"
        if (
            "probe_agreement" in ref
            and m.get("probe_agreement", 1.0) < self.guard.min_probe_agreement * ref["probe_agreement"]
        ):
            return "probe_drift"
        return None

    def describe(self, reason: str, measures: dict[str, float]) -> str:
        """A sentence saying what the check saw."""
        ref = self.reference
        return {
            "monitor_drop": f"monitor accuracy {measures.get('monitor_acc', float('nan')):.1f}% fell more than"
            f" {self.guard.max_drop:g} points below {ref.get('monitor_acc', float('nan')):.1f}%",
            "logit_blowup": f"the probes' logit norm grew {measures['logit_norm'] / ref['logit_norm']:.2f}x"
            f" (limit {self.guard.max_logit_growth:g}x)",
            "single_class": "the model predicts one class for (almost) every probe",
            "probe_drift": f"only {100 * measures.get('probe_agreement', float('nan')):.0f}% of the class probes keep"
            f" the original's class (before the run: {100 * ref.get('probe_agreement', float('nan')):.0f}%; limit"
            f" {self.guard.min_probe_agreement:g}x)",
        }.get(reason, "another process saw a collapse")

    def state_dict(self) -> dict[str, Any]:
        """The check's state, to go on after a restart (:meth:`load_state_dict`)."""
        return {
            "events": [e.as_dict() for e in self.events],
            "reference": dict(self.reference),
            "last": dict(self.last),
            "halvings": self.halvings,
            "checks": self.checks,
            "probes": self._probes,
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.events = [GuardEvent(**event) for event in state["events"]]
        self.reference, self.last = dict(state["reference"]), dict(state["last"])
        self.halvings, self.checks = int(state["halvings"]), int(state["checks"])
        probes = state["probes"]
        self._probes = (probes[0].to(device), probes[1].to(device)) if probes is not None else None
        if self._probes is not None:
            self.site.admit(self._probes[0])  # a module site runs its probes on a forget input

    def report(self) -> dict[str, Any]:
        """A JSON-serialisable summary: mode, thresholds, reference and last measurements, and every event."""
        g = self.guard
        return {
            "mode": "monitor" if self.monitor is not None else "forget-set probes",
            "max_drop": g.max_drop if self.monitor is not None else None,
            "max_logit_growth": g.max_logit_growth if self.monitor is None else None,
            "single_class_share": g.single_class_share if self.monitor is None else None,
            "check_every": g.check_every,
            "on_collapse": g.on_collapse,
            "checks": self.checks,
            "halvings": self.halvings,
            "reference": dict(self.reference),
            "last": dict(self.last),
            "events": [e.as_dict() for e in self.events],
        }


def _top_share(logits: Tensor) -> float:
    if logits.shape[0] == 0:
        return float("nan")
    counts = torch.bincount(logits.argmax(1).cpu(), minlength=logits.shape[1])
    return float(counts.max()) / logits.shape[0]


def check_monitor(monitor: Any, name: str = "monitor") -> Iterable[Any] | None:
    """``monitor`` if it is ``None`` or an iterable of batches (a DataLoader), else an error naming ``name``."""
    bad = isinstance(monitor, (Tensor, str, bytes, dict)) or not isinstance(monitor, Iterable)
    if monitor is not None and bad:
        raise MisconfigurationException(
            f"`{name}` must be None or a DataLoader (an iterable of batches such as (x, y)), got"
            f" {type(monitor).__name__}. Wrap tensors as DataLoader(TensorDataset(x, y), batch_size=...)."
        )
    return monitor


def __getattr__(name: str) -> Any:
    # ``CollapseGuard``, the old name of ``GuardSettings`` (:mod:`lightning_jit.core.renamed`).
    return renamed(name, __name__)
