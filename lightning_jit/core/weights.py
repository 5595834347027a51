"""The model's weights during a run: snapshots, finiteness checks, trainable parameters and the train/eval mode."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn


class WeightSnapshot:
    """A copy of every parameter and buffer of a module, restorable bit for bit.

    Example:
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

    @classmethod
    def from_state(cls, state: dict[str, Tensor], device: torch.device | None = None) -> WeightSnapshot:
        """A snapshot holding ``state`` (e.g. one saved in a checkpoint), moved to ``device``."""
        snapshot = cls.__new__(cls)
        snapshot.state = {k: v.to(device) if device is not None else v for k, v in state.items()}
        return snapshot

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Overwrite the snapshot with the module's current values, in place (no new memory)."""
        for key, tensor in module.state_dict(keep_vars=True).items():
            self.state[key].copy_(tensor.detach())

    @torch.no_grad()
    def restore(self, module: nn.Module) -> None:
        for key, tensor in module.state_dict(keep_vars=True).items():
            tensor.data.copy_(self.state[key])
        reshard(module)  # a sharded module's next forward gathers the restored shards

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
    return tensors_finite(list(module.state_dict().values()))


def tensors_finite(tensors: list[Tensor]) -> bool:
    """Whether every floating-point value of ``tensors`` is finite, by one sum per tensor (accumulated in float32, or
    float64 for float64 tensors): a NaN or an Inf makes its tensor's sum non-finite. That is one reduction instead of an
    element-wise check and its boolean copy; values so large that their sum overflows float32 count as not finite.

    Example:
        >>> tensors_finite([torch.ones(3), torch.tensor([1.0, float("inf")])])
        False
        >>> tensors_finite([torch.tensor([float("inf"), -float("inf")])])  # inf - inf is NaN
        False
        >>> tensors_finite([torch.full((4,), 6e4, dtype=torch.float16)])  # half values whose sum overflows half
        True
    """
    sums = [
        t.detach().sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32).double()
        for t in tensors
        if torch.is_floating_point(t)
    ]
    if not sums:
        return True
    device = sums[0].device
    return bool(torch.stack([v.to(device) for v in sums]).isfinite().all())


def is_sharded(module: nn.Module) -> bool:
    """Whether some parameter of ``module`` is sharded across processes (a ``DTensor``, as PyTorch's
    ``fully_shard`` (FSDP2) and tensor parallelism leave them): each process then holds only its shard.

    Example:
        >>> is_sharded(torch.nn.Linear(2, 2))
        False
    """
    return any(_is_dtensor(p) for p in module.parameters())


def local_shard(tensor: Tensor) -> Tensor:
    """The part of ``tensor`` this process holds: a ``DTensor``'s local shard (its storage, so that an in-place
    change reaches the parameter), any other tensor itself."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def reshard(module: nn.Module) -> None:
    """Free the gathered copies of ``fully_shard``-ed (FSDP2) submodules, so that their next forward all-gathers the
    shards as they are now (after an in-place change to them). A no-op for a module that is not sharded."""
    for sub in module.modules():
        free = getattr(sub, "reshard", None)
        if callable(free) and type(sub).__name__.startswith("FSDP"):
            free()


def _is_dtensor(tensor: object) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters JiT updates: those with ``requires_grad``."""
    return [p for p in model.parameters() if p.requires_grad]


def gradients_finite(params: list[nn.Parameter]) -> bool:
    """Whether every gradient of ``params`` is finite, in one fused pass per device and dtype (as GradScaler checks)."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return True
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    flags = []
    try:
        for (device, _), group in groups.items():
            found = torch.zeros(1, device=device)
            # Unscaling by 1 changes nothing; the fused kernel only records whether a value was not finite.
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, torch.ones(1, device=device))
            flags.append(found)
    except (RuntimeError, NotImplementedError, AttributeError):  # a dtype or device the fused check does not take
        return bool(torch.stack([g.float().isfinite().all() for g in grads]).all())
    return not bool(torch.cat([f.to(grads[0].device) for f in flags]).any())


@contextlib.contextmanager
def normalization_mode(model: nn.Module, policy: str) -> Iterator[None]:
    """Put ``model`` in the mode the normalisation policy asks for, and restore every submodule's mode afterwards.

    ``"eval"``: BatchNorm uses (and keeps) its running statistics and dropout is off, so the noise never changes
    BatchNorm buffers. ``"train"``: the model stays in train mode, as in the reference.
    """
    want = policy == "train"
    modes = [(m, m.training) for m in model.modules()]
    changed = any(training != want for _, training in modes)  # usually not: then there is nothing to do per step
    try:
        if changed:
            model.train(want)
        yield
    finally:
        if changed:
            for module, training in modes:
                module.training = training
