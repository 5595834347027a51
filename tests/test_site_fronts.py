"""A perturbation site (``perturb_at``) through every front and scale check: the CLI on the token example, bf16,
resuming from a checkpoint and the tuner (DDP equality with a site is ``tests/test_structured_inputs.py``'s, on dict
batches).

The token model is ``tests/test_site.py``'s (digits as 64 tokens over a vocabulary of 17, an ``nn.Embedding`` named
``embedding``); the CLI runs ``examples/token_classifier.py``'s transformer with ``examples/configs``.
"""

# ruff: noqa: F811  (the token fixtures are imported from tests/test_site.py and named as test arguments)
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_jit import JiTInputError, JiTSettingError, JiTSettings, JiTUnlearning
from lightning_jit.cli import UNLEARN_RECORD_KEY, main
from lightning_jit.core.engine import JiTRun
from lightning_jit.core.site import first_embedding
from lightning_jit.lightning.data import forget_loader
from lightning_jit.tune import tune_jit
from lightning_jit.tune.runner import TRIAL_SEED_STRIDE
from tests._utils import quiet_trainer
from tests.test_site import FORGOTTEN, TokenNet, _forget, _token_state, token_model, tokens  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
TOKEN_CONFIG = str(ROOT / "examples" / "configs" / "token_full_class.yaml")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _weights(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _max_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean() * 100)


def _fresh(state: dict[str, Tensor]) -> TokenNet:
    model = TokenNet()
    model.load_state_dict(state)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------------
# The CLI: the token example's config, `--jit.perturb_at`
# ----------------------------------------------------------------------------------------------------------------------
def _token_checkpoint(path: Path, epochs: int) -> Path:
    """``examples/token_classifier.py``'s model, trained ``epochs`` passes (plain Adam, seeded), as a checkpoint."""
    from examples.token_classifier import TokenClassifier, load_token_digits

    train, _ = load_token_digits()
    torch.manual_seed(0)
    model = TokenClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=generator)
        for i in range(0, len(order), 64):
            batch = order[i : i + 64]
            loss = nn.functional.cross_entropy(model(train.ids[batch]), train.labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model.eval())
    trainer.save_checkpoint(path)
    return path


def _cli(ckpt: Path, run: Path, *args: str) -> list[str]:
    return [
        "unlearn",
        "--config",
        TOKEN_CONFIG,
        f"--ckpt_path={ckpt}",
        f"--trainer.default_root_dir={run}",
        "--trainer.enable_progress_bar=false",
        *args,
    ]


@pytest.mark.slow
def test_the_cli_forgets_a_class_of_the_token_example(tmp_path, monkeypatch, capsys):
    """``lightning-jit unlearn`` with the example's config (``perturb_at: embed``) forgets digit 3 of the token
    classifier: gone on the held-out split, measured here on the checkpoint it wrote."""
    from examples.token_classifier import TokenClassifier, load_token_digits

    monkeypatch.chdir(ROOT)  # the config's class_path is `examples.token_classifier...`, found from the root
    ckpt = _token_checkpoint(tmp_path / "tokens.ckpt", epochs=10)
    out, run = tmp_path / "unlearned.ckpt", tmp_path / "run"
    code = main(_cli(ckpt, run, f"--output={out}", "--jit.perturb_at=embed"))
    assert code == 0, capsys.readouterr().err[-3000:]

    train, test = load_token_digits()
    original = TokenClassifier.load_from_checkpoint(ckpt, strict=True)
    unlearned = TokenClassifier.load_from_checkpoint(out, strict=True)
    gone, kept = test.labels == FORGOTTEN, test.labels != FORGOTTEN
    before = _accuracy(original, test.ids[gone], test.labels[gone])
    after = _accuracy(unlearned, test.ids[gone], test.labels[gone])
    rest_before = _accuracy(original, test.ids[kept], test.labels[kept])
    rest_after = _accuracy(unlearned, test.ids[kept], test.labels[kept])
    assert before > 60 and after <= 5 and rest_after >= rest_before - 5, (before, after, rest_before, rest_after)

    record = torch.load(out, weights_only=True)[UNLEARN_RECORD_KEY]
    train3 = train.labels == FORGOTTEN
    assert record["outcome"] == "forgotten" and record["forget_samples"] == int(train3.sum())
    forget_after = _accuracy(unlearned, train.ids[train3], train.labels[train3])
    assert record["verification"]["forget_accuracy"] == pytest.approx(forget_after)
    (config_file,) = run.rglob("config.yaml")
    config = yaml.safe_load(config_file.read_text())
    assert config["jit"]["perturb_at"] == "embed" and config["batch"]["input_key"] == "input_ids"


def test_the_cli_at_the_input_site_names_the_setting_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """Token ids with ``--jit.perturb_at=input``: one error line naming ``--jit.perturb_at`` and the embedding."""
    monkeypatch.chdir(ROOT)
    ckpt = _token_checkpoint(tmp_path / "tokens.ckpt", epochs=0)
    out, run = tmp_path / "unlearned.ckpt", tmp_path / "run"
    code = main(_cli(ckpt, run, f"--output={out}", "--jit.perturb_at=input", "--jit.epochs=1"))
    err = capsys.readouterr().err
    assert code != 0 and "--jit.perturb_at=embed" in err, err[-3000:]
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------------------
# Scale: bf16, with a site (DDP equality with a site: tests/test_structured_inputs.py, on dict batches)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bf16_mixed_forgets_like_32_true_with_a_site(_token_state, tokens):
    """The no-knob path with ``perturb_at``, under ``bf16-mixed`` on the CPU: the perturbed passes run under autocast,
    and the class is forgotten as in float32, on the forget set and on the held-out split."""
    x_tr, y_tr, x_te, y_te = tokens
    forget, held = y_tr == FORGOTTEN, y_te == FORGOTTEN
    results, autocast_seen = {}, {}
    for precision in ("32-true", "bf16-mixed"):
        model = _fresh(_token_state)
        assert _accuracy(model, x_tr[forget], y_tr[forget]) > 60.0
        seen: list[bool] = []
        hook = model.embedding.register_forward_pre_hook(
            lambda m, a, seen=seen: None if torch.is_grad_enabled() else seen.append(torch.is_autocast_enabled("cpu"))
        )
        wrapper = JiTUnlearning(model, perturb_at="embedding", seed=0)
        quiet_trainer(max_epochs=-1, precision=precision).fit(
            wrapper, forget_loader(TensorDataset(x_tr[forget], y_tr[forget]))
        )
        hook.remove()
        autocast_seen[precision] = seen
        assert wrapper.outcome == "forgotten" and wrapper.skipped_steps == 0
        results[precision] = (
            _accuracy(model, x_tr[forget], y_tr[forget]),
            _accuracy(model, x_te[held], y_te[held]),
        )
    assert autocast_seen["bf16-mixed"] and all(autocast_seen["bf16-mixed"])
    assert autocast_seen["32-true"] and not any(autocast_seen["32-true"])
    (f32, h32), (f16, h16) = results["32-true"], results["bf16-mixed"]
    assert f32 <= 5.0 and f16 <= 5.0 and h16 <= 10.0, results
    assert abs(f32 - f16) <= 5.0 and abs(h32 - h16) <= 10.0, results


# ----------------------------------------------------------------------------------------------------------------------
# Resuming a run with a module site
# ----------------------------------------------------------------------------------------------------------------------
class _Preempted(pl.Callback):
    """Stops a fit with an error when a given epoch starts (a preempted job)."""

    def __init__(self, at_epoch: int) -> None:
        self.at_epoch = at_epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.at_epoch:
            raise RuntimeError("preempted")


@pytest.mark.parametrize("perturb_at", ["embedding", None])
def test_resuming_with_a_module_site_equals_the_uninterrupted_run(_token_state, tokens, tmp_path, perturb_at):
    """As ``tests/test_outcomes.py``'s resume test, with a module site (named, or the default's pick): the run's state
    (probes, sigma in the embedding's units, the noise) comes back from the checkpoint and the weights are the
    uninterrupted run's."""
    settings = JiTSettings(perturb_at=perturb_at, epochs=3, target_forget_accuracy=0.0, on_unverified="keep")

    whole = _fresh(_token_state)
    quiet_trainer(max_epochs=-1).fit(JiTUnlearning(whole, settings), _forget(tokens))
    assert _max_diff(_token_state, _weights(whole)) > 1e-3

    first = _fresh(_token_state)
    saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, save_on_train_epoch_end=True)
    trainer = quiet_trainer(
        max_epochs=-1, enable_checkpointing=True, callbacks=[saver, _Preempted(at_epoch=1)], default_root_dir=tmp_path
    )
    with pytest.raises(RuntimeError, match="preempted"):
        trainer.fit(JiTUnlearning(first, settings), _forget(tokens))
    (checkpoint,) = tmp_path.glob("epoch=0*.ckpt")
    assert "jit_run_state" in torch.load(checkpoint, weights_only=False)
    resumed = _fresh(_token_state)
    quiet_trainer(max_epochs=-1).fit(JiTUnlearning(resumed, settings), _forget(tokens), ckpt_path=checkpoint)
    for name, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


# ----------------------------------------------------------------------------------------------------------------------
# The tuner
# ----------------------------------------------------------------------------------------------------------------------
def test_the_tuner_runs_its_trials_through_the_site(token_model, tokens):
    """``tune_jit(..., perturb_at=...)``: every trial perturbs the embedding (token ids refuse the input site), a trial
    rerun on its own with the same settings and seed forgets exactly as much, and the chosen settings keep the site."""
    before = _weights(token_model)
    forget = _forget(tokens)
    tiny = {"n_configs": 2, "reduction_factor": 2, "max_epochs": 2, "finalists": 1, "n_perturbations": [4]}
    result = tune_jit(
        token_model,
        forget,
        progress=False,
        trainer_kwargs={"accelerator": "cpu"},
        perturb_at="embedding",
        sigma_range=(0.1, 1.0),
        probes_per_class=2,
        seed=3,
        **tiny,
    )
    assert _max_diff(before, _weights(token_model)) == 0.0
    assert len(result.trials) == 2 and all(t.history for t in result.trials)
    assert result.jit_settings().perturb_at == "embedding"
    assert yaml.safe_load(result.to_yaml())["jit"]["perturb_at"] == "embedding"

    # With no setting the trials and the judge pick the same embedding: the same table.
    default = tune_jit(
        token_model,
        forget,
        progress=False,
        trainer_kwargs={"accelerator": "cpu"},
        sigma_range=(0.1, 1.0),
        probes_per_class=2,
        seed=3,
        **tiny,
    )
    assert [t.history for t in default.trials] == [t.history for t in result.trials]

    trial = result.trials[-1]
    model = copy.deepcopy(token_model)
    settings = result.jit_settings().replace(
        **trial.settings(),
        epochs=int(trial.history[0]["epochs"]),
        seed=3 + TRIAL_SEED_STRIDE * trial.index,
        target_forget_accuracy=None,
        on_unverified="keep",  # as the trials run: the judge measures what a trial reached
    )
    quiet_trainer(max_epochs=settings.epochs).fit(JiTUnlearning(model, settings), forget)
    x_tr, y_tr, _, _ = tokens
    f = y_tr == FORGOTTEN
    assert trial.history[0]["forget_acc"] == pytest.approx(_accuracy(model, x_tr[f], y_tr[f]))


def test_a_separate_original_is_perturbed_at_the_same_module(_token_state, tokens):
    """``original=`` (as the tuner's trials give it) is another module object: the survey, the probes and the penalty's
    frozen passes run through it, so the site must act on its module too. The weights equal a run without it."""
    settings = JiTSettings(perturb_at="embedding", epochs=2, target_forget_accuracy=0.0, on_unverified="keep")
    alone = _fresh(_token_state)
    quiet_trainer(max_epochs=-1).fit(JiTUnlearning(alone, settings), _forget(tokens))
    model = _fresh(_token_state)
    original = copy.deepcopy(model)
    unlearner = JiTUnlearning(model, settings, original=original)
    quiet_trainer(max_epochs=-1).fit(unlearner, _forget(tokens))
    assert _max_diff(_token_state, _weights(alone)) > 1e-3
    assert _max_diff(_weights(alone), _weights(model)) == 0.0
    assert all(not m._forward_hooks for m in original.modules())
    with pytest.raises(JiTSettingError, match="original"):
        JiTRun(_fresh(_token_state), settings, original=nn.Sequential(nn.Linear(2, 2)))


# ----------------------------------------------------------------------------------------------------------------------
# perturb_at="auto": the first nn.Embedding for integer inputs, the input for float ones
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def lightning_info(caplog):
    """The records Lightning's ``rank_zero_info`` writes (the test session sets its logger to errors only)."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(level)


def _site_run(model: nn.Module, loader: DataLoader, **settings) -> tuple[dict[str, Tensor], Any]:
    unlearner = JiTUnlearning(model, JiTSettings(epochs=1, on_unverified="keep", **settings))
    quiet_trainer(max_epochs=-1).fit(unlearner, loader)
    return _weights(model), unlearner


@pytest.mark.parametrize("auto", [None, "auto"])
def test_the_default_picks_the_first_embedding_for_token_ids_bit_for_bit(_token_state, tokens, lightning_info, auto):
    named, by_name = _site_run(_fresh(_token_state), _forget(tokens), perturb_at="embedding")
    picked, by_auto = _site_run(_fresh(_token_state), _forget(tokens), perturb_at=auto)
    assert _max_diff(_token_state, named) > 1e-3
    assert all(torch.equal(named[k], picked[k]) for k in named)
    assert by_auto.run.site.name == "embedding" and by_auto.run.site.picked.module is by_auto.model.embedding
    assert by_auto.verification.cost == by_name.verification.cost
    said = [r.getMessage() for r in lightning_info.records if "perturb_at='auto'" in r.getMessage()]
    assert len(said) == 1 and "`embedding`" in said[0]


@pytest.mark.parametrize("auto", [None, "auto"])
def test_the_default_on_float_inputs_is_the_input_site_bit_for_bit(trained_cnn, digits, auto):
    """The explicit input site is the paper's JiT (``tests/test_site.py`` checks it against recorded weights)."""
    keep = digits.y_train == FORGOTTEN
    loader = DataLoader(TensorDataset(digits.x_train[keep][:64], digits.y_train[keep][:64]), batch_size=32)
    at_input, by_input = _site_run(copy.deepcopy(trained_cnn), loader, perturb_at="input")
    picked, by_auto = _site_run(copy.deepcopy(trained_cnn), loader, perturb_at=auto)
    assert _max_diff(_weights(trained_cnn), at_input) > 1e-4
    assert all(torch.equal(at_input[k], picked[k]) for k in at_input)
    assert by_auto.run.site.name == "input" and by_auto.verification.cost == by_input.verification.cost


class _NoEmbedding(nn.Module):
    """Integer inputs, no ``nn.Embedding``: a one-hot encoding by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(64 * 17, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(nn.functional.one_hot(x, 17).float().flatten(1))


@pytest.mark.parametrize("auto", [None, "auto"])
def test_integer_inputs_without_an_embedding_name_perturb_at(tokens, auto):
    model = _NoEmbedding()
    before = _weights(model)
    with pytest.raises(JiTInputError, match="`perturb_at`"):
        quiet_trainer().fit(JiTUnlearning(model, perturb_at=auto), _forget(tokens))
    assert _max_diff(before, _weights(model)) == 0.0


def test_the_first_embedding_of_the_benchmarks_token_models():
    from benchmarks.datasets import TokenTransformer

    assert first_embedding(TokenTransformer(17, 64, 10)) == "embed"
    pytest.importorskip("transformers")
    from benchmarks.datasets import make_bert

    assert first_embedding(make_bert(17, 64, 10)) == "bert.embeddings.word_embeddings"
