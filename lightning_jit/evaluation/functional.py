"""The unlearning metrics as pure functions of logits (torch, float64), and the tests and attacks they feed.

These are what the metric classes of :mod:`lightning_jit.evaluation.metrics` accumulate, as torchmetrics'
``functional`` package is to its classes. They hold no state and never synchronise across processes.

Conventions:

* accuracies are in percent;
* entropies are in nats (natural logarithm), computed in float64 from ``log_softmax``;
* Jensen-Shannon divergences are in **bits** (log base 2), so they lie in ``[0, 1]`` and the ZRF score does too.

Each metric, which way is better and what it is compared against: ``docs/metrics.md``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

#: The three splits of an unlearning evaluation.
SPLITS = ("forget", "retain", "test")

#: An entropy MIA attack whose balanced accuracy on its own training data is at most this is called useless.
USELESS_ATTACK_BALANCED_ACCURACY = 0.55


# ----------------------------------------------------------------------------------------------------------------------
# Input checks (shared with the metric classes)
# ----------------------------------------------------------------------------------------------------------------------
def _check_logits(logits: Tensor, name: str = "logits") -> Tensor:
    """``logits`` if it is a 2-D ``(batch, classes)`` tensor with at least 2 classes."""
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise MisconfigurationException(f"`{name}` must be a 2-D (batch, classes) tensor of logits, got {shape}.")
    if logits.shape[1] < 2:
        raise MisconfigurationException(f"`{name}` must have at least 2 classes, got {logits.shape[1]}.")
    return logits


def _check_pair(a: Tensor, b: Tensor, names: tuple[str, str]) -> None:
    """Two models' logits on the same samples: both valid, and of the same shape."""
    _check_logits(a, names[0])
    _check_logits(b, names[1])
    if a.shape != b.shape:
        raise MisconfigurationException(
            f"`{names[0]}` {tuple(a.shape)} and `{names[1]}` {tuple(b.shape)} must have the same shape: the models must"
            " have the same output width (number of classes) and be run on the same samples."
        )


def _check_targets(target: Tensor, logits: Tensor) -> None:
    """``target`` holds one class index in ``[0, classes)`` per row of ``logits``."""
    if (
        not isinstance(target, Tensor)
        or target.dim() != 1
        or target.shape[0] != logits.shape[0]
        or torch.is_floating_point(target)
    ):
        shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        dtype = f" ({target.dtype})" if isinstance(target, Tensor) else ""
        raise MisconfigurationException(
            f"`target` must be a 1-D integer tensor of {logits.shape[0]} class labels, got {shape}{dtype}."
        )
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= logits.shape[1]):
        raise MisconfigurationException(
            f"Labels must be class indices in [0, {logits.shape[1]}) to match the model's {logits.shape[1]} outputs,"
            f" got labels in [{int(target.min())}, {int(target.max())}]. The split and the model disagree on the"
            " number of classes."
        )


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise MisconfigurationException(f"`split` must be one of {SPLITS}, got {split!r}.")
    return split


# ----------------------------------------------------------------------------------------------------------------------
# Per-sample values
# ----------------------------------------------------------------------------------------------------------------------
def prediction_entropy(logits: Tensor) -> Tensor:
    """Per-sample entropy ``H(p) = -sum_k p_k log p_k`` (nats) of ``p = softmax(logits)``, in float64.

    Raises:
        MisconfigurationException: if ``logits`` is not a ``(batch, classes)`` tensor with at least 2 classes.

    Example:
        >>> prediction_entropy(torch.zeros(1, 4))  # uniform over 4 classes: log(4)
        tensor([1.3863], dtype=torch.float64)
    """
    logp = torch.log_softmax(_check_logits(logits).detach().double(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def js_divergence(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """Per-sample Jensen-Shannon divergence in bits between ``softmax(logits_p)`` and ``softmax(logits_q)``.

    Equals ``scipy.spatial.distance.jensenshannon(p, q, base=2) ** 2``; lies in ``[0, 1]`` (0: the same prediction).

    Raises:
        MisconfigurationException: if the two are not ``(batch, classes)`` logits of the same shape.

    Example:
        >>> js_divergence(torch.tensor([[9.0, -9.0]]), torch.tensor([[-9.0, 9.0]])).round(decimals=3)
        tensor([1.], dtype=torch.float64)
    """
    _check_pair(logits_p, logits_q, ("logits_p", "logits_q"))
    logp = torch.log_softmax(logits_p.detach().double(), -1)
    logq = torch.log_softmax(logits_q.detach().double(), -1)
    logm = torch.logaddexp(logp, logq) - math.log(2.0)

    def kl(loga: Tensor) -> Tensor:
        a = loga.exp()
        return torch.where(a > 0, a * (loga - logm), torch.zeros_like(a)).sum(-1)

    return (0.5 * kl(logp) + 0.5 * kl(logq)).clamp_min(0.0) / math.log(2.0)


def activation_distance(logits_u: Tensor, logits_r: Tensor) -> Tensor:
    """Per-sample L2 distance ``||softmax(logits_u) - softmax(logits_r)||_2`` (float64), in ``[0, sqrt(2)]``.

    Compared with the retrained model (``logits_r``): **lower is better**, 0 is the same prediction.

    Raises:
        MisconfigurationException: if the two are not ``(batch, classes)`` logits of the same shape.

    Example:
        >>> activation_distance(torch.zeros(1, 3), torch.zeros(1, 3))
        tensor([0.], dtype=torch.float64)
    """
    _check_pair(logits_u, logits_r, ("logits_u", "logits_r"))
    p = torch.softmax(logits_u.detach().double(), -1)
    q = torch.softmax(logits_r.detach().double(), -1)
    return torch.linalg.vector_norm(p - q, dim=-1)


# ----------------------------------------------------------------------------------------------------------------------
# Aggregates, tests and attacks
# ----------------------------------------------------------------------------------------------------------------------
def tug_of_war(unlearned: dict[str, float], retrained: dict[str, float]) -> float:
    """Tug of War: ``prod_S (1 - |acc_S(u) - acc_S(r)| / 100)`` over S in forget, retain, test (accuracies in %).

    1 means the unlearned model's three accuracies equal the retrained model's; **higher is better**.

    Raises:
        MisconfigurationException: if a split is missing or an accuracy is outside ``[0, 100]``.

    Example:
        >>> tug_of_war({"forget": 10.0, "retain": 95.0, "test": 90.0}, {"forget": 0.0, "retain": 97.0, "test": 90.0})
        0.882
    """
    missing = [s for s in SPLITS if s not in unlearned or s not in retrained]
    if missing:
        raise MisconfigurationException(f"Tug of War needs the accuracies of all three splits; missing {missing}.")
    value = 1.0
    for s in SPLITS:
        for name, acc in (("unlearned", unlearned[s]), ("retrained", retrained[s])):
            if not (0.0 <= acc <= 100.0):
                raise MisconfigurationException(f"The {name} {s} accuracy must be a percentage in [0, 100], got {acc}.")
        value *= 1.0 - abs(unlearned[s] - retrained[s]) / 100.0
    return value


def random_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``model``'s architecture with fresh, reproducibly initialised weights (the ZRF "incompetent teacher").

    Every submodule with a ``reset_parameters`` method is re-initialised under ``torch.manual_seed(seed)`` (the
    global RNG state is restored afterwards). Parameters owned by modules without one are re-drawn from N(0, 0.02).
    The copy is in eval mode; ``model`` is left untouched.

    Example:
        >>> net = torch.nn.Linear(3, 2)
        >>> a, b = random_copy(net, seed=1), random_copy(net, seed=1)
        >>> torch.equal(a.weight, b.weight), torch.equal(a.weight, net.weight)
        (True, False)
    """
    trainer = getattr(model, "_trainer", None)
    memo: dict[int, Any] = {id(trainer): None} if trainer is not None else {}
    clone = copy.deepcopy(model, memo)
    covered: set[int] = set()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in clone.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
                covered.update(id(p) for p in module.parameters(recurse=False))
        with torch.no_grad():
            for p in clone.parameters():
                if id(p) not in covered:
                    p.normal_(0.0, 0.02)
    return clone.eval()


def fit_entropy_attack(retain_entropy: Tensor | np.ndarray, test_entropy: Tensor | np.ndarray) -> Any:
    """Fit the entropy membership-inference attack: ``LogisticRegression(class_weight="balanced")`` on
    ``X = [H(retain) -> 1 (member), H(test) -> 0 (non-member)]``, as in the JiT, SSD and Bad Teacher papers.

    Returns:
        The fitted scikit-learn classifier; ``attack.predict(h.reshape(-1, 1))`` calls samples "member" (1) or not.

    Raises:
        MisconfigurationException: if either split is empty.

    Example:
        >>> attack = fit_entropy_attack(torch.tensor([0.0, 0.1, 0.05]), torch.tensor([1.0, 1.2, 0.9]))
        >>> attack.predict(np.array([[0.02], [1.1]])).tolist()
        [1.0, 0.0]
    """
    from sklearn.linear_model import LogisticRegression

    r = np.asarray(torch.as_tensor(retain_entropy).double().cpu(), dtype=np.float64).reshape(-1, 1)
    t = np.asarray(torch.as_tensor(test_entropy).double().cpu(), dtype=np.float64).reshape(-1, 1)
    if len(r) == 0 or len(t) == 0:
        raise MisconfigurationException(
            "The entropy MIA needs both retain (members) and test (non-members) samples; one of them is empty."
        )
    x = np.concatenate([r, t])
    y = np.concatenate([np.ones(len(r)), np.zeros(len(t))])
    return LogisticRegression(class_weight="balanced").fit(x, y)


def entropy_tests(unlearned: np.ndarray | Tensor, retrained: np.ndarray | Tensor) -> dict[str, float]:
    """Paired (Wilcoxon signed-rank) and unpaired (Kolmogorov-Smirnov, Mann-Whitney U) two-sample tests of two
    entropy samples, via :mod:`scipy.stats` with its default options.

    Returns ``{name}_statistic`` and ``{name}_pvalue`` for ``wilcoxon``, ``ks`` and ``mannwhitney``. A **high
    p-value** is good: no evidence that the two distributions differ. When the paired differences are all zero (or
    the samples are not paired) the Wilcoxon test is reported as statistic 0, p-value 1.

    Example:
        >>> out = entropy_tests(np.array([0.1, 0.2, 0.3]), np.array([0.1, 0.2, 0.3]))
        >>> out["wilcoxon_pvalue"], out["ks_pvalue"]
        (1.0, 1.0)
    """
    from scipy import stats

    unlearned = np.asarray(unlearned, dtype=np.float64)
    retrained = np.asarray(retrained, dtype=np.float64)
    out: dict[str, float] = {}
    if unlearned.shape == retrained.shape and np.any(unlearned != retrained):
        w = stats.wilcoxon(unlearned, retrained)
        out["wilcoxon_statistic"], out["wilcoxon_pvalue"] = float(w.statistic), float(w.pvalue)
    else:
        out["wilcoxon_statistic"], out["wilcoxon_pvalue"] = 0.0, 1.0
    ks = stats.ks_2samp(unlearned, retrained)
    out["ks_statistic"], out["ks_pvalue"] = float(ks.statistic), float(ks.pvalue)
    mw = stats.mannwhitneyu(unlearned, retrained)
    out["mannwhitney_statistic"], out["mannwhitney_pvalue"] = float(mw.statistic), float(mw.pvalue)
    return out


def warn_if_useless_attack(balanced_accuracy: float, model_name: str) -> str | None:
    """A note (also warned on rank zero) when the entropy MIA attack is no better than chance on its own training data.

    Returns:
        The note when ``balanced_accuracy <= 0.55`` (:data:`USELESS_ATTACK_BALANCED_ACCURACY`), else ``None``.

    Example:
        >>> warn_if_useless_attack(0.9, "unlearned") is None
        True
    """
    if balanced_accuracy <= USELESS_ATTACK_BALANCED_ACCURACY:
        note = (
            f"The entropy MIA attack for the {model_name} model reaches only {balanced_accuracy:.2f} balanced accuracy"
            " on its own training data (retain vs test): it barely separates members from non-members, so its MIA"
            " value says little."
        )
        rank_zero_warn(note)
        return note
    return None


__all__ = [
    "SPLITS",
    "activation_distance",
    "entropy_tests",
    "fit_entropy_attack",
    "js_divergence",
    "prediction_entropy",
    "random_copy",
    "tug_of_war",
    "warn_if_useless_attack",
]
