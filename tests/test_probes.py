"""Probe distillation and the retain term: against hand computations, and through the real Trainer."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _utils import assert_same_weights, quiet_trainer, sgd_by_hand
from torch.utils.data import DataLoader, TensorDataset

from lightning_jit import BatchFormat, JiTSettings, JiTUnlearning
from lightning_jit.core.distillation import DistillationSet
from lightning_jit.core.objective import jit_objective
from lightning_jit.core.probes import counterfactual_probes
from lightning_jit.core.reference import FrozenReference
from lightning_jit.demo.data import DigitsCNN, accuracy, class_mask
from lightning_jit.lightning.data import forget_loader


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


def test_counterfactual_probes_start_at_forget_samples_and_reach_their_class(trained_cnn, digits):
    threes = digits.x_train[class_mask(digits.y_train, [3])][:20]
    frozen = FrozenReference(trained_cnn)
    x, y = counterfactual_probes(frozen.differentiable, threes, [0, 5], 3, std=1.0, generator=torch.Generator())
    assert y.tolist() == [0, 0, 0, 5, 5, 5]
    assert (trained_cnn.eval()(x).argmax(1) == y).float().mean() >= 5 / 6  # the original now calls them that class
    # Each probe is a forget sample moved by at most 20 Adam steps of 0.1 std per pixel (not noise, which is ~1 std).
    nearest = (x.flatten(1)[:, None] - threes.flatten(1)[None]).abs().amax(dim=2).min(dim=1).values
    assert float(nearest.max()) <= 20 * 0.1 + 1e-3
    assert all(p.grad is None for p in trained_cnn.parameters())  # the original's weights are untouched


def test_loss_is_the_mean_kl_over_this_steps_probes_taken_in_turn(trained_cnn, digits):
    frozen = copy.deepcopy(trained_cnn).eval()
    reference = FrozenReference(trained_cnn)
    starts = digits.x_train[class_mask(digits.y_train, [3])][:16]
    distill = DistillationSet.synthesise(reference, starts, [0, 1, 2], 4, std=1.0, generator=torch.Generator())
    assert distill.probes.shape == (12, 1, 8, 8)
    assert float(distill.loss(trained_cnn, batch_size=8)) == pytest.approx(0.0, abs=1e-6)  # unmoved: no cost
    moved = _moved(trained_cnn, scale=0.3).eval()
    # ceil(0.5 * 10) = 5 probes a step, in turn: probes 4-8 come next, then 9, 10, 11, 0, 1.
    for window in ([4, 5, 6, 7, 8], [9, 10, 11, 0, 1]):
        got = distill.loss(moved, batch_size=10)
        assert float(got) == pytest.approx(_kl_by_hand(moved, frozen, distill.probes[window]), rel=1e-4)
    got.backward()
    assert all(p.grad is not None for p in moved.parameters())


def test_many_classes_get_fewer_probes_synthesised_in_chunks():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3000))
    reference = FrozenReference(net)
    distill = DistillationSet.synthesise(reference, torch.randn(4, 1, 4, 4), list(range(3000)), 4, std=1.0)
    assert distill.probes.shape[0] == 3000  # at most MAX_PROBES // classes = 0 -> 1 per class


def test_the_defaults_are_the_measured_improvements():
    settings = JiTSettings()
    assert settings.normalize_logits is True and settings.unitless_ratio is True
    assert settings.logit_norm_penalty == 10.0 and settings.probe_distillation == 5.0
    assert settings.probes_per_class == 4 and settings.update_scope == 2 and settings.n_perturbations == 8
    assert settings.sigma is None and settings.lr is None


def test_a_step_with_the_default_terms_equals_hand_sgd(trained_cnn, digits):
    """One wrapper step with probe distillation (plain SGD at a given lr, every parameter, raw ratio) equals a hand
    SGD step on the JiT objective plus the KL on the same probes; without the term the weights differ."""
    forget = class_mask(digits.y_train, [3])
    x, y = digits.x_train[forget][:8], digits.y_train[forget][:8]
    start = copy.deepcopy(trained_cnn.state_dict())
    settings = JiTSettings.plain(sigma=0.2, lr=0.5, n_perturbations=4, normalize_logits=True, seed=5,
                                 probe_distillation=5.0, epochs=1, on_unverified="keep")  # fmt: skip

    def run(settings):
        model = DigitsCNN()
        model.load_state_dict(start)
        wrapper = JiTUnlearning(model, settings, guard=False)
        quiet_trainer().fit(wrapper, DataLoader(TensorDataset(x, y), batch_size=8))
        return model, wrapper

    unlearned, wrapper = run(settings)
    probes = wrapper.run.probes
    assert probes is not None and sorted(set(probes.classes.tolist())) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    model = DigitsCNN()
    model.load_state_dict(start)
    model.eval()
    take = torch.arange(math.ceil(0.5 * 8))  # the first step's probes
    loss = jit_objective(model, x, 0.2, 4, generator=torch.Generator().manual_seed(5), normalize_logits=True)
    log_p = torch.log_softmax(model(probes.probes[take]), dim=1)
    loss = loss + 5.0 * torch.nn.functional.kl_div(log_p, probes.targets[take], log_target=True, reduction="batchmean")
    sgd_by_hand(model, loss, 0.5)
    assert_same_weights(unlearned, model)
    off, _ = run(settings.replace(probe_distillation=0.0))
    assert not all(
        torch.equal(a, b) for a, b in zip(off.state_dict().values(), unlearned.state_dict().values(), strict=True)
    )


def test_no_probe_is_held_for_random_forgetting(trained_cnn, digits):
    """The forget set holds every class: a random task, with no class to hold."""
    idx = torch.cat([torch.nonzero(digits.y_train == c).flatten()[:2] for c in range(10)])
    loader = DataLoader(TensorDataset(digits.x_train[idx], digits.y_train[idx]), batch_size=20)
    wrapper = JiTUnlearning(trained_cnn)
    quiet_trainer(max_epochs=-1).fit(wrapper, loader)
    assert wrapper.run.calibrated["task"] == "random" and wrapper.run.probes is None
    assert wrapper.verification.target is None and wrapper.outcome == "unverifiable"  # no held-out data to test
    assert wrapper.verification.passes == 1


def test_retain_is_held_at_the_original_outputs_and_changes_the_run(trained_cnn, digits):
    """With `retain=`, one step equals hand SGD on the objective plus the KL to the original's outputs on those
    samples (ceil(0.5 * B) of them, in turn); without it the weights differ after the second step."""
    forget = class_mask(digits.y_train, [3])
    x, y = digits.x_train[forget][:8], digits.y_train[forget][:8]
    # Kept samples the model is not sure of (noise images): on confident training digits the KL to the original and
    # its gradient stay at rounding level, and the with/without comparison would compare float noise.
    kept = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(3)), digits.y_train[~forget][:6]
    start = copy.deepcopy(trained_cnn.state_dict())
    settings = JiTSettings.plain(  # the weights each run reaches are compared, verified or not
        sigma=0.2, lr=0.5, n_perturbations=4, seed=5, epochs=1, retain_distillation=2.0, on_unverified="keep"
    )

    def run(retain, epochs=1):
        model = DigitsCNN()
        model.load_state_dict(start)
        wrapper = JiTUnlearning(model, settings.replace(epochs=epochs), guard=False, retain=retain)
        quiet_trainer().fit(wrapper, DataLoader(TensorDataset(x, y), batch_size=8))
        return model, wrapper

    unlearned, wrapper = run(DataLoader(TensorDataset(*kept), batch_size=4))
    assert wrapper.run.retain.probes.shape[0] == 6 and wrapper.verification.extra["calibrated"]["retain_samples"] == 6
    assert wrapper.verification.retain_accuracy == pytest.approx(accuracy(unlearned, *kept))
    model, frozen = DigitsCNN(), DigitsCNN()
    model.load_state_dict(start)
    frozen.load_state_dict(start)
    model.eval()
    frozen.eval()
    loss = jit_objective(model, x, 0.2, 4, generator=torch.Generator().manual_seed(5))
    held = kept[0][:4]  # ceil(0.5 * 8) retain samples at the first step
    with torch.no_grad():
        target = torch.log_softmax(frozen(held), dim=1)
    log_p = torch.log_softmax(model(held), dim=1)
    loss = loss + 2.0 * torch.nn.functional.kl_div(log_p, target, log_target=True, reduction="batchmean")
    sgd_by_hand(model, loss, 0.5)
    assert_same_weights(unlearned, model)
    # At the first step the model is the original, so the KL and its gradient are 0: the terms part from the second.
    with_retain, _ = run(DataLoader(TensorDataset(*kept), batch_size=4), epochs=2)
    without, _ = run(None, epochs=2)
    assert not all(
        torch.equal(a, b) for a, b in zip(without.state_dict().values(), with_retain.state_dict().values(), strict=True)
    )


def test_retain_batches_are_read_with_the_batch_format(trained_cnn, digits):
    keep = DataLoader([{"pixels": xi} for xi in digits.x_train[:10]], batch_size=5)
    reference = FrozenReference(trained_cnn)
    held = DistillationSet.from_retain(
        reference, keep, BatchFormat(input_key="pixels"), device=torch.device("cpu"), limit=7
    )
    assert held.probes.shape == (7, 1, 8, 8)
    assert torch.equal(held.probes, digits.x_train[:7])


def test_retained_samples_of_a_forgotten_label_are_checked_and_a_lost_one_rolls_back(trained_cnn, digits):
    """Sub-class forgetting with `retain=`: kept samples of the forget set's label (siblings) are not distilled but
    checked at the end. Forgetting some 3s while keeping the other 3s takes the whole label here, so the run restores
    the original weights and says why; the figures are checked against independent accuracies."""
    threes = torch.nonzero(digits.y_train == 3).flatten()
    forget, siblings = threes[:60], threes[60:]
    others = torch.nonzero(digits.y_train != 3).flatten()[:40]
    keep = torch.cat([siblings, others])
    before = copy.deepcopy(trained_cnn.state_dict())
    with torch.no_grad():
        recognised = int((trained_cnn.eval()(digits.x_train[siblings]).argmax(1) == 3).sum())
    retain = DataLoader(TensorDataset(digits.x_train[keep], digits.y_train[keep]), batch_size=64)
    wrapper = JiTUnlearning(trained_cnn, seed=0, retain=retain)
    forget_set = TensorDataset(digits.x_train[forget], digits.y_train[forget])
    quiet_trainer(max_epochs=-1).fit(wrapper, forget_loader(forget_set))
    assert wrapper.run.calibrated["retain_siblings"] == recognised > 0
    assert wrapper.run.retain.probes.shape[0] == len(others)  # the siblings left the distillation
    assert wrapper.outcome == "rolled_back" and "sub-class" in wrapper.verification.reason
    assert all(torch.equal(v, before[k]) for k, v in trained_cnn.state_dict().items())
    assert wrapper.verification.retain_accuracy == pytest.approx(
        accuracy(trained_cnn, digits.x_train[others], digits.y_train[others])
    )
