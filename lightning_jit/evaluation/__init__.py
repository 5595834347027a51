"""Judging an unlearning run: functional metrics, torchmetrics classes, ``evaluate_unlearning`` and its report.

* :mod:`~lightning_jit.evaluation.functional`: the metrics as pure functions of logits, the entropy tests and attack;
* :mod:`~lightning_jit.evaluation.metrics`: the torchmetrics classes (DDP-safe, each with its good direction);
* :mod:`~lightning_jit.evaluation.information`: alpha(x), the information of a sample;
* :mod:`~lightning_jit.evaluation.evaluate`: ``evaluate_unlearning`` and ``predict_split`` (running models over
  splits read with :class:`~lightning_jit.core.batch.BatchFormat`);
* :mod:`~lightning_jit.evaluation.report`: ``UnlearningReport`` and its JSON, Markdown and PNG;
* :mod:`~lightning_jit.evaluation.callback`: the ``UnlearningEvaluation`` callback and the protocols it finds the
  unlearning through.

Every metric, which way is better and what it is compared against: ``docs/metrics.md``.
"""

from lightning_jit.evaluation.callback import (
    UnlearningEvaluation,
    UnlearningHook,
    UnlearningWrapper,
    find_unlearning_hook,
    unlearning_target,
)
from lightning_jit.evaluation.evaluate import evaluate_unlearning, predict_split
from lightning_jit.evaluation.functional import (
    SPLITS,
    activation_distance,
    entropy_tests,
    fit_entropy_attack,
    js_divergence,
    prediction_entropy,
    random_copy,
    tug_of_war,
    warn_if_useless_attack,
)
from lightning_jit.evaluation.information import (
    InformationSplit,
    layer_features,
    sample_information,
    split_by_information,
)
from lightning_jit.evaluation.metrics import (
    EntropyMIA,
    ForgetAccuracy,
    PredictionEntropy,
    RetrainMatch,
    SplitAccuracy,
    TugOfWar,
    ZRFScore,
)
from lightning_jit.evaluation.report import UnlearningReport

__all__ = [
    "SPLITS",
    "EntropyMIA",
    "ForgetAccuracy",
    "InformationSplit",
    "PredictionEntropy",
    "RetrainMatch",
    "SplitAccuracy",
    "TugOfWar",
    "UnlearningEvaluation",
    "UnlearningHook",
    "UnlearningReport",
    "UnlearningWrapper",
    "ZRFScore",
    "activation_distance",
    "entropy_tests",
    "evaluate_unlearning",
    "find_unlearning_hook",
    "fit_entropy_attack",
    "js_divergence",
    "layer_features",
    "predict_split",
    "prediction_entropy",
    "random_copy",
    "sample_information",
    "split_by_information",
    "tug_of_war",
    "unlearning_target",
    "warn_if_useless_attack",
]
