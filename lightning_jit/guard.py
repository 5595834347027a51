"""Protection against a JiT run that fails: collapse detection, rollback, and divergence handling.

JiT can destroy a model in a few steps: a learning rate slightly too high, or a ``sigma`` too small for the data. This
module makes that impossible to miss and cheap to undo:

* :class:`WeightSnapshot`: a bit-exact copy of a module's parameters and buffers.
* :class:`RollbackOnError`: restores the weights from before the run if the run raises (a bad batch, a divergence,
  Ctrl+C, SIGTERM), so a half-updated model is never returned.
* :class:`CollapseGuard`: checks the model every ``check_every`` steps, with a held-out monitor loader if the user has
  one, or else with a check computed from the model and the forget set alone (see its docstring and
  ``docs/safety.md``). On a collapse it restores earlier weights and halves the step size or stops.
* :class:`JiTDivergenceError`: raised after a divergence (non-finite weights, repeated non-finite losses, non-finite
  outputs), once the weights from before the run have been restored bit for bit.

The guard never takes a gradient from anything but the forget set: the monitor and the probes are only evaluated, under
``torch.no_grad`` and in eval mode.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_jit.config import JiTConfig
from lightning_jit.objective import JiTInputError, select_output
from lightning_jit.step import batch_labels, batch_to_input, normalization_mode

#: How a run ended. ``"completed"``: all epochs ran and the guard never intervened. ``"stopped_early"``: the forget-set
#: stopping rule ended the run. ``"rolled_back"``: the guard restored earlier weights at least once (the run then went
#: on at a smaller step size, or stopped). ``"diverged"``: the weights from before the run were restored and
#: :class:`JiTDivergenceError` was raised.
Outcome = Literal["completed", "stopped_early", "rolled_back", "diverged"]
OnCollapse = Literal["halve_lr", "stop"]
ON_COLLAPSE = ("halve_lr", "stop")

#: Consecutive steps with a non-finite loss (or, without a ``GradScaler``, non-finite gradients) after which a run is
#: declared diverged. A single such step is an isolated overflow: it is skipped and the run goes on.
NONFINITE_PATIENCE = 3


def divergence_hint(config: JiTConfig | None = None) -> str:
    """The advice given with every :class:`JiTDivergenceError`."""
    values = f" (now lr={config.lr:g}, sigma={config.sigma:g})" if config is not None else ""
    return (
        f"Try a smaller `lr` (e.g. 10x smaller) or a larger `sigma`{values}; a `sigma` far above the inputs' scale"
        " overflows too. Keep `target_forget_accuracy` set so the run stops once the forget set is forgotten."
    )


def forward_failure(model: nn.Module, batch: Any, config: JiTConfig, err: BaseException) -> JiTInputError:
    """Turn an error raised inside torch while running JiT on a batch into a :class:`JiTInputError` naming the cause.

    Example:
        >>> err = forward_failure(torch.nn.Linear(3, 2), torch.ones(2, 5), JiTConfig(sigma=1, lr=1), RuntimeError("x"))
        >>> "shape (2, 5)" in str(err)
        True
    """
    try:
        x = batch_to_input(batch, config)
        found = f"a forget batch input of shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"
    except ValueError:
        found = f"a forget batch of type {type(batch).__name__}"
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    devices = sorted({str(p.device) for p in model.parameters()})
    return JiTInputError(
        f"JiT could not run `model` (parameters {', '.join(dtypes)} on {', '.join(devices)}) on {found}: {err}."
        " Make the forget batches match what the model expects (shape, dtype, device; a half-precision model on CPU"
        " needs half inputs or `Trainer(precision=...)`), or set `input_key` / `batch_to_input`."
    )


class JiTDivergenceError(RuntimeError):
    """JiT diverged (non-finite weights, losses or outputs). The weights from before the run have been restored."""


class WeightSnapshot:
    """A copy of every parameter and buffer of a module, restorable bit for bit.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 2)
        >>> snap = WeightSnapshot(net)
        >>> with torch.no_grad():
        ...     _ = net.weight.add_(1.0)
        >>> snap.restore(net)
        >>> snap.equals(net)
        True
    """

    def __init__(self, module: nn.Module) -> None:
        self.state = {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Overwrite the snapshot with the module's current values, in place (no new memory)."""
        for key, tensor in module.state_dict(keep_vars=True).items():
            self.state[key].copy_(tensor.detach())

    @torch.no_grad()
    def restore(self, module: nn.Module) -> None:
        for key, tensor in module.state_dict(keep_vars=True).items():
            tensor.data.copy_(self.state[key])

    def equals(self, module: nn.Module) -> bool:
        """Whether ``module`` holds exactly the snapshot's values (NaN equals NaN in the same place)."""
        current = module.state_dict()
        return current.keys() == self.state.keys() and all(_same(current[k], self.state[k]) for k in current)


def _same(a: Tensor, b: Tensor) -> bool:
    if torch.equal(a, b):
        return True
    if not (torch.is_floating_point(a) and a.shape == b.shape and a.dtype == b.dtype):
        return False
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


def weights_finite(module: nn.Module) -> bool:
    """Whether every floating-point parameter and buffer of ``module`` is finite.

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> weights_finite(net)
        True
        >>> with torch.no_grad():
        ...     net.bias[0] = float("nan")
        >>> weights_finite(net)
        False
    """
    flags = [t.detach().isfinite().all() for t in module.state_dict().values() if torch.is_floating_point(t)]
    return bool(torch.stack(flags).all()) if flags else True


class RollbackOnError(pl.Callback):
    """Snapshot the LightningModule's weights when training starts and restore them if the run raises.

    Added automatically by :class:`~lightning_jit.module.JiTUnlearning`, so that an error in the middle of a run
    (bad batch, divergence, Ctrl+C, SIGTERM) never leaves a half-unlearned model behind. :class:`CollapseGuard` reuses
    its snapshot as the "weights from before the run", so no second copy is kept.
    """

    def __init__(self) -> None:
        self.snapshot: WeightSnapshot | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.snapshot = WeightSnapshot(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.snapshot = None

    def restore(self, pl_module: pl.LightningModule) -> bool:
        """Restore the weights from before the run; ``False`` if no run is in progress."""
        if self.snapshot is None:
            return False
        self.snapshot.restore(pl_module)
        return True

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.snapshot is None:
            return
        self.snapshot.restore(pl_module)
        self.snapshot = None
        rank_zero_warn(
            f"JiT unlearning was interrupted by {type(exception).__name__}; the model's weights were restored to"
            " their values before the run."
        )

    def state_dict(self) -> dict[str, Any]:
        return {}


def restore_pre_run(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Restore ``pl_module`` to its weights from before the run, from the trainer's :class:`RollbackOnError`."""
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, RollbackOnError) and callback.restore(pl_module):
            return True
    return False


@dataclass
class GuardEvent:
    """One intervention of the guard: at which step, why, what it did, and the measurements behind it."""

    step: int
    reason: str  # "monitor_drop", "logit_blowup", "single_class" or "non_finite"
    action: str  # "halve_lr", "stop" or "diverged"
    detail: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class CollapseGuard(pl.Callback):
    r"""Detect a collapsing JiT run, restore earlier weights, then halve the step size or stop.

    On by default in :class:`~lightning_jit.module.JiTUnlearning`. Every ``check_every`` optimizer steps (and once at
    the end of the run) the guard evaluates the model, under ``torch.no_grad`` and in eval mode; it never
    back-propagates anything, so the zero-shot property holds: every gradient still comes from the forget set alone.

    **With a monitor loader** (held-out data the user owns, e.g. test data of the retained classes, batches like
    ``(x, y)``): the check fails when the monitor accuracy falls more than ``max_drop`` points below its value before
    the run. The guard then restores the last weights that passed a check.

    **Without a monitor** the check uses only the model and the forget set. At the first step, before any update, it
    keeps the first forget batch as probes plus ``n_noise_probes`` Gaussian noise inputs with that batch's mean and
    std, and records the model's outputs on them. A check fails on one of these collapse signatures:

    * ``"logit_blowup"``: the mean L2 norm of the logits on the probes exceeds ``max_logit_growth`` times its value
      before the run;
    * ``"single_class"``: at least ``single_class_share`` of the noise probes (or of the forget probes) are predicted as
      one class, where before the run they were not;
    * ``"non_finite"``: a NaN or Inf in the logits or the weights (this is a divergence, see below).

    These signals lag behind the damage (on the digits CNN the retained accuracy had already fallen ~20 points when the
    logits had grown 1.45x), so without a monitor the guard restores the weights from **before the run**, never an
    intermediate state it cannot vouch for. With ``on_collapse="halve_lr"`` the run then starts again at half the step
    size; after ``max_halvings`` halvings it stops with the original weights.

    A ``"non_finite"`` check is a divergence: the weights from before the run are restored bit for bit and
    :class:`JiTDivergenceError` is raised.

    The outcome is in :attr:`outcome` and every intervention in :attr:`events`; both are logged and go into the
    wrapper's :meth:`~lightning_jit.module.JiTUnlearning.safety_report` and checkpoints.

    Args:
        monitor: Optional held-out loader of labelled batches (never used for gradients).
        max_drop: With a monitor: the largest allowed fall of its accuracy, in percentage points.
        check_every: Check every this many optimizer steps. Checking every step (default) restores the least progress.
        on_collapse: ``"halve_lr"`` (restore, halve the learning rate of every optimizer, go on) or ``"stop"``
            (restore and end the run).
        max_halvings: With ``"halve_lr"``: after this many halvings a further collapse stops the run.
        max_logit_growth: Without a monitor: the largest allowed growth factor of the probes' mean logit norm.
        single_class_share: Without a monitor: the share of probes predicted as one class that counts as a collapse.
        n_noise_probes: Without a monitor: how many noise probes to evaluate.
        seed: Seed of the noise probes.

    Example:
        >>> import torch, lightning.pytorch as pl
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from lightning_jit import JiTUnlearning
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
        >>> forget = DataLoader(TensorDataset(torch.randn(8, 1, 4, 4), torch.zeros(8, dtype=torch.long)), batch_size=4)
        >>> wrapper = JiTUnlearning(net, sigma=0.5, lr=0.01, guard=CollapseGuard(check_every=1))
        >>> trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                      enable_model_summary=False)
        >>> trainer.fit(wrapper, train_dataloaders=forget)
        >>> wrapper.outcome
        'completed'
    """

    def __init__(
        self,
        monitor: Iterable[Any] | None = None,
        max_drop: float = 2.0,
        check_every: int = 1,
        on_collapse: OnCollapse = "halve_lr",
        max_halvings: int = 5,
        max_logit_growth: float = 2.0,
        single_class_share: float = 0.95,
        n_noise_probes: int = 128,
        seed: int = 0,
    ) -> None:
        bad_monitor = isinstance(monitor, (Tensor, str, bytes, dict)) or not isinstance(monitor, Iterable)
        if monitor is not None and bad_monitor:
            raise MisconfigurationException(
                f"`monitor` must be None or a DataLoader (an iterable of labelled batches such as (x, y)), got"
                f" {type(monitor).__name__}. Wrap held-out tensors as DataLoader(TensorDataset(x, y), batch_size=...)."
            )
        _check_number("max_drop", max_drop, 0.0, 100.0, "It is in accuracy points; the default is 2.")
        _check_int("check_every", check_every, 1)
        if on_collapse not in ON_COLLAPSE:
            raise MisconfigurationException(f"`on_collapse` must be one of {ON_COLLAPSE}, got {on_collapse!r}.")
        _check_int("max_halvings", max_halvings, 0)
        _check_number("max_logit_growth", max_logit_growth, 1.0, math.inf, "The default 2.0 lets logits double.")
        if not max_logit_growth > 1.0:
            raise MisconfigurationException(f"`max_logit_growth` must be > 1, got {max_logit_growth!r}.")
        _check_number("single_class_share", single_class_share, 0.0, 1.0, "The default is 0.95.")
        _check_int("n_noise_probes", n_noise_probes, 0)
        _check_int("seed", seed, 0)
        self.monitor = monitor
        self.max_drop = float(max_drop)
        self.check_every = int(check_every)
        self.on_collapse = on_collapse
        self.max_halvings = int(max_halvings)
        self.max_logit_growth = float(max_logit_growth)
        self.single_class_share = float(single_class_share)
        self.n_noise_probes = int(n_noise_probes)
        self.seed = int(seed)
        self._reset()

    # ----------------------------------------------------------------------------------------------------------------
    def _reset(self) -> None:
        self.events: list[GuardEvent] = []
        self.reference: dict[str, float] = {}
        self.last_measures: dict[str, float] = {}
        self.halvings = 0
        self.diverged = False
        self.checks = 0
        self._steps = 0
        self._probes: tuple[Tensor, Tensor] | None = None
        self._last_good: WeightSnapshot | None = None
        self._own_pre_run: WeightSnapshot | None = None

    @property
    def outcome(self) -> Outcome | None:
        """``"diverged"``, ``"rolled_back"`` if the guard restored weights, else ``None`` (the run decides)."""
        if self.diverged:
            return "diverged"
        return "rolled_back" if self.events else None

    def report(self) -> dict[str, Any]:
        """A JSON-serialisable summary: mode, thresholds, reference and last measurements, and every event."""
        return {
            "mode": "monitor" if self.monitor is not None else "forget-set probes",
            "max_drop": self.max_drop if self.monitor is not None else None,
            "max_logit_growth": self.max_logit_growth if self.monitor is None else None,
            "single_class_share": self.single_class_share if self.monitor is None else None,
            "check_every": self.check_every,
            "on_collapse": self.on_collapse,
            "checks": self.checks,
            "halvings": self.halvings,
            "reference": dict(self.reference),
            "last": dict(self.last_measures),
            "events": [e.as_dict() for e in self.events],
        }

    def state_dict(self) -> dict[str, Any]:
        return {"events": [e.as_dict() for e in self.events], "halvings": self.halvings}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_probes"] = None
        state["_last_good"] = None
        state["_own_pre_run"] = None
        return state

    # ----------------------------------------------------------------------------------------------------------------
    # Lightning hooks
    # ----------------------------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._probes is None:
            self._begin(trainer, pl_module, batch)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._steps += 1
        if self._probes is not None and self._steps % self.check_every == 0:
            self._check(trainer, pl_module, final=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._probes is not None and self._steps % self.check_every != 0:
            self._check(trainer, pl_module, final=True)
        if self.events:
            rank_zero_info(f"JiT collapse guard: outcome 'rolled_back' after {len(self.events)} intervention(s).")

    # ----------------------------------------------------------------------------------------------------------------
    # Measurement
    # ----------------------------------------------------------------------------------------------------------------
    def _begin(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        model, config = _target(pl_module)
        x = batch_to_input(batch, config).detach()
        generator = torch.Generator().manual_seed(self.seed)
        mean = float(x.float().mean())
        std = float(x.float().std()) if x.numel() > 1 else 0.0
        std = std if math.isfinite(std) and std > 0 else 1.0
        noise = mean + std * torch.randn((self.n_noise_probes, *x.shape[1:]), generator=generator)
        self._probes = (x.clone(), noise.to(device=x.device, dtype=x.dtype))
        try:
            measures = self._measure(trainer, model, config)
        except (RuntimeError, TypeError) as err:
            self._probes = None
            raise forward_failure(model, batch, config, err) from err
        if measures["non_finite"]:
            self._probes = None
            raise MisconfigurationException(
                "The model's outputs (or weights) are already NaN/Inf before unlearning"
                f"{' on the `monitor` data' if self.monitor is not None else ' on the forget set'}: check the `model`"
                " checkpoint and the input normalisation."
            )
        self.reference = {k: v for k, v in measures.items() if k != "non_finite"}
        self.last_measures = dict(self.reference)
        if self.monitor is not None:
            self._last_good = WeightSnapshot(pl_module)
        else:
            self._last_good = _pre_run_snapshot(trainer)
            if self._last_good is None:
                self._own_pre_run = self._last_good = WeightSnapshot(pl_module)

    @torch.no_grad()
    def _measure(self, trainer: pl.Trainer, model: nn.Module, config: JiTConfig) -> dict[str, float]:
        assert self._probes is not None
        forget_x, noise_x = self._probes
        out: dict[str, float] = {"non_finite": float(not weights_finite(model))}
        with normalization_mode(model, "eval"), trainer.precision_plugin.forward_context():
            logits = [select_output(model(forget_x), config.output_selector).float()]
            if noise_x.shape[0]:
                logits.append(select_output(model(noise_x), config.output_selector).float())
        for t, inputs in zip(logits, (forget_x, noise_x), strict=False):
            if t.dim() != 2 or t.shape[0] != inputs.shape[0]:
                raise JiTInputError(
                    f"The model output selected by `output_selector` must be a (batch, classes) tensor with"
                    f" batch={inputs.shape[0]}, got {tuple(t.shape)}. Pass an `output_selector` returning the logits."
                )
        if not all(bool(t.isfinite().all()) for t in logits):
            out["non_finite"] = 1.0
        out["logit_norm"] = float(torch.cat([t.norm(dim=1) for t in logits]).mean())
        out["forget_share"] = _top_share(logits[0])
        out["noise_share"] = _top_share(logits[1]) if len(logits) > 1 else float("nan")
        if self.monitor is not None:
            accuracy, finite = self._monitor_accuracy(model, config, forget_x)
            out["monitor_acc"] = accuracy
            if not finite:
                out["non_finite"] = 1.0
        return out

    def _monitor_accuracy(self, model: nn.Module, config: JiTConfig, like: Tensor) -> tuple[float, bool]:
        correct, total, finite = 0, 0, True
        with normalization_mode(model, "eval"):
            for batch in self.monitor:  # type: ignore[union-attr]
                try:
                    x = batch_to_input(batch, config)
                except ValueError as err:
                    raise MisconfigurationException(f"`monitor` yielded a batch JiT cannot read: {err}") from err
                y = batch_labels(batch, config)
                if y is None or y.shape[0] != x.shape[0]:
                    raise MisconfigurationException(
                        "`monitor` batches must carry integer class labels, e.g. (x, y) with y of shape (batch,) at"
                        f" `label_key={config.label_key!r}`."
                    )
                try:
                    logits = select_output(model(x.to(device=like.device, dtype=like.dtype)), config.output_selector)
                except (RuntimeError, TypeError) as err:
                    raise MisconfigurationException(
                        f"`monitor` batch of shape {tuple(x.shape)} does not fit `model`: {err}"
                    ) from err
                finite = finite and bool(logits.isfinite().all())
                correct += int((logits.argmax(1).cpu() == y.cpu()).sum())
                total += int(y.shape[0])
        if total == 0:
            raise MisconfigurationException("`monitor` is empty: pass a loader with at least one labelled batch.")
        return 100.0 * correct / total, finite

    # ----------------------------------------------------------------------------------------------------------------
    # Decision
    # ----------------------------------------------------------------------------------------------------------------
    def _verdict(self, m: dict[str, float]) -> str | None:
        if m["non_finite"]:
            return "non_finite"
        ref = self.reference
        if self.monitor is not None:
            return "monitor_drop" if m["monitor_acc"] < ref["monitor_acc"] - self.max_drop else None
        if m["logit_norm"] > self.max_logit_growth * ref["logit_norm"]:
            return "logit_blowup"
        share = self.single_class_share
        for key in ("noise_share", "forget_share"):
            if ref[key] < share <= m[key]:  # NaN-safe: a missing probe group never triggers
                return "single_class"
        return None

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, final: bool) -> None:
        model, config = _target(pl_module)
        measures = self._measure(trainer, model, config)
        self.checks += 1
        reason = self._verdict(measures)
        strategy = trainer.strategy
        diverged = strategy.reduce_boolean_decision(reason == "non_finite", all=False)
        failed = strategy.reduce_boolean_decision(reason is not None, all=False)
        self.last_measures = {k: v for k, v in measures.items() if k != "non_finite"}
        detail = {k: round(v, 4) for k, v in self.last_measures.items() if math.isfinite(v)}
        step = int(trainer.global_step)
        if diverged:
            self.diverged = True
            self.events.append(GuardEvent(step, "non_finite", "diverged", detail))
            restored = restore_pre_run(trainer, pl_module)
            if not restored and self._own_pre_run is not None:
                self._own_pre_run.restore(pl_module)
            raise JiTDivergenceError(
                f"JiT diverged at step {step}: the model's outputs or weights became NaN/Inf. The weights from before"
                f" the run were restored bit for bit. {divergence_hint(config)}"
            )
        if not failed:
            if self.monitor is not None and self._last_good is not None:
                self._last_good.update(pl_module)
            return
        reason = reason or "other_rank"
        assert self._last_good is not None
        self._last_good.restore(pl_module)
        for optimizer in trainer.optimizers:
            optimizer.state.clear()  # momentum buffers point the way that collapsed
        hook = getattr(pl_module, "on_guard_rollback", None)
        if callable(hook):
            hook()
        if self.on_collapse == "halve_lr" and self.halvings < self.max_halvings and not final:
            action = "halve_lr"
            self.halvings += 1
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = group["lr"] * 0.5
            trainer.should_stop = False
        else:
            action = "stop"
            trainer.should_stop = True
        self.events.append(GuardEvent(step, reason, action, detail))
        target = "the last weights that passed" if self.monitor is not None else "the weights from before the run"
        what = {
            "monitor_drop": f"monitor accuracy {measures.get('monitor_acc', float('nan')):.1f}% fell more than"
            f" {self.max_drop:g} points below {self.reference.get('monitor_acc', float('nan')):.1f}%",
            "logit_blowup": f"the probes' logit norm grew {measures['logit_norm'] / self.reference['logit_norm']:.2f}x"
            f" (limit {self.max_logit_growth:g}x)",
            "single_class": "the model predicts one class for (almost) every probe",
        }.get(reason, "another process saw a collapse")
        then = (
            f"the learning rate was halved (halving {self.halvings} of {self.max_halvings})"
            if action == "halve_lr"
            else "the run was stopped"
        )
        rank_zero_warn(f"JiT collapse guard at step {step}: {what}. Restored {target}; {then}.")


def _top_share(logits: Tensor) -> float:
    if logits.shape[0] == 0:
        return float("nan")
    counts = torch.bincount(logits.argmax(1).cpu(), minlength=logits.shape[1])
    return float(counts.max()) / logits.shape[0]


def _target(pl_module: pl.LightningModule) -> tuple[nn.Module, JiTConfig]:
    config = getattr(pl_module, "config", None)
    if not isinstance(config, JiTConfig):
        config = JiTConfig(sigma=1.0, lr=1.0)
    model = getattr(pl_module, "model", None)
    return (model if isinstance(model, nn.Module) else pl_module), config


def _pre_run_snapshot(trainer: pl.Trainer) -> WeightSnapshot | None:
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, RollbackOnError) and callback.snapshot is not None:
            return callback.snapshot
    return None


def _check_number(name: str, value: Any, low: float, high: float, hint: str) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) or value == math.inf
    if not ok or not low <= value <= high:
        raise MisconfigurationException(f"`{name}` must be a number in [{low:g}, {high:g}], got {value!r}. {hint}")


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise MisconfigurationException(f"`{name}` must be an integer >= {low}, got {value!r}.")
