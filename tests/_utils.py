"""Helpers shared by the tests."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_jit.demo.data import DigitsCNN


def sgd_by_hand(model: nn.Module, loss: torch.Tensor, lr: float) -> None:
    """One plain SGD step on ``loss``, written out: the independent computation the wrapper's steps are checked
    against."""
    model.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad


def assert_same_weights(got: nn.Module, want: nn.Module, atol: float = 1e-6) -> None:
    for (name, a), b in zip(got.state_dict().items(), want.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=atol), name


def fit_fails_without_changing(model: nn.Module, loader, error, match: str, **wrapper_kwargs) -> None:
    """Fitting ``JiTUnlearning(model, **wrapper_kwargs)`` on ``loader`` raises ``error`` (matching ``match``), and every
    weight and buffer of ``model`` is then bit for bit what it was before the fit (NaN where it was NaN)."""
    from lightning_jit import JiTUnlearning

    before = {name: value.detach().clone() for name, value in model.state_dict().items()}
    wrapper = JiTUnlearning(model, **wrapper_kwargs)
    with pytest.raises(error, match=match):
        quiet_trainer().fit(wrapper, loader)
    after = model.state_dict()
    assert list(after) == list(before)
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=0, equal_nan=True, msg=f"{name} changed")


def quiet_trainer(**kwargs):
    """The library's quiet Trainer, for one epoch unless told otherwise."""
    from lightning_jit.lightning.trainer import quiet_trainer as library_quiet_trainer

    return library_quiet_trainer(**{"max_epochs": 1, **kwargs})


def release_process_group():
    """A callback for Lightning ``ddp_spawn`` runs in the tests: every rank leaves the process group together at the
    end of ``fit``.

    Otherwise each spawned process destroys it in an ``atexit`` handler as it exits, each at its own time; in full
    test runs a child then sometimes died with "terminate called without an active exception" (SIGABRT) after its
    training had finished (2 of 11 full-suite runs here), which looks like one rank's gloo teardown racing the other's
    exit.
    """
    return _ReleaseProcessGroup()


class _ReleaseProcessGroup(pl.Callback):
    """See :func:`release_process_group` (defined at module level so that ``ddp_spawn`` can pickle it)."""

    def teardown(self, trainer, pl_module, stage):
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Whether two modules hold bit-identical parameters and buffers."""
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


class InterruptAtFirstBatch(pl.Callback):
    """Raises ``KeyboardInterrupt`` (what Ctrl+C raises) when the first training batch starts."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        raise KeyboardInterrupt


class FeaturesAndLogitsCNN(DigitsCNN):
    """A digits CNN whose forward returns ``(features, logits)``: the logits are found by its ``num_classes``
    hyperparameter (the one ``(batch, 10)`` output), or by ``output_selector=1``."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(x)
        return features.flatten(1), self.head(features)


class RecordOnRankZero(pl.Callback):
    """Saves, in rank 0 at ``teardown``, what a ``JiTUnlearningCallback`` of the same Trainer holds (its outcome,
    verification and ledger) to ``path``: the rank-0 side of a multi-process run, read back by a test in the launching
    process, independently of how the library sends results there."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def teardown(self, trainer, pl_module, stage):
        from lightning_jit import JiTUnlearningCallback

        if not trainer.is_global_zero:
            return
        (callback,) = [c for c in trainer.callbacks if isinstance(c, JiTUnlearningCallback)]
        state = {"outcome": callback.outcome, "verification": callback.verification, "ledger": callback.ledger}
        torch.save({k: v.state_dict() if k == "ledger" else v for k, v in state.items()}, self.path)


class RecordRunOnRankZero(pl.Callback):
    """Saves, in rank 0 at ``teardown``, how a ``JiTUnlearning``'s run ended: its steps, whether ``max_cost`` ended it
    and its cost counts (this process's), to ``path``."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def teardown(self, trainer, pl_module, stage):
        if trainer.is_global_zero:
            run = pl_module.run
            state = {"steps": run.steps, "bound_reached": run.bound_reached, "cost": dict(run.cost.counts)}
            torch.save(state, self.path)


def digit_tokens() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as 64 token ids (the pixel values 0-16), stratified 75/25:
    ``(train ids, train labels, test ids, test labels)``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.reshape(-1, 64).astype("int64")
    parts = train_test_split(x, digits.target, test_size=0.25, random_state=0, stratify=digits.target)
    x_tr, x_te, y_tr, y_te = (torch.from_numpy(p) for p in parts)
    return x_tr, y_tr.long(), x_te, y_te.long()
