"""Information of a sample, alpha(x) (Definition 4.2 of the JiT paper).

``alpha(x)`` is the share of ``x``'s neighbours that carry ``x``'s label: among its ``k`` nearest neighbours, or
among all samples within a radius ``r``. The sample itself is never its own neighbour (it is excluded by index, so
exact duplicates still count). A high alpha means the neighbourhood already tells the label: the sample carries
**little information** and is easy to forget. A low alpha (``alpha < tau``) means **high information**: the sample
cannot be inferred from its context, and the paper's central claim is that such samples are harder to forget.

Distances are Euclidean, in input space or in any feature space (``feature_fn``; see :func:`layer_features` for a
model layer). Everything is batched with ``torch.cdist`` / ``topk`` over row blocks: there is no Python loop over
samples, and the memory used is ``block x N``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_jit.core.weights import normalization_mode

#: Rows of the distance matrix computed at once.
DEFAULT_BLOCK = 2048


class InformationSplit(NamedTuple):
    """Boolean masks of the low- (``alpha >= tau``) and high-information (``alpha < tau``) samples."""

    low: Tensor
    high: Tensor


def check_tau(tau: float) -> float:
    """Validate the information threshold: ``tau`` must lie in ``(0, 1]``."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 < float(tau) <= 1.0:
        raise MisconfigurationException(
            f"`tau` must be a number in (0, 1], got {tau!r}. It is the share of same-label neighbours below which a"
            " sample counts as high-information (the paper uses e.g. 0.5)."
        )
    return float(tau)


@torch.no_grad()
def sample_information(
    x: Tensor,
    y: Tensor,
    k: int = 10,
    radius: float | None = None,
    feature_fn: Callable[[Tensor], Tensor] | None = None,
    *,
    queries: Tensor | None = None,
    block_size: int = DEFAULT_BLOCK,
) -> Tensor:
    """alpha(x): the share of each sample's neighbours that carry its label.

    Args:
        x: The samples, ``(N, ...)``; they are flattened to ``(N, D)`` (after ``feature_fn``, if given).
        y: Their integer labels, ``(N,)``.
        k: Number of nearest neighbours (used when ``radius`` is ``None``). Must be ``< N``.
        radius: If set, use every sample within this Euclidean distance instead of the ``k`` nearest. A sample with
            no neighbour within the radius gets ``NaN``.
        feature_fn: Optional map from a batch of ``x`` to features (e.g. :func:`layer_features`); distances are then
            measured in that space.
        queries: Optional indices (or a boolean mask) of the samples to score; all of ``x`` is still the pool of
            neighbours. Default: score every sample.
        block_size: Rows of the distance matrix computed at once.

    Returns:
        A float tensor of alpha values in ``[0, 1]``, one per query.

    Example:
        >>> x = torch.tensor([[0.0], [0.1], [0.2], [5.0], [5.1], [0.15]])
        >>> y = torch.tensor([0, 0, 0, 1, 1, 1])  # the last sample is a "1" among "0"s
        >>> sample_information(x, y, k=1)
        tensor([1., 0., 0., 1., 1., 0.])
        >>> sample_information(x, y, radius=0.3)  # the 0.0 sample sees 0.1, 0.2 and the 1 at 0.15
        tensor([0.6667, 0.6667, 0.6667, 1.0000, 1.0000, 0.0000])
    """
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise MisconfigurationException("`x` and `y` must be tensors.")
    if x.shape[0] == 0:
        raise MisconfigurationException("`x` is empty: alpha needs at least two samples.")
    if y.dim() != 1 or y.shape[0] != x.shape[0] or torch.is_floating_point(y):
        raise MisconfigurationException(
            f"`y` must be a 1-D integer tensor with one label per sample ({x.shape[0]}), got {tuple(y.shape)}."
        )
    features = x if feature_fn is None else _features_in_blocks(feature_fn, x, block_size)
    features = features.reshape(features.shape[0], -1).float()
    n = features.shape[0]
    if radius is None:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 < k < n:
            raise MisconfigurationException(
                f"`k` must be an integer in [1, {n - 1}] (fewer than the samples), got {k!r}."
            )
    elif not radius > 0:
        raise MisconfigurationException(f"`radius` must be positive, got {radius!r}.")
    if queries is None:
        index = torch.arange(n, device=features.device)
    else:
        queries = torch.as_tensor(queries, device=features.device)
        index = queries.nonzero().flatten() if queries.dtype == torch.bool else queries.long().flatten()
    y = y.to(features.device)
    out = []
    for start in range(0, index.numel(), block_size):
        rows = index[start : start + block_size]
        dist = torch.cdist(features[rows], features)
        dist[torch.arange(rows.numel(), device=dist.device), rows] = float("inf")  # never your own neighbour
        same = y[rows].unsqueeze(1)
        if radius is None:
            nearest = dist.topk(k, dim=1, largest=False).indices
            out.append((y[nearest] == same).float().mean(1))
        else:
            within = dist <= radius
            count = within.sum(1)
            agree = (within & (y.unsqueeze(0) == same)).sum(1)
            nan = torch.full_like(agree, float("nan"), dtype=torch.float)
            out.append(torch.where(count > 0, agree.float() / count.clamp_min(1), nan))
    return torch.cat(out) if out else torch.zeros(0)


def _features_in_blocks(fn: Callable[[Tensor], Tensor], x: Tensor, block_size: int) -> Tensor:
    return torch.cat([fn(x[i : i + block_size]).detach() for i in range(0, x.shape[0], block_size)])


def split_by_information(alpha: Tensor, tau: float = 0.5) -> InformationSplit:
    """Split samples into low information (``alpha >= tau``) and high information (``alpha < tau``).

    Samples whose alpha is NaN (no neighbour within the radius) are in neither group.

    Example:
        >>> split_by_information(torch.tensor([1.0, 0.2, 0.5]), tau=0.5)
        InformationSplit(low=tensor([ True, False,  True]), high=tensor([False,  True, False]))
    """
    tau = check_tau(tau)
    alpha = torch.as_tensor(alpha)
    return InformationSplit(low=alpha >= tau, high=alpha < tau)


def layer_features(model: nn.Module, layer: str | nn.Module) -> Callable[[Tensor], Tensor]:
    """A ``feature_fn`` that runs ``model`` (in eval mode, no grad) and returns the output of ``layer``.

    Args:
        model: The model.
        layer: A submodule or its dotted name in ``model.named_modules()`` (e.g. ``"features"``).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        >>> layer_features(net, "1")(torch.randn(5, 4)).shape
        torch.Size([5, 3])
    """
    if isinstance(layer, str):
        modules = dict(model.named_modules())
        if layer not in modules:
            names = [n for n in modules if n][:12]
            raise MisconfigurationException(
                f"`feature_layer={layer!r}` is not a submodule of {type(model).__name__}. Some names: {names}."
            )
        module = modules[layer]
    elif isinstance(layer, nn.Module):
        module = layer
    else:
        raise MisconfigurationException(
            f"`feature_layer` must be a module name or an nn.Module, got {type(layer).__name__}."
        )

    def fn(batch: Tensor) -> Tensor:
        captured: list[Tensor] = []

        def hook(_m: nn.Module, _i: object, output: object) -> None:
            captured.append(output[0] if isinstance(output, (tuple, list)) else output)  # type: ignore[arg-type]

        handle = module.register_forward_hook(hook)
        try:
            with torch.no_grad(), normalization_mode(model, "eval"):
                device = next((p.device for p in model.parameters()), batch.device)
                model(batch.to(device))
        finally:
            handle.remove()
        if not captured:
            raise MisconfigurationException(f"`feature_layer` {layer!r} was not called in the model's forward pass.")
        return captured[0].reshape(batch.shape[0], -1)

    return fn


__all__ = ["InformationSplit", "check_tau", "layer_features", "sample_information", "split_by_information"]
