"""The perturbations JiT draws: a registry of distributions, and the stream that draws them reproducibly.

A perturbation is a function that draws *unit-scale* noise, ``fn(shape, generator, device, dtype) -> Tensor``; JiT
multiplies it by ``sigma``. ``"gaussian"`` (the paper's) is the default. A new distribution is one function::

    from lightning_jit.core.noise import register_perturbation

    @register_perturbation("rademacher")
    def rademacher(shape, generator, device, dtype):
        return torch.randint(0, 2, shape, generator=generator, device=device).to(dtype) * 2 - 1

and then ``JiTSettings(perturbation="rademacher")`` (or ``--jit.perturbation=rademacher``) uses it. A callable may
also be given directly as ``perturbation``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_jit.core.errors import JiTInputError, JiTSettingError

#: ``fn(shape, generator, device, dtype) -> Tensor`` of unit-scale noise; ``generator`` may be ``None`` (global RNG).
Perturbation = Callable[[torch.Size, torch.Generator | None, torch.device, torch.dtype], Tensor]
PerturbationSpec = str | Perturbation

PERTURBATIONS: dict[str, Perturbation] = {}


def register_perturbation(name: str) -> Callable[[Perturbation], Perturbation]:
    """Register a perturbation under ``name`` (a decorator), so that settings can name it.

    Raises:
        JiTSettingError: if ``name`` is taken or not an identifier.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise JiTSettingError("perturbation", f"names must be identifiers, got {name!r}.")

    def add(fn: Perturbation) -> Perturbation:
        if name in PERTURBATIONS and PERTURBATIONS[name] is not fn:
            raise JiTSettingError("perturbation", f"{name!r} is registered already.")
        PERTURBATIONS[name] = fn
        return fn

    return add


@register_perturbation("gaussian")
def gaussian(shape: torch.Size, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Standard normal noise, ``N(0, I)``: the paper's perturbation."""
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def resolve_perturbation(spec: PerturbationSpec) -> Perturbation:
    """The function a ``perturbation`` setting names.

    Raises:
        JiTSettingError: naming ``perturbation`` and the registered names, for an unknown one.

    Example:
        >>> resolve_perturbation("gaussian") is gaussian
        True
    """
    if callable(spec):
        return spec
    if isinstance(spec, str) and spec in PERTURBATIONS:
        return PERTURBATIONS[spec]
    raise JiTSettingError(
        "perturbation",
        f"must be one of {sorted(PERTURBATIONS)} or a callable `fn(shape, generator, device, dtype)`, got {spec!r}."
        " Register a new one with `lightning_jit.core.noise.register_perturbation`.",
    )


def sample_seed(seed: int, key: Any, epoch: int = 0) -> int:
    """A 63-bit seed for one sample's noise, derived from ``(seed, key, epoch)`` and nothing else.

    The key is a sample id or position, so the same sample gets the same noise whichever rank or batch it lands in.

    Example:
        >>> sample_seed(0, 17) == sample_seed(0, 17) and sample_seed(0, 17) != sample_seed(0, 18)
        True
    """
    digest = hashlib.blake2b(repr((int(seed), str(key), int(epoch))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class NoiseStream:
    """Draws the noise ``sigma * xi_j`` of shape ``x.shape`` (or ``shape``: e.g. a module's output for a batch, in
    the device and dtype of ``x``), one perturbation index ``j`` at a time.

    Drawing one perturbation at a time keeps the memory for noise independent of ``N``. Three sources:

    * ``generator=None, keys=None``: the global RNG on ``x``'s device;
    * ``generator``: a :class:`torch.Generator` (drawn on its device, then moved to ``x``'s device);
    * ``keys`` and ``seed``: one generator per sample, seeded by :func:`sample_seed`, so that a sample's noise does
      not depend on the batch or rank it is in.

    Example:
        >>> x = torch.zeros(3, 2)
        >>> a = NoiseStream(x, 0.5, keys=[0, 1, 2]).next()
        >>> b = NoiseStream(x[1:], 0.5, keys=[1, 2]).next()
        >>> torch.equal(a[1:], b)
        True
    """

    def __init__(
        self,
        x: Tensor,
        sigma: float,
        generator: torch.Generator | None = None,
        keys: Sequence[Any] | None = None,
        seed: int = 0,
        epoch: int = 0,
        perturbation: PerturbationSpec = "gaussian",
        shape: torch.Size | None = None,
    ) -> None:
        self.shape = x.shape if shape is None else torch.Size(shape)
        self.sigma = float(sigma)
        self.device = x.device
        self.dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        self.draw = resolve_perturbation(perturbation)
        self.generator = generator
        self.sample_generators: list[torch.Generator] | None = None
        if keys is not None:
            if len(keys) != self.shape[0]:
                raise JiTInputError(f"`keys` has {len(keys)} entries for a batch of {self.shape[0]} samples.")
            gen_device = "cuda" if self.device.type == "cuda" else "cpu"
            self.sample_generators = []
            for key in keys:
                g = torch.Generator(device=gen_device)
                g.manual_seed(sample_seed(seed, key, epoch))
                self.sample_generators.append(g)

    def next(self) -> Tensor:
        """The noise for the next perturbation index, shape ``x.shape``."""
        if self.sample_generators is not None:
            draws = [self.draw(self.shape[1:], g, g.device, self.dtype) for g in self.sample_generators]
            noise = torch.stack(draws).to(self.device)
        elif self.generator is not None:
            noise = self.draw(self.shape, self.generator, self.generator.device, self.dtype).to(self.device)
        else:
            noise = self.draw(self.shape, None, self.device, self.dtype)
        return noise.mul_(self.sigma)
