"""The bad-input campaign: every public entry point fed the wrong things.

Each case must end in a correct result or a clear error that names the argument: never a bare traceback from inside
torch, a hang, or a changed model. ``docs/safety.md`` lists the cases and their outcomes.
"""

from __future__ import annotations

import math

import pytest
import torch
from _utils import fit_fails_without_changing, quiet_trainer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_jit import (
    JiTDivergenceError,
    JiTInputError,
    JiTSettingError,
    JiTSettings,
    JiTUnlearning,
    JiTUnlearningCallback,
)
from lightning_jit.core.objective import jit_objective
from lightning_jit.core.weights import WeightSnapshot, weights_finite

CAMPAIGN = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
RUNS = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

#: Anything a user might pass for a number: NaN, +-Inf, huge, negative, zero, bools, strings, None.
ANY_NUMBER = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.integers(min_value=-(10**6), max_value=10**20),
    st.booleans(),
    st.none(),
    st.sampled_from(["0.1", "", "nan"]),
)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


#: A target for runs on `_data()`, whose labels span every class: without one it is a request for individual samples,
#: which without held-out data makes no update (it ends `unverifiable`), and these tests are about the steps.
STEPS = {"target_forget_accuracy": 0.0}


def _data(n: int = 12, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def _real(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float))


#: The independent statement of what each numeric argument accepts (the docs' table says the same).
VALID = {
    "sigma": lambda v: v is None or (_real(v) and math.isfinite(v) and v > 0),
    "lr": lambda v: v is None or (_real(v) and math.isfinite(v) and v > 0),
    "max_cost": lambda v: v is None or (_real(v) and math.isfinite(v) and v > 0),
    "n_perturbations": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    "epochs": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "update_scope": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "perturbation_chunk": lambda v: (
        v is None or v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)
    ),
    "logit_norm_penalty": lambda v: _real(v) and not isinstance(v, bool) and math.isfinite(v) and v >= 0,
    "logit_norm_sigma": lambda v: v is None or (_real(v) and math.isfinite(v) and v > 0),
    "retain_distillation": lambda v: _real(v) and math.isfinite(v) and v >= 0,
    "probe_distillation": lambda v: _real(v) and not isinstance(v, bool) and math.isfinite(v) and v >= 0,
    "probes_per_class": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    "target_forget_accuracy": lambda v: v is None or (_real(v) and 0 <= v <= 100),
    "max_drop": lambda v: _real(v) and math.isfinite(v) and 0 <= v <= 100,
    "check_every": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
}


# ------------------------------------------------------------------------------------------------------------------
# Hypothesis: numeric arguments of the wrapper (and the declarations behind it)
# ------------------------------------------------------------------------------------------------------------------
@CAMPAIGN
@given(name=st.sampled_from(sorted(VALID)), value=ANY_NUMBER)
def test_wrapper_numeric_arguments_accepted_iff_valid(name, value):
    model = _mlp()
    before = WeightSnapshot(model)
    kwargs = {"sigma": 0.1, "lr": 0.01, name: value}
    if name == "target_forget_accuracy" and isinstance(value, bool):
        value = kwargs[name] = float(value)  # bools are ints to Python; the config treats them as 0/1
    try:
        JiTUnlearning(model, **kwargs)
    except MisconfigurationException as err:
        assert f"`{name}`" in str(err)
        assert not VALID[name](value), f"{name}={value!r} is valid but was refused: {err}"
    else:
        assert VALID[name](value), f"{name}={value!r} is invalid but was accepted"
    assert before.equals(model)


@CAMPAIGN
@given(
    clamp=st.one_of(
        st.none(),
        st.just("batch"),
        st.tuples(st.floats(-5, 5), st.floats(-5, 5)),
        st.sampled_from(["auto", (1.0,), (0.0, 1.0, 2.0), 3.0]),
    )
)
def test_wrapper_clamp_accepted_iff_valid(clamp):
    ok = clamp is None or clamp == "batch" or (isinstance(clamp, tuple) and len(clamp) == 2 and clamp[0] < clamp[1])
    try:
        JiTUnlearning(_mlp(), sigma=0.1, lr=0.01, clamp=clamp)
    except MisconfigurationException as err:
        assert "`clamp`" in str(err) and not ok
    else:
        assert ok


# ------------------------------------------------------------------------------------------------------------------
# Hypothesis: the objective on valid and invalid numbers
# ------------------------------------------------------------------------------------------------------------------
@CAMPAIGN
@given(
    sigma=st.one_of(st.floats(1e-4, 1e4), st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, -1])),
    n=st.integers(-2, 6),
    chunk=st.one_of(st.none(), st.integers(-1, 40)),
    batch=st.integers(1, 5),
    clamp=st.sampled_from([None, "batch", (-1.0, 1.0)]),
)
def test_objective_is_finite_and_chunk_invariant_or_names_the_argument(sigma, n, chunk, batch, clamp):
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()  # float64: at sigma ~1e-4 float32 cancellation would hide a chunking bug
    x = torch.randn(batch, 4, dtype=torch.float64)
    valid = {
        "sigma": 0 < sigma < math.inf,
        "n_perturbations": n >= 1,
        "perturbation_chunk": chunk is None or chunk >= 1,
    }
    kwargs = dict(clamp=clamp, perturbation_chunk=chunk)
    if not all(valid.values()):
        with pytest.raises(JiTSettingError) as info:
            jit_objective(model, x, sigma, n, **kwargs)
        assert info.value.setting in [name for name, ok in valid.items() if not ok]
        return
    loss = jit_objective(model, x, sigma, n, generator=torch.Generator().manual_seed(1), **kwargs)
    if sigma > 1e6:
        # The noise overflows float32 (||xi|| ~ sigma * sqrt(d)): the loss may be NaN, which the wrapper skips and
        # then reports as a divergence (test_huge_sigma_diverges_cleanly). It is never a wrong finite number.
        assert loss.shape == () and (torch.isnan(loss) or loss >= 0)
        return
    whole = jit_objective(
        model, x, sigma, n, generator=torch.Generator().manual_seed(1), clamp=clamp, perturbation_chunk=None
    )
    assert loss.shape == () and torch.isfinite(loss) and loss >= 0
    torch.testing.assert_close(loss, whole)  # the chunking never changes the result


# ------------------------------------------------------------------------------------------------------------------
# Hypothesis: whole runs with random (valid) hyperparameters, negative-to-huge learning rates included
# ------------------------------------------------------------------------------------------------------------------
@RUNS
@given(
    sigma=st.floats(1e-3, 10.0),
    log_lr=st.floats(-5.0, 38.0),
    n=st.integers(1, 4),
    chunk=st.sampled_from([None, 1, 7]),
    epochs=st.integers(1, 2),
    clamp=st.sampled_from([None, "batch", (-2.0, 2.0)]),
)
def test_any_valid_run_ends_well_or_restores_the_model(sigma, log_lr, n, chunk, epochs, clamp):
    model = _mlp()
    original = WeightSnapshot(model)
    wrapper = JiTUnlearning(  # a target: the steps run (a sample request without held-out data would not step)
        model,
        sigma=sigma,
        lr=10.0**log_lr,
        n_perturbations=n,
        perturbation_chunk=chunk,
        epochs=epochs,
        clamp=clamp,
        **STEPS,
    )
    try:
        quiet_trainer(max_epochs=epochs).fit(wrapper, DataLoader(_data(), batch_size=4))
    except JiTDivergenceError:
        assert wrapper.outcome == "diverged" and original.equals(model)
        return
    assert wrapper.outcome in ("forgotten", "not_forgotten", "rolled_back")
    assert weights_finite(model)
    if wrapper.outcome == "rolled_back" and wrapper.run.check.events[-1].action == "stop":
        assert original.equals(model)  # no monitor: the guard goes back to the weights from before the run


# ------------------------------------------------------------------------------------------------------------------
# The listed wrong inputs, one by one
# ------------------------------------------------------------------------------------------------------------------
def _fit_expecting(model, loader, error, match, **kwargs):
    defaults = STEPS if "settings" in kwargs else {"sigma": 0.1, "lr": 0.01, "n_perturbations": 2, **STEPS}
    fit_fails_without_changing(model, loader, error, match, **{**defaults, **kwargs})


@pytest.mark.parametrize(
    ("model", "match"),
    [("resnet18", "`model` must be"), (None, "`model` must be"), (lambda x: x, "`model` must be")],
)
def test_wrong_model_type(model, match):
    with pytest.raises(MisconfigurationException, match=match):
        JiTUnlearning(model, sigma=0.1, lr=0.01)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"guard": "yes"}, "guard"), ({"monitor": torch.randn(3, 16)}, "monitor"), ({"on_collapse": 1}, "on_collapse")],
)
def test_wrong_guard_argument_types(kwargs, name):
    with pytest.raises(MisconfigurationException, match=f"`{name}`"):
        JiTUnlearning(_mlp(), sigma=0.1, lr=0.01, **kwargs)


def test_frozen_model():
    model = _mlp().requires_grad_(False)
    with pytest.raises(MisconfigurationException, match="`model` has no trainable parameters"):
        JiTUnlearning(model, sigma=0.1, lr=0.01)


def test_empty_forget_set():
    _fit_expecting(_mlp(), DataLoader(_data(0), batch_size=4), MisconfigurationException, "empty")


def test_empty_objective_batch():
    with pytest.raises(JiTInputError, match="batch >= 1"):
        jit_objective(nn.Linear(4, 3), torch.zeros(0, 4), 0.1, 2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_forget_inputs(bad):
    data = _data()
    data.tensors[0][5, 0, 1, 1] = bad  # in the second batch: the first batch's update must be undone
    _fit_expecting(_mlp(), DataLoader(data, batch_size=4), JiTInputError, "NaN or Inf")


def test_non_finite_monitor_inputs():
    monitor = _data(4)
    monitor.tensors[0][0, 0, 0, 0] = float("nan")
    _fit_expecting(
        _mlp(),
        DataLoader(_data(), batch_size=4),
        MisconfigurationException,
        "`monitor`",
        monitor=DataLoader(monitor, batch_size=4),
    )


def test_mismatched_input_shape():
    wrong = TensorDataset(torch.randn(8, 3, 5, 5), torch.zeros(8, dtype=torch.long))
    _fit_expecting(_mlp(), DataLoader(wrong, batch_size=4), JiTInputError, r"shape \(4, 3, 5, 5\)")


def test_mismatched_monitor_shape():
    wrong = TensorDataset(torch.randn(8, 1, 5, 5), torch.zeros(8, dtype=torch.long))
    _fit_expecting(
        _mlp(),
        DataLoader(_data(), batch_size=4),
        MisconfigurationException,
        "`monitor` batch of shape",
        monitor=DataLoader(wrong, batch_size=4),
    )
    before = WeightSnapshot(model := _mlp())  # a sample request reads the monitor first, for the held-out test
    with pytest.raises(MisconfigurationException, match="`monitor` batch of shape"):
        quiet_trainer().fit(
            JiTUnlearning(model, task="random", monitor=DataLoader(wrong, batch_size=4)), DataLoader(_data())
        )
    assert before.equals(model)


def test_integer_inputs():
    ints = TensorDataset(torch.randint(0, 255, (8, 1, 4, 4)), torch.zeros(8, dtype=torch.long))
    _fit_expecting(_mlp(), DataLoader(ints, batch_size=4), JiTInputError, "floating")


def test_half_precision_model_on_cpu_with_float_inputs():
    _fit_expecting(_mlp().half(), DataLoader(_data(), batch_size=4), JiTInputError, "torch.float16.*half inputs")


def test_half_precision_model_on_cpu_with_half_inputs():
    model = _mlp().half()
    data = TensorDataset(_data().tensors[0].half(), _data().tensors[1])
    wrapper = JiTUnlearning(model, sigma=0.1, lr=0.01, n_perturbations=2, **STEPS)
    quiet_trainer().fit(wrapper, DataLoader(data, batch_size=4))
    assert wrapper.outcome == "not_forgotten" and weights_finite(model)  # no target: nothing claimed
    assert all(p.dtype == torch.float16 for p in model.parameters())


def test_one_sample_forget_set():
    model = _mlp()
    before = WeightSnapshot(model)
    wrapper = JiTUnlearning(model, sigma=0.1, lr=0.01, n_perturbations=3, on_unverified="keep", **STEPS)
    quiet_trainer().fit(wrapper, DataLoader(_data(1), batch_size=4))
    assert wrapper.outcome == "not_forgotten" and not before.equals(model) and weights_finite(model)


class _Stream(IterableDataset):
    """A forget set 'larger than memory': samples are generated on the fly, without end."""

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(1, 4, 4, generator=g), torch.randint(0, 3, (), generator=g)


def test_forget_set_larger_than_memory_as_iterable_dataset():
    model = _mlp()
    wrapper = JiTUnlearning(model, sigma=0.1, lr=0.01, n_perturbations=2, **STEPS)
    trainer = quiet_trainer(limit_train_batches=5)
    trainer.fit(wrapper, DataLoader(_Stream(), batch_size=8))
    assert trainer.global_step == 5 and wrapper.outcome == "not_forgotten"


@pytest.mark.parametrize(
    ("batches", "match"),
    [
        ([[[0.1, 0.2], [0.3, 0.4]]], "input_key"),  # lists of floats
        ([{"image": torch.randn(2, 1, 4, 4)}], "input_key"),  # dict without the key
        ([("a", "b")], "input_key"),  # strings
        ([None], "train_dataloaders"),  # Lightning's own clear error (a TypeError naming the argument)
    ],
)
def test_non_tensor_batches(batches, match):
    _fit_expecting(_mlp(), batches, (JiTInputError, MisconfigurationException, TypeError), match)


def test_batch_to_input_returning_garbage():
    _fit_expecting(
        _mlp(),
        DataLoader(_data(), batch_size=4),
        JiTInputError,
        "batch_to_input. returned a str",
        batch_to_input=lambda batch: "not a tensor",
    )


@pytest.mark.parametrize("lr", [1e30, 1e38])
def test_huge_learning_rate_diverges_cleanly(lr):
    _fit_expecting(_mlp(), DataLoader(_data(), batch_size=4), JiTDivergenceError, "restored bit for bit", lr=lr)


def test_huge_sigma_diverges_cleanly():
    # Plain JiT: with normalised logits (the default) the loss is bounded and a huge sigma only makes it vanish.
    plain = JiTSettings.plain(sigma=1e30, lr=0.01)
    _fit_expecting(_mlp(), DataLoader(_data(), batch_size=4), JiTDivergenceError, "sigma", settings=plain)


def test_tiny_sigma_warns_and_leaves_the_model_unchanged():
    model = _mlp()
    before = WeightSnapshot(model)
    with pytest.warns(UserWarning, match="loss is exactly 0"):
        quiet_trainer().fit(
            JiTUnlearning(model, sigma=1e-30, lr=0.01, n_perturbations=2, **STEPS), DataLoader(_data(), batch_size=4)
        )
    assert before.equals(model)


def test_model_with_nan_weights_is_refused_before_any_step():
    model = _mlp()
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    _fit_expecting(model, DataLoader(_data(), batch_size=4), MisconfigurationException, "already NaN/Inf")


# ------------------------------------------------------------------------------------------------------------------
# The other public entry points: the callback and the evaluation
# ------------------------------------------------------------------------------------------------------------------
def _callback_fit(make_callback):
    import tempfile

    import lightning.pytorch as pl
    from lightning.pytorch.demos.boring_classes import BoringModel

    model = BoringModel()
    before = WeightSnapshot(model)
    callback = make_callback()
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tempfile.mkdtemp(),
        callbacks=[callback],
    )  # fmt: skip
    return trainer, model, before, callback


def _forget32(n=8, bad=None, width=32):
    x = torch.randn(n, width, generator=torch.Generator().manual_seed(0))
    if bad is not None:
        x[3, 0] = bad
    return TensorDataset(x, torch.zeros(n, dtype=torch.long), torch.arange(n))


_CB = {"checkpoint_filename": None, "audit_path": None, "n_perturbations": 2}


@pytest.mark.parametrize(
    ("args", "kwargs", "name"),
    [
        ((_forget32(),), {"sigma": -1.0, "lr": 0.01}, "sigma"),
        ((_forget32(),), {"sigma": 0.1, "lr": float("inf")}, "lr"),
        (("data.pt",), {"sigma": 0.1, "lr": 0.01}, "forget"),
        ((_forget32(),), {"sigma": 0.1, "lr": 0.01, "when": "never"}, "when"),
    ],
)
def test_callback_arguments(args, kwargs, name):
    with pytest.raises(MisconfigurationException, match=f"`{name}`"):
        trainer, model, before, callback = _callback_fit(lambda: JiTUnlearningCallback(*args, **kwargs, **_CB))
        trainer.fit(model)


@pytest.mark.parametrize(
    ("forget", "error", "match"),
    [
        (_forget32(bad=float("nan")), JiTInputError, "NaN or Inf"),
        (_forget32(n=0), MisconfigurationException, "empty"),
        pytest.param(
            _forget32(width=7),
            JiTInputError,
            "shape",
        ),
    ],
)
def test_callback_bad_forget_sets_leave_model_and_ledger_clean(forget, error, match):
    trainer, model, before, callback = _callback_fit(lambda: JiTUnlearningCallback(forget, sigma=0.1, lr=0.01, **_CB))
    with pytest.raises(error, match=match):
        trainer.fit(model)
    assert len(callback.ledger) == 0  # no id is claimed by a run that failed


def _two_nets():
    torch.manual_seed(0)
    return nn.Linear(4, 3), nn.Linear(4, 3)


@pytest.mark.parametrize(
    ("call", "kwargs", "match"),
    [
        (lambda a, b: ("a", b, (torch.randn(4, 4), torch.zeros(4, dtype=torch.long))), {}, "`original`"),
        (lambda a, b: (a, b, (torch.randn(0, 4), torch.zeros(0, dtype=torch.long))), {}, "`forget`"),
        (lambda a, b: (a, b, (torch.randn(4, 4), torch.zeros(3, dtype=torch.long))), {}, "`forget`"),
        (lambda a, b: (a, b, (torch.randn(4, 4), torch.zeros(4, dtype=torch.long))), {"tau": -1}, "`tau`"),
        pytest.param(
            lambda a, b: (a, b, (torch.randn(4, 5), torch.zeros(4, dtype=torch.long))),
            {},
            "shape",
        ),
    ],
)
def test_evaluate_bad_inputs(call, kwargs, match):
    from lightning_jit import evaluation as evaluate

    a, b = _two_nets()
    before_a, before_b = WeightSnapshot(a), WeightSnapshot(b)
    with pytest.raises(MisconfigurationException, match=match):
        evaluate.evaluate_unlearning(*call(a, b), **kwargs)
    assert before_a.equals(a) and before_b.equals(b)
