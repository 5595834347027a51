"""The JiT objective: the only place where the JiT math lives.

For a batch ``x`` of forget samples, JiT draws ``N`` perturbations ``xi_j`` (Gaussian by default, see
:mod:`lightning_jit.core.noise`) of scale ``sigma`` and estimates the local Lipschitz constant of the model around each
sample:

.. code-block:: text

    x'_j = clamp(x + xi_j)
    k_j  = || f(x) - f(x'_j) ||_2 / || x - x'_j ||_2        (per sample)
    loss = mean over samples and perturbations of k_j       (reduction="mean")
         = sum over samples, mean over perturbations         (reduction="sum", the reference)

As in the authors' reference implementation, ``f`` is the model output (the logits, unit-normalised with
``normalize_logits``), the perturbed outputs are computed without autograd and act as fixed targets, and the
denominator is the *realised* input change after clamping. Where the noise goes is the perturbation site's
(:mod:`lightning_jit.core.site`): the input by default, or a module's output (``x`` then stands for that output).
Unlike the reference, the ``N`` perturbed copies do not go through the model in a Python loop of ``N`` forward
passes: they are stacked and sent through in as few batched, no-grad passes as ``perturbation_chunk`` allows, and the
noise is drawn on the input's device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_jit.core.batch import (
    ModelInput,
    OutputSelector,
    check_forget_input,
    check_logits,
    concat,
    device_of,
    index,
    select_output,
)
from lightning_jit.core.batch import batch_size as count
from lightning_jit.core.checks import choice, integer, positive
from lightning_jit.core.errors import JiTInputError
from lightning_jit.core.noise import NoiseStream, PerturbationSpec
from lightning_jit.core.settings import ClampSpec, PerturbationChunk, Reduction
from lightning_jit.core.site import InputSite, PerturbationSite

#: What ``perturbation_chunk="auto"`` means, measured with ``benchmarks/bench_objective.py`` and
#: ``benchmarks/gpu_check.sh`` (``docs/benchmarks.md``): cache-sized chunks win on a CPU, larger ones on CUDA.
PERTURBATION_CHUNK_BY_DEVICE: dict[str, int] = {"cpu": 256, "cuda": 1024}


def resolve_perturbation_chunk(chunk: PerturbationChunk, device: torch.device) -> int | None:
    """The chunk size for inputs on ``device``: ``"auto"`` becomes the device's measured default.

    Example:
        >>> resolve_perturbation_chunk("auto", torch.device("cpu")), resolve_perturbation_chunk(64, torch.device("cpu"))
        (256, 64)
    """
    if chunk == "auto":
        return PERTURBATION_CHUNK_BY_DEVICE.get(device.type, PERTURBATION_CHUNK_BY_DEVICE["cpu"])
    return chunk  # type: ignore[return-value]


def output_geometry(logits: Tensor, normalize: bool) -> Tensor:
    """The outputs the ratio's numerator compares, in float32: raw, or unit-normalised."""
    out = logits.float()
    return torch.nn.functional.normalize(out, dim=1) if normalize else out


def _clamp_bounds(x: Tensor, clamp: ClampSpec) -> tuple[float, float] | tuple[Tensor, Tensor] | None:
    if clamp is None:
        return None
    if clamp == "batch":
        return x.min(), x.max()
    if isinstance(clamp, (tuple, list)) and len(clamp) == 2 and float(clamp[0]) < float(clamp[1]):
        return float(clamp[0]), float(clamp[1])
    raise JiTInputError(f'`clamp` must be None, "batch" or a (low, high) pair with low < high, got {clamp!r}.')


def _chunks(n_perturbations: int, batch_size: int, chunk: int) -> Iterator[list[tuple[int, int, int]]]:
    """Group the ``N x B`` perturbed samples into chunks of at most ``chunk`` rows.

    Yields lists of ``(j, start, stop)``: perturbation ``j`` for samples ``start:stop``. Rows are ordered by
    perturbation, then sample, so the grouping never changes which noise a sample gets.
    """
    current: list[tuple[int, int, int]] = []
    room = chunk
    for j in range(n_perturbations):
        start = 0
        while start < batch_size:
            stop = min(batch_size, start + room)
            current.append((j, start, stop))
            room -= stop - start
            start = stop
            if room == 0:
                yield current
                current, room = [], chunk
    if current:
        yield current


def jit_objective(
    model: nn.Module | Callable[[Any], Any],
    x: ModelInput,
    sigma: float,
    n_perturbations: int = 25,
    *,
    reduction: Reduction = "mean",
    clamp: ClampSpec = None,
    output_selector: OutputSelector = None,
    generator: torch.Generator | None = None,
    keys: Sequence[Any] | None = None,
    seed: int = 0,
    epoch: int = 0,
    perturbation_chunk: PerturbationChunk = "auto",
    clean_logits: Tensor | None = None,
    normalize_logits: bool = False,
    perturbation: PerturbationSpec = "gaussian",
    site: PerturbationSite | None = None,
) -> Tensor:
    """The JiT loss: a Monte-Carlo estimate of the local Lipschitz constant of ``model`` around each sample of ``x``.

    Gradients flow only through the clean pass ``f(x)``; the ``N`` perturbed passes run under :func:`torch.no_grad`
    in chunks of at most ``perturbation_chunk`` samples, under whatever autocast context is active, and keep no
    activations. The denominator ``||x - x'_j||`` is computed in float32 whatever the precision, so a tiny ``sigma``
    cannot divide by a rounded zero.

    Args:
        model: The classifier (any callable returning logits, or an output ``output_selector`` can read), called on
            ``x`` as one argument.
        x: A floating-point batch of forget inputs, shape ``(B, ...)``; with a module ``site``, any input the model
            takes: token ids, or a dict or tuple of tensors (token ids and their attention mask) that ``model`` takes
            as one argument (e.g. :func:`~lightning_jit.core.batch.input_caller` of the model). Such an input is only
            sliced and joined along the batch dimension: its other fields reach the model unchanged.
        sigma: Standard deviation of the Gaussian perturbations, in the units of ``x``.
        n_perturbations: ``N``, the number of perturbations per sample.
        reduction: ``"mean"`` averages the per-sample ratios over samples and perturbations (the step size then
            does not depend on the batch size). ``"sum"`` sums over samples and averages over perturbations, as the
            reference does, so ``"sum" == B * "mean"``.
        clamp: ``None`` (no clamping), ``"batch"`` (clamp ``x + xi`` to the min/max of the whole batch, as the
            reference does) or explicit ``(low, high)`` bounds.
        output_selector: How to find the logits in the model output; see :func:`select_output`.
        generator: Optional generator for reproducible noise.
        keys: Optional per-sample ids or positions. With ``keys``, sample ``b``'s noise comes from a generator
            seeded by ``(seed, keys[b], epoch)``, so it does not depend on batch composition, order or rank.
        seed: Seed combined with ``keys``.
        epoch: Epoch combined with ``keys``.
        perturbation_chunk: Maximum number of perturbed samples per no-grad forward pass; ``"auto"`` (default)
            chooses by device (:data:`PERTURBATION_CHUNK_BY_DEVICE`: 256 on a CPU, 1024 on CUDA); ``None`` sends all
            ``N * B`` in one pass. Peak memory depends on this, not on ``N``.
        clean_logits: The clean logits ``f(x)`` if the caller already computed them (with autograd).
        normalize_logits: Divide every output by its L2 norm before taking differences, so the objective measures
            how the *direction* of the logits changes. With raw logits, JiT can lower its ratio by inflating the logits
            of a neighbouring class until it swallows the forget samples and many retained ones (the collapse seen in
            practice); the scale-free objective has no such incentive.
        perturbation: The noise distribution (a registered name or a callable, see :mod:`lightning_jit.core.noise`).
        site: Where the noise goes (:mod:`lightning_jit.core.site`): ``None``, the input (then ``x`` must be floating
            point); a :class:`~lightning_jit.core.site.ModuleSite` adds it to a module's output, and the denominator
            is then the noise's norm in that module's space (``sigma`` is in its units, and ``clamp`` must be None).

    Returns:
        A scalar tensor (float32).

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Linear(4, 3)
        >>> loss = jit_objective(net, torch.randn(8, 4), sigma=0.1, n_perturbations=5)
        >>> loss.backward()
        >>> bool(loss > 0) and net.weight.grad is not None
        True
    """
    _check_call(reduction, sigma, n_perturbations, perturbation_chunk)
    device = x.device if isinstance(x, Tensor) else device_of(x)
    perturbation_chunk = resolve_perturbation_chunk(perturbation_chunk, device)
    check_forget_input(x, structured=True)
    site = site if site is not None else InputSite(model if isinstance(model, nn.Module) else None)
    site.admit(x)  # the input site takes one floating-point tensor; a module site any input the model takes
    batch_size = count(x)
    n = int(n_perturbations)
    chunk = n * batch_size if perturbation_chunk is None else int(perturbation_chunk)
    bounds = _clamp_bounds(x, clamp)

    if clean_logits is None:
        clean_logits = select_output(model(x), output_selector)
    clean = output_geometry(check_logits(clean_logits, batch_size), normalize_logits)

    noise: NoiseStream | None = None
    pending: dict[int, Tensor] = {}  # noise of the perturbation indices the current chunk touches
    total = clean.new_zeros((), dtype=torch.float32)
    for group in _chunks(n, batch_size, chunk):
        x_parts = [x if start == 0 and stop == batch_size else index(x, slice(start, stop)) for _, start, stop in group]
        x_rows = x_parts[0] if len(x_parts) == 1 else concat(x_parts)
        n_rows = sum(stop - start for _, start, stop in group)

        def rows_noise(like: Tensor, group: list[tuple[int, int, int]] = group) -> Tensor:
            """The chunk's noise, shaped like its rows in the site's space (drawn when the site asks for it)."""
            nonlocal noise
            if noise is None:
                shape = torch.Size((batch_size, *like.shape[1:]))
                noise = NoiseStream(
                    like,
                    sigma,
                    generator=generator,
                    keys=keys,
                    seed=seed,
                    epoch=epoch,
                    perturbation=perturbation,
                    shape=shape,
                )
            parts = []
            for j, start, stop in group:
                if j not in pending:
                    pending.clear()
                    pending[j] = noise.next()
                whole = start == 0 and stop == batch_size
                parts.append(pending[j] if whole else pending[j][start:stop])
            # The whole chunk at once (elementwise, so the same values as part by part): few ops per chunk.
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        with torch.no_grad(), site.perturbing(x_rows, rows_noise, bounds=bounds) as p:
            perturbed_out = select_output(model(p.inputs), output_selector)
        denominator = p.change()
        perturbed_out = check_logits(perturbed_out, n_rows).detach()
        perturbed_out = output_geometry(perturbed_out, normalize_logits)
        # A chunk is a contiguous run of the (perturbation, sample) rows: row r is sample r mod B.
        first = group[0][0] * batch_size + group[0][1]
        rows = torch.arange(first, first + n_rows, device=device) % batch_size
        numerator = (clean[rows] - perturbed_out).norm(dim=1)
        # A perturbation that clamping undid entirely has no defined ratio: it contributes nothing.
        ratio = torch.where(denominator > 0, numerator / denominator.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        total = total + ratio.sum()

    per_batch = total / n  # sum over samples, mean over perturbations
    return per_batch / batch_size if reduction == "mean" else per_batch


def _check_call(reduction: Any, sigma: Any, n_perturbations: Any, perturbation_chunk: Any) -> None:
    """The same rules as :class:`~lightning_jit.core.settings.JiTSettings`, for direct calls of the objective."""
    choice(("mean", "sum"), '"sum" is the reference\'s per-batch sum.')["check"]("reduction", reduction)
    positive("Try 0.1-1x the input's std.")["check"]("sigma", sigma)
    integer(1)["check"]("n_perturbations", n_perturbations)
    if perturbation_chunk is not None and perturbation_chunk != "auto":
        integer(1, 'Or "auto" or None.')["check"]("perturbation_chunk", perturbation_chunk)
