"""The held-out test of a sample request: do the forget samples look like data the model never saw?

A model retrained without some training samples treats them like any data it never trained on. So a request that
names individual samples (one user's records, a few poisoned rows) is verified against labelled *held-out* data (a
validation split): on the final weights, the forget set must be indistinguishable from it, by two two-sided tests:

* **accuracy**: the forget set's accuracy against the held-out accuracy, by Fisher's exact test on the two counts;
* **membership**: a per-sample score (the model's loss on the sample's label; its confidence in the label orders the
  samples the same way) separates forget from held-out samples no better than chance. The membership AUC is the
  probability that a forget sample scores as more member-like (a lower loss) than a held-out one; it is tested
  against 0.5 with the Mann-Whitney U test, and reported with a DeLong interval.

Both tests are two-sided: forgetting too much makes the forget samples stand out again (the Streisand effect), and
that fails too.

A test that does not reject is only as strong as its power. A memorised forget set is recognised to the last sample;
if even such a set would pass the accuracy test at these sizes, not rejecting says nothing, and the request is *too
small to verify* (:attr:`SampleTest.powered` is false; :attr:`SampleTest.min_forget` says how many forget samples
it takes against this held-out data). :class:`SampleTest` also records the smallest accuracy gap and AUC gap that
these sizes detect, so that a request is never reported as more than it is.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats
from torch import Tensor

#: Significance level of each of the two tests (two-sided).
ALPHA = 0.05


@dataclass(frozen=True)
class SampleTest:
    """The figures of the held-out test, enough for a reviewer to re-check the claim.

    Attributes:
        n_forget: Forget samples scored.
        n_heldout: Held-out samples scored.
        forget_accuracy: Percent of the forget samples given their label.
        heldout_accuracy: Percent of the held-out samples given their label.
        accuracy_p: Two-sided p-value of Fisher's exact test of the two accuracies.
        detectable_accuracy_gap: The accuracy gap (points) these sizes detect at ``alpha`` (normal approximation at
            the pooled accuracy).
        auc: Membership AUC: the probability that a forget sample has a lower loss than a held-out sample (ties count
            half); 0.5 is chance.
        auc_low: Lower end of its two-sided ``1 - alpha`` DeLong interval.
        auc_high: Upper end.
        auc_p: Two-sided p-value of the Mann-Whitney U test of AUC = 0.5.
        detectable_auc_gap: The distance from 0.5 that these sizes detect at ``alpha`` (under the null hypothesis).
        alpha: Significance level of each test.
        memorised_p: The accuracy test's p-value for a forget set of this size recognised to the last sample (what
            a memorised set looks like).
        min_forget: The fewest forget samples for which such a set is rejected against this held-out data (``None``
            when none is: the held-out data is recognised to the last sample too).
        passed: Neither test rejects: the forget samples are indistinguishable from held-out data at these sizes.
    """

    n_forget: int
    n_heldout: int
    forget_accuracy: float
    heldout_accuracy: float
    accuracy_p: float
    detectable_accuracy_gap: float
    auc: float
    auc_low: float
    auc_high: float
    auc_p: float
    detectable_auc_gap: float
    alpha: float
    memorised_p: float
    min_forget: int | None
    passed: bool

    @property
    def powered(self) -> bool:
        """Whether a memorised forget set of this size would fail the test: only then does passing mean anything."""
        return self.memorised_p < self.alpha

    @property
    def verified(self) -> bool:
        """The claim the outcome rests on: the test could tell a memorised set, and it passed."""
        return self.powered and self.passed

    @property
    def summary(self) -> str:
        """One line: the two comparisons and the power.

        Example:
            >>> import torch
            >>> t = sample_test(torch.zeros(40), torch.ones(40, dtype=torch.bool),
            ...                 torch.zeros(60), torch.ones(60, dtype=torch.bool))
            >>> t.summary  # doctest: +NORMALIZE_WHITESPACE
            'forget 100.0% vs held-out 100.0% accurate (p=1); membership AUC 0.50 [0.50, 0.50] (p=1); these sizes
            detect an accuracy gap of 0.0 points or an AUC gap of 0.12'
        """
        return (
            f"forget {self.forget_accuracy:.1f}% vs held-out {self.heldout_accuracy:.1f}% accurate"
            f" (p={self.accuracy_p:.2g}); membership AUC {self.auc:.2f} [{self.auc_low:.2f}, {self.auc_high:.2f}]"
            f" (p={self.auc_p:.2g}); these sizes detect an accuracy gap of {self.detectable_accuracy_gap:.1f} points"
            f" or an AUC gap of {self.detectable_auc_gap:.2f}"
        )

    @property
    def too_small(self) -> str:
        """Why a test without power verifies nothing, and what it would take."""
        need = (
            f"at least {self.min_forget} forget samples are needed against this held-out data"
            if self.min_forget is not None
            else "the held-out data is recognised to the last sample, so memorisation cannot show in accuracy"
        )
        return (
            f"too few forget samples to verify: against {self.n_heldout} held-out samples {self.heldout_accuracy:.1f}%"
            f" accurate, even {self.n_forget} forget samples recognised to the last one would pass (p="
            f"{self.memorised_p:.2g}); {need}"
        )

    @property
    def failure(self) -> str | None:
        """Which test rejected and which way (``None`` when the test passed)."""
        reasons = []
        if self.accuracy_p < self.alpha:
            way = "above" if self.forget_accuracy > self.heldout_accuracy else "below"
            reasons.append(f"the forget accuracy is {way} the held-out accuracy")
        if self.auc_p < self.alpha:
            if self.auc > 0.5:
                reasons.append("the forget samples' losses are lower than the held-out data's: they look like members")
            else:
                reasons.append(
                    "the forget samples' losses are higher than the held-out data's: they stand out (over-forgetting,"
                    " or memorised wrong labels, does that)"
                )
        return "; ".join(reasons) if reasons else None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def membership_auc(forget_loss: Tensor, heldout_loss: Tensor) -> float:
    """The probability that a forget sample has a lower loss than a held-out one (ties count half).

    Example:
        >>> import torch
        >>> membership_auc(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.2]))
        0.875
    """
    f = np.asarray(forget_loss, dtype=np.float64)
    h = np.asarray(heldout_loss, dtype=np.float64)
    ranks = stats.rankdata(np.concatenate([-f, -h]))  # member-likeness: a lower loss ranks higher
    u = ranks[: len(f)].sum() - len(f) * (len(f) + 1) / 2.0
    return float(u / (len(f) * len(h)))


def _delong_interval(f: np.ndarray, h: np.ndarray, auc: float, z: float) -> tuple[float, float]:
    """DeLong's interval for the AUC; with a single sample on one side, that side's variance term is taken as its
    upper bound (a Bernoulli variance of at most 1/4)."""
    # psi(f_i, h_j) = 1 if f_i's loss is lower, 0.5 on ties: the placements of each sample among the other side.
    lower = (f[:, None] < h[None, :]).astype(np.float64) + 0.5 * (f[:, None] == h[None, :])
    v_f, v_h = lower.mean(1), lower.mean(0)
    var_f = v_f.var(ddof=1) if len(f) > 1 else 0.25
    var_h = v_h.var(ddof=1) if len(h) > 1 else 0.25
    se = math.sqrt(var_f / len(f) + var_h / len(h))
    return max(0.0, auc - z * se), min(1.0, auc + z * se)


def sample_test(
    forget_loss: Tensor,
    forget_hits: Tensor,
    heldout_loss: Tensor,
    heldout_hits: Tensor,
    alpha: float = ALPHA,
) -> SampleTest:
    """Test whether the forget samples are indistinguishable from held-out data.

    Args:
        forget_loss: Per-sample loss (cross-entropy of the label) of the forget samples, on the final weights.
        forget_hits: Whether each forget sample is given its label.
        heldout_loss: Per-sample loss of the held-out samples, on the same weights.
        heldout_hits: Whether each held-out sample is given its label.
        alpha: Significance level of each two-sided test.

    Returns:
        The :class:`SampleTest`; ``passed`` when neither test rejects.

    Raises:
        ValueError: if a side is empty.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> memorised = sample_test(torch.rand(100, generator=g) * 0.01, torch.ones(100, dtype=torch.bool),
        ...                         torch.rand(500, generator=g), torch.rand(500, generator=g) < 0.9)
        >>> memorised.passed, memorised.auc > 0.9
        (False, True)
        >>> memorised.failure  # doctest: +NORMALIZE_WHITESPACE
        "the forget accuracy is above the held-out accuracy; the forget samples' losses are lower than the held-out
        data's: they look like members"

    """
    f = forget_loss.detach().double().cpu().numpy().reshape(-1)
    h = heldout_loss.detach().double().cpu().numpy().reshape(-1)
    if len(f) == 0 or len(h) == 0:
        raise ValueError(f"The held-out test needs samples on both sides, got {len(f)} forget and {len(h)} held-out.")
    m, n = len(f), len(h)
    hits_f, hits_h = int(forget_hits.sum()), int(heldout_hits.sum())
    z = float(stats.norm.ppf(1 - alpha / 2))
    accuracy_p = float(stats.fisher_exact([[hits_f, m - hits_f], [hits_h, n - hits_h]]).pvalue)
    pooled = (hits_f + hits_h) / (m + n)
    detectable_accuracy_gap = 100.0 * z * math.sqrt(pooled * (1 - pooled) * (1 / m + 1 / n))
    memorised_p = float(stats.fisher_exact([[m, 0], [hits_h, n - hits_h]]).pvalue)
    auc = membership_auc(forget_loss, heldout_loss)
    if np.all(f == f[0]) and np.all(h == f[0]):
        auc_p = 1.0  # every score ties: nothing separates the two sides
    else:
        auc_p = float(stats.mannwhitneyu(-f, -h, alternative="two-sided").pvalue)
    low, high = _delong_interval(f, h, auc, z)
    return SampleTest(
        n_forget=m,
        n_heldout=n,
        forget_accuracy=100.0 * hits_f / m,
        heldout_accuracy=100.0 * hits_h / n,
        accuracy_p=accuracy_p,
        detectable_accuracy_gap=detectable_accuracy_gap,
        auc=auc,
        auc_low=low,
        auc_high=high,
        auc_p=auc_p,
        detectable_auc_gap=z * math.sqrt((m + n + 1) / (12.0 * m * n)),
        alpha=alpha,
        memorised_p=memorised_p,
        min_forget=min_forget_samples(hits_h, n, alpha),
        passed=accuracy_p >= alpha and auc_p >= alpha,
    )


def min_forget_samples(heldout_hits: int, n_heldout: int, alpha: float = ALPHA, limit: int = 1_000_000) -> int | None:
    """The fewest forget samples for which a set recognised to the last sample fails Fisher's exact test against
    held-out data with ``heldout_hits`` of ``n_heldout`` recognised (``None`` if none up to ``limit`` does).

    Example:
        >>> min_forget_samples(925, 1000)  # held-out accuracy 92.5%
        47
        >>> min_forget_samples(1000, 1000) is None  # nothing to tell apart
        True
    """

    def rejected(m: int) -> bool:
        return stats.fisher_exact([[m, 0], [heldout_hits, n_heldout - heldout_hits]]).pvalue < alpha

    if heldout_hits >= n_heldout:
        return None
    high = 1
    while not rejected(high):
        high *= 2
        if high > limit:
            return None
    low = high // 2  # not rejected (or 0); the p-value falls as the set grows
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if rejected(mid) else (mid, high)
    return high


__all__ = ["ALPHA", "SampleTest", "membership_auc", "min_forget_samples", "sample_test"]
