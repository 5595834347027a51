"""The metric classes against independent computations (per-sample loops, scikit-learn, scipy), and under real DDP."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from scipy import stats
from scipy.spatial.distance import jensenshannon
from scipy.special import softmax
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score

from lightning_jit.evaluation import (
    EntropyMIA,
    ForgetAccuracy,
    PredictionEntropy,
    RetrainMatch,
    SplitAccuracy,
    TugOfWar,
    ZRFScore,
    activation_distance,
    entropy_tests,
    fit_entropy_attack,
    js_divergence,
    random_copy,
    tug_of_war,
    warn_if_useless_attack,
)


def _logits(n: int, c: int = 10, scale: float = 3.0, seed: int = 0) -> torch.Tensor:
    return scale * torch.randn(n, c, generator=torch.Generator().manual_seed(seed))


def _entropy_loop(logits: torch.Tensor) -> np.ndarray:
    """Independent path: scipy's entropy of a numpy softmax, one sample at a time."""
    return np.array([stats.entropy(softmax(row.double().numpy())) for row in logits])


def _batches(t: torch.Tensor, size: int = 7):
    return [t[i : i + size] for i in range(0, len(t), size)]


# ------------------------------------------------------------------------------------------------------------------
# accuracy and entropy
# ------------------------------------------------------------------------------------------------------------------
def test_split_accuracy_matches_hand_count():
    logits, y = _logits(53), torch.randint(0, 10, (53,), generator=torch.Generator().manual_seed(1))
    y[:20] = logits[:20].argmax(1)  # make a known share right
    hand = sum(int(max(range(10), key=lambda c: float(logits[i, c])) == int(y[i])) for i in range(53))
    for metric in (SplitAccuracy(split="test"), SplitAccuracy(split="retain"), ForgetAccuracy()):
        for lb, yb in zip(_batches(logits), _batches(y), strict=True):
            metric.update(lb, yb)
        assert float(metric.compute()) == pytest.approx(100.0 * hand / 53, abs=1e-12)
    assert hand >= 20


def test_directions_and_flags():
    assert SplitAccuracy.higher_is_better is True and ForgetAccuracy.higher_is_better is None
    assert EntropyMIA.higher_is_better is False and ZRFScore.higher_is_better is True
    assert TugOfWar.higher_is_better is True and PredictionEntropy.higher_is_better is None
    assert RetrainMatch.higher_is_better is None
    for cls in (SplitAccuracy, ForgetAccuracy, EntropyMIA, ZRFScore, TugOfWar, PredictionEntropy, RetrainMatch):
        assert cls.full_state_update is False
        assert cls.__doc__ and ">>>" in cls.__doc__
    assert PredictionEntropy.is_differentiable is True and EntropyMIA.is_differentiable is False


def test_prediction_entropy_matches_scipy_per_sample():
    logits = torch.cat([_logits(40, scale=0.3), _logits(40, scale=8.0, seed=1), torch.tensor([[80.0] + [-80.0] * 9])])
    metric = PredictionEntropy()
    for b in _batches(logits):
        metric.update(b)
    expected = _entropy_loop(logits)
    np.testing.assert_allclose(metric.per_sample().numpy(), expected, rtol=1e-9, atol=1e-12)
    assert float(metric.compute()) == pytest.approx(expected.mean(), rel=1e-12)
    assert metric.per_sample()[-1] >= 0  # a saturated softmax gives 0, never NaN


# ------------------------------------------------------------------------------------------------------------------
# membership inference
# ------------------------------------------------------------------------------------------------------------------
def test_entropy_mia_matches_sklearn_fitted_directly():
    retain, test = _logits(300, scale=6.0, seed=2), _logits(120, scale=1.5, seed=3)
    forget = torch.cat([_logits(30, scale=6.0, seed=4), _logits(20, scale=1.0, seed=5)])
    metric = EntropyMIA()
    for split, logits in (("retain", retain), ("test", test), ("forget", forget)):
        for b in _batches(logits, 33):
            metric.update(b, split)
    out = metric.compute()

    h_r, h_t, h_f = _entropy_loop(retain), _entropy_loop(test), _entropy_loop(forget)
    x = np.concatenate([h_r, h_t]).reshape(-1, 1)
    y = np.concatenate([np.ones(len(h_r)), np.zeros(len(h_t))])
    clf = LogisticRegression(class_weight="balanced").fit(x, y)
    expected_mia = clf.predict(h_f.reshape(-1, 1)).mean()
    expected_attack = (clf.predict(x) == y).mean()
    assert abs(float(out["mia"]) - expected_mia) < 1e-6
    assert abs(float(out["attack_accuracy"]) - expected_attack) < 1e-6
    balanced = balanced_accuracy_score(y, clf.predict(x))
    assert abs(float(out["attack_balanced_accuracy"]) - balanced) < 1e-6
    assert 0.0 < expected_mia < 1.0  # a case where the answer is not trivially all or nothing
    assert expected_attack > 0.7


def test_entropy_mia_bad_inputs():
    metric = EntropyMIA()
    with pytest.raises(MisconfigurationException, match="split"):
        metric.update(_logits(3), "train")
    metric.update(_logits(5), "retain")
    metric.update(_logits(5), "forget")
    with pytest.raises(MisconfigurationException, match="retain.*test|empty"):
        metric.compute()
    with pytest.raises(MisconfigurationException, match="forget split is empty"):
        only = EntropyMIA()
        only.update(_logits(5), "retain")
        only.update(_logits(5), "test")
        only.compute()


def test_entropy_tests_attack_and_the_useless_attack_note():
    u, r = _entropy_loop(_logits(30, seed=1)), _entropy_loop(_logits(40, scale=1.0, seed=2))
    out = entropy_tests(u, r)  # different sizes: not paired, so no Wilcoxon test
    assert out["wilcoxon_statistic"] == 0.0 and out["wilcoxon_pvalue"] == 1.0
    assert out["ks_pvalue"] == pytest.approx(stats.ks_2samp(u, r).pvalue)
    assert out["mannwhitney_pvalue"] == pytest.approx(stats.mannwhitneyu(u, r).pvalue)
    attack = fit_entropy_attack(torch.from_numpy(u), r)  # tensors and arrays alike
    expected = LogisticRegression(class_weight="balanced").fit(
        np.concatenate([u, r]).reshape(-1, 1), np.concatenate([np.ones(30), np.zeros(40)])
    )
    np.testing.assert_array_equal(attack.predict(u.reshape(-1, 1)), expected.predict(u.reshape(-1, 1)))
    with pytest.raises(MisconfigurationException, match="one of them is empty"):
        fit_entropy_attack(np.zeros(0), r)
    with pytest.warns(UserWarning, match="only 0.55 balanced accuracy"):
        note = warn_if_useless_attack(0.55, "unlearned")
    assert note is not None and "for the unlearned model" in note
    assert warn_if_useless_attack(0.56, "unlearned") is None


# ------------------------------------------------------------------------------------------------------------------
# retrain match, ZRF, Tug of War
# ------------------------------------------------------------------------------------------------------------------
def test_retrain_match_matches_scipy():
    retrained = _logits(60, scale=2.0, seed=6)
    unlearned = retrained + 1.5 * _logits(60, scale=1.0, seed=7)
    metric = RetrainMatch()
    for u, r in zip(_batches(unlearned), _batches(retrained), strict=True):
        metric.update(u, r)
    out = {k: float(v) for k, v in metric.compute().items()}

    h_u, h_r = _entropy_loop(unlearned), _entropy_loop(retrained)
    w, ks, mw = stats.wilcoxon(h_u, h_r), stats.ks_2samp(h_u, h_r), stats.mannwhitneyu(h_u, h_r)
    assert out["wilcoxon_statistic"] == pytest.approx(w.statistic) and out["wilcoxon_pvalue"] == pytest.approx(w.pvalue)
    assert out["ks_statistic"] == pytest.approx(ks.statistic) and out["ks_pvalue"] == pytest.approx(ks.pvalue)
    assert out["mannwhitney_statistic"] == pytest.approx(mw.statistic)
    assert out["mannwhitney_pvalue"] == pytest.approx(mw.pvalue)
    p = softmax(unlearned.double().numpy(), axis=1)
    q = softmax(retrained.double().numpy(), axis=1)
    dist_loop = np.mean([np.sqrt(((p[i] - q[i]) ** 2).sum()) for i in range(60)])
    js_loop = np.mean([jensenshannon(p[i], q[i], base=2) ** 2 for i in range(60)])
    assert out["activation_distance"] == pytest.approx(dist_loop, rel=1e-10)
    assert out["js_divergence"] == pytest.approx(js_loop, rel=1e-8)


def test_retrain_match_identical_models_is_a_perfect_match():
    logits = _logits(25)
    metric = RetrainMatch()
    metric.update(logits, logits.clone())
    out = metric.compute()
    assert float(out["wilcoxon_pvalue"]) == 1.0 and float(out["ks_pvalue"]) == 1.0
    assert float(out["activation_distance"]) == 0.0 and float(out["js_divergence"]) == pytest.approx(0.0, abs=1e-15)


def test_js_divergence_and_activation_distance_shapes():
    with pytest.raises(MisconfigurationException, match="same output width"):
        js_divergence(_logits(4, 10), _logits(4, 9))
    with pytest.raises(MisconfigurationException, match="same output width"):
        activation_distance(_logits(4, 10), _logits(5, 10))
    with pytest.raises(MisconfigurationException, match="2-D"):
        PredictionEntropy().update(torch.zeros(10))


def test_zrf_matches_scipy_and_random_copy_is_seeded():
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(8))
    state = torch.random.get_rng_state()
    teacher = random_copy(net, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    again, other = random_copy(net, seed=3), random_copy(net, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), again.parameters(), strict=True))
    assert not torch.equal(teacher[0].weight, other[0].weight)
    assert not torch.equal(teacher[0].weight, net[0].weight)

    with torch.no_grad():
        u, t = net(x), teacher(x)
    zrf = ZRFScore()
    for ub, tb in zip(_batches(u), _batches(t), strict=True):
        zrf.update(ub, tb)
    p, q = softmax(u.double().numpy(), axis=1), softmax(t.double().numpy(), axis=1)
    expected = 1.0 - np.mean([jensenshannon(p[i], q[i], base=2) ** 2 for i in range(50)])
    assert float(zrf.compute()) == pytest.approx(expected, rel=1e-9)
    assert 0.0 <= float(zrf.compute()) <= 1.0


def test_tug_of_war_matches_formula_from_hand_counts():
    g = torch.Generator().manual_seed(9)
    tow = TugOfWar()
    acc_u, acc_r = {}, {}
    for split, n in (("forget", 31), ("retain", 80), ("test", 45)):
        u, r, y = _logits(n, seed=n), _logits(n, seed=n + 1), torch.randint(0, 10, (n,), generator=g)
        y[: n // 2] = u[: n // 2].argmax(1)
        tow.update(u, r, y, split)
        acc_u[split] = 100.0 * sum(int(u[i].argmax()) == int(y[i]) for i in range(n)) / n
        acc_r[split] = 100.0 * sum(int(r[i].argmax()) == int(y[i]) for i in range(n)) / n
    formula = math.prod(1 - abs(acc_u[s] - acc_r[s]) / 100 for s in ("forget", "retain", "test"))
    assert float(tow.compute()) == pytest.approx(formula, rel=1e-12)
    assert tug_of_war(acc_u, acc_r) == pytest.approx(formula, rel=1e-12)
    assert 0.0 < formula < 1.0
    assert tug_of_war({"forget": 5, "retain": 90, "test": 80}, {"forget": 5, "retain": 90, "test": 80}) == 1.0
    with pytest.raises(MisconfigurationException, match="missing"):
        tug_of_war({"forget": 1.0}, {"forget": 1.0})
    with pytest.raises(MisconfigurationException, match="percentage"):
        tug_of_war({"forget": 0.5, "retain": 1.5, "test": 120.0}, {"forget": 0.5, "retain": 1.0, "test": 1.0})
    with pytest.raises(MisconfigurationException, match="every split"):
        partial = TugOfWar()
        partial.update(_logits(3), _logits(3), torch.zeros(3, dtype=torch.long), "forget")
        partial.compute()


def test_bad_labels_and_empty_splits():
    with pytest.raises(MisconfigurationException, match="number of classes"):
        SplitAccuracy().update(_logits(4, c=3), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(MisconfigurationException, match="1-D integer"):
        SplitAccuracy().update(_logits(4), torch.zeros(4))
    with pytest.raises(MisconfigurationException, match="ForgetAccuracy"):
        SplitAccuracy(split="forget")
    for metric in (SplitAccuracy(), PredictionEntropy(), ZRFScore(), RetrainMatch()):
        with pytest.raises(MisconfigurationException, match="empty"):
            metric.compute()


# ------------------------------------------------------------------------------------------------------------------
# real DDP: two gloo processes, each seeing half of the data, must give the single-process answer
# ------------------------------------------------------------------------------------------------------------------
def _ddp_worker(rank: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        data = _ddp_data()
        ent, mia, match, tow, zrf = PredictionEntropy(), EntropyMIA(), RetrainMatch(), TugOfWar(), ZRFScore()
        half = slice(rank, None, 2)
        ent.update(data["forget_u"][half])
        for split in ("forget", "retain", "test"):
            mia.update(data[f"{split}_u"][half], split)
            tow.update(data[f"{split}_u"][half], data[f"{split}_r"][half], data[f"{split}_y"][half], split)
        match.update(data["forget_u"][half], data["forget_r"][half])
        zrf.update(data["forget_u"][half], data["forget_r"][half])
        accuracy = SplitAccuracy(split="test")
        accuracy.update(data["test_u"][half], data["test_y"][half])
        result = {
            "accuracy": float(accuracy.compute()),
            "entropy": float(ent.compute()),
            "n": int(ent.per_sample().numel()),
            "mia": float(mia.compute()["mia"]),
            "tow": float(tow.compute()),
            "zrf": float(zrf.compute()),
            **{k: float(v) for k, v in match.compute().items()},
        }
        if rank == 0:
            torch.save(result, out_file)
    finally:
        dist.destroy_process_group()


def _ddp_data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    data = {}
    for i, (split, n, scale) in enumerate((("forget", 40, 5.0), ("retain", 120, 6.0), ("test", 60, 1.5))):
        data[f"{split}_u"] = _logits(n, scale=scale, seed=20 + i)
        data[f"{split}_r"] = _logits(n, scale=scale, seed=30 + i)
        data[f"{split}_y"] = torch.randint(0, 10, (n,), generator=g)
    return data


@pytest.mark.slow
def test_metrics_sync_under_real_ddp(tmp_path):
    out_file = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), out_file), nprocs=2, join=True)
    ddp = torch.load(out_file)

    data = _ddp_data()
    ent, mia, match, tow, zrf = PredictionEntropy(), EntropyMIA(), RetrainMatch(), TugOfWar(), ZRFScore()
    # the DDP "cat" order is rank 0's samples then rank 1's; the metrics below do not depend on the order
    ent.update(data["forget_u"])
    for split in ("forget", "retain", "test"):
        mia.update(data[f"{split}_u"], split)
        tow.update(data[f"{split}_u"], data[f"{split}_r"], data[f"{split}_y"], split)
    match.update(data["forget_u"], data["forget_r"])
    zrf.update(data["forget_u"], data["forget_r"])
    # accuracy over both ranks' samples, counted by hand
    single = {
        "accuracy": 100.0 * int((data["test_u"].argmax(1) == data["test_y"]).sum()) / len(data["test_y"]),
        "entropy": float(ent.compute()),
        "n": 40,
        "mia": float(mia.compute()["mia"]),
        "tow": float(tow.compute()),
        "zrf": float(zrf.compute()),
        **{k: float(v) for k, v in match.compute().items()},
    }
    assert ddp.keys() == single.keys()
    for key, value in single.items():
        assert ddp[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
