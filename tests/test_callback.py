"""`JiTUnlearningCallback` inside real Trainer runs on CPU, on real digits data; the ledger and the audit file."""

from __future__ import annotations

import math
import pickle

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lightning_jit
from lightning_jit import JiTInputError, JiTSettings, JiTUnlearning, JiTUnlearningCallback
from lightning_jit.core.batching import batch_size_for
from lightning_jit.demo.data import DigitsCNN, accuracy
from lightning_jit.io import file_sha256
from lightning_jit.lightning.ledger import AUDIT_FILENAME, content_id, read_audit

#: The defaults, with a target any run meets: these tests are about the callback's plumbing (when it runs, the ledger,
#: the files), so every run verifies. The outcomes themselves are tested with real targets below and in test_outcomes.
SETTINGS = dict(n_perturbations=8, target_forget_accuracy=100.0)
FORGET_A = list(range(0, 200, 7))  # 29 train indices: a deletion request
FORGET_B = [i for i in range(3, 200, 11) if i % 7]  # 15 more, none in A


def _forget_set(digits, indices):
    idx = torch.tensor(indices)
    return TensorDataset(digits.x_train[idx], digits.y_train[idx], idx)


def _job_loader(digits):
    """The user's own fine-tuning data: the part of the training split that no request touches."""
    return DataLoader(TensorDataset(digits.x_train[400:656], digits.y_train[400:656]), batch_size=64)


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _wrapper_reference(state, dataset, batch_size=None, model_factory=DigitsCNN, **settings):
    """What `JiTUnlearning` does to weights `state` on `dataset`, via its own Trainer run (the callback's defaults:
    seed 0, the collapse guard on)."""
    model = model_factory()
    model.load_state_dict(state)
    wrapper = JiTUnlearning(model, **{**SETTINGS, **settings})
    pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(wrapper, DataLoader(dataset, batch_size=batch_size or batch_size_for(len(dataset))))
    return _state(model)


class Probe(Callback):
    """Copies the module's weights at the hooks the JiT callback uses (placed before or after it in `callbacks`)."""

    def __init__(self):
        self.seen = {"on_train_start": [], "on_train_epoch_end": [], "on_train_end": []}

    def on_train_start(self, trainer, pl_module):
        self.seen["on_train_start"].append(_state(pl_module))

    def on_train_epoch_end(self, trainer, pl_module):
        self.seen["on_train_epoch_end"].append(_state(pl_module))

    def on_train_end(self, trainer, pl_module):
        self.seen["on_train_end"].append(_state(pl_module))


class Requests:
    """A deletion-request queue: each call returns the requests received so far (one more batch per call)."""

    def __init__(self, digits, batches):
        self.digits, self.batches, self.calls = digits, batches, 0

    def __call__(self):
        self.calls += 1
        received = [i for batch in self.batches[: self.calls] for i in batch]
        return _forget_set(self.digits, received)


def _fit(model, tmp_path, callbacks, digits, max_epochs=1, ckpt_path=None, **kw):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, save_on_train_epoch_end=True)
    trainer = pl.Trainer(
        **{"accelerator": "cpu", "devices": 1, **kw},
        max_epochs=max_epochs,
        limit_train_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[*callbacks, checkpoint],
    )
    trainer.fit(model, _job_loader(digits), ckpt_path=ckpt_path)
    return trainer, checkpoint


# ----------------------------------------------------------------------------------------------------------------------
# Each moment, equivalence with the wrapper, and the checkpoints
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("when", ["fit_start", "train_epoch_end", "fit_end"])
def test_each_when_unlearns_like_the_wrapper_and_checkpoints_hold_it(when, trained_cnn, digits, tmp_path):
    before, after = Probe(), Probe()
    if when == "train_epoch_end":
        forget = Requests(digits, [FORGET_A, FORGET_B])  # a second request arrives before the second epoch ends
    else:
        forget = _forget_set(digits, FORGET_A)
    callback = JiTUnlearningCallback(forget, **SETTINGS, when=when)
    hook = {"fit_start": "on_train_start", "train_epoch_end": "on_train_epoch_end", "fit_end": "on_train_end"}[when]
    epochs = 2 if when == "train_epoch_end" else 1
    trainer, checkpoint = _fit(trained_cnn, tmp_path, [before, callback, after], digits, epochs)

    runs = callback.ledger.runs
    assert len(runs) == epochs
    requests = [FORGET_A, FORGET_B]
    for k, run in enumerate(runs):
        # The JiT callback changed the weights at its hook exactly as the wrapper does from the same weights.
        assert run["ids"] == requests[k]  # the second run processes only the new request
        want = _wrapper_reference(before.seen[hook][k], _forget_set(digits, requests[k]))
        _assert_same(after.seen[hook][k], want)
        assert not all(torch.equal(before.seen[hook][k][n], want[n]) for n in want)
        assert run["global_step"] == {"fit_start": 0, "train_epoch_end": 2 * (k + 1), "fit_end": 2}[when]
    # Training continued after a fit_start unlearning; nothing ran after the last epoch-end or fit-end one.
    final = _state(trained_cnn)
    if when == "fit_start":
        assert not torch.equal(final["head.3.weight"], after.seen[hook][-1]["head.3.weight"])
    else:
        _assert_same(final, after.seen[hook][-1])

    # The checkpoint the callback saves holds the unlearned weights and loads strictly into the user's class.
    unlearned = DigitsCNN.load_from_checkpoint(tmp_path / "ckpt" / "unlearned.ckpt", strict=True)
    _assert_same(_state(unlearned), after.seen[hook][-1])
    assert runs[-1]["checkpoint"] == str(tmp_path / "ckpt" / "unlearned.ckpt")
    if when == "train_epoch_end":
        # ModelCheckpoint saves at the end of each training epoch, after the hook: it holds that epoch's unlearning.
        for k in range(2):
            path = tmp_path / "ckpt" / f"epoch={k}-step={2 * (k + 1)}.ckpt"
            _assert_same(_state(DigitsCNN.load_from_checkpoint(path, strict=True)), after.seen[hook][k])


def test_equivalence_with_wrapper_for_every_setting(trained_bn_cnn, digits, tmp_path):
    """BatchNorm model, epochs, sum reduction, batch clamp, the logit-norm penalty and the stopping rule: identical
    weights."""
    settings = dict(
        logit_norm_penalty=10.0,
        logit_norm_sigma=0.5,
        sigma=0.3,
        lr=0.002,
        n_perturbations=5,
        epochs=2,
        reduction="sum",
        clamp="batch",
        target_forget_accuracy=60.0,
        seed=123,
        perturbation_chunk=16,
    )
    forget = _forget_set(digits, FORGET_A + FORGET_B)
    before, after = Probe(), Probe()
    callback = JiTUnlearningCallback(forget, when="fit_start", batch_size=16, **settings)
    _fit(trained_bn_cnn, tmp_path, [before, callback, after], digits)
    want = _wrapper_reference(
        before.seen["on_train_start"][0],
        forget,
        batch_size=16,
        model_factory=lambda: DigitsCNN(batchnorm=True),
        **settings,
    )
    _assert_same(after.seen["on_train_start"][0], want)
    run = callback.ledger.runs[0]
    assert run["stopped_early"] == (run["steps"] < 2 * math.ceil(len(forget) / 16))


# ----------------------------------------------------------------------------------------------------------------------
# The ledger: resume, idempotence, audit file
# ----------------------------------------------------------------------------------------------------------------------
def test_resume_never_forgets_the_same_ids_twice(trained_cnn, digits, tmp_path):
    first = JiTUnlearningCallback(_forget_set(digits, FORGET_A), **SETTINGS, when="fit_end")
    _fit(trained_cnn, tmp_path / "a", [first], digits)
    resumed_from = tmp_path / "a" / "ckpt" / "unlearned.ckpt"

    # A second job resumes from the unlearned checkpoint with the same request plus new ids.
    before, after = Probe(), Probe()
    second = JiTUnlearningCallback(_forget_set(digits, FORGET_A + FORGET_B), **SETTINGS, when="fit_start")
    _fit(DigitsCNN(), tmp_path / "b", [before, second, after], digits, max_epochs=2, ckpt_path=resumed_from)
    run = second.ledger.runs[-1]
    assert [r["ids"] for r in second.ledger.runs] == [FORGET_A, FORGET_B]
    assert run["counts"] == {
        "requested": len(FORGET_A + FORGET_B),
        "already_forgotten": len(FORGET_A),
        "attempted": len(FORGET_B),
        "forgotten": len(FORGET_B),
        "unverifiable": 0,
    }
    want = _wrapper_reference(before.seen["on_train_start"][0], _forget_set(digits, FORGET_B))
    _assert_same(after.seen["on_train_start"][0], want)

    # A third resume with nothing new changes no weight and forgets nothing, but still leaves an audit record.
    before, after = Probe(), Probe()
    third = JiTUnlearningCallback(_forget_set(digits, FORGET_B + FORGET_A), **SETTINGS, when="fit_start")
    last = tmp_path / "b" / "ckpt" / "epoch=1-step=4.ckpt"
    _fit(DigitsCNN(), tmp_path / "c", [before, third, after], digits, max_epochs=3, ckpt_path=last)
    _assert_same(before.seen["on_train_start"][0], after.seen["on_train_start"][0])
    assert third.ledger.runs[-1]["counts"]["forgotten"] == 0
    assert len(third.ledger) == len(FORGET_A) + len(FORGET_B)
    assert not (tmp_path / "c" / "ckpt" / "unlearned.ckpt").exists()
    assert read_audit(tmp_path / "c" / "ckpt" / AUDIT_FILENAME)[0]["ids"] == []


def test_audit_record_content(trained_cnn, digits, tmp_path):
    forget = _forget_set(digits, FORGET_A)
    before, after = Probe(), Probe()
    callback = JiTUnlearningCallback(forget, **SETTINGS, when="fit_end")
    _, checkpoint = _fit(trained_cnn, tmp_path, [before, callback, after], digits)

    records = read_audit(tmp_path / "ckpt" / AUDIT_FILENAME)
    assert len(records) == 1
    record = records[0]
    # The file and the checkpointed ledger say the same; the file also names the checkpoint's bytes.
    assert record == {**callback.ledger.runs[0], "checkpoint_sha256": file_sha256(record["checkpoint"])}
    assert record["ids"] == FORGET_A and record["id_source"] == "dataset"
    assert record["counts"] == {
        "requested": 29,
        "already_forgotten": 0,
        "attempted": 29,
        "forgotten": 29,
        "unverifiable": 0,
    }
    assert {k: record["settings"][k] for k in ("sigma", "lr", "n_perturbations", "seed", "norm_policy", "when")} == {
        "sigma": None,
        "lr": None,
        "n_perturbations": 8,
        "seed": 0,
        "norm_policy": "eval",
        "when": "fit_end",
    }
    assert record["versions"]["torch"] == torch.__version__
    assert record["versions"]["lightning"] == pl.__version__
    assert record["versions"]["lightning_jit"] == lightning_jit.__version__
    assert record["wall_time_s"] > 0 and record["time"] <= record["time_end"]
    assert record["steps"] == 8 and record["skipped_steps"] == 0  # 29 samples, one pass of 8 batches (random task)
    assert record["outcome"] == "forgotten" and record["verification"]["target"] == 100.0
    assert record["verification"]["extra"]["calibrated"]["task"] == "random"  # what it calibrated, in the record
    assert record["cost"]["total"] > 0

    # Forget-set metrics before and after, recomputed independently from the probed weights.
    x, y = forget.tensors[0], forget.tensors[1]
    for key, state in (
        ("metrics_before", before.seen["on_train_end"][0]),
        ("metrics_after", after.seen["on_train_end"][0]),
    ):
        model = DigitsCNN()
        model.load_state_dict(state)
        assert record[key]["forget_accuracy"] == pytest.approx(accuracy(model, x, y))
        with torch.no_grad():
            p = torch.softmax(model.eval()(x).double(), dim=1)
        entropy = float(-(p * p.clamp_min(1e-300).log()).sum(1).mean())
        assert record[key]["forget_mean_entropy"] == pytest.approx(entropy, rel=1e-4)
        assert record[key]["n"] == 29

    # The checkpoint's callback state carries the same ledger, and ModelCheckpoint's directory holds the audit file.
    ckpt = torch.load(tmp_path / "ckpt" / "unlearned.ckpt", weights_only=False)
    assert ckpt["callbacks"][callback.state_key]["ledger"]["runs"][0]["ids"] == FORGET_A
    assert checkpoint.dirpath == str(tmp_path / "ckpt")
    pickle.loads(pickle.dumps(callback))  # everything the callback holds pickles


def test_ids_from_argument_or_content_hash(trained_cnn, digits, tmp_path):
    idx = torch.tensor(FORGET_A)
    plain = TensorDataset(digits.x_train[idx], digits.y_train[idx])
    named = [f"user-{i}" for i in FORGET_A]
    by_name = JiTUnlearningCallback(plain, **SETTINGS, ids=named, when="fit_start", checkpoint_filename=None)
    by_hash = JiTUnlearningCallback(
        DataLoader(plain, batch_size=8), **SETTINGS, when="fit_end", audit_path=tmp_path / "hash.jsonl", ledger_name="b"
    )
    _fit(trained_cnn, tmp_path, [by_name, by_hash], digits)
    assert by_name.ledger.runs[0]["ids"] == named and by_name.ledger.runs[0]["id_source"] == "ids"
    assert by_hash.ledger.runs[0]["ids"] == [content_id(plain[i]) for i in range(len(plain))]
    assert by_hash.ledger.runs[0]["steps"] == 4  # the loader's batch size (8) is used
    assert read_audit(tmp_path / "hash.jsonl")[0]["id_source"] == "content_hash"


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: a clear error before any weight changes
# ----------------------------------------------------------------------------------------------------------------------
def test_invalid_arguments_are_refused_at_construction(digits):
    forget = _forget_set(digits, FORGET_A)
    with pytest.raises(MisconfigurationException, match="`when` must be one of"):
        JiTUnlearningCallback(forget, **SETTINGS, when="epoch_end")
    with pytest.raises(MisconfigurationException, match="`sigma`"):
        JiTUnlearningCallback(forget, sigma=0.0, lr=0.01)
    with pytest.raises(MisconfigurationException, match="`forget` must be"):
        JiTUnlearningCallback(digits.x_train, **SETTINGS)
    with pytest.raises(MisconfigurationException, match="not unique"):
        JiTUnlearningCallback(forget, **SETTINGS, ids=[1, 2, "1"])


class DictDataset(Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixels": self.x[i]}


def _duplicated(digits):
    return TensorDataset(digits.x_train[:4], digits.y_train[:4], torch.tensor([5, 6, 5, 7]))


@pytest.mark.parametrize(
    ("make_forget", "error", "match"),
    [
        (lambda d: TensorDataset(d.x_train[:0], d.y_train[:0]), MisconfigurationException, "forget set is empty"),
        (_duplicated, MisconfigurationException, r"not unique: 1 id\(s\) occur more than once, e.g. \[5\]"),
        (
            lambda d: TensorDataset(d.x_train[[3, 3]], d.y_train[[3, 3]]),
            MisconfigurationException,
            "Content ids repeat only for identical samples",
        ),
        (lambda d: DictDataset(d.x_train[:8]), JiTInputError, "input_key"),
    ],
    ids=["empty", "duplicate-ids", "duplicate-content", "no-input"],
)
@pytest.mark.parametrize("at_hook", [False, True], ids=["static", "callable"])
def test_bad_forget_sets_fail_before_any_weight_change(
    make_forget, error, match, at_hook, trained_cnn, digits, tmp_path
):
    start = _state(trained_cnn)
    before = Probe()
    forget = make_forget(digits)
    callback = JiTUnlearningCallback(
        (lambda: forget) if at_hook else forget, **SETTINGS, when="fit_end", checkpoint_filename=None
    )
    with pytest.raises(error, match=match):
        _fit(trained_cnn, tmp_path, [before, callback], digits)
    if at_hook:  # checked when the hook fires, after training: the callback itself changed nothing
        _assert_same(_state(trained_cnn), before.seen["on_train_end"][0])
    else:  # checked in `setup`, before the user's training even starts
        _assert_same(_state(trained_cnn), start)
        assert before.seen["on_train_start"] == []
    assert len(callback.ledger) == 0 and not (tmp_path / "ckpt" / AUDIT_FILENAME).exists()


def test_unsupported_strategies_are_refused_by_name():
    from lightning_jit.lightning.distributed import check_strategy_support as check_strategy

    check_strategy(SingleDeviceStrategy("cpu"))
    # DeepSpeed is not installed here; its class (a DDPStrategy subclass) is still refused by name.
    cases = {
        "DeepSpeedStrategy": DeepSpeedStrategy.__new__(DeepSpeedStrategy),
        "FSDPStrategy": FSDPStrategy(),
    }
    for name, strategy in cases.items():
        with pytest.raises(MisconfigurationException, match=f"does not support the {name} strategy"):
            check_strategy(strategy)
    # ModelParallelStrategy runs as FSDP2 only (tests/test_sharded.py); its tensor parallelism is refused.
    with pytest.raises(MisconfigurationException, match="ModelParallelStrategy` as FSDP2 only"):
        check_strategy(ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2))

    class CustomDeepSpeed(DeepSpeedStrategy):
        pass

    with pytest.raises(MisconfigurationException, match=r"CustomDeepSpeed \(a DeepSpeedStrategy\)"):
        check_strategy(CustomDeepSpeed.__new__(CustomDeepSpeed))


# ----------------------------------------------------------------------------------------------------------------------
# The run engine's guard, divergence handling and outcome, in the production path
# ----------------------------------------------------------------------------------------------------------------------
#: Plain JiT at a step that collapses the digits CNN (see test_guard.py): the guard must intervene.
COLLAPSING = JiTSettings.plain(sigma=0.1, lr=0.03, n_perturbations=8, epochs=3, target_forget_accuracy=10.0)


def test_guard_intervenes_in_the_callback_exactly_as_in_the_wrapper(trained_cnn, digits, tmp_path):
    forget = _forget_set(digits, FORGET_A + FORGET_B)
    before, after = Probe(), Probe()
    callback = JiTUnlearningCallback(forget, COLLAPSING, when="fit_start", batch_size=16, check_every=1)
    _fit(trained_cnn, tmp_path, [before, callback, after], digits)
    events = callback.run.check.events
    assert events and events[0].action == "halve_lr"

    model = DigitsCNN()
    model.load_state_dict(before.seen["on_train_start"][0])
    wrapper = JiTUnlearning(model, COLLAPSING, check_every=1)
    pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    ).fit(wrapper, DataLoader(forget, batch_size=16))  # fmt: skip
    assert wrapper.outcome == callback.outcome
    assert [e.as_dict() for e in wrapper.run.check.events] == [e.as_dict() for e in events]
    _assert_same(after.seen["on_train_start"][0], _state(model))
    record = callback.ledger.runs[0]
    assert record["outcome"] == callback.outcome.value
    assert record["safety"]["guard"]["events"][0]["reason"] == events[0].reason


def test_divergence_in_the_callback_restores_the_weights_and_records_nothing(trained_cnn, digits, tmp_path):
    from lightning_jit import JiTDivergenceError

    start = _state(trained_cnn)
    callback = JiTUnlearningCallback(
        _forget_set(digits, FORGET_A), sigma=0.1, lr=1e38, target_forget_accuracy=100.0, when="fit_start"
    )
    before = Probe()
    with pytest.raises(JiTDivergenceError, match="smaller `lr`"):
        _fit(trained_cnn, tmp_path, [before, callback], digits)
    _assert_same(_state(trained_cnn), start)
    assert callback.outcome == "diverged"
    assert len(callback.ledger) == 0 and not (tmp_path / "ckpt" / AUDIT_FILENAME).exists()
