"""`JiTUnlearning` through the real Lightning Trainer, on real digits data."""

from __future__ import annotations

import pytest
import torch
from _utils import assert_same_weights, fit_fails_without_changing, quiet_trainer, sgd_by_hand
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_jit import JiTSettings, JiTUnlearning
from lightning_jit.core.errors import JiTInputError
from lightning_jit.core.noise import NoiseStream
from lightning_jit.core.run.stopping import ForgetAccuracyWindow
from lightning_jit.core.weights import WeightSnapshot
from lightning_jit.demo.data import DigitsCNN, accuracy, class_mask
from lightning_jit.lightning.data import forget_loader


def _forget_loader(digits, cls=3, batch_size=32):
    mask = class_mask(digits.y_train, [cls])
    return DataLoader(TensorDataset(digits.x_train[mask], digits.y_train[mask]), batch_size=batch_size)


def test_one_step_equals_manual_sgd_on_the_objective(trained_cnn, digits):
    """The wrapper's update is exactly theta - lr * grad(objective), with the same noise."""
    x = digits.x_train[:8]
    reference = DigitsCNN()
    reference.load_state_dict(trained_cnn.state_dict())
    sigma, lr, n = 0.2, 0.05, 4

    # guard=False: this checks the update's math; at this lr the collapse guard would (rightly) undo the step.
    plain = JiTSettings.plain(
        sigma=sigma, lr=lr, n_perturbations=n, perturbation_chunk=None, seed=11, on_unverified="keep"
    )
    wrapper = JiTUnlearning(trained_cnn, plain, guard=False)  # the objective alone (other terms: test_probes)
    quiet_trainer().fit(wrapper, DataLoader(TensorDataset(x), batch_size=8))

    # Independent computation: draw the same noise from the same seed, loop per perturbation.
    stream = NoiseStream(x, sigma, generator=torch.Generator().manual_seed(11))
    noise = [stream.next() for _ in range(n)]
    reference.eval()
    clean = reference(x)
    with torch.no_grad():
        targets = [reference(x + xi) for xi in noise]
    loss = sum(
        (torch.linalg.vector_norm(clean - t, dim=1) / torch.linalg.vector_norm(xi.flatten(1), dim=1)).sum()
        for t, xi in zip(targets, noise, strict=True)
    ) / (n * 8)
    loss.backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= lr * p.grad
    for (name, got), want in zip(trained_cnn.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def test_gradients_are_zeroed_every_step(trained_cnn, digits):
    """Two batches: the second update uses only the second batch's gradient (the reference accumulates both)."""
    x = digits.x_train[:16]
    a, b = DigitsCNN(), DigitsCNN()
    a.load_state_dict(trained_cnn.state_dict())
    b.load_state_dict(trained_cnn.state_dict())
    wrapper = JiTUnlearning(
        a,
        JiTSettings.plain(
            sigma=0.2, lr=0.05, n_perturbations=3, seed=3, on_unverified="keep", target_forget_accuracy=0.0
        ),
        guard=False,
    )
    quiet_trainer().fit(wrapper, DataLoader(TensorDataset(x), 8))
    # Same two steps with a hand loop that zeroes gradients, drawing from the same seeded generator.
    from lightning_jit.core.objective import jit_objective

    generator = torch.Generator().manual_seed(3)
    opt = torch.optim.SGD(b.parameters(), lr=0.05)
    b.eval()
    for i in (0, 8):
        opt.zero_grad()
        jit_objective(b, x[i : i + 8], 0.2, 3, generator=generator).backward()
        opt.step()
    for got, want in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_batchnorm_buffers_frozen_under_eval_and_changed_under_train(trained_bn_cnn, digits):
    loader = _forget_loader(digits)
    before = {k: v.clone() for k, v in trained_bn_cnn.state_dict().items() if "running" in k}
    quiet_trainer().fit(JiTUnlearning(trained_bn_cnn, sigma=0.3, lr=0.001, on_unverified="keep"), loader)
    after = {k: v for k, v in trained_bn_cnn.state_dict().items() if "running" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)

    quiet_trainer().fit(
        JiTUnlearning(trained_bn_cnn, sigma=0.3, lr=0.001, norm_policy="train", on_unverified="keep"), loader
    )
    after_train = {k: v for k, v in trained_bn_cnn.state_dict().items() if "running" in k}
    assert any(not torch.equal(before[k], after_train[k]) for k in before)


def test_mode_is_restored_after_each_step(trained_bn_cnn, digits):
    trained_bn_cnn.train()
    wrapper = JiTUnlearning(trained_bn_cnn, sigma=0.3, lr=0.001)
    quiet_trainer().fit(wrapper, _forget_loader(digits))
    assert all(m.training for m in trained_bn_cnn.modules())


def test_checkpoint_round_trip_into_original_class(trained_cnn, digits, tmp_path):
    wrapper = JiTUnlearning(trained_cnn, sigma=0.1, lr=0.003, epochs=2)
    trainer = quiet_trainer(max_epochs=2)
    trainer.fit(wrapper, _forget_loader(digits))
    path = tmp_path / "unlearned.ckpt"
    trainer.save_checkpoint(path)
    loaded = DigitsCNN.load_from_checkpoint(path, strict=True)
    assert wrapper.model is trained_cnn
    for (name, got), want in zip(loaded.state_dict().items(), trained_cnn.state_dict().values(), strict=True):
        assert torch.equal(got, want), name
    assert loaded.hparams.num_classes == 10


def test_checkpoint_round_trip_for_model_with_model_attribute(digits, tmp_path):
    """A user module whose own attribute is called `model` (keys `model.*`) still round-trips both ways."""
    import lightning.pytorch as pl

    class UserModel(pl.LightningModule):
        def __init__(self, hidden: int = 8):
            super().__init__()
            self.save_hyperparameters()
            self.model = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

        def forward(self, x):
            return self.model(x)

    user = UserModel(hidden=12)
    wrapper = JiTUnlearning(user, sigma=0.1, lr=0.01)
    trainer = quiet_trainer()
    trainer.fit(wrapper, _forget_loader(digits))
    path = tmp_path / "u.ckpt"
    trainer.save_checkpoint(path)
    loaded = UserModel.load_from_checkpoint(path, strict=True)
    assert loaded.hparams.hidden == 12
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), user.state_dict().values(), strict=True))
    # And the wrapper itself resumes from the checkpoint it wrote.
    fresh = JiTUnlearning(UserModel(hidden=12), sigma=0.1, lr=0.01, epochs=2)
    quiet_trainer(max_epochs=2).fit(fresh, _forget_loader(digits), ckpt_path=path)


def test_input_checkpoint_is_never_written(trained_cnn, digits, tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    src = tmp_path / "original.ckpt"
    t = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, max_epochs=0)
    t.strategy.connect(trained_cnn)
    t.save_checkpoint(src)
    before = src.read_bytes()
    model = DigitsCNN.load_from_checkpoint(src)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "out")
    trainer = quiet_trainer(enable_checkpointing=True, callbacks=[ckpt], default_root_dir=tmp_path)
    trainer.fit(JiTUnlearning(model, sigma=0.1, lr=0.003), _forget_loader(digits))
    assert src.read_bytes() == before
    reloaded = DigitsCNN.load_from_checkpoint(ckpt.best_model_path or ckpt.last_model_path, strict=True)
    assert all(
        torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values(), strict=True)
    )


def test_plain_nn_module_and_batch_forms(digits):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x, y = digits.x_train[:16], digits.y_train[:16]
    batches = {
        "tensor": DataLoader(x, batch_size=8),
        "tuple": DataLoader(TensorDataset(x, y), batch_size=8),
    }
    for name, loader in batches.items():
        snap = WeightSnapshot(net)
        quiet_trainer().fit(
            JiTUnlearning(net, sigma=0.2, lr=0.1, on_unverified="keep", target_forget_accuracy=0.0), loader
        )
        assert not snap.equals(net), name

    dict_loader = DataLoader([{"image": xi, "label": yi} for xi, yi in zip(x, y, strict=True)], batch_size=8)
    snap = WeightSnapshot(net)
    quiet_trainer().fit(
        JiTUnlearning(
            net,
            sigma=0.2,
            lr=0.1,
            input_key="image",
            label_key="label",
            on_unverified="keep",
            target_forget_accuracy=0.0,
        ),
        dict_loader,
    )
    assert not snap.equals(net)

    class Pair:
        def __init__(self, tensor):
            self.tensor = tensor

    odd_loader = DataLoader([Pair(xi) for xi in x], batch_size=8, collate_fn=lambda items: items)
    snap = WeightSnapshot(net)
    to_input = lambda batch: torch.stack([p.tensor for p in batch])  # noqa: E731
    quiet_trainer().fit(
        JiTUnlearning(net, sigma=0.2, lr=0.1, batch_to_input=to_input, on_unverified="keep"), odd_loader
    )
    assert not snap.equals(net)


def test_objective_is_logged(trained_cnn, digits):
    trainer = quiet_trainer()
    trainer.fit(JiTUnlearning(trained_cnn, sigma=0.1, lr=0.003), _forget_loader(digits))
    assert "jit_loss_epoch" in trainer.callback_metrics
    assert "jit_loss" in trainer.progress_bar_metrics or "jit_loss_epoch" in trainer.progress_bar_metrics
    assert torch.isfinite(trainer.callback_metrics["jit_loss_epoch"])


def test_forget_accuracy_window_keeps_recent_samples():
    w = ForgetAccuracyWindow(min_samples=64)
    for correct in (32, 32, 16, 0):
        w.update(correct, 32)
    assert w.totals() == (16, 64)
    assert w.ready()


@pytest.mark.slow
def test_end_to_end_digits_demo_thresholds():
    from lightning_jit.demo.run import run_demo

    result = run_demo(seed=0, verbose=False)
    jit = result.row("JiT (unlearned)")
    original = result.row("original")
    assert original.forget_acc > 95.0
    assert jit.forget_acc <= 5.0 and result.verification.outcome == "forgotten"
    assert jit.forget_test_acc <= 5.0
    assert jit.retain_test_acc >= result.row("retrained").retain_test_acc - 2.0


# ------------------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, and unchanged weights
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": -1.0}, "sigma"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"n_perturbations": 0}, "n_perturbations"),
        ({"epochs": 0}, "epochs"),
        ({"reduction": "max"}, "reduction"),
        ({"norm_policy": "frozen"}, "norm_policy"),
        ({"clamp": (1.0, 0.0)}, "clamp"),
        ({"target_forget_accuracy": 120}, "target_forget_accuracy"),
    ],
)
def test_bad_hyperparameters_fail_at_construction(trained_cnn, kwargs, name):
    args = {"sigma": 0.1, "lr": 0.01} | kwargs
    with pytest.raises(MisconfigurationException, match=f"`{name}`"):
        JiTUnlearning(trained_cnn, **args)


def test_model_without_trainable_parameters_is_refused(trained_cnn):
    trained_cnn.requires_grad_(False)
    with pytest.raises(MisconfigurationException, match="no trainable parameters"):
        JiTUnlearning(trained_cnn, sigma=0.1, lr=0.01)


def test_non_module_model_is_refused():
    with pytest.raises(MisconfigurationException, match="`model`"):
        JiTUnlearning("resnet", sigma=0.1, lr=0.01)


def _fails_without_changing(model, loader, error, match, **kwargs):
    fit_fails_without_changing(model, loader, error, match, sigma=0.1, lr=0.5, **kwargs)


def test_empty_forget_loader_is_refused(trained_cnn):
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    _fails_without_changing(trained_cnn, empty, MisconfigurationException, "empty")


def test_integer_inputs_are_refused(trained_cnn):
    loader = DataLoader(TensorDataset(torch.ones(8, 1, 8, 8, dtype=torch.long)), batch_size=4)
    _fails_without_changing(trained_cnn, loader, JiTInputError, "dtype")


def test_nan_in_a_later_batch_rolls_back_earlier_updates(trained_cnn, digits):
    x = digits.x_train[:12].clone()
    x[10, 0, 3, 3] = float("nan")
    _fails_without_changing(trained_cnn, DataLoader(TensorDataset(x), batch_size=4), JiTInputError, "NaN")


def test_output_that_is_not_batch_by_classes_is_refused(digits):
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 10)

        def forward(self, x):
            return self.lin(x.flatten(1)).flatten()

    _fails_without_changing(Flat(), DataLoader(TensorDataset(digits.x_train[:8]), 4), JiTInputError, "classes")


def test_batch_without_findable_input_is_refused(trained_cnn, digits):
    loader = DataLoader([{"pixels": xi} for xi in digits.x_train[:8]], batch_size=4)
    _fails_without_changing(trained_cnn, loader, JiTInputError, "input_key")


def test_forgetting_with_no_setting_lowers_forget_accuracy_only(trained_cnn, digits):
    """The no-knob path: the forgotten class's test images go, the rest stay; the run stops once the whole forget set,
    measured on the current weights, reads the target (checked against an independent accuracy of the final weights),
    and records what it calibrated."""
    mask = class_mask(digits.y_test, [3])
    before = accuracy(trained_cnn, digits.x_test[mask], digits.y_test[mask])
    kept_before = accuracy(trained_cnn, digits.x_test[~mask], digits.y_test[~mask])
    wrapper = JiTUnlearning(trained_cnn)
    quiet_trainer(max_epochs=-1).fit(wrapper, forget_loader(_forget_loader(digits).dataset))
    after = accuracy(trained_cnn, digits.x_test[mask], digits.y_test[mask])
    assert before > 90 and after < 10
    assert accuracy(trained_cnn, digits.x_test[~mask], digits.y_test[~mask]) > kept_before - 5
    verification = wrapper.verification
    train = class_mask(digits.y_train, [3])
    assert wrapper.outcome == "forgotten" and wrapper.stopped_early and verification.forget_accuracy <= 5.0
    assert verification.forget_accuracy == pytest.approx(
        accuracy(trained_cnn, digits.x_train[train], digits.y_train[train])
    )
    assert wrapper.run.cost.counts["stopping_rule"] > 0 and wrapper.run.cost.counts["verification"] == 0  # reused
    calibrated = verification.extra["calibrated"]
    assert {"sigma", "lr", "task", "target_forget_accuracy"} <= set(calibrated) and calibrated["task"] == "class"


def test_labels_that_do_not_match_the_inputs_are_refused(trained_cnn, digits):
    """A label tensor of another length would silently disable the stopping rule: it is an error naming `label_key`."""
    x = digits.x_train[:8]
    loader = DataLoader(
        list(zip(x, torch.zeros(8, dtype=torch.long), strict=True)),
        batch_size=8,
        collate_fn=lambda items: (torch.stack([a for a, _ in items]), torch.zeros(3, dtype=torch.long)),
    )
    _fails_without_changing(trained_cnn, loader, JiTInputError, "label_key")


def test_logit_norm_penalty_is_applied_against_the_pre_run_model(trained_cnn, digits):
    """Two steps with the penalty equal hand SGD steps on objective + lambda * penalty vs. a frozen pre-run copy.

    (At the first step the model is the reference, so the penalty and its gradient are 0; the second step has both.)
    """
    from lightning_jit.core.objective import jit_objective
    from lightning_jit.core.penalties import logit_norm_penalty

    x, y = digits.x_train[:16], digits.y_train[:16]
    start = {k: v.clone() for k, v in trained_cnn.state_dict().items()}
    settings = JiTSettings.plain(
        sigma=0.2,
        lr=0.5,
        n_perturbations=4,
        normalize_logits=True,
        seed=5,
        on_unverified="keep",
        target_forget_accuracy=0.0,
    )

    def run(penalty):
        model = DigitsCNN()
        model.load_state_dict(start)
        wrapper = JiTUnlearning(model, settings.replace(logit_norm_penalty=penalty, logit_norm_sigma=0.5), guard=False)
        quiet_trainer().fit(wrapper, DataLoader(TensorDataset(x, y), batch_size=8))
        return model

    unlearned = run(10.0)  # the default weight
    model, frozen = DigitsCNN(), DigitsCNN()
    model.load_state_dict(start)
    frozen.load_state_dict(start)
    model.eval()
    frozen.eval()
    generator = torch.Generator().manual_seed(5)
    for xb in (x[:8], x[8:]):
        clean = model(xb)
        loss = jit_objective(model, xb, 0.2, 4, generator=generator, clean_logits=clean, normalize_logits=True)
        loss = loss + 10.0 * logit_norm_penalty(model, frozen, xb, 0.5, clean_logits=clean, generator=generator)
        sgd_by_hand(model, loss, 0.5)
    assert_same_weights(unlearned, model)
    plain = run(0.0)
    pairs = zip(plain.state_dict().values(), unlearned.state_dict().values(), strict=True)
    assert not all(torch.equal(a, b) for a, b in pairs)


def test_a_model_in_train_mode_keeps_its_batchnorm_statistics(trained_bn_cnn, digits):
    """Most models arrive in train mode (straight from training, or inside a training job): with the default
    `norm_policy="eval"` no pass of the run, the step-size calibration included, may update BatchNorm's running
    statistics; the model's modes are as they were after the fit."""
    trained_bn_cnn.train()
    before = {k: v.clone() for k, v in trained_bn_cnn.state_dict().items() if "running" in k or "num_batches" in k}
    forget = class_mask(digits.y_train, [3])
    wrapper = JiTUnlearning(trained_bn_cnn, seed=0)
    quiet_trainer(max_epochs=-1).fit(
        wrapper, forget_loader(TensorDataset(digits.x_train[forget], digits.y_train[forget]))
    )
    after = trained_bn_cnn.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert all(m.training for m in trained_bn_cnn.modules()) and wrapper.run.steps > 0
