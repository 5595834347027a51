"""Which strategies and precisions JiT runs under, and how the run engine's processes split and agree.

Shared by the wrapper and the callback. :func:`collectives` turns a Trainer's strategy into the engine's
:class:`~lightning_jit.core.engine.Collectives`, so that the unlearned weights do not depend on the number of
processes. See ``docs/scale.md`` for the rules in prose.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy, Strategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler

from lightning_jit.core.run.collectives import Collectives

#: Precisions the JiT step is tested under. Others run with a warning.
SUPPORTED_PRECISIONS = ("32-true", "32", "64-true", "bf16-mixed", "16-mixed")
#: Strategies JiT supports, by user-facing name. All are :class:`~lightning.pytorch.strategies.DDPStrategy` or
#: single-device strategies; FSDP is refused (see :func:`check_strategy`).
SUPPORTED_STRATEGIES = ("auto", "single_device", "ddp", "ddp_spawn", "ddp_fork", "ddp_find_unused_parameters_true")


def strategy_name(strategy: Strategy) -> str:
    """A readable name for a strategy instance, e.g. ``"ddp_spawn (DDPStrategy)"``."""
    cls = type(strategy).__name__
    name = getattr(type(strategy), "strategy_name", None)
    if isinstance(strategy, DDPStrategy):
        start = getattr(strategy, "_start_method", "popen")
        name = "ddp" if start == "popen" else f"ddp_{start}"
    return f"{name} ({cls})" if name else cls


#: Strategies refused by name (checked against every class in the strategy's MRO, since e.g. DeepSpeed subclasses
#: DDP), and why.
REFUSED_STRATEGIES = {
    "DeepSpeedStrategy": (
        "DeepSpeed shards parameters, gradients and optimizer state and owns the optimizer step, so a JiT SGD step over"
        " the module's parameters would not update the real (sharded or fp32 master) weights"
    ),
    "FSDPStrategy": (
        "Lightning's FSDP runs only on GPUs and has not been validated with JiT (the JiT step itself matched one"
        " process under PyTorch's FSDP2 on CPU; set LIGHTNING_JIT_EXPERIMENTAL_FSDP=1 to try it, see docs/scale.md)"
    ),
    "ModelParallelStrategy": "tensor/FSDP2 parallel parameters are sharded (DTensor); this is not verified",
    "XLAStrategy": "XLA devices are not verified",
    "SingleDeviceXLAStrategy": "XLA devices are not verified",
}


def check_strategy_support(strategy: Strategy, who: str = "JiTUnlearning") -> None:
    """Refuse a strategy the JiT step does not support, naming it, why, and what to use instead.

    Supported: one device, and every :class:`~lightning.pytorch.strategies.DDPStrategy` (``"ddp"``,
    ``"ddp_spawn"``, ``"ddp_fork"``, ``"ddp_find_unused_parameters_true"``), on any number of nodes. Sharded
    strategies (DeepSpeed, FSDP, ModelParallel) and XLA are refused by name, also through subclasses; any other
    strategy is refused as not verified.

    FSDP is refused for now. The JiT step itself is sound under sharding: its no-grad perturbed passes are
    ordinary forwards that all-gather like any other, and with PyTorch's ``fully_shard`` (FSDP2) on 2 CPU processes
    it gives the one-process weights to 3e-8. But Lightning's ``FSDPStrategy`` (FSDP1) only runs on GPUs, so it
    has not been tested with JiT. ``benchmarks/gpu_check.sh`` probes it; set the environment variable
    ``LIGHTNING_JIT_EXPERIMENTAL_FSDP=1`` to try it anyway.

    Raises:
        MisconfigurationException: naming the unsupported strategy.

    Example:
        >>> from lightning.pytorch.strategies import SingleDeviceStrategy
        >>> check_strategy_support(SingleDeviceStrategy("cpu"))
    """
    if isinstance(strategy, FSDPStrategy) and os.environ.get("LIGHTNING_JIT_EXPERIMENTAL_FSDP") == "1":
        rank_zero_warn(f"{who} under FSDP is experimental (LIGHTNING_JIT_EXPERIMENTAL_FSDP=1); check the result.")
        return
    for cls in type(strategy).__mro__:
        reason = REFUSED_STRATEGIES.get(cls.__name__)
        if reason is not None:
            kind = "" if cls is type(strategy) else f" (a {cls.__name__})"
            raise MisconfigurationException(
                f"{who} does not support the {type(strategy).__name__}{kind} strategy: {reason}."
                " Use `strategy='ddp'` (or 'ddp_spawn') or one device; the model must fit on one device."
            )
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise MisconfigurationException(
            f"{who} does not support the strategy {strategy_name(strategy)!r}. Supported strategies:"
            f" {', '.join(SUPPORTED_STRATEGIES)} (with any `num_nodes`). The model must fit on one device."
        )


def check_strategy(trainer: pl.Trainer, who: str = "JiTUnlearning") -> None:
    """At setup: refuse an unsupported strategy (:func:`check_strategy_support`), warn about an untested precision.

    Raises:
        MisconfigurationException: naming the unsupported strategy.
    """
    check_strategy_support(trainer.strategy, who)
    precision = str(getattr(trainer.precision_plugin, "precision", trainer.precision))
    if precision not in SUPPORTED_PRECISIONS:
        rank_zero_warn(
            f"{who} is tested under the precisions {SUPPORTED_PRECISIONS}, not {precision!r}; check the result."
        )


def _loaders(loaders: Any) -> list[DataLoader]:
    if isinstance(loaders, DataLoader):
        return [loaders]
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return [dl for item in loaders for dl in _loaders(item)]
    return []


def sampler_shards(loader: DataLoader) -> bool:
    """Whether ``loader`` already gives each process its own share (a ``DistributedSampler`` inside)."""
    samplers = (loader.sampler, getattr(loader.batch_sampler, "sampler", None))
    return any(isinstance(s, DistributedSampler) for s in samplers)


def collectives(trainer: pl.Trainer, loaders: Any = None, who: str = "JiTUnlearning") -> Collectives:
    """The run engine's :class:`~lightning_jit.core.engine.Collectives` for ``trainer``'s processes.

    With one process: the defaults. With ``W`` processes, two cases:

    * The loaders hold no ``DistributedSampler`` (``Trainer(use_distributed_sampler=False)``, or the callback, which
      reads the forget set itself): every process sees the same global batches, and each takes its contiguous share
      inside the step (``split="shard"``). With per-sample ids in the batches, the weights are those of one process,
      up to float reduction order.
    * Lightning put a (shuffled) ``DistributedSampler`` in (``use_distributed_sampler=True``, its default): each
      process runs its own local batch (``split="local"``); the global batch is the union of the ``W`` local ones and
      the update is the one-process update of that union, but which samples meet in a batch depends on ``W`` (warned
      once).

    In both cases the loss is scaled so that DDP's gradient average equals the gradient of the global batch. Pass
    ``loaders=None`` for a front that shards its own batches.
    """
    world = int(trainer.world_size)
    if world <= 1:
        return Collectives()
    strategy = trainer.strategy

    def all_true(ok: bool) -> bool:
        return bool(strategy.reduce_boolean_decision(bool(ok), all=True))

    def any_true(ok: bool) -> bool:
        return bool(strategy.reduce_boolean_decision(bool(ok), all=False))

    def total(tensor: Any) -> Any:
        return strategy.reduce(tensor, reduce_op="sum")

    base = {"world_size": world, "rank": int(trainer.global_rank), "all_true": all_true, "any_true": any_true}
    dls = _loaders(loaders)
    if loaders is None or (dls and not any(sampler_shards(dl) for dl in dls)):
        return Collectives(split="shard", sum=total, **base)
    rank_zero_warn(
        f"{who}: Lightning gave the forget loader a shuffled DistributedSampler, so each of the {world} processes"
        " unlearns its own share and the batches differ from a one-process run. For weights that do not depend on"
        " the number of processes, pass `use_distributed_sampler=False` to the Trainer (every process then receives"
        " the same batches and takes its share of each) and put sample ids in the batches: `(x, y, id)`."
    )
    return Collectives(split="local", sum=total, gather=strategy.all_gather, **base)


def gradient_scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
    """The precision plugin's ``GradScaler`` ("16-mixed"), or ``None``."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if isinstance(scaler, torch.amp.GradScaler) else None
