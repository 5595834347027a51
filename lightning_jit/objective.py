"""The JiT objective: the only place where the JiT math lives.

For a batch ``x`` of forget samples, JiT draws ``N`` Gaussian perturbations ``xi_j ~ N(0, sigma^2 I)`` and
estimates the local Lipschitz constant of the model around each sample:

.. code-block:: text

    x'_j = clamp(x + xi_j)
    k_j  = || f(x) - f(x'_j) ||_2 / || x - x'_j ||_2        (per sample)
    loss = mean over samples and perturbations of k_j       (reduction="mean")
         = sum over samples, mean over perturbations         (reduction="sum", the reference)

As in the authors' reference implementation, ``f`` is the raw model output (the logits), the perturbed outputs are
computed without autograd and act as fixed targets, and the denominator is the *realised* input change after
clamping. Unlike the reference, the ``N`` perturbed copies do not go through the model in a Python loop of ``N``
forward passes: they are stacked and sent through in as few batched, no-grad passes as ``perturbation_chunk``
allows, and the noise is drawn on the input's device.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

Reduction = Literal["mean", "sum"]
ClampSpec = Literal["batch"] | tuple[float, float] | None
OutputSelector = int | str | Callable[[Any], Tensor] | None

#: How many perturbed samples go through the model in one no-grad forward pass: an integer, ``None`` (all ``N * B`` at
#: once) or ``"auto"`` (the default: by the input's device, :data:`PERTURBATION_CHUNK_BY_DEVICE`).
PerturbationChunk = int | Literal["auto"] | None
DEFAULT_PERTURBATION_CHUNK: PerturbationChunk = "auto"
#: What ``"auto"`` means, measured with ``benchmarks/bench_objective.py`` and ``benchmarks/gpu_check.sh``
#: (docs/benchmarks.md), ResNet18 (3x32x32), batch 128, N=25:
#:
#: * CPU (2 cores): 256 was the fastest of 128/256/1024/4096/all for both the digits CNN and ResNet18; one pass of all
#:   3,200 copies was ~1.6x slower (cache-sized activations win on a CPU);
#: * CUDA (one H200): 1024 took 0.032 s per step against 0.072 s with 256 (2.2x faster); ViT-B/16 (224x224) was the same
#:   with either. All at once was faster still for ResNet18 (0.022 s), but its memory grows with ``N * B``.
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


class JiTInputError(ValueError):
    """Raised when a forget batch cannot be used by the JiT objective (wrong dtype, non-finite values, ...)."""


def select_output(output: Any, selector: OutputSelector = None) -> Tensor:
    """Pick the logits out of whatever the model's forward returns.

    Args:
        output: The model output: a tensor, a tuple/list, a dict, or any object.
        selector: ``None`` for a tensor output, or for a tuple/list/dict whose logits are the first item or under the
            ``"logits"`` key; an ``int`` index into a tuple/list; a ``str`` key into a dict (or attribute name);
            or a callable that maps the output to the logits tensor.

    Returns:
        The selected tensor.

    Example:
        >>> import torch
        >>> select_output({"logits": torch.ones(2, 3), "aux": 0}).shape
        torch.Size([2, 3])
        >>> select_output((torch.zeros(2, 5), None), 0).shape
        torch.Size([2, 5])
    """
    if callable(selector):
        return selector(output)
    if selector is None:
        if isinstance(output, Tensor):
            return output
        if isinstance(output, (tuple, list)) and output:
            return output[0]
        if isinstance(output, dict) and "logits" in output:
            return output["logits"]
        if hasattr(output, "logits"):
            return output.logits
        raise JiTInputError(
            f"`output_selector` is needed: the model returned a {type(output).__name__}, and JiT needs the logits"
            " tensor. Pass an int index, a dict key or a callable as `output_selector`."
        )
    if isinstance(selector, int):
        return output[selector]
    if isinstance(output, dict):
        return output[selector]
    return getattr(output, selector)


def _check_logits(logits: Any, batch_size: int) -> Tensor:
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != batch_size:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise JiTInputError(
            f"The model output selected by `output_selector` must be a (batch, classes) tensor with batch={batch_size},"
            f" got {shape}. Pass an `output_selector` that returns the logits."
        )
    return logits


def check_forget_input(x: Any) -> Tensor:
    """Validate one batch of forget inputs before anything is computed from it.

    Raises:
        JiTInputError: if ``x`` is not a floating-point tensor with a batch dimension, or holds NaN or Inf.
    """
    if not isinstance(x, Tensor):
        raise JiTInputError(
            f"The forget batch input must be a tensor, got {type(x).__name__}. Set `input_key` or `batch_to_input`"
            " so that the input tensor can be found in the batch."
        )
    if x.dim() < 2 or x.shape[0] == 0:
        raise JiTInputError(
            f"The forget batch input must have shape (batch, ...) with batch >= 1, got {tuple(x.shape)}."
        )
    if not torch.is_floating_point(x):
        raise JiTInputError(
            f"The forget batch input has dtype {x.dtype}; JiT perturbs inputs with Gaussian noise and needs floating"
            " point inputs. Convert them (and normalise them as the model expects) in the dataset or `batch_to_input`."
        )
    if not torch.isfinite(x).all():
        raise JiTInputError("The forget batch input contains NaN or Inf; clean the forget set before unlearning.")
    return x


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
    """Draws the noise ``xi_j`` of shape ``x.shape``, one perturbation index ``j`` at a time.

    Drawing one perturbation at a time keeps the memory for noise independent of ``N``. Three sources:

    * ``generator=None, keys=None``: the global RNG on ``x``'s device;
    * ``generator``: a user :class:`torch.Generator` (drawn on its device, then moved to ``x``'s device);
    * ``keys`` and ``seed``: one generator per sample, seeded by :func:`sample_seed`, so that a sample's noise does
      not depend on the batch or rank it is in.
    """

    def __init__(
        self,
        x: Tensor,
        sigma: float,
        generator: torch.Generator | None = None,
        keys: Sequence[Any] | None = None,
        seed: int = 0,
        epoch: int = 0,
    ) -> None:
        self.shape = x.shape
        self.sigma = float(sigma)
        self.device = x.device
        self.dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        self.generator = generator
        self.sample_generators: list[torch.Generator] | None = None
        if keys is not None:
            if len(keys) != x.shape[0]:
                raise JiTInputError(f"`keys` has {len(keys)} entries for a batch of {x.shape[0]} samples.")
            gen_device = "cuda" if self.device.type == "cuda" else "cpu"
            self.sample_generators = []
            for key in keys:
                g = torch.Generator(device=gen_device)
                g.manual_seed(sample_seed(seed, key, epoch))
                self.sample_generators.append(g)

    def next(self) -> Tensor:
        """The noise for the next perturbation index, shape ``x.shape``."""
        if self.sample_generators is not None:
            draws = [
                torch.randn(self.shape[1:], generator=g, device=g.device, dtype=self.dtype)
                for g in self.sample_generators
            ]
            noise = torch.stack(draws).to(self.device)
        elif self.generator is not None:
            noise = torch.randn(self.shape, generator=self.generator, device=self.generator.device, dtype=self.dtype)
            noise = noise.to(self.device)
        else:
            noise = torch.randn(self.shape, device=self.device, dtype=self.dtype)
        return noise.mul_(self.sigma)


def _output_geometry(logits: Tensor, center: bool, normalize: bool) -> Tensor:
    """The outputs the ratio's numerator compares, in float32: raw, centred over classes, and/or unit-normalised."""
    out = logits.float()
    if center:
        out = out - out.mean(dim=1, keepdim=True)
    if normalize:
        out = torch.nn.functional.normalize(out, dim=1)
    return out


def _is_count(value: Any) -> bool:
    """An integer >= 1 (a bool or a float like 2.5 is not)."""
    try:
        return not isinstance(value, bool) and operator.index(value) >= 1
    except TypeError:
        return False


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
    model: nn.Module | Callable[[Tensor], Any],
    x: Tensor,
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
    perturbation_chunk: PerturbationChunk = DEFAULT_PERTURBATION_CHUNK,
    clean_logits: Tensor | None = None,
    center_logits: bool = False,
    normalize_logits: bool = False,
) -> Tensor:
    """The JiT loss: a Monte-Carlo estimate of the local Lipschitz constant of ``model`` around each sample of ``x``.

    Gradients flow only through the clean pass ``f(x)``; the ``N`` perturbed passes run under :func:`torch.no_grad`
    in chunks of at most ``perturbation_chunk`` samples, under whatever autocast context is active, and keep no
    activations. The denominator ``||x - x'_j||`` is computed in float32 whatever the precision, so a tiny ``sigma``
    cannot divide by a rounded zero.

    Args:
        model: The classifier (any callable returning logits, or an output ``output_selector`` can read).
        x: A floating-point batch of forget inputs, shape ``(B, ...)``.
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
        center_logits: Subtract each output's mean over classes before taking differences, i.e. measure only the
            part of the logits that softmax sees. A shift of all logits by the same amount changes no prediction,
            but the raw-logit objective (the reference's) spends part of every update on it.
        normalize_logits: Divide every output by its L2 norm before taking differences (after centring, if both
            are set), so the objective measures how the *direction* of the logits changes. With raw logits, JiT can
            lower its ratio by inflating the logits of a neighbouring class until it swallows the forget samples and
            many retained ones (the collapse seen in practice); the scale-free objective has no such incentive.

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
    if reduction not in ("mean", "sum"):
        raise JiTInputError(f'`reduction` must be "mean" or "sum", got {reduction!r}.')
    try:
        sigma_ok = 0 < float(sigma) < float("inf")
    except (TypeError, ValueError):
        sigma_ok = False
    if not sigma_ok:
        raise JiTInputError(f"`sigma` must be finite and > 0, got {sigma!r}. Try 0.1-1x the input's std.")
    if not _is_count(n_perturbations):
        raise JiTInputError(f"`n_perturbations` must be an integer >= 1, got {n_perturbations!r}.")
    if perturbation_chunk is not None and perturbation_chunk != "auto" and not _is_count(perturbation_chunk):
        raise JiTInputError(f"`perturbation_chunk` must be >= 1, 'auto' or None, got {perturbation_chunk!r}.")
    perturbation_chunk = resolve_perturbation_chunk(perturbation_chunk, x.device)
    check_forget_input(x)
    batch_size = x.shape[0]
    n = int(n_perturbations)
    chunk = n * batch_size if perturbation_chunk is None else int(perturbation_chunk)
    bounds = _clamp_bounds(x, clamp)

    if clean_logits is None:
        clean_logits = select_output(model(x), output_selector)
    clean = _output_geometry(_check_logits(clean_logits, batch_size), center_logits, normalize_logits)

    noise = NoiseStream(x, sigma, generator=generator, keys=keys, seed=seed, epoch=epoch)
    pending: dict[int, Tensor] = {}  # noise of the perturbation indices the current chunk touches
    total = clean.new_zeros((), dtype=torch.float32)
    for group in _chunks(n, batch_size, chunk):
        x_parts, noise_parts = [], []
        for j, start, stop in group:
            if j not in pending:
                pending.clear()
                pending[j] = noise.next()
            whole = start == 0 and stop == batch_size
            x_parts.append(x if whole else x[start:stop])
            noise_parts.append(pending[j] if whole else pending[j][start:stop])
        # The whole chunk at once (elementwise, so the same values as part by part): few ops per chunk, not per part.
        x_rows = x_parts[0] if len(x_parts) == 1 else torch.cat(x_parts)
        perturbed = x_rows + (noise_parts[0] if len(noise_parts) == 1 else torch.cat(noise_parts)).to(x.dtype)
        if bounds is not None:
            perturbed = perturbed.clamp(bounds[0], bounds[1])
        denominator = (perturbed.float() - x_rows.float()).flatten(1).norm(dim=1)
        with torch.no_grad():
            perturbed_out = select_output(model(perturbed), output_selector)
        perturbed_out = _check_logits(perturbed_out, perturbed.shape[0]).detach()
        perturbed_out = _output_geometry(perturbed_out, center_logits, normalize_logits)
        # A chunk is a contiguous run of the (perturbation, sample) rows: row r is sample r mod B.
        first = group[0][0] * batch_size + group[0][1]
        index = torch.arange(first, first + perturbed.shape[0], device=x.device) % batch_size
        numerator = (clean[index] - perturbed_out).norm(dim=1)
        # A perturbation that clamping undid entirely has no defined ratio: it contributes nothing.
        ratio = torch.where(denominator > 0, numerator / denominator.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        total = total + ratio.sum()

    per_batch = total / n  # sum over samples, mean over perturbations
    return per_batch / batch_size if reduction == "mean" else per_batch


#: Added to the seed of the logit-norm penalty's noise, so that its noisy copies never repeat the JiT perturbations.
_PENALTY_SEED_SALT = 0x5EED


def logit_norm_penalty(
    model: nn.Module | Callable[[Tensor], Any],
    reference: Callable[[Tensor], Tensor],
    x: Tensor,
    sigma: float,
    *,
    clean_logits: Tensor | None = None,
    reduction: Reduction = "mean",
    output_selector: OutputSelector = None,
    generator: torch.Generator | None = None,
    keys: Sequence[Any] | None = None,
    seed: int = 0,
    epoch: int = 0,
) -> Tensor:
    """How far the model's logits have grown beyond the original model's, around the forget samples.

    JiT's usual failure is a *sink* class: smoothing the forget samples inflates the logits of a neighbouring class,
    which then swallows retained samples too. This term penalises exactly that growth, one-sidedly, against
    ``reference`` (the original model, frozen), on each forget input and on one noisy copy of it:

    .. code-block:: text

        g(v)      = relu(||f(v)|| / max(||f0(v)||, 1) - 1) ** 2
        penalty_b = (g(x_b) + g(x_b + sigma * noise_b)) / 2
        penalty   = mean over samples (reduction="mean") or sum (reduction="sum")

    Logits that shrink, or keep their norm while changing direction (which forgetting needs), cost nothing. Original
    logits of norm below 1 (nearly uniform predictions, e.g. an untrained model's) count as norm 1, so that growth out
    of them is not blown up into a diverging step. It uses
    no retained data: only the forget inputs and the original model. Gradients flow through ``model``'s passes.

    Args:
        model: The model being unlearned.
        reference: The original model's forward (no gradient needed), e.g. a
            :class:`~lightning_jit.step.FrozenReference`.
        x: The forget inputs, ``(B, ...)``.
        sigma: Std of the noisy copies, in input units (typically several times the JiT ``sigma``).
        clean_logits: ``model(x)`` if already computed with autograd.
        reduction: ``"mean"`` or ``"sum"`` over samples, as in :func:`jit_objective`.
        output_selector: How to find the logits in the model's output.
        generator: Optional generator for the noise.
        keys: Per-sample ids for keyed noise (see :func:`jit_objective`).
        seed: Seed combined with ``keys``.
        epoch: Epoch combined with ``keys``.

    Example:
        >>> net = torch.nn.Linear(4, 3)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.eye(3, 4)), net.bias.fill_(3.0)  # logits of norm > 1 near x = 0
        >>> frozen = torch.nn.Linear(4, 3)
        >>> _ = frozen.load_state_dict(net.state_dict())
        >>> x = 0.1 * torch.randn(8, 4)
        >>> logit_norm_penalty(net, frozen, x, sigma=0.1).item()  # same weights: no growth
        0.0
        >>> with torch.no_grad():
        ...     _ = net.weight.mul_(2.0), net.bias.mul_(2.0)  # doubled logits: growth 1 everywhere
        >>> round(logit_norm_penalty(net, frozen, x, sigma=0.1).item(), 5)
        1.0
    """
    if reduction not in ("mean", "sum"):
        raise JiTInputError(f'`reduction` must be "mean" or "sum", got {reduction!r}.')
    batch_size = x.shape[0]
    if clean_logits is None:
        clean_logits = select_output(model(x), output_selector)
    noise = NoiseStream(x, sigma, generator=generator, keys=keys, seed=seed + _PENALTY_SEED_SALT, epoch=epoch).next()
    noisy = x + noise.to(x.dtype)
    noisy_logits = select_output(model(noisy), output_selector)
    out = torch.cat([_check_logits(clean_logits, batch_size), _check_logits(noisy_logits, batch_size)]).float()
    with torch.no_grad():
        ref = _check_logits(select_output(reference(torch.cat([x, noisy])), output_selector), 2 * batch_size).float()
    growth = out.norm(dim=1) / ref.norm(dim=1).clamp_min(1.0) - 1.0
    per_sample = growth.clamp_min(0.0).pow(2).view(2, batch_size).mean(dim=0)
    return per_sample.mean() if reduction == "mean" else per_sample.sum()
