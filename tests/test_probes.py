"""Probe distillation: the zero-shot retain term, against hand computations and through the real Trainer."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from _utils import assert_same_weights, quiet_trainer, release_process_group, sgd_by_hand
from torch.utils.data import DataLoader, TensorDataset

from lightning_jit import JiTUnlearning
from lightning_jit.config import JiTConfig
from lightning_jit.data import DigitsCNN, class_mask
from lightning_jit.objective import jit_objective
from lightning_jit.probes import ProbeDistillation, synthesize_class_probes
from lightning_jit.step import FrozenReference


def _kl_by_hand(model, frozen, probes) -> float:
    """Mean over probes of sum_c p0_c (log p0_c - log p_c), one probe at a time."""
    terms = []
    for p in probes:
        log_p0 = torch.log_softmax(frozen(p[None]).double(), dim=1)[0]
        log_p = torch.log_softmax(model(p[None]).double(), dim=1)[0]
        terms.append(float((log_p0.exp() * (log_p0 - log_p)).sum()))
    return sum(terms) / len(terms)


def _moved(model: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> torch.nn.Module:
    moved = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return moved


def test_loss_is_the_mean_kl_over_the_probes_of_the_classes_not_forgotten(trained_cnn, digits):
    frozen = copy.deepcopy(trained_cnn).eval()
    distill = ProbeDistillation(FrozenReference(trained_cnn).differentiable, per_class=3, seed=2)
    forget = digits.x_train[class_mask(digits.y_train, [3])][:16]
    distill.observe(forget, torch.full((16,), 3))
    assert distill.active_classes() == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert distill.probes.shape == (27, 1, 8, 8)  # the classes the first batch does not hold
    # The original model classifies its probes as their classes, and an unmoved model costs nothing.
    assert torch.equal(frozen(distill.probes).argmax(1), distill.probe_classes)
    assert float(distill.loss(trained_cnn)) == pytest.approx(0.0, abs=1e-6)
    moved = _moved(trained_cnn).eval()
    kept = distill.probes
    got = distill.loss(moved)
    assert float(got) == pytest.approx(_kl_by_hand(moved, frozen, kept), rel=1e-4)
    assert float(got) > 1e-3
    got.backward()
    assert all(p.grad is not None for p in moved.parameters())
    assert all(p.grad is None for p in trained_cnn.parameters())  # the reference's weights are copies, untouched


def test_unlabelled_batches_forget_the_classes_the_original_predicts(trained_cnn, digits):
    distill = ProbeDistillation(FrozenReference(trained_cnn).differentiable, per_class=2)
    x = digits.x_train[class_mask(digits.y_train, [1, 7])][:20]
    predicted = set(trained_cnn.eval()(x).argmax(1).tolist())
    distill.observe(x, None)
    assert predicted == {1, 7}
    assert distill.active_classes() == [c for c in range(10) if c not in predicted]
    # Classes accumulate over batches; once every class was in the forget set, no probe is held.
    distill.observe(x, torch.arange(10))
    assert distill.active_classes() == [] and distill.loss(trained_cnn) is None


def test_at_most_max_per_step_probes_a_step_taken_in_turn(trained_cnn, digits):
    frozen = copy.deepcopy(trained_cnn).eval()
    distill = ProbeDistillation(FrozenReference(trained_cnn).differentiable, per_class=4, max_per_step=5)
    distill.observe(digits.x_train[:8], torch.tensor([c for c in range(10) if c not in (0, 1, 2)]))
    active = distill.probes[distill.probe_classes <= 2]  # 12 probes of classes 0, 1, 2
    moved = _moved(trained_cnn, scale=0.3).eval()
    for window in ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 0, 1, 2]):
        assert float(distill.loss(moved)) == pytest.approx(_kl_by_hand(moved, frozen, active[window]), rel=1e-4)


def test_many_classes_get_fewer_probes_synthesised_in_chunks():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 20))
    distill = ProbeDistillation(FrozenReference(net).differentiable, per_class=16, max_per_step=8, max_probes=40)
    distill.observe(torch.randn(4, 1, 4, 4), torch.zeros(4, dtype=torch.long))
    assert distill.probe_classes.tolist() == [c for c in range(1, 20) for _ in range(2)]  # 40 // 20 = 2 each
    assert torch.equal(net(distill.probes).argmax(1), distill.probe_classes)  # each chunk reached its classes


def test_the_defaults_are_the_measured_improvements():
    config = JiTConfig(sigma=0.1, lr=0.03)
    assert config.normalize_logits is True
    assert config.logit_norm_penalty == 10.0
    assert config.probe_distillation == 1.0


def test_wrapper_applies_the_default_term_against_the_pre_run_model(trained_cnn, digits):
    """Two wrapper steps, with the default probe_distillation, equal hand SGD steps on the JiT objective plus the KL
    on probes synthesised by hand from a frozen pre-run copy (at the first batch's scale). Off, the weights differ."""
    forget = class_mask(digits.y_train, [3])
    x, y = digits.x_train[forget][:16], digits.y_train[forget][:16]
    start = copy.deepcopy(trained_cnn.state_dict())
    settings = dict(sigma=0.2, lr=0.5, n_perturbations=4, seed=5, guard=False, logit_norm_penalty=0.0)

    def run(**extra):
        model = DigitsCNN()
        model.load_state_dict(start)
        wrapper = JiTUnlearning(model, **settings, **extra)
        quiet_trainer().fit(wrapper, DataLoader(TensorDataset(x, y), batch_size=8))
        return model, wrapper

    unlearned, wrapper = run()
    assert wrapper.config.probe_distillation == 1.0 and wrapper._probes.active_classes() == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    model, frozen = DigitsCNN(), DigitsCNN()
    model.load_state_dict(start)
    frozen.load_state_dict(start)
    model.eval()
    frozen.eval()
    first = x[:8]
    scale = (float(first.mean()), float(first.var(unbiased=False).sqrt()))
    # The probes are seeded with the run's seed.
    kept = [c for c in range(10) if c != 3]  # the classes the first batch does not hold
    probes, _ = synthesize_class_probes(frozen, kept, like=first, per_class=16, seed=5, scale=scale)
    with torch.no_grad():
        target = torch.log_softmax(frozen(probes), dim=1)
    generator = torch.Generator().manual_seed(5)
    for xb in (x[:8], x[8:]):
        loss = jit_objective(model, xb, 0.2, 4, generator=generator, normalize_logits=True)
        log_p = torch.log_softmax(model(probes), dim=1)
        loss = loss + torch.nn.functional.kl_div(log_p, target, log_target=True, reduction="batchmean")
        sgd_by_hand(model, loss, 0.5)
    assert_same_weights(unlearned, model)
    off, _ = run(probe_distillation=0.0)
    assert not all(
        torch.equal(a, b) for a, b in zip(off.state_dict().values(), unlearned.state_dict().values(), strict=True)
    )


def test_no_probe_is_held_when_the_forget_set_holds_every_class(trained_cnn, digits):
    """Random forgetting: one batch with all ten classes, so the term is zero and the run equals the run without it."""
    idx = torch.cat([torch.nonzero(digits.y_train == c).flatten()[:2] for c in range(10)])
    loader = DataLoader(TensorDataset(digits.x_train[idx], digits.y_train[idx]), batch_size=20)
    start = copy.deepcopy(trained_cnn.state_dict())
    finals = []
    for weight in (1.0, 0.0):
        model = DigitsCNN()
        model.load_state_dict(start)
        quiet_trainer(max_epochs=2).fit(
            JiTUnlearning(model, sigma=0.2, lr=0.1, n_perturbations=4, epochs=2, seed=3, probe_distillation=weight),
            loader,
        )
        finals.append(model.state_dict())
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
    assert any(not torch.equal(finals[0][k], start[k]) for k in start)  # JiT itself did move the weights


class _RecordProbes(pl.Callback):
    """Writes each rank's held classes and a fingerprint of its probes (module level, so ddp_spawn can pickle it)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        probes = pl_module._probes
        record = {"active": probes.active_classes(), "probe_sum": float(probes.probes.double().sum())}
        (Path(self.out_dir) / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def test_ddp_ranks_with_different_batches_pool_the_classes_and_the_probes(trained_cnn, digits, tmp_path):
    """Under DDP with Lightning's (shuffling) DistributedSampler each process holds other samples: here 31 threes and
    one five, so only one rank ever sees a 5. Both must stop holding both classes, and synthesise the same probes (the
    input scale pooled over the ranks)."""
    threes = torch.nonzero(digits.y_train == 3).flatten()[:31]
    fives = torch.nonzero(digits.y_train == 5).flatten()[:1]
    order = torch.cat([threes, fives])
    loader = DataLoader(TensorDataset(digits.x_train[order], digits.y_train[order]), batch_size=8)
    wrapper = JiTUnlearning(trained_cnn, sigma=0.1, lr=0.03, n_perturbations=4, seed=1, guard=False)
    trainer = quiet_trainer(
        devices=2, strategy="ddp_spawn", callbacks=[_RecordProbes(str(tmp_path)), release_process_group()]
    )
    trainer.fit(wrapper, loader)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["active"] == ranks[1]["active"] == [0, 1, 2, 4, 6, 7, 8, 9]
    assert ranks[0]["probe_sum"] == ranks[1]["probe_sum"]
