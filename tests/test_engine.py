"""The run engine on its own, without Lightning: cost counters, the perturbation registry, the life cycle."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_jit import GuardSettings, JiTSettings
from lightning_jit.core.engine import JiTRun
from lightning_jit.core.noise import PERTURBATIONS, NoiseStream, register_perturbation


class SampleCounter:
    """An independent count of the samples through a module: forward 1, forward with autograd on 3."""

    def __init__(self, module: nn.Module) -> None:
        self.total = 0
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, module, args, output):
        self.total += args[0].shape[0] * (3 if torch.is_grad_enabled() else 1)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))


def _batches(n_batches=2, batch=6, label=0):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 1, 4, 4, generator=g), torch.full((batch,), label)) for _ in range(n_batches)]


def _run(settings, batches, guard=None, epochs=1):
    net = _net()
    counter = SampleCounter(net)
    run = JiTRun(net, settings, guard=guard if guard is not None else GuardSettings(enabled=False))
    run.start(batches)
    opt = run.make_optimizer()
    for epoch in range(epochs):
        for batch in batches:
            run.step(batch, optimizer=opt, backward=lambda loss: loss.backward(), epoch=epoch)
        run.end_pass(epoch)
    run.finish(opt)
    counter.handle.remove()
    return run, counter


def test_plain_jit_costs_the_reference_pass_per_step():
    """Plain JiT: N no-grad perturbed passes and one forward+backward per forget sample and pass."""
    n, batch = 5, 6
    run, counter = _run(JiTSettings.plain(sigma=0.3, lr=0.01, n_perturbations=n), _batches(2, batch), epochs=2)
    samples = 2 * 2 * batch  # two batches, two passes
    assert run.cost.counts["perturbed"] == n * samples
    assert run.cost.counts["clean"] == 3 * samples
    # Plus the verification after the run (one no-grad forward of the forget set) and the survey before it, which
    # sends only the first batch through the model: the later batches are labelled, their classes are their labels.
    assert run.cost.counts["verification"] == samples // 2
    assert run.cost.counts["calibration"] == batch
    assert run.cost.total == counter.total == (n + 3) * samples + samples // 2 + batch
    # Over the reference's one pass at ITS N = 25 (28 per sample), whatever N this run drew.
    report = run.cost.report(n_forget=2 * batch, n_perturbations=n)
    assert report["over_reference"] == pytest.approx(counter.total / (2 * batch * (25 + 3)))


def test_every_kind_of_work_is_counted_and_nothing_else():
    """The defaults (penalty, probes, guard): the counter's total equals an independent hook's, kind by kind."""
    settings = JiTSettings(n_perturbations=3, probes_per_class=2)
    run, counter = _run(settings, _batches(2, 6), guard=GuardSettings(n_noise_probes=8, check_every=1))
    counts = run.cost.counts
    assert counts["penalty"] == 2 * 6 * (3 + 2)  # per sample: a noisy copy with backward, two frozen passes
    assert counts["probes"] == 2 * 3 * 3  # ceil(0.5 * 6) probes a step, forward and backward
    assert counts["synthesis"] > 0 and counts["guard"] > 0 and counts["calibration"] > 12  # and the step search
    assert run.cost.total == counter.total


def test_a_registered_perturbation_is_drawn_and_named():
    @register_perturbation("test_sign")
    def sign(shape, generator, device, dtype):
        return torch.randint(0, 2, shape, generator=generator, device=device).to(dtype) * 2 - 1

    try:
        x = torch.zeros(3, 4)
        noise = NoiseStream(x, 0.5, generator=torch.Generator().manual_seed(0), perturbation="test_sign").next()
        assert set(noise.unique().tolist()) <= {-0.5, 0.5}
        run, _ = _run(JiTSettings.plain(sigma=0.3, lr=0.01, n_perturbations=2, perturbation="test_sign"), _batches(1))
        assert run.settings.hparams()["perturbation"] == "test_sign" and run.steps == 1
    finally:
        PERTURBATIONS.pop("test_sign")


def test_a_finished_run_is_never_undone_and_a_step_needs_a_started_run():
    run, _ = _run(JiTSettings.plain(sigma=0.3, lr=0.5), _batches(1))
    after = {k: v.clone() for k, v in run.model.state_dict().items()}
    assert run.outcome is not None  # finished
    assert run.abort() is False  # an error after the run must not restore the weights from before it
    assert all(torch.equal(after[k], v) for k, v in run.model.state_dict().items())
    fresh = JiTRun(_net(), JiTSettings.plain(sigma=0.3, lr=0.5))
    with pytest.raises(RuntimeError, match="before start"):
        fresh.step(_batches(1)[0], optimizer=torch.optim.SGD(fresh.params, lr=0.1), backward=lambda x: x, epoch=0)


def test_an_error_that_is_not_the_batch_keeps_its_type():
    """Only an error the batch causes is reported as a batch problem; e.g. a failing backward keeps its own."""
    run = JiTRun(_net(), JiTSettings.plain(sigma=0.3, lr=0.5), guard=GuardSettings(enabled=False))
    run.start()

    def broken_backward(loss):
        raise RuntimeError("out of memory (simulated)")

    with pytest.raises(RuntimeError, match="out of memory") as info:
        run.step(_batches(1)[0], optimizer=torch.optim.SGD(run.params, lr=0.1), backward=broken_backward, epoch=0)
    assert type(info.value) is RuntimeError


def test_verification_of_small_batches_counts_every_sample_once():
    """A forget loader of batch 1 is verified in joined passes (few forwards), with the accuracy and confidence that
    a per-sample loop over the same weights gives."""
    torch.manual_seed(3)
    net = _net()
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(11, 1, 4, 4, generator=g), torch.randint(0, 4, (11,), generator=g)
    batches = [(x[i : i + 1], y[i : i + 1]) for i in range(11)]
    counter = SampleCounter(net)
    calls = []
    net.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    run = JiTRun(net, JiTSettings.plain(sigma=0.3, lr=0.01, task="class"), guard=GuardSettings(enabled=False))
    run.start(batches)
    calls.clear()
    verification = run.finish()
    counter.handle.remove()
    assert calls == [11]  # one joined pass, not one per batch
    with torch.no_grad():  # the independent per-sample loop
        hits = [int(net(x[i : i + 1]).argmax(1) == y[i]) for i in range(11)]
        conf = [float(torch.softmax(net(x[i : i + 1]), 1)[0, y[i]]) for i in range(11)]
    assert verification.n_forget == 11
    assert verification.forget_accuracy == pytest.approx(100.0 * sum(hits) / 11)
    assert verification.forget_confidence == pytest.approx(100.0 * sum(conf) / 11, rel=1e-5)


def test_survey_reads_labelled_batches_without_the_model():
    """The survey sends the first batch through the model (its width, the order of its weight modules); the labelled
    batches after it are read for their labels and statistics only. An unlabelled batch still goes through it (its
    classes are the original's predictions)."""
    batches = _batches(3, 5, label=2)
    unlabelled = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(9))
    run, _ = _run(JiTSettings.plain(sigma=0.3, lr=0.01, task="class"), [*batches, unlabelled])
    assert run.cost.counts["calibration"] == 5 + 4
    assert run.survey is not None and run.survey.n == 3 * 5 + 4
    inputs = torch.cat([b[0] for b in batches] + [unlabelled])
    assert run.survey.std == pytest.approx(float(inputs.double().std(unbiased=False)))
    with torch.no_grad():
        predicted = set(_net()(unlabelled).argmax(1).tolist())
    assert set(run.survey.classes) == {2} | predicted
    assert [type(m) for m in run.survey.weight_modules] == [nn.Linear, nn.Linear]
