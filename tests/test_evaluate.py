"""``evaluate_unlearning`` and the ``UnlearningEvaluation`` callback on real models trained on digits.

The original model forgets digit 3 through ``JiTUnlearning`` inside a Trainer that carries the callback (with a real
CSVLogger); a model retrained without digit 3 is the gold standard. Every figure of the report is checked against an
independent computation: numpy counts, scikit-learn's LogisticRegression fitted directly, scipy.stats, the ToW formula.
The models are the digits CNN at width 8, trained here: the evaluation does not need the suite's larger CNN.
"""

from __future__ import annotations

import copy
import csv
import json
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from scipy import stats
from scipy.spatial.distance import jensenshannon
from scipy.special import softmax
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_jit.core.batch import BatchFormat
from lightning_jit.core.settings import JiTSettings
from lightning_jit.demo.data import DigitsCNN, class_mask, train_classifier
from lightning_jit.evaluation import (
    UnlearningEvaluation,
    UnlearningReport,
    evaluate_unlearning,
    predict_split,
    random_copy,
    sample_information,
)
from lightning_jit.lightning.callback import JiTUnlearningCallback
from lightning_jit.lightning.data import forget_loader
from lightning_jit.lightning.module import JiTUnlearning
from tests._utils import quiet_trainer

FORGET_CLASS = 3
#: JiT settings that take the forget accuracy of the width-8 CNN well below the original's in 3 epochs.
JIT = JiTSettings(seed=0)  # the no-knob defaults


def _cnn() -> DigitsCNN:
    return DigitsCNN(width=8)


@pytest.fixture(scope="module")
def setup(digits, tmp_path_factory):
    """Original and retrained-without-3 CNNs, and the original JiT-unlearned through the wrapper + callback."""
    f = class_mask(digits.y_train, [FORGET_CLASS])
    splits = {
        "forget": (digits.x_train[f], digits.y_train[f]),
        "retain": (digits.x_train[~f], digits.y_train[~f]),
        "test": (digits.x_test, digits.y_test),
    }
    original = train_classifier(_cnn, digits.x_train, digits.y_train, epochs=10, seed=0)
    retrained = train_classifier(_cnn, *splits["retain"], epochs=10, seed=0)

    model = copy.deepcopy(original)
    log_root = tmp_path_factory.mktemp("logs")
    evaluation = UnlearningEvaluation(
        forget=DataLoader(TensorDataset(*splits["forget"]), batch_size=50),
        retain=splits["retain"],
        test=splits["test"],
        retrained=retrained,
        retrain_seconds=5.0,
    )
    trainer = quiet_trainer(max_epochs=-1, logger=CSVLogger(log_root, name="jit"), callbacks=[evaluation])
    trainer.fit(JiTUnlearning(model, JIT), forget_loader(TensorDataset(*splits["forget"])))
    return {
        "splits": splits,
        "original": original,
        "unlearned": model,
        "retrained": retrained,
        "evaluation": evaluation,
        "trainer": trainer,
    }


# ----------------------------------------------------------------------------------------------------------------------
# independent computations: the models' own forward, then numpy / scipy
# ----------------------------------------------------------------------------------------------------------------------
def _logits(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        out = model(x)
    return (out[0] if isinstance(out, tuple) else out).double().numpy()


def _entropies(model, x):
    return stats.entropy(softmax(_logits(model, x), axis=1), axis=1)


def _hand_accuracy(model, x, y):
    return 100.0 * float(np.mean(np.argmax(_logits(model, x), axis=1) == y.numpy()))


# ----------------------------------------------------------------------------------------------------------------------
# the callback and the known orderings
# ----------------------------------------------------------------------------------------------------------------------
def test_callback_logs_and_writes_report(setup):
    evaluation, trainer = setup["evaluation"], setup["trainer"]
    report = evaluation.report
    assert isinstance(report, UnlearningReport)
    log_dir = trainer.log_dir
    assert sorted(p.name for p in evaluation.paths.values()) == ["report.json", "report.md", "report.png"]
    assert all(str(p.parent) == log_dir for p in evaluation.paths.values())
    assert evaluation.paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(evaluation.paths["json"].read_text())["accuracy"] == report.accuracy
    # The report's first line is the run's verified verdict, measured by the run itself on the final weights.
    verification = trainer.lightning_module.verification
    first = evaluation.paths["markdown"].read_text().splitlines()[0]
    assert first == f"**{verification.verdict}**" and verification.verdict.startswith("forgotten: ")
    assert verification.forget_accuracy == pytest.approx(report.accuracy["unlearned"]["forget"])
    trainer.loggers[0].experiment.save()
    rows = list(csv.DictReader(open(f"{log_dir}/metrics.csv")))
    logged = {k: float(v) for row in rows for k, v in row.items() if v not in ("", None)}
    assert logged["forget/acc"] == pytest.approx(report.accuracy["unlearned"]["forget"])
    assert logged["retain/acc"] == pytest.approx(report.accuracy["unlearned"]["retain"])
    assert logged["test/acc"] == pytest.approx(report.accuracy["unlearned"]["test"])
    assert logged["forget/mia"] == pytest.approx(report.mia["unlearned"]["mia"])
    assert logged["forget/mia_retrained"] == pytest.approx(report.mia["retrained"]["mia"])
    assert logged["test/tow"] == pytest.approx(report.tug_of_war["unlearned"])
    assert float(trainer.callback_metrics["forget/zrf"]) == pytest.approx(report.zrf["unlearned"])
    assert report.timing["unlearning_seconds"] > 0 and report.timing["retrain_seconds"] == 5.0
    # the callback evaluates the wrapper's `unlearning_target`, and its "original" is the snapshot taken before
    # unlearning: the trained model's own figures
    assert report.accuracy["unlearned"]["forget"] == pytest.approx(
        _hand_accuracy(setup["unlearned"], *setup["splits"]["forget"])
    )
    assert report.accuracy["original"]["forget"] == pytest.approx(
        _hand_accuracy(setup["original"], *setup["splits"]["forget"])
    )


def test_full_class_forgetting_orderings(setup):
    report = setup["evaluation"].report
    acc, mia = report.accuracy, report.mia
    # original remembers digit 3, the retrained model never saw it, JiT lies in between
    assert acc["original"]["forget"] > 95.0 and acc["retrained"]["forget"] < 5.0
    assert mia["original"]["mia"] > mia["retrained"]["mia"] + 0.3
    assert acc["original"]["forget"] > acc["unlearned"]["forget"] >= acc["retrained"]["forget"]
    assert report.entropy["retrained"]["forget"] > report.entropy["original"]["forget"]
    assert report.entropy["unlearned"]["forget"] > report.entropy["original"]["forget"]  # JiT moved something
    # the original model is far from the retrained one on the forget set; unlearning narrows the gap
    assert report.retrain_match["original"]["ks_pvalue"] < 1e-6
    assert (
        report.retrain_match["unlearned"]["activation_distance"]
        < report.retrain_match["original"]["activation_distance"]
    )
    assert report.tug_of_war["unlearned"] > report.tug_of_war["original"]
    assert report.tug_of_war["original"] == pytest.approx(
        (1 - abs(acc["original"]["forget"] - acc["retrained"]["forget"]) / 100)
        * (1 - abs(acc["original"]["retain"] - acc["retrained"]["retain"]) / 100)
        * (1 - abs(acc["original"]["test"] - acc["retrained"]["test"]) / 100)
    )
    assert report.zrf["retrained"] > report.zrf["original"]
    # On digits the model generalises so well that retain and test entropies barely differ: the attack is only a
    # little better than chance, and the notes flag exactly the weak ones.
    assert all(0.5 <= v["attack_balanced_accuracy"] < 0.7 for v in mia.values())
    flagged = {m for m in mia if any(f"for the {m} model" in n for n in report.notes)}
    assert flagged == {m for m, v in mia.items() if v["attack_balanced_accuracy"] <= 0.55}


# ----------------------------------------------------------------------------------------------------------------------
# exactness against independent computations
# ----------------------------------------------------------------------------------------------------------------------
def test_report_matches_independent_computations(setup):
    models = {m: setup[m] for m in ("original", "unlearned", "retrained")}
    splits = setup["splits"]
    report = evaluate_unlearning(
        models["original"],
        models["unlearned"],
        splits["forget"],
        splits["retain"],
        splits["test"],
        models["retrained"],
        unlearning_seconds=2.0,
        retrain_seconds=8.0,
        seed=5,
    )
    assert report.timing["speedup"] == 4.0
    assert report.sizes == {s: len(v[1]) for s, v in splits.items()}
    teacher = random_copy(models["unlearned"], seed=5)
    q = softmax(_logits(teacher, splits["forget"][0]), axis=1)
    for m, model in models.items():
        h = {s: _entropies(model, x) for s, (x, _) in splits.items()}
        for s, (x, y) in splits.items():
            assert report.accuracy[m][s] == pytest.approx(_hand_accuracy(model, x, y), abs=1e-9)
            assert report.entropy[m][s] == pytest.approx(h[s].mean(), rel=1e-5, abs=1e-7)
        # MIA: scikit-learn's LogisticRegression fitted directly on independently computed entropies
        x_attack = np.concatenate([h["retain"], h["test"]]).reshape(-1, 1)
        y_attack = np.concatenate([np.ones(len(h["retain"])), np.zeros(len(h["test"]))])
        clf = LogisticRegression(class_weight="balanced").fit(x_attack, y_attack)
        assert abs(report.mia[m]["mia"] - clf.predict(h["forget"].reshape(-1, 1)).mean()) < 1e-6
        assert abs(report.mia[m]["attack_accuracy"] - (clf.predict(x_attack) == y_attack).mean()) < 1e-6
        balanced = balanced_accuracy_score(y_attack, clf.predict(x_attack))
        assert abs(report.mia[m]["attack_balanced_accuracy"] - balanced) < 1e-6
        # ZRF against the seeded random copy of the unlearned model's architecture
        p = softmax(_logits(model, splits["forget"][0]), axis=1)
        zrf = 1 - np.mean(jensenshannon(p, q, base=2, axis=1) ** 2)
        assert report.zrf[m] == pytest.approx(zrf, abs=1e-6)
    # retrain match: scipy.stats on the forget-set entropies
    h_r = _entropies(models["retrained"], splits["forget"][0])
    for m in ("original", "unlearned"):
        h = _entropies(models[m], splits["forget"][0])
        got = report.retrain_match[m]
        assert got["wilcoxon_pvalue"] == pytest.approx(stats.wilcoxon(h, h_r).pvalue, rel=1e-3, abs=1e-12)
        assert got["ks_statistic"] == pytest.approx(stats.ks_2samp(h, h_r).statistic, abs=1e-9)
        assert got["mannwhitney_statistic"] == pytest.approx(stats.mannwhitneyu(h, h_r).statistic, abs=1e-9)
        # ToW against its formula, from hand-counted accuracies
        hand = {
            s: (_hand_accuracy(models[m], *splits[s]), _hand_accuracy(models["retrained"], *splits[s])) for s in splits
        }
        tow = math.prod(1 - abs(a - b) / 100 for a, b in hand.values())
        assert report.tug_of_war[m] == pytest.approx(tow, abs=1e-12)
    # the information split: alpha of the forget samples among forget + retain in input space
    assert report.information["counts"]["low"] + report.information["counts"]["high"] == len(splits["forget"][1])


class _DictDataset(Dataset):
    def __init__(self, x, y, keys=("image", "label")):
        self.x, self.y, self.keys = x, y, keys

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {self.keys[0]: self.x[i], self.keys[1]: self.y[i]}


def test_loaders_and_pairs_give_the_same_report(setup):
    s = {name: (x[:300], y[:300]) for name, (x, y) in setup["splits"].items()}
    kwargs = dict(retrained=setup["retrained"], unlearning_seconds=1.0)
    from_pairs = evaluate_unlearning(
        setup["original"], setup["unlearned"], s["forget"], s["retain"], s["test"], **kwargs
    )
    from_loaders = evaluate_unlearning(
        setup["original"],
        setup["unlearned"],
        DataLoader(TensorDataset(*s["forget"]), batch_size=16),
        DataLoader(_DictDataset(*s["retain"]), batch_size=100),
        DataLoader(TensorDataset(*s["test"], torch.arange(len(s["test"][1]))), batch_size=64),  # (x, y, id)
        **kwargs,
    )
    a, b = from_pairs.to_dict(), from_loaders.to_dict()
    assert a.keys() == b.keys()
    for key in ("accuracy", "sizes", "mia"):
        assert a[key] == b[key]
    assert a["information"]["counts"] == b["information"]["counts"]
    for key in ("entropy", "zrf", "retrain_match", "tug_of_war", "information"):
        np.testing.assert_allclose(_flatten(a[key]), _flatten(b[key]), rtol=1e-5, atol=1e-9)


def _flatten(d):
    if isinstance(d, dict):
        return [v for k in sorted(d) for v in _flatten(d[k])]
    if isinstance(d, str):
        return []
    return [math.nan if d is None else float(d)]


def test_mislabelled_forget_samples_are_in_the_high_information_group(setup, digits):
    # forget = 60 ordinary samples + 8 samples of digit 1 deliberately labelled 7
    ones = (digits.y_train == 1).nonzero().flatten()
    flipped = ones[torch.randperm(len(ones), generator=torch.Generator().manual_seed(0))[:8]]
    keep = torch.ones(len(digits.y_train), dtype=torch.bool)
    keep[flipped] = False
    ordinary = keep.nonzero().flatten()[:60]
    x_f = torch.cat([digits.x_train[ordinary], digits.x_train[flipped]])
    y_f = torch.cat([digits.y_train[ordinary], torch.full((8,), 7)])
    rest = keep.clone()
    rest[ordinary] = False
    retain = (digits.x_train[rest], digits.y_train[rest])
    report = evaluate_unlearning(
        setup["original"], setup["unlearned"], (x_f, y_f), retain, (digits.x_test, digits.y_test), tau=0.5, k=10
    )
    alpha = torch.tensor(report.forget_alpha)
    assert bool((alpha[60:] < 0.5).all())
    assert report.information["counts"]["high"] >= 8
    assert report.information["counts"]["high"] <= 8 + 3  # ordinary samples are almost all low information
    # the original model learnt the wrong labels less well than the ordinary samples: visible in the groups
    groups = report.information["groups"]
    assert groups["high"]["original"]["acc"] < groups["low"]["original"]["acc"]
    md = report.to_markdown()
    assert "high information" in md and "alpha < tau = 0.5" in md
    # in a layer's feature space: alpha over the original model's features of forget + retain
    in_features = evaluate_unlearning(
        setup["original"], setup["unlearned"], (x_f, y_f), retain, feature_layer="features"
    )
    with torch.no_grad():
        features = setup["original"].features(torch.cat([x_f, retain[0]])).flatten(1)
    direct = sample_information(features, torch.cat([y_f, retain[1]]), k=10, queries=torch.arange(len(y_f)))
    np.testing.assert_allclose(in_features.forget_alpha, direct.numpy(), atol=1e-6)
    assert in_features.information["space"] == "the features of layer 'features'"
    assert in_features.settings["feature_layer"] == "features"


# ----------------------------------------------------------------------------------------------------------------------
# one batch convention: a dict batch with custom keys and a model returning (logits, aux), in JiT and in the report
# ----------------------------------------------------------------------------------------------------------------------
class _WithAux(nn.Module):
    """A classifier whose forward returns ``(logits, features)``."""

    def __init__(self, cnn: DigitsCNN) -> None:
        super().__init__()
        self.cnn = cnn

    def forward(self, x):
        features = self.cnn.features(x)
        return self.cnn.head(features), features


def test_dict_batches_and_tuple_outputs_read_like_jit(setup, tmp_path):
    x_f, y_f = (t[:64] for t in setup["splits"]["forget"])
    x_r, y_r = (t[:200] for t in setup["splits"]["retain"])

    def loader(x, y, batch_size=32):
        return DataLoader(_DictDataset(x, y, keys=("pixels", "digit")), batch_size=batch_size)

    fmt = BatchFormat(input_key="pixels", label_key="digit", output_selector=0)
    original = _WithAux(copy.deepcopy(setup["original"]))
    model = _WithAux(copy.deepcopy(setup["original"]))
    evaluation = UnlearningEvaluation(
        forget=loader(x_f, y_f), retain=loader(x_r, y_r), batch_format=fmt, write_files=False
    )
    settings = JiTSettings(sigma=0.1, lr=0.3, n_perturbations=4, epochs=1)
    unlearner = JiTUnlearning(model, settings, input_key="pixels", label_key="digit", output_selector=0)
    quiet_trainer(callbacks=[evaluation], default_root_dir=tmp_path).fit(unlearner, loader(x_f, y_f))
    assert unlearner.outcome is not None and unlearner.run.steps > 0
    report = evaluation.report
    assert report.accuracy["unlearned"]["forget"] == pytest.approx(_hand_accuracy(model, x_f, y_f))
    assert report.accuracy["original"]["forget"] == pytest.approx(_hand_accuracy(original, x_f, y_f))
    assert report.accuracy["unlearned"]["retain"] == pytest.approx(_hand_accuracy(model, x_r, y_r))
    assert report.entropy["unlearned"]["forget"] == pytest.approx(_entropies(model, x_f).mean(), rel=1e-5)
    # the same figures from evaluate_unlearning directly, and from predict_split
    direct = evaluate_unlearning(original, model, loader(x_f, y_f), loader(x_r, y_r), batch_format=fmt)
    assert direct.accuracy == report.accuracy
    logits, labels = predict_split(model, loader(x_r, y_r), "retain", batch_format=fmt)
    np.testing.assert_allclose(logits.double().numpy(), _logits(model, x_r), rtol=1e-5, atol=1e-6)
    assert torch.equal(labels, y_r)
    # without the batch format the report says what to pass
    with pytest.raises(MisconfigurationException, match="batch_format=BatchFormat"):
        evaluate_unlearning(original, model, loader(x_f, y_f))
    with pytest.raises(MisconfigurationException, match="output_selector"):
        evaluate_unlearning(original, model, (x_f, y_f), batch_format=BatchFormat(output_selector="logits"))
    with pytest.raises(MisconfigurationException, match="batch_format"):
        evaluate_unlearning(original, model, (x_f, y_f), batch_format={"input_key": "pixels"})


# ----------------------------------------------------------------------------------------------------------------------
# the protocols: any unlearning method that names its target model or its hook
# ----------------------------------------------------------------------------------------------------------------------
class _GradientAscent(pl.LightningModule):
    """A toy unlearning method (not JiT): gradient ascent on the forget loss of the model it holds."""

    def __init__(self, model: nn.Module, lr: float = 0.5) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    @property
    def unlearning_target(self) -> nn.Module:
        return self.model

    def training_step(self, batch, batch_idx):
        x, y = batch
        return -nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=self.lr)


class _AscentAtTrainEnd(pl.Callback):
    """A toy unlearning callback: one gradient-ascent step on the forget set in ``on_train_end``."""

    def __init__(self, x, y, hook: str = "on_train_end") -> None:
        self.x, self.y, self.unlearns_at = x, y, hook

    def on_train_end(self, trainer, pl_module):
        with torch.enable_grad():
            loss = -nn.functional.cross_entropy(pl_module(self.x), self.y)
            grads = torch.autograd.grad(loss, list(pl_module.parameters()))
        with torch.no_grad():
            for p, g in zip(pl_module.parameters(), grads, strict=True):
                p -= 1.0 * g


class _Unwrapped(pl.LightningModule):
    def __init__(self, target) -> None:
        super().__init__()
        self.layer = nn.Linear(64, 10)
        self.unlearning_target = target

    def forward(self, x):
        return self.layer(x.flatten(1))

    def training_step(self, batch, batch_idx):
        return self(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_the_evaluation_finds_any_method_through_the_protocols(setup, tmp_path):
    x_f, y_f = (t[:64] for t in setup["splits"]["forget"])
    x_t, y_t = (t[:100] for t in setup["splits"]["test"])
    forget = DataLoader(TensorDataset(x_f, y_f), batch_size=32)

    # a wrapper with `unlearning_target`: the wrapped model is evaluated and snapshotted, not the wrapper
    before = copy.deepcopy(setup["original"])
    model = copy.deepcopy(setup["original"])
    evaluation = UnlearningEvaluation(forget=(x_f, y_f), test=(x_t, y_t), write_files=False)
    quiet_trainer(callbacks=[evaluation], default_root_dir=tmp_path).fit(_GradientAscent(model), forget)
    assert evaluation.report.accuracy["original"]["forget"] == pytest.approx(_hand_accuracy(before, x_f, y_f))
    assert evaluation.report.accuracy["unlearned"]["forget"] == pytest.approx(_hand_accuracy(model, x_f, y_f))
    assert evaluation.report.accuracy["unlearned"]["forget"] < evaluation.report.accuracy["original"]["forget"]
    assert list(evaluation._snapshot) == list(model.state_dict())  # the inner model's keys: no "model." prefix

    # a callback with `unlearns_at`: the original is the model right before that hook, after the training
    trained = _cnn()
    initial = copy.deepcopy(trained.state_dict())
    evaluation = UnlearningEvaluation(forget=(x_f, y_f), test=(x_t, y_t), write_files=False)
    train = DataLoader(TensorDataset(*(t[:256] for t in setup["splits"]["retain"])), batch_size=64)
    quiet_trainer(callbacks=[evaluation, _AscentAtTrainEnd(x_f, y_f)], default_root_dir=tmp_path).fit(trained, train)
    snapshot = copy.deepcopy(trained)
    snapshot.load_state_dict(evaluation._snapshot)
    assert evaluation.report.accuracy["original"]["test"] == pytest.approx(_hand_accuracy(snapshot, x_t, y_t))
    assert evaluation.report.accuracy["unlearned"]["test"] == pytest.approx(_hand_accuracy(trained, x_t, y_t))
    assert any(not torch.equal(v, initial[k]) for k, v in evaluation._snapshot.items())  # after the training
    assert any(not torch.equal(v, trained.state_dict()[k]) for k, v in evaluation._snapshot.items())  # before ascent
    assert evaluation.report.timing["unlearning_seconds"] > 0  # no ledger: the run was timed

    # placed after such a callback, or with a hook it cannot snapshot before, or a target that is not a model: errors
    with pytest.raises(MisconfigurationException, match="comes after _AscentAtTrainEnd"):
        late = UnlearningEvaluation(forget=(x_f, y_f))
        quiet_trainer(callbacks=[_AscentAtTrainEnd(x_f, y_f), late], default_root_dir=tmp_path).fit(_cnn(), train)
    with pytest.raises(MisconfigurationException, match="unlearns_at is 'on_validation_end'"):
        bad = _AscentAtTrainEnd(x_f, y_f, hook="on_validation_end")
        quiet_trainer(callbacks=[UnlearningEvaluation(forget=(x_f, y_f)), bad], default_root_dir=tmp_path).fit(
            _cnn(), train
        )
    with pytest.raises(MisconfigurationException, match="unlearning_target must be the nn.Module"):
        evaluation = UnlearningEvaluation(forget=(x_f, y_f), write_files=False)
        quiet_trainer(callbacks=[evaluation], default_root_dir=tmp_path).fit(_Unwrapped("not a model"), forget)


# ----------------------------------------------------------------------------------------------------------------------
# missing inputs, serialisation and bad inputs
# ----------------------------------------------------------------------------------------------------------------------
def test_missing_optional_inputs_skip_with_notes(setup, tmp_path):
    report = evaluate_unlearning(setup["original"], setup["unlearned"], setup["splits"]["forget"])
    assert report.models == ["original", "unlearned"] and list(report.sizes) == ["forget"]
    assert report.mia == {} and report.tug_of_war == {} and report.retrain_match == {}
    joined = " ".join(report.notes)
    for word in ("MIA skipped", "retrained", "alpha measured among the forget samples", "Unlearning time unknown"):
        assert word in joined
    assert set(report.information["groups"]["low"]) == {"original", "unlearned"}
    assert report.information["counts"]["high"] == 0  # one class alone: every neighbour shares the label
    paths = report.save(tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert data["notes"] == report.notes and data["timing"]["unlearning_seconds"] is None
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert "Notes:" in paths["markdown"].read_text()
    # retain and test but no retrained model: MIA is there, ToW is not
    s = setup["splits"]
    partial = evaluate_unlearning(setup["original"], setup["unlearned"], s["forget"], s["retain"], s["test"])
    assert set(partial.mia) == {"original", "unlearned"} and partial.tug_of_war == {}
    # a retrained model but no test split: the retrain match is there, ToW is skipped with a note
    no_test = evaluate_unlearning(
        setup["original"], setup["unlearned"], s["forget"], s["retain"], retrained=setup["retrained"]
    )
    assert set(no_test.retrain_match) == {"original", "unlearned"} and no_test.tug_of_war == {}
    assert any("Tug of War skipped" in n for n in no_test.notes)


def test_to_markdown_and_json_round_trip(setup, tmp_path):
    report = setup["evaluation"].report
    md = report.to_markdown()
    assert "| forget accuracy (%) | ≈ retrained |" in md
    assert f"{report.accuracy['unlearned']['forget']:.1f}" in md
    text = report.to_json(tmp_path / "r.json", per_sample=True)
    data = json.loads(text)
    assert len(data["forget_entropies"]["unlearned"]) == report.sizes["forget"]
    assert data["retrain_match"]["unlearned"]["ks_pvalue"] == report.retrain_match["unlearned"]["ks_pvalue"]
    assert "forget_entropies" not in report.to_dict()
    assert report.metrics("retrained")["forget/acc"] == report.accuracy["retrained"]["forget"]


def test_bad_inputs(setup):
    orig, unl, s = setup["original"], setup["unlearned"], setup["splits"]
    x, y = s["forget"]
    # splits with mismatched class counts
    with pytest.raises(MisconfigurationException, match="disagree on the number of classes"):
        evaluate_unlearning(orig, unl, (x, y), (s["retain"][0][:20], torch.full((20,), 10)))
    with pytest.raises(MisconfigurationException, match="num_classes=5"):
        evaluate_unlearning(orig, unl, (x, y), num_classes=5)
    # an empty split
    with pytest.raises(MisconfigurationException, match="`test` split is empty"):
        evaluate_unlearning(orig, unl, (x, y), s["retain"], (x[:0], y[:0]))
    with pytest.raises(MisconfigurationException, match="`forget` split is empty"):
        evaluate_unlearning(orig, unl, DataLoader(TensorDataset(x[:0], y[:0]), batch_size=4))
    # models with different output widths
    with pytest.raises(MisconfigurationException, match="different output widths"):
        evaluate_unlearning(orig, unl, (x, y), retrained=DigitsCNN(width=8, num_classes=9))
    # tau outside (0, 1]
    for tau in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(MisconfigurationException, match="tau"):
            evaluate_unlearning(orig, unl, (x, y), tau=tau)
        with pytest.raises(MisconfigurationException, match="tau"):
            UnlearningEvaluation(forget=(x, y), tau=tau)
    for name in ("k", "batch_size"):
        with pytest.raises(MisconfigurationException, match=f"`{name}` must be a positive integer"):
            evaluate_unlearning(orig, unl, (x, y), **{name: 0})
        with pytest.raises(MisconfigurationException, match=f"`{name}` must be a positive integer"):
            UnlearningEvaluation(forget=(x, y), **{name: 0})
    # the same object as original and unlearned (JiT works in place)
    with pytest.raises(MisconfigurationException, match="deepcopy"):
        evaluate_unlearning(unl, unl, (x, y))
    with pytest.raises(MisconfigurationException, match="one label per input"):
        evaluate_unlearning(orig, unl, (x, y[:-1]))
    with pytest.raises(MisconfigurationException, match="DataLoader"):
        evaluate_unlearning(orig, unl, x)
    # batches without labels, inputs the models cannot take
    with pytest.raises(MisconfigurationException, match="`forget` batches must carry one integer class label"):
        evaluate_unlearning(orig, unl, DataLoader(TensorDataset(x), batch_size=8))
    with pytest.raises(MisconfigurationException, match="cannot run on the `forget` split"):
        evaluate_unlearning(orig, unl, (x.flatten(1), y))


def test_with_the_jit_callback_the_original_is_snapshotted_right_before_it_fires(digits, tmp_path):
    f = class_mask(digits.y_train, [FORGET_CLASS])
    x_f, y_f = digits.x_train[f][:64], digits.y_train[f][:64]
    settings = JiTSettings.plain(sigma=0.1, lr=0.003, n_perturbations=4, on_unverified="keep")
    jit_kwargs = dict(when="fit_end", checkpoint_filename=None, audit_path=None)
    jit = JiTUnlearningCallback(TensorDataset(x_f, y_f, torch.arange(64)), settings, **jit_kwargs)
    evaluation = UnlearningEvaluation(
        forget=(x_f, y_f), retain=(digits.x_train[~f], digits.y_train[~f]), test=(digits.x_test, digits.y_test)
    )
    pl.seed_everything(0, verbose=False)
    model = _cnn()  # untrained: the user's job trains it, then JiT forgets at the end of the same fit
    train = DataLoader(TensorDataset(digits.x_train, digits.y_train), batch_size=64, shuffle=True)
    trainer = quiet_trainer(max_epochs=2, callbacks=[evaluation, jit], default_root_dir=tmp_path)
    trainer.fit(model, train)
    report = evaluation.report
    # the original is the trained model from right before JiT fired, not the untrained one from the start of fit
    assert report.accuracy["original"]["retain"] > 80.0
    snapshot = evaluation._snapshot
    assert any(not torch.equal(snapshot[k], v) for k, v in model.state_dict().items())  # JiT changed the weights
    assert report.timing["unlearning_seconds"] == jit.ledger.runs[-1]["wall_time_s"]
    assert (tmp_path / "report.md").exists()  # no logger: the report goes to default_root_dir
    # placed after the JiT callback, it cannot see the weights from before unlearning: a clear error
    late = UnlearningEvaluation(forget=(x_f, y_f))
    other = JiTUnlearningCallback(TensorDataset(x_f, y_f, torch.arange(64)), settings, **jit_kwargs)
    with pytest.raises(MisconfigurationException, match="Put it before JiTUnlearningCallback"):
        quiet_trainer(callbacks=[other, late], default_root_dir=tmp_path).fit(_cnn(), train)
