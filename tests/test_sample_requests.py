"""Sample requests: the held-out test against hand computations, and its verdict in every front on real digits."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _utils import quiet_trainer
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_jit import JiTUnlearning, JiTUnlearningCallback, JiTUnlearningFailed, Outcome
from lightning_jit.core.membership import membership_auc, sample_test
from lightning_jit.core.outcome import JiTOutcomeWarning
from lightning_jit.core.weights import WeightSnapshot

# ---------------------------------------------------------------------------------------------------- the test itself


def test_membership_auc_is_sklearns_roc_auc_of_the_negated_loss_ties_included():
    g = torch.Generator().manual_seed(0)
    forget = torch.randint(0, 20, (37,), generator=g).double() / 10  # many ties, within and across the sides
    heldout = torch.randint(0, 25, (211,), generator=g).double() / 10
    labels = np.r_[np.ones(37), np.zeros(211)]
    want = roc_auc_score(labels, -np.r_[forget.numpy(), heldout.numpy()])
    assert membership_auc(forget, heldout) == pytest.approx(want, abs=1e-12)


def test_the_auc_interval_matches_a_bootstrap():
    g = torch.Generator().manual_seed(1)
    forget, heldout = torch.rand(150, generator=g) * 0.8, torch.rand(400, generator=g)
    hits_f, hits_h = torch.ones(150, dtype=torch.bool), torch.ones(400, dtype=torch.bool)
    test = sample_test(forget, hits_f, heldout, hits_h)
    rng = np.random.default_rng(0)
    f, h = forget.numpy(), heldout.numpy()
    boot = [
        membership_auc(torch.from_numpy(rng.choice(f, len(f))), torch.from_numpy(rng.choice(h, len(h))))
        for _ in range(1000)
    ]
    low, high = np.percentile(boot, [2.5, 97.5])
    assert test.auc_low == pytest.approx(low, abs=0.015) and test.auc_high == pytest.approx(high, abs=0.015)
    assert test.auc_p < test.alpha and not test.passed  # 0.8-scaled losses: the forget side looks like members


def test_detectable_gaps_are_the_null_standard_errors_at_these_sizes():
    test = sample_test(torch.rand(10), torch.ones(10, dtype=torch.bool), torch.rand(90), torch.rand(90) < 0.9)
    z = 1.959963984540054
    assert test.detectable_auc_gap == pytest.approx(z * math.sqrt((10 + 90 + 1) / (12 * 10 * 90)))
    pooled = (10 + int((test.heldout_accuracy / 100) * 90 + 0.5)) / 100
    assert test.detectable_accuracy_gap == pytest.approx(100 * z * math.sqrt(pooled * (1 - pooled) * (1 / 10 + 1 / 90)))


def test_the_test_is_two_sided_an_over_forgotten_set_fails():
    g = torch.Generator().manual_seed(2)
    heldout = torch.rand(500, generator=g)
    over = sample_test(heldout[:100] + 3.0, torch.zeros(100, dtype=torch.bool), heldout, torch.rand(500) < 0.9)
    assert not over.passed and over.auc < 0.1
    assert "below the held-out accuracy" in over.failure and "over-forgetting" in over.failure
    same = sample_test(heldout[:100], torch.rand(100, generator=g) < 0.9, heldout[100:], torch.rand(400) < 0.9)
    assert same.passed and same.failure is None


# ------------------------------------------------------------------------------------------------ on real digits


class _MLP(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def _memorised_poison(digits):
    """An MLP trained on 400 digits of which 40 carry a wrong label: it memorises them (the poisoned rows a request
    names). Returns the model and the poisoned rows with the labels it was trained on."""
    x, y = digits.x_train[:400], digits.y_train[:400].clone()
    y[:40] = (y[:40] + 1) % 10
    torch.manual_seed(0)
    model = _MLP()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        for i in range(0, 400, 100):
            opt.zero_grad()
            F.cross_entropy(model(x[i : i + 100]), y[i : i + 100]).backward()
            opt.step()
    return model.eval(), TensorDataset(x[:40], y[:40])


def _loader(x, y, batch_size=64):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def test_unseen_samples_are_verified_forgotten_without_any_update(digits):
    """A request for samples the model never trained on: they already look like held-out data, so the run verifies
    that and changes nothing."""
    model, _ = _memorised_poison(digits)
    start = WeightSnapshot(model)
    unlearner = JiTUnlearning(model, monitor=_loader(digits.x_test[150:], digits.y_test[150:]), task="random")
    quiet_trainer(max_epochs=-1).fit(unlearner, _loader(digits.x_test[:150], digits.y_test[:150], 32))
    test = unlearner.verification.heldout_test
    assert unlearner.outcome == Outcome.FORGOTTEN and start.equals(model)
    assert test["n_forget"] == 150 and test["n_heldout"] == len(digits.y_test) - 150
    assert test["memorised_p"] < test["alpha"] <= test["accuracy_p"]  # powered, and passed
    assert unlearner.run.steps == 0 and "indistinguishable" in unlearner.verification.verdict


def test_a_request_too_small_to_tell_a_memorised_set_is_unverifiable(digits):
    """Five poisoned rows recognised to the last one would pass the accuracy test against this held-out data, so
    passing says nothing: no update, and the record says how many samples it takes."""
    model, poison = _memorised_poison(digits)
    start = WeightSnapshot(model)
    unlearner = JiTUnlearning(model, monitor=_loader(digits.x_test, digits.y_test), task="random")
    with pytest.warns(JiTOutcomeWarning, match="too few forget samples to verify"):
        quiet_trainer(max_epochs=-1).fit(unlearner, DataLoader(Subset(poison, range(5)), batch_size=5))
    test = unlearner.verification.heldout_test
    assert unlearner.outcome == Outcome.UNVERIFIABLE and start.equals(model) and unlearner.run.steps == 0
    assert test["memorised_p"] >= test["alpha"] and test["min_forget"] > 5


def test_min_forget_samples_is_the_first_size_fisher_rejects():
    from scipy.stats import fisher_exact

    from lightning_jit.core.membership import min_forget_samples

    for hits, n in [(925, 1000), (380, 450), (99, 100)]:
        by_hand = next(m for m in range(1, 5000) if fisher_exact([[m, 0], [hits, n - hits]]).pvalue < 0.05)
        assert min_forget_samples(hits, n) == by_hand


def _memorising_mlp(x, y):
    """An MLP that memorises a few hundred digits (train 100%, test several points lower)."""
    torch.manual_seed(0)
    model = _MLP()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        for i in range(0, len(y), 100):
            opt.zero_grad()
            F.cross_entropy(model(x[i : i + 100]), y[i : i + 100]).backward()
            opt.step()
    return model.eval()


def test_memorised_samples_are_forgotten_to_the_heldout_level_without_costing_test_accuracy(digits):
    """90 samples the model memorised (100% recognised): afterwards they look like held-out data, the record's test
    is the one recomputed by hand on the final weights, and on data neither side used the model is as accurate as
    one retrained without them."""
    from lightning_jit.demo.data import accuracy

    model = _memorising_mlp(digits.x_train[:300], digits.y_train[:300])
    order = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    forget, kept = order[:90], order[90:]
    xf, yf = digits.x_train[forget], digits.y_train[forget]
    retrained = _memorising_mlp(digits.x_train[kept], digits.y_train[kept])  # the gold standard
    heldout, test = (digits.x_test[:225], digits.y_test[:225]), (digits.x_test[225:], digits.y_test[225:])
    assert accuracy(model, xf, yf) == 100.0 and accuracy(model, *heldout) < 97.0
    unlearner = JiTUnlearning(model, monitor=_loader(*heldout), task="random", seed=0)
    quiet_trainer(max_epochs=-1).fit(unlearner, _loader(xf, yf, 8))
    record = unlearner.verification.heldout_test
    with torch.no_grad():
        lf, lh = model(xf), model(heldout[0])
    by_hand = sample_test(
        F.cross_entropy(lf, yf, reduction="none"),
        lf.argmax(1) == yf,
        F.cross_entropy(lh, heldout[1], reduction="none"),
        lh.argmax(1) == heldout[1],
    )
    assert unlearner.outcome == Outcome.FORGOTTEN and unlearner.run.steps > 0
    assert record["auc"] == pytest.approx(by_hand.auc) and record["forget_accuracy"] == by_hand.forget_accuracy
    assert by_hand.verified and by_hand.forget_accuracy < 100.0
    assert accuracy(model, *test) >= accuracy(retrained, *test) - 1.0
    assert abs(by_hand.forget_accuracy - accuracy(retrained, xf, yf)) <= 10.0


def test_memorised_wrong_labels_are_not_claimed(digits):
    """Poisoned rows (memorised wrong labels) are not like held-out data under their given labels, whatever the run
    does: the held-out test does not pass, and the weights are restored."""
    model, poison = _memorised_poison(digits)
    start = WeightSnapshot(model)
    unlearner = JiTUnlearning(model, monitor=_loader(digits.x_test, digits.y_test), task="random")
    with pytest.warns(JiTOutcomeWarning, match="still differ from"):
        quiet_trainer(max_epochs=-1).fit(unlearner, DataLoader(poison, batch_size=20))
    test = unlearner.verification.heldout_test
    assert unlearner.outcome == Outcome.NOT_FORGOTTEN and not test["passed"] and start.equals(model)
    assert unlearner.verification.reason.startswith("the forget accuracy is")


def test_a_sample_request_without_heldout_data_is_unverifiable_and_changes_nothing(digits):
    model, poison = _memorised_poison(digits)
    start = WeightSnapshot(model)
    unlearner = JiTUnlearning(model, task="random")
    with pytest.warns(JiTOutcomeWarning, match="NOT verified"):
        quiet_trainer(max_epochs=-1).fit(unlearner, DataLoader(poison, batch_size=20))
    assert unlearner.outcome == Outcome.UNVERIFIABLE and unlearner.run.steps == 0 and start.equals(model)
    assert "monitor=" in unlearner.verification.verdict
    strict = JiTUnlearning(model, task="random", strict=True)
    with pytest.raises(JiTUnlearningFailed, match="NOT verified"):
        quiet_trainer(max_epochs=-1).fit(strict, DataLoader(poison, batch_size=20))
    assert strict.run.steps == 0 and start.equals(model)


def test_the_callback_records_unverifiable_ids_and_tries_them_again_only_when_that_can_change(digits, tmp_path):
    model, poison = _memorised_poison(digits)
    requests = TensorDataset(poison.tensors[0], poison.tensors[1], torch.arange(40))
    job = _loader(digits.x_train[400:528], digits.y_train[400:528])
    heldout = _loader(digits.x_test, digits.y_test)

    def fit(callback, epochs=1):
        trainer = quiet_trainer(
            max_epochs=epochs, limit_train_batches=1, default_root_dir=tmp_path, callbacks=[callback]
        )
        trainer.fit(_LitMLP(model), job)

    # No held-out data: attempted once, then not at every job.
    callback = JiTUnlearningCallback(requests, task="random", when="train_epoch_end", audit_path=None)
    fit(callback, epochs=2)
    assert [run["counts"]["attempted"] for run in callback.ledger.runs] == [40, 0]
    assert callback.ledger.runs[0]["outcome"] == "unverifiable" and len(callback.ledger) == 0
    assert all(callback.ledger.is_unverifiable(i) for i in range(40))

    # Held-out data now: tried again, tested, and not claimed (the rows are memorised).
    with_heldout = JiTUnlearningCallback(
        requests, task="random", when="train_epoch_end", audit_path=None, monitor=heldout
    )
    with_heldout.ledger.load_state_dict(callback.ledger.state_dict())
    fit(with_heldout)
    run = with_heldout.ledger.runs[-1]
    assert run["counts"]["attempted"] == 40 and run["outcome"] == "not_forgotten"
    assert run["verification"]["heldout_test"]["n_heldout"] == len(digits.y_test)

    # A request too small to verify waits for new ids, then is tried with them.
    small = JiTUnlearningCallback(
        lambda: Subset(requests, range(size[0])),
        task="random",
        when="train_epoch_end",
        audit_path=None,
        monitor=heldout,
    )
    size = [5]
    fit(small, epochs=2)
    assert [r["counts"]["attempted"] for r in small.ledger.runs] == [5, 0] and small.ledger.runs[0][
        "outcome"
    ] == "unverifiable"
    size[0] = 40
    fit(small)
    assert small.ledger.runs[-1]["counts"]["attempted"] == 40 and small.ledger.runs[-1]["outcome"] == "not_forgotten"


class _LitMLP(pl.LightningModule):
    """A job that trains ``net`` at a zero learning rate: only the callback changes the weights."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_a_sample_request_resumes_with_its_targets_and_projection(digits):
    """The run state of a sample request survives a checkpoint (``torch.load(weights_only=True)``) and resumes with
    the same update: its held-out projection, its targets and its test on the original weights."""
    import io

    from lightning_jit.core.engine import JiTRun
    from lightning_jit.core.settings import JiTSettings

    model = _memorising_mlp(digits.x_train[:300], digits.y_train[:300])
    order = torch.randperm(300, generator=torch.Generator().manual_seed(0))[:90]
    forget = [(digits.x_train[order[i : i + 12]], digits.y_train[order[i : i + 12]]) for i in range(0, 90, 12)]
    heldout = [(digits.x_test[:225], digits.y_test[:225])]
    run = JiTRun(model, JiTSettings(task="random", seed=0), monitor=heldout)
    run.start(forget)
    run.step(forget[0], optimizer=run.make_optimizer(), backward=lambda loss: loss.backward(), epoch=0)
    buffer = io.BytesIO()
    torch.save(run.state_dict(), buffer)
    buffer.seek(0)
    resumed = JiTRun(model, JiTSettings(task="random", seed=0), monitor=heldout)
    resumed.resume(torch.load(buffer, weights_only=True), forget)
    assert run.matching is not None and resumed.matching is not None
    assert torch.equal(resumed.matching[1].basis, run.matching[1].basis)
    assert torch.equal(resumed.matching[0].heldout, run.matching[0].heldout)
    assert resumed.sample_test_before == run.sample_test_before
