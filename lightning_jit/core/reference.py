"""The original model, frozen: :class:`FrozenReference`, and :func:`call_with_state`, a forward with weights that
are not the module's own (sharded modules included)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_jit.core.batch import ModelInput, call_model, device_of
from lightning_jit.core.weights import is_sharded, local_shard, normalization_mode, reshard


class FrozenReference:
    """The original model, frozen, for the retain terms (:func:`logit_norm_penalty`, probe distillation).

    It keeps a copy of ``module``'s parameters and buffers as they are now and evaluates ``module`` with them
    (``torch.func.functional_call``) in eval mode, without autograd, however ``module`` changes later. It holds one
    extra copy of the weights; the module object itself is shared, not copied.

    Under sharding (``fully_shard``, FSDP2) the copy is of this process's shards, and a call loads them into the
    module in place for its forward and puts the current shards back after it: the sharded module gathers its
    parameters itself, so ``functional_call`` would evaluate the current weights instead.

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> frozen = FrozenReference(net)
        >>> x = torch.ones(1, 2)
        >>> before = net(x).detach()
        >>> with torch.no_grad():
        ...     _ = net.weight.add_(1.0)
        >>> torch.equal(frozen(x), before)
        True
    """

    #: It takes the model's input as one argument: a dict or tuple input is unpacked as ``unpack`` says.
    takes_model_input = True

    def __init__(self, module: nn.Module, unpack: bool = True) -> None:
        self.module = module
        #: A dict input goes in as keyword arguments and a tuple as positional ones (``False``: as one argument).
        self.unpack = unpack
        self.state = {
            name: tensor.detach().clone() for name, tensor in [*module.named_parameters(), *module.named_buffers()]
        }

    @classmethod
    def from_state(
        cls, module: nn.Module, state: dict[str, Tensor], device: torch.device, unpack: bool = True
    ) -> FrozenReference:
        """The frozen ``module`` with the parameters and buffers ``state`` (as :attr:`state` saved them)."""
        reference = cls.__new__(cls)
        reference.module = module
        reference.unpack = unpack
        reference.state = {name: tensor.to(device) for name, tensor in state.items()}
        return reference

    @torch.no_grad()
    def __call__(self, x: ModelInput) -> Any:
        return self.differentiable(x)

    def differentiable(self, x: ModelInput) -> Any:
        """The same forward with autograd left as it is, so that gradients can flow to ``x`` (the weights are
        detached copies: they never receive one). Used to synthesise class probes from the original model.

        The copy follows the inputs' device: the first call on another device moves it there once."""
        if not is_sharded(self.module):
            first = next(iter(self.state.values()), None)
            device = x.device if isinstance(x, Tensor) else device_of(x)
            if first is not None and first.device != device:
                self.state = {name: tensor.to(device) for name, tensor in self.state.items()}
        with normalization_mode(self.module, "eval"):
            return call_with_state(self.module, self.state, x, self.unpack)


def call_with_state(module: nn.Module, state: dict[str, Tensor], x: ModelInput, unpack: bool = True) -> Any:
    """``module(x)`` (a dict or tuple input unpacked as :func:`~lightning_jit.core.batch.call_model` does, with
    ``unpack``) evaluated with the parameters and buffers in ``state`` (keyed by name) instead of its own, which
    are left as they are; autograd is left as it is.

    ``torch.func.functional_call``, except for a sharded module (``fully_shard``, FSDP2), which gathers its
    parameters itself and would evaluate its current weights: there ``state`` holds this process's shards, and they
    are loaded in place for the forward and the current ones put back after it.

    Example:
        >>> net = torch.nn.Linear(1, 1, bias=False)
        >>> call_with_state(net, {"weight": torch.full((1, 1), 3.0)}, torch.ones(1, 1)).item()
        3.0
    """
    if not is_sharded(module):
        if unpack and isinstance(x, Mapping):
            return torch.func.functional_call(module, state, (), dict(x))
        if unpack and isinstance(x, (tuple, list)):
            return torch.func.functional_call(module, state, tuple(x))
        return torch.func.functional_call(module, state, (x,))
    named = [*module.named_parameters(), *module.named_buffers()]
    held = [(local_shard(t), local_shard(state[name])) for name, t in named if name in state]
    with torch.no_grad():
        current = [mine.clone() for mine, _ in held]
        reshard(module)
        for mine, frozen in held:
            mine.copy_(frozen)
    try:
        return call_model(module, x, unpack)
    finally:
        with torch.no_grad():
            reshard(module)
            for (mine, _), now in zip(held, current, strict=True):
                mine.copy_(now)
