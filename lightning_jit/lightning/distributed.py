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
from lightning.pytorch.strategies import (
    DDPStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
)
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from lightning_jit.core.run.collectives import Collectives
from lightning_jit.core.weights import is_sharded

#: Precisions the JiT step is tested under. Others run with a warning.
SUPPORTED_PRECISIONS = ("32-true", "32", "64-true", "bf16-mixed", "16-mixed")
#: Strategies JiT supports, by user-facing name: :class:`~lightning.pytorch.strategies.DDPStrategy`, single-device
#: strategies, and :class:`~lightning.pytorch.strategies.ModelParallelStrategy` as FSDP2 only (its
#: ``tensor_parallel_size=1``). Lightning's FSDP1 ``FSDPStrategy`` is refused (see :func:`check_strategy_support`).
SUPPORTED_STRATEGIES = (
    "auto",
    "single_device",
    "ddp",
    "ddp_spawn",
    "ddp_fork",
    "ddp_find_unused_parameters_true",
    "ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)",
)
#: What to use instead of a refused sharded strategy.
_SHARD_INSTEAD = (
    " To shard the model, use `ModelParallelStrategy(data_parallel_size=<devices>, tensor_parallel_size=1)` (FSDP2:"
    " JiTUnlearning applies `fully_shard` itself, a callback's module in its `configure_model`); if the model fits"
    " on one device, `strategy='ddp'`."
)


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
        "Lightning's FSDPStrategy (FSDP1) runs only on GPUs, and on a GPU its backward failed after the JiT step's"
        ' no-grad perturbed passes ("Expects BACKWARD_PRE or BACKWARD_POST state"; benchmarks/gpu_check.sh probes it'
        " again, see docs/scale.md)"
    ),
    "XLAStrategy": "XLA devices are not verified",
    "SingleDeviceXLAStrategy": "XLA devices are not verified",
}


def check_strategy_support(strategy: Strategy, who: str = "JiTUnlearning") -> None:
    """Refuse a strategy the JiT step does not support, naming it, why, and what to use instead.

    Supported: one device, and every :class:`~lightning.pytorch.strategies.DDPStrategy` (``"ddp"``,
    ``"ddp_spawn"``, ``"ddp_fork"``, ``"ddp_find_unused_parameters_true"``), on any number of nodes. Sharded
    strategies other than FSDP2 (DeepSpeed, FSDP1) and XLA are refused by name, also through subclasses; any other
    strategy is refused as not verified.

    Sharded models run under :class:`~lightning.pytorch.strategies.ModelParallelStrategy` used as FSDP2
    (``tensor_parallel_size=1``; tensor parallelism is refused): the wrapper applies ``fully_shard`` itself
    (:func:`shard_model`), a callback's module applies it in its own ``configure_model``. Lightning's
    ``FSDPStrategy`` (FSDP1) is refused: it runs only on GPUs, and its backward failed after the perturbed passes
    on a GPU. ``benchmarks/gpu_check.sh`` probes it again; ``LIGHTNING_JIT_EXPERIMENTAL_FSDP=1`` lets it run.

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
            instead = (
                _SHARD_INSTEAD
                if cls.__name__ == "FSDPStrategy"
                else " Use `strategy='ddp'` (or 'ddp_spawn') or one device; the model must fit on one device."
            )
            raise MisconfigurationException(
                f"{who} does not support the {type(strategy).__name__}{kind} strategy: {reason}.{instead}"
            )
    if isinstance(strategy, ModelParallelStrategy):
        tensor_parallel = _tensor_parallel_size(strategy)
        if tensor_parallel > 1:
            raise MisconfigurationException(
                f"{who} supports `ModelParallelStrategy` as FSDP2 only, but it was given tensor_parallel_size="
                f"{strategy._tensor_parallel_size!r} ('auto' is the number of devices on a node). JiT's perturbed"
                " passes, per-sample ids and verification split the batch across data-parallel processes, which"
                " tensor parallelism does not have. Pass `ModelParallelStrategy(data_parallel_size=<devices>,"
                " tensor_parallel_size=1)`."
            )
        return
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise MisconfigurationException(
            f"{who} does not support the strategy {strategy_name(strategy)!r}. Supported strategies:"
            f" {', '.join(SUPPORTED_STRATEGIES)} (with any `num_nodes`). The model must fit on one device."
        )


def _tensor_parallel_size(strategy: ModelParallelStrategy) -> int:
    """The tensor-parallel size: from the device mesh once processes are up, else from the arguments ("auto" is the
    number of devices of a node)."""
    mesh = getattr(strategy, "_device_mesh", None)
    if mesh is not None:
        return int(mesh["tensor_parallel"].size())
    size = strategy._tensor_parallel_size
    if size == "auto":  # the devices of a node; before the Trainer gives them, unknown: counted as parallel
        return len(strategy.parallel_devices) if strategy.parallel_devices else 2
    return int(size)


def check_strategy(trainer: pl.Trainer, who: str = "JiTUnlearning") -> None:
    """At setup: refuse an unsupported strategy (:func:`check_strategy_support`), warn about an untested precision.

    Under ``ModelParallelStrategy`` with checkpointing on, the checkpoints must go through the Trainer's checkpoint
    IO (``save_distributed_checkpoint=False``), which is where unverified checkpoints are held back.

    Raises:
        MisconfigurationException: naming the unsupported strategy.
    """
    check_strategy_support(trainer.strategy, who)
    strategy = trainer.strategy
    if (
        isinstance(strategy, ModelParallelStrategy)
        and strategy._save_distributed_checkpoint
        and trainer.checkpoint_callbacks
    ):
        raise MisconfigurationException(
            f"{who} under `ModelParallelStrategy(save_distributed_checkpoint=True)` (its default) cannot hold back"
            " the unverified checkpoints of a run: sharded checkpoints bypass the Trainer's checkpoint IO. Pass"
            " `ModelParallelStrategy(..., save_distributed_checkpoint=False)` (rank 0 writes one full checkpoint),"
            " or `Trainer(enable_checkpointing=False)`."
        )
    precision = str(getattr(trainer.precision_plugin, "precision", trainer.precision))
    if precision not in SUPPORTED_PRECISIONS:
        rank_zero_warn(
            f"{who} is tested under the precisions {SUPPORTED_PRECISIONS}, not {precision!r}; check the result."
        )


def shard_model(model: nn.Module, mesh: Any, min_fraction: float = 1 / 16) -> None:
    """Apply PyTorch's ``fully_shard`` (FSDP2) to ``model`` over ``mesh``, in place: the default sharding of the
    wrapper under ``ModelParallelStrategy``.

    Every submodule whose parameters (those not already in a sharded submodule) reach ``min_fraction`` of the
    model's is sharded as one unit, deepest first, then the model itself with what is left: so a stack of blocks is
    gathered one block at a time. Every unit, the root included, frees its gathered parameters after each forward
    (``reshard_after_forward=True``), so an in-place change to the shards between passes is seen by the next one.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> shard_model(net, mesh=None) if torch.distributed.is_initialized() else None
    """
    from torch.distributed.fsdp import fully_shard

    if is_sharded(model):
        return
    total = sum(p.numel() for p in model.parameters())
    threshold = max(1.0, total * min_fraction)

    def visit(module: nn.Module) -> int:
        pending = sum(p.numel() for p in module.parameters(recurse=False))
        pending += sum(visit(child) for child in module.children())
        if module is not model and pending >= threshold:
            fully_shard(module, mesh=mesh, reshard_after_forward=True)
            return 0
        return pending

    visit(model)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)


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
