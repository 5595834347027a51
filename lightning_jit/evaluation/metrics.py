"""torchmetrics classes for judging unlearning (`docs/metrics.md`).

Every metric here is compared with a model **retrained from scratch without the forget set** (the gold standard): a
good unlearning method lands close to the retrained model's value, not at an extreme. Each class states in its
docstring and in ``higher_is_better`` which way is "more forgotten" / "better"; ``docs/metrics.md`` defines them all.

The classes accumulate the pure functions of :mod:`lightning_jit.evaluation.functional` (same units: accuracies in
percent, entropies in nats, Jensen-Shannon divergences in bits). They keep their state in ``add_state`` tensors with a
``dist_reduce_fx`` (``"sum"`` for counters, ``"cat"`` for per-sample values), so they synchronise correctly under
DDP; ``full_state_update = False``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.utilities.data import dim_zero_cat

from lightning_jit.evaluation.functional import (
    SPLITS,
    _check_logits,
    _check_pair,
    _check_split,
    _check_targets,
    activation_distance,
    entropy_tests,
    fit_entropy_attack,
    js_divergence,
    prediction_entropy,
    tug_of_war,
)


class SplitAccuracy(MulticlassAccuracy):
    """Top-1 accuracy in percent on the retain or test split: **higher is better** (unlearning should not hurt the
    rest); the reference is the original model's and the retrained model's accuracy on the same split.

    torchmetrics' ``MulticlassAccuracy`` (``average="micro"``: correct predictions over samples) counts; this class
    checks the inputs, names the split and reports the share in percent, in float64.

    For the forget split use :class:`ForgetAccuracy`, whose good direction differs.

    Example:
        >>> metric = SplitAccuracy(split="test")
        >>> metric.update(torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]]), torch.tensor([0, 1, 1]))
        >>> round(float(metric.compute()), 2)
        66.67
    """

    is_differentiable = False
    higher_is_better: bool | None = True
    full_state_update = False
    _allowed_splits: tuple[str, ...] = ("retain", "test")

    tp: Tensor
    fn: Tensor

    def __init__(self, split: str = "test", **kwargs: Any) -> None:
        if split not in self._allowed_splits:
            hint = " Use `ForgetAccuracy` for the forget split." if split == "forget" else ""
            raise MisconfigurationException(f"`split` must be one of {self._allowed_splits}, got {split!r}.{hint}")
        super().__init__(num_classes=None, average="micro", **kwargs)
        self.split = split

    def update(self, logits: Tensor, target: Tensor) -> None:
        _check_logits(logits)
        _check_targets(target, logits)
        super().update(logits, target)

    def compute(self) -> Tensor:
        # micro average: every sample is either a true positive or a false negative of its own class
        total = (self.tp + self.fn).sum()
        if total == 0:
            raise MisconfigurationException(f"SplitAccuracy({self.split!r}) saw no samples: the split is empty.")
        return 100.0 * self.tp.sum().double() / total


class ForgetAccuracy(SplitAccuracy):
    """Top-1 accuracy in percent on the forget split.

    ``higher_is_better = None``: the target is the **retrained** model's forget accuracy (about 0 for full-class
    forgetting, about the test accuracy for random forgetting). Far above it, the forget set is remembered; far below
    it, the model over-forgets, which is itself detectable.

    Example:
        >>> metric = ForgetAccuracy()
        >>> metric.update(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([1, 1]))
        >>> float(metric.compute())
        50.0
    """

    higher_is_better = None
    _allowed_splits = ("forget",)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(split="forget", **kwargs)


class PredictionEntropy(Metric):
    """Mean prediction entropy ``H(softmax f(x))`` (nats) over a split; the per-sample values are kept too.

    There is no universal good direction (``higher_is_better = None``): on the forget set, unlearning raises the
    entropy, and the target is the **retrained** model's forget-set entropy; on retain/test, it should stay close to
    the original model's. The per-sample values (:meth:`per_sample`) feed the entropy MIA and the retrain match.

    Example:
        >>> metric = PredictionEntropy()
        >>> metric.update(torch.tensor([[0.0, 0.0], [100.0, 0.0]]))  # log(2) and ~0
        >>> round(float(metric.compute()), 4), metric.per_sample().shape
        (0.3466, torch.Size([2]))
    """

    is_differentiable = True
    higher_is_better = None
    full_state_update = False

    entropy_sum: Tensor
    total: Tensor
    values: list[Tensor]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("entropy_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, logits: Tensor) -> None:
        h = prediction_entropy(logits)
        self.entropy_sum += h.sum()
        self.total += h.numel()
        self.values.append(h)

    def compute(self) -> Tensor:
        if self.total == 0:
            raise MisconfigurationException("PredictionEntropy saw no samples: the split is empty.")
        return self.entropy_sum / self.total

    def per_sample(self) -> Tensor:
        """All per-sample entropies seen so far, concatenated over batches and over processes (under DDP this is a
        collective call: every process must make it)."""
        with self.sync_context(should_unsync=True):
            return dim_zero_cat(self.values) if len(self.values) else torch.zeros(0, dtype=torch.float64)


class EntropyMIA(Metric):
    """Entropy membership-inference attack (MIA): the fraction of the forget set an attacker calls "member".

    A logistic regression with ``class_weight="balanced"`` is fitted on the prediction entropies of the retain set
    (label 1, member) and the test set (label 0, non-member); ``mia`` is the fraction of forget samples it predicts to
    be members. **Lower means more forgotten** (``higher_is_better = False``), but the target is the **retrained**
    model's value: far below it is over-forgetting (the forget set then looks *less* familiar than unseen data).

    ``compute()`` returns a dict: ``mia`` (fraction in [0, 1]), ``attack_accuracy``, the attack's accuracy on its own
    (retain + test) training data, and ``attack_balanced_accuracy``, the mean of its recall on members and on
    non-members. Retain is usually much larger than test, so plain accuracy can look good for an attack that calls
    everything "member"; a balanced accuracy near 0.5 means the attack is useless and its MIA value carries no
    information.

    Feed each split with ``update(logits, split)``; ``split`` is ``"forget"``, ``"retain"`` or ``"test"``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> metric = EntropyMIA()
        >>> metric.update(10 * torch.eye(4)[torch.randint(0, 4, (50,), generator=g)], "retain")  # confident: member
        >>> metric.update(torch.randn(50, 4, generator=g) * 0.1, "test")  # unsure: non-member
        >>> metric.update(10 * torch.eye(4)[:5], "forget")  # still confident: remembered
        >>> out = metric.compute()
        >>> float(out["mia"]), float(out["attack_accuracy"]), float(out["attack_balanced_accuracy"])
        (1.0, 1.0, 1.0)
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    forget_entropy: list[Tensor]
    retain_entropy: list[Tensor]
    test_entropy: list[Tensor]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for split in SPLITS:
            self.add_state(f"{split}_entropy", default=[], dist_reduce_fx="cat")
        self.attack: Any = None

    def update(self, logits: Tensor, split: str) -> None:
        getattr(self, f"{_check_split(split)}_entropy").append(prediction_entropy(logits))

    def entropies(self, split: str) -> Tensor:
        """The per-sample entropies of one split seen so far (float64)."""
        states = getattr(self, f"{_check_split(split)}_entropy")
        return dim_zero_cat(states) if len(states) else torch.zeros(0, dtype=torch.float64)

    def compute(self) -> dict[str, Tensor]:
        forget = self.entropies("forget")
        if forget.numel() == 0:
            raise MisconfigurationException("EntropyMIA saw no forget samples: the forget split is empty.")
        retain, test = self.entropies("retain"), self.entropies("test")
        self.attack = fit_entropy_attack(retain, test)
        x_train = np.concatenate([retain.cpu().numpy(), test.cpu().numpy()]).reshape(-1, 1)
        y_train = np.concatenate([np.ones(len(retain)), np.zeros(len(test))])
        predicted = self.attack.predict(x_train)
        attack_accuracy = float((predicted == y_train).mean())
        balanced = 0.5 * float((predicted[y_train == 1] == 1).mean() + (predicted[y_train == 0] == 0).mean())
        mia = float(self.attack.predict(forget.cpu().numpy().reshape(-1, 1)).mean())
        return {
            "mia": torch.tensor(mia, dtype=torch.float64),
            "attack_accuracy": torch.tensor(attack_accuracy, dtype=torch.float64),
            "attack_balanced_accuracy": torch.tensor(balanced, dtype=torch.float64),
        }


class RetrainMatch(Metric):
    """How closely the unlearned model matches the retrained model on the forget set.

    Feed the unlearned and the retrained model's logits on the **same** forget samples (same order):
    ``update(unlearned_logits, retrained_logits)``. ``compute()`` returns a dict:

    * ``wilcoxon_statistic`` / ``wilcoxon_pvalue``: paired Wilcoxon signed-rank test of the per-sample entropies;
    * ``ks_statistic`` / ``ks_pvalue``: unpaired two-sample Kolmogorov-Smirnov test of the entropy distributions;
    * ``mannwhitney_statistic`` / ``mannwhitney_pvalue``: unpaired Mann-Whitney U test;
    * ``activation_distance``: mean ``||softmax f_u(x) - softmax f_r(x)||_2`` -- lower is better (0 = identical);
    * ``js_divergence``: mean Jensen-Shannon divergence (bits) of the two predictions -- lower is better.

    For the tests, a **high p-value** is good: no evidence that the unlearned model's forget-set entropies differ from
    the retrained model's (the JiT paper reports p = 0.10). The keys point different ways, so
    ``higher_is_better = None``. Tests come from :mod:`scipy.stats` with their default options.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> retrained = torch.randn(40, 5, generator=g)
        >>> out = RetrainMatch()
        >>> out.update(retrained + 0.01 * torch.randn(40, 5, generator=g), retrained)
        >>> res = out.compute()
        >>> res["ks_pvalue"] > 0.5, res["activation_distance"] < 0.01
        (tensor(True), tensor(True))
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    unlearned_entropy: list[Tensor]
    retrained_entropy: list[Tensor]
    distance_sum: Tensor
    js_sum: Tensor
    total: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("unlearned_entropy", default=[], dist_reduce_fx="cat")
        self.add_state("retrained_entropy", default=[], dist_reduce_fx="cat")
        self.add_state("distance_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("js_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, unlearned_logits: Tensor, retrained_logits: Tensor) -> None:
        _check_pair(unlearned_logits, retrained_logits, ("unlearned_logits", "retrained_logits"))
        self.unlearned_entropy.append(prediction_entropy(unlearned_logits))
        self.retrained_entropy.append(prediction_entropy(retrained_logits))
        self.distance_sum += activation_distance(unlearned_logits, retrained_logits).sum()
        self.js_sum += js_divergence(unlearned_logits, retrained_logits).sum()
        self.total += unlearned_logits.shape[0]

    def compute(self) -> dict[str, Tensor]:
        if self.total == 0:
            raise MisconfigurationException("RetrainMatch saw no forget samples: the forget split is empty.")
        u = dim_zero_cat(self.unlearned_entropy).cpu().numpy()
        r = dim_zero_cat(self.retrained_entropy).cpu().numpy()
        out = {**entropy_tests(u, r)}
        out["activation_distance"] = float(self.distance_sum / self.total)
        out["js_divergence"] = float(self.js_sum / self.total)
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


class ZRFScore(Metric):
    """Zero Retrain Forgetting score: ``1 - mean_x JS(softmax f_u(x), softmax T(x))`` over the forget set.

    ``T`` is a randomly initialised copy of the architecture (see
    :func:`~lightning_jit.evaluation.functional.random_copy`, seeded), an "incompetent
    teacher" that knows nothing. ZRF lies in ``[0, 1]`` (JS in bits). **Higher means the model behaves more like a
    model that never learned the forget set** (``higher_is_better = True``), but the target is the **retrained**
    model's ZRF on the same forget set: a model can overshoot it.

    Feed ``update(model_logits, random_logits)`` with the model's and the random copy's logits on the same samples.

    Example:
        >>> from lightning_jit.evaluation.functional import random_copy
        >>> net = torch.nn.Linear(4, 3)
        >>> teacher = random_copy(net, seed=0)
        >>> x = torch.randn(8, 4)
        >>> zrf = ZRFScore()
        >>> zrf.update(teacher(x), teacher(x))  # behaving exactly like the random teacher
        >>> float(zrf.compute())
        1.0
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    js_sum: Tensor
    total: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("js_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, model_logits: Tensor, random_logits: Tensor) -> None:
        self.js_sum += js_divergence(model_logits, random_logits).sum()
        self.total += model_logits.shape[0]

    def compute(self) -> Tensor:
        if self.total == 0:
            raise MisconfigurationException("ZRFScore saw no forget samples: the forget split is empty.")
        return 1.0 - self.js_sum / self.total


class TugOfWar(Metric):
    """Tug of War (ToW): ``prod_S (1 - |acc_S(u) - acc_S(r)| / 100)`` over S in forget, retain, test.

    Compares the unlearned model's accuracies with the retrained model's on all three splits at once; 1 is a perfect
    match, **higher is better**. Feed ``update(unlearned_logits, retrained_logits, target, split)`` for each split.

    Example:
        >>> tow = TugOfWar()
        >>> y = torch.tensor([0, 1])
        >>> right, wrong = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
        >>> tow.update(right, wrong, y, "forget")  # 100% vs 0%: factor 0
        >>> tow.update(right, right, y, "retain")
        >>> tow.update(right, right, y, "test")
        >>> float(tow.compute())
        0.0
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct_unlearned: Tensor
    correct_retrained: Tensor
    total: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        zeros = torch.zeros(len(SPLITS), dtype=torch.long)
        self.add_state("correct_unlearned", default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state("correct_retrained", default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state("total", default=zeros.clone(), dist_reduce_fx="sum")

    def update(self, unlearned_logits: Tensor, retrained_logits: Tensor, target: Tensor, split: str) -> None:
        _check_split(split)
        _check_pair(unlearned_logits, retrained_logits, ("unlearned_logits", "retrained_logits"))
        _check_targets(target, unlearned_logits)
        i = SPLITS.index(split)
        self.correct_unlearned[i] += (unlearned_logits.argmax(-1) == target).sum()
        self.correct_retrained[i] += (retrained_logits.argmax(-1) == target).sum()
        self.total[i] += target.numel()

    def accuracies(self) -> tuple[dict[str, float], dict[str, float]]:
        """The unlearned and retrained accuracies (percent) per split."""
        empty = [s for s, n in zip(SPLITS, self.total.tolist(), strict=True) if n == 0]
        if empty:
            raise MisconfigurationException(f"TugOfWar needs samples of every split; {empty} saw none.")
        u = {s: 100.0 * int(c) / int(n) for s, c, n in zip(SPLITS, self.correct_unlearned, self.total, strict=True)}
        r = {s: 100.0 * int(c) / int(n) for s, c, n in zip(SPLITS, self.correct_retrained, self.total, strict=True)}
        return u, r

    def compute(self) -> Tensor:
        u, r = self.accuracies()
        return torch.tensor(tug_of_war(u, r), dtype=torch.float64)


__all__ = [
    "EntropyMIA",
    "ForgetAccuracy",
    "PredictionEntropy",
    "RetrainMatch",
    "SplitAccuracy",
    "TugOfWar",
    "ZRFScore",
]
