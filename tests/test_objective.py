"""The JiT objective against an independent per-sample, per-perturbation loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_jit.core.batch import select_output
from lightning_jit.core.errors import JiTInputError, JiTSettingError
from lightning_jit.core.noise import NoiseStream
from lightning_jit.core.objective import jit_objective


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))


def _same_noise(x: torch.Tensor, sigma: float, n: int, seed: int) -> list[torch.Tensor]:
    """The noise jit_objective draws from a generator seeded with `seed`: one (B, ...) draw per perturbation."""
    stream = NoiseStream(x, sigma, generator=torch.Generator().manual_seed(seed))
    return [stream.next() for _ in range(n)]


def _naive(model, x, noise, clamp=None):
    """Per sample, per perturbation, written from the formula: ||f(x) - f(x')|| / ||x - x'||, mean over all."""
    total = 0.0
    lo, hi = (x.min(), x.max()) if clamp == "batch" else (None, None)
    for b in range(x.shape[0]):
        xb = x[b : b + 1]
        clean = model(xb)[0]
        for xi in noise:
            xp = xb + xi[b : b + 1]
            if clamp == "batch":
                xp = xp.clamp(lo, hi)
            out = model(xp)[0].detach()
            total = total + torch.linalg.vector_norm(clean - out) / torch.linalg.vector_norm(xp - xb)
    return total / (len(noise) * x.shape[0])


@pytest.mark.parametrize("clamp", [None, "batch"])
def test_objective_equals_naive_loop(clamp):
    model = _net()
    x = torch.randn(6, 3, 4)
    n, sigma = 7, 0.3
    noise = _same_noise(x, sigma, n, seed=123)
    got = jit_objective(model, x, sigma, n, clamp=clamp, generator=torch.Generator().manual_seed(123))
    want = _naive(model, x, noise, clamp=clamp)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_gradients_flow_only_through_clean_pass():
    model = _net()
    x = torch.randn(4, 3, 4)
    noise = _same_noise(x, 0.5, 3, seed=5)
    loss = jit_objective(model, x, 0.5, 3, generator=torch.Generator().manual_seed(5))
    grads = torch.autograd.grad(loss, list(model.parameters()))

    # Independent: treat the perturbed outputs as constants computed beforehand.
    with torch.no_grad():
        targets = [model(x + xi) for xi in noise]
    clean = model(x)
    manual = sum(
        (torch.linalg.vector_norm(clean - t, dim=1) / torch.linalg.vector_norm(xi.flatten(1), dim=1)).sum()
        for t, xi in zip(targets, noise, strict=True)
    ) / (3 * 4)
    expected = torch.autograd.grad(manual, list(model.parameters()))
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)

    # And a version whose perturbed pass keeps its graph gives different gradients, so the test can fail.
    clean = model(x)
    with_grad = (
        sum(
            (
                torch.linalg.vector_norm(clean - model(x + xi), dim=1) / torch.linalg.vector_norm(xi.flatten(1), dim=1)
            ).sum()
            for xi in noise
        )
        / 12
    )
    other = torch.autograd.grad(with_grad, list(model.parameters()))
    assert any(not torch.allclose(g, o) for g, o in zip(grads, other, strict=True))


def test_sum_is_batch_size_times_mean():
    model = _net()
    x = torch.randn(9, 3, 4)
    mean = jit_objective(model, x, 0.2, 4, reduction="mean", generator=torch.Generator().manual_seed(1))
    total = jit_objective(model, x, 0.2, 4, reduction="sum", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(total, 9 * mean)


@pytest.mark.parametrize("chunk", [1, 5, 9, 10, 31, None])
def test_chunked_equals_unchunked(chunk):
    model = _net()
    x = torch.randn(9, 3, 4)
    ref = jit_objective(model, x, 0.2, 6, perturbation_chunk=None, generator=torch.Generator().manual_seed(2))
    got = jit_objective(model, x, 0.2, 6, perturbation_chunk=chunk, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)


def test_perturbed_passes_are_batched_not_a_loop():
    calls = []
    model = _net()
    model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    jit_objective(model, torch.randn(4, 3, 4), 0.2, 25, perturbation_chunk=50)
    assert calls == [4, 50, 50]  # one clean pass, then N*B = 100 perturbed samples in 2 chunks


def test_keyed_noise_does_not_depend_on_batch_composition():
    model = _net()
    x = torch.randn(6, 3, 4)
    keys = list(range(10, 16))
    whole = jit_objective(model, x, 0.3, 5, keys=keys, seed=7, reduction="sum")
    parts = sum(
        jit_objective(model, x[i : i + 2], 0.3, 5, keys=keys[i : i + 2], seed=7, reduction="sum") for i in (4, 0, 2)
    )
    torch.testing.assert_close(whole, parts, rtol=1e-5, atol=1e-6)


def test_denominator_is_the_realised_change_after_clamping():
    model = _net()
    x = torch.zeros(2, 3, 4)
    x[1] = 1.0
    # All noise pushes outside [0, 1] for half the pixels, so the realised change is smaller than ||xi||.
    loss_clamped = jit_objective(model, x, 5.0, 3, clamp=(0.0, 1.0), generator=torch.Generator().manual_seed(0))
    noise = _same_noise(x, 5.0, 3, seed=0)
    want = 0.0
    for xi in noise:
        xp = (x + xi).clamp(0, 1)
        num = torch.linalg.vector_norm(model(x) - model(xp).detach(), dim=1)
        den = torch.linalg.vector_norm((xp - x).flatten(1), dim=1)
        want = want + (num / den).sum()
    torch.testing.assert_close(loss_clamped, want / 6, rtol=1e-5, atol=1e-6)


def test_output_selector_for_tuple_and_dict_models():
    base = _net()

    class TupleNet(nn.Module):
        def forward(self, x):
            return (torch.zeros(1), base(x))

    class DictNet(nn.Module):
        def forward(self, x):
            return {"out": base(x)}

    x = torch.randn(3, 3, 4)
    ref = jit_objective(base, x, 0.2, 3, generator=torch.Generator().manual_seed(0))
    got_t = jit_objective(TupleNet(), x, 0.2, 3, output_selector=1, generator=torch.Generator().manual_seed(0))
    got_d = jit_objective(DictNet(), x, 0.2, 3, output_selector="out", generator=torch.Generator().manual_seed(0))
    got_c = jit_objective(
        DictNet(), x, 0.2, 3, output_selector=lambda o: o["out"], generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(got_t, ref)
    torch.testing.assert_close(got_d, ref)
    torch.testing.assert_close(got_c, ref)
    with pytest.raises(JiTInputError, match="output_selector"):
        jit_objective(DictNet(), x, 0.2, 3)
    with pytest.raises(JiTInputError, match=r"\(batch, classes\)"):
        jit_objective(TupleNet(), x, 0.2, 3, output_selector=0)
    # A tuple whose only 2-D tensor is the logits: found without a selector.
    torch.testing.assert_close(jit_objective(TupleNet(), x, 0.2, 3, generator=torch.Generator().manual_seed(0)), ref)

    class TwoHeads(nn.Module):
        def forward(self, x):
            return base(x), 2 * base(x)

    # Two (batch, k) tensors and no class count: which is meant cannot be guessed, so it is an error.
    with pytest.raises(JiTInputError, match="2 tensors.*output_selector"):
        jit_objective(TwoHeads(), x, 0.2, 3)


def test_select_output_defaults():
    t = torch.ones(2, 3)
    assert select_output(t) is t
    assert select_output([t, 1]) is t
    assert select_output({"logits": t}) is t


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.ones(2, 3, 4, dtype=torch.long), "dtype"),
        (torch.full((2, 3, 4), float("nan")), "NaN"),
        (torch.full((2, 3, 4), float("inf")), "NaN or Inf"),
        (torch.ones(0, 3, 4), "batch >= 1"),
    ],
)
def test_bad_inputs_are_refused(x, match):
    with pytest.raises(JiTInputError, match=match):
        jit_objective(_net(), x, 0.2, 3)


@pytest.mark.parametrize(("kwargs", "match"), [({"sigma": 0.0}, "sigma"), ({"n_perturbations": 0}, "n_perturbations")])
def test_bad_hyperparameters_are_refused(kwargs, match):
    args = {"sigma": 0.2, "n_perturbations": 3} | kwargs
    with pytest.raises(JiTSettingError, match=match) as info:
        jit_objective(_net(), torch.randn(2, 3, 4), **args)
    assert info.value.setting == match


def _peak_live_bytes(fn) -> int:
    """Peak of the CPU bytes allocated and not yet freed while `fn` runs, from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Allocations are attributed to the innermost op (its self memory), frees to "[memory]" events (negative).
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def test_memory_does_not_grow_with_n():
    """N=100 stays within the peak memory of N=25 at the same chunk size; without chunking it does not."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 512), nn.ReLU(), nn.Linear(512, 10))
    x = torch.randn(16, 3, 32, 32)

    def peak(n: int, chunk: int | None) -> int:
        return _peak_live_bytes(lambda: jit_objective(model, x, 0.1, n, perturbation_chunk=chunk).backward())

    p25, p100 = peak(25, 64), peak(100, 64)
    assert p100 <= p25 * 1.05
    # The measurement can fail: unchunked, N=100 needs several times the memory of N=25.
    assert peak(100, None) > 2 * peak(25, None)


def test_normalized_objective_equals_naive_loop():
    """`normalize_logits` equals the naive loop on unit-normalised outputs."""
    center, normalize = False, True
    base = _net()

    def transformed(z):
        out = base(z)
        if center:
            out = out - out.mean(dim=1, keepdim=True)
        if normalize:
            out = torch.nn.functional.normalize(out, dim=1)
        return out

    x = torch.randn(5, 3, 4)
    noise = _same_noise(x, 0.3, 4, seed=9)
    got = jit_objective(base, x, 0.3, 4, normalize_logits=normalize, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(got, _naive(transformed, x, noise), rtol=1e-5, atol=1e-6)
    raw = jit_objective(base, x, 0.3, 4, generator=torch.Generator().manual_seed(9))
    assert not torch.allclose(got, raw)


def test_normalized_objective_is_scale_free():
    """Scaling the logits by 10 scales the raw objective by 10 and leaves the normalised one unchanged."""
    base = _net()
    x = torch.randn(5, 3, 4)

    def scaled(z):
        return 10 * base(z)

    def loss(model, normalize):
        return jit_objective(model, x, 0.3, 4, normalize_logits=normalize, generator=torch.Generator().manual_seed(1))

    torch.testing.assert_close(loss(scaled, False), 10 * loss(base, False))
    torch.testing.assert_close(loss(scaled, True), loss(base, True))


def test_logit_norm_penalty_matches_a_per_sample_loop():
    """The penalty against the formula, sample by sample: one-sided squared growth of the logits' norm."""
    from lightning_jit.core.penalties import logit_norm_penalty

    model, frozen = _net(0), _net(0)
    with torch.no_grad():
        for p in model.parameters():  # some rows grow, some shrink: both sides of the relu are exercised
            p.add_(0.3 * torch.randn_like(p))
    # Inputs from tiny to large, so that the original logits' norms fall on both sides of 1 (the floor).
    x = torch.randn(6, 3, 4) * torch.tensor([0.02, 0.1, 1.0, 3.0, 10.0, 30.0]).view(6, 1, 1)
    norms = frozen(x).norm(dim=1)
    assert (norms < 1).any() and (norms > 1).any()
    got = logit_norm_penalty(model, frozen, x, 0.5, generator=torch.Generator().manual_seed(4))
    noise = NoiseStream(x, 0.5, generator=torch.Generator().manual_seed(4)).next()
    per_sample = []
    for b in range(6):
        terms = []
        for v in (x[b : b + 1], x[b : b + 1] + noise[b : b + 1]):
            growth = float(model(v).norm() / max(float(frozen(v).norm()), 1.0)) - 1.0  # norms below 1 count as 1
            terms.append(max(growth, 0.0) ** 2)
        per_sample.append(sum(terms) / 2)
    assert float(got) == pytest.approx(sum(per_sample) / 6, rel=1e-5)
    summed = logit_norm_penalty(model, frozen, x, 0.5, generator=torch.Generator().manual_seed(4), reduction="sum")
    assert float(summed) == pytest.approx(sum(per_sample), rel=1e-5)
    got.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad is None for p in frozen.parameters())
    # Logits that only shrink cost nothing (the penalty is one-sided).
    shrunk = _net(0)
    with torch.no_grad():
        shrunk[-1].weight.mul_(0.5)
        shrunk[-1].bias.mul_(0.5)
    assert float(logit_norm_penalty(shrunk, frozen, x, 0.5)) == 0.0


def test_auto_chunk_is_the_measured_size_of_the_device():
    """``"auto"`` (the default) sends the CPU's 256 perturbed samples per pass: the same passes as an explicit 256."""
    from lightning_jit.core.objective import PERTURBATION_CHUNK_BY_DEVICE, resolve_perturbation_chunk

    assert resolve_perturbation_chunk("auto", torch.device("cpu")) == PERTURBATION_CHUNK_BY_DEVICE["cpu"] == 256
    assert resolve_perturbation_chunk("auto", torch.device("cuda")) == PERTURBATION_CHUNK_BY_DEVICE["cuda"]
    assert resolve_perturbation_chunk(None, torch.device("cuda")) is None
    model = _net()
    sizes: dict[object, list[int]] = {}
    for chunk in ("auto", 256, 64):
        calls: list[int] = []
        handle = model.register_forward_hook(lambda m, i, o, calls=calls: calls.append(i[0].shape[0]))
        jit_objective(model, torch.randn(20, 3, 4), 0.1, 25, perturbation_chunk=chunk)
        handle.remove()
        sizes[chunk] = calls
    assert sizes["auto"] == sizes[256] == [20, 256, 244]
    assert sizes[64] != sizes[256]
