"""alpha(x), the information of a sample (Definition 4.2), against a per-sample loop, on real digits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from sklearn.datasets import load_digits

from lightning_jit.evaluation import layer_features, sample_information, split_by_information


def _alpha_loop(x: np.ndarray, y: np.ndarray, k: int | None = None, radius: float | None = None) -> np.ndarray:
    """Independent path: one sample at a time, float64 numpy, stable argsort."""
    out = []
    for i in range(len(x)):
        d = np.sqrt(((x - x[i]) ** 2).sum(1))
        d[i] = np.inf
        if radius is None:
            nn_idx = np.argsort(d, kind="stable")[:k]
        else:
            nn_idx = np.nonzero(d <= radius)[0]
        out.append(np.mean(y[nn_idx] == y[i]) if len(nn_idx) else np.nan)
    return np.array(out)


def _tie_free(x: np.ndarray, k: int) -> np.ndarray:
    """Samples whose k-th and (k+1)-th neighbour distances differ: their k-NN set is unique."""
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    d.sort(1)
    return d[:, k - 1] < d[:, k] - 1e-6


def test_alpha_matches_per_sample_loop_knn_and_radius(digits):
    x, y = digits.x_test.flatten(1), digits.y_test
    xn, yn = x.double().numpy(), y.numpy()
    alpha = sample_information(x, y, k=7, block_size=100)  # several blocks
    expected = _alpha_loop(xn, yn, k=7)
    unique = _tie_free(xn, 7)
    assert unique.mean() > 0.95
    np.testing.assert_allclose(alpha.numpy()[unique], expected[unique], atol=1e-6)
    assert 0.0 < alpha.mean() < 1.0

    radius = float(np.median(np.sqrt(((xn[:50, None] - xn[None]) ** 2).sum(-1))) * 0.5)
    alpha_r = sample_information(x, y, radius=radius, block_size=64)
    expected_r = _alpha_loop(xn, yn, radius=radius)
    assert np.array_equal(np.isnan(alpha_r.numpy()), np.isnan(expected_r))
    np.testing.assert_allclose(alpha_r.numpy(), expected_r, atol=1e-6)
    assert np.isnan(expected_r).any() and not np.isnan(expected_r).all()  # some isolated samples, some not


def test_alpha_on_all_digits_is_batched(monkeypatch):
    data = load_digits()
    x = torch.from_numpy(data.data.astype(np.float32))
    y = torch.from_numpy(data.target)
    assert len(y) == 1797
    calls = []
    real_cdist = torch.cdist
    monkeypatch.setattr(torch, "cdist", lambda a, b, **kw: calls.append(a.shape[0]) or real_cdist(a, b, **kw))
    alpha = sample_information(x, y, k=10)
    assert calls == [1797]  # one distance computation for all 1,797 samples, no loop over samples
    calls.clear()
    sample_information(x, y, k=10, block_size=500)
    assert calls == [500, 500, 500, 297]

    xn, yn = x.double().numpy(), y.numpy()
    idx = np.arange(0, 1797, 7)  # an independent check on a subset of the queries
    d = np.sqrt(((xn[idx, None, :] - xn[None, :, :]) ** 2).sum(-1))
    d[np.arange(len(idx)), idx] = np.inf
    order = np.argsort(d, axis=1, kind="stable")
    sorted_d = np.take_along_axis(d, order, 1)
    unique = sorted_d[:, 9] < sorted_d[:, 10] - 1e-6
    expected = (yn[order[:, :10]] == yn[idx, None]).mean(1)
    np.testing.assert_allclose(alpha.numpy()[idx][unique], expected[unique], atol=1e-6)
    assert unique.mean() > 0.9
    # digits are easy: most samples are low information, a few are not
    assert (alpha >= 0.5).float().mean() > 0.9 and (alpha < 0.5).any()


def test_mislabelled_group_is_high_information(digits):
    x, y = digits.x_train.flatten(1), digits.y_train.clone()
    ones = (y == 1).nonzero().flatten()
    flipped = ones[torch.randperm(len(ones), generator=torch.Generator().manual_seed(0))[:8]]
    y[flipped] = 7  # deliberately mislabelled: 1s called 7
    alpha = sample_information(x, y, k=10)
    groups = split_by_information(alpha, tau=0.5)
    assert bool(groups.high[flipped].all())
    others = torch.ones_like(groups.high)
    others[flipped] = False
    assert groups.high[others].float().mean() < 0.05  # the rest is mostly low information
    # queries: scoring only the flipped samples against the whole pool gives the same values
    assert torch.equal(sample_information(x, y, k=10, queries=flipped), alpha[flipped])
    mask = torch.zeros(len(y), dtype=torch.bool)
    mask[flipped] = True
    assert torch.equal(sample_information(x, y, k=10, queries=mask), alpha[flipped.sort().values])


def test_feature_space_alpha_uses_the_layer(digits):
    from lightning_jit.demo.data import DigitsCNN

    torch.manual_seed(0)
    trained_cnn = DigitsCNN().eval()  # the hook mechanism does not need trained weights
    x, y = digits.x_test[:200], digits.y_test[:200]
    with torch.no_grad():
        feats = trained_cnn.features(x).flatten(1)
    by_name = sample_information(x, y, k=5, feature_fn=layer_features(trained_cnn, "features"))
    by_module = sample_information(x, y, k=5, feature_fn=layer_features(trained_cnn, trained_cnn.features))
    direct = sample_information(feats, y, k=5)
    assert torch.equal(by_name, direct) and torch.equal(by_module, direct)
    assert not torch.equal(direct, sample_information(x, y, k=5))  # a different space gives different alphas
    with pytest.raises(MisconfigurationException, match="not a submodule"):
        layer_features(trained_cnn, "nope")


def test_split_by_information_and_tau():
    alpha = torch.tensor([0.0, 0.3, 0.5, 1.0, float("nan")])
    low, high = split_by_information(alpha, tau=0.5)
    assert low.tolist() == [False, False, True, True, False]
    assert high.tolist() == [True, True, False, False, False]
    low, high = split_by_information(alpha, tau=1)
    assert low.tolist() == [False, False, False, True, False]
    for tau in (0, 0.0, -0.1, 1.0001, 2, math.nan, math.inf, True, "0.5", None):
        with pytest.raises(MisconfigurationException, match="tau"):
            split_by_information(alpha, tau=tau)


def test_bad_inputs():
    x, y = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(MisconfigurationException, match="`k`"):
        sample_information(x, y, k=6)
    with pytest.raises(MisconfigurationException, match="`k`"):
        sample_information(x, y, k=0)
    with pytest.raises(MisconfigurationException, match="radius"):
        sample_information(x, y, radius=0.0)
    with pytest.raises(MisconfigurationException, match="one label per sample"):
        sample_information(x, y[:5])
    with pytest.raises(MisconfigurationException, match="one label per sample"):
        sample_information(x, y.float())
    with pytest.raises(MisconfigurationException, match="empty"):
        sample_information(x[:0], y[:0])
