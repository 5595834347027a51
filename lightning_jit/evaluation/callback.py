"""``UnlearningEvaluation``: a Lightning callback that evaluates unlearning at the end of a run.

It runs :func:`~lightning_jit.evaluation.evaluate.evaluate_unlearning` at the end of an unlearning run, logs the figures
to the Trainer's loggers under ``forget/``, ``retain/`` and ``test/`` and writes the report files into the Trainer's
log directory.

The evaluation imports nothing from :mod:`lightning_jit.lightning`. It finds what it needs through two small
protocols, which the JiT fronts implement and any other unlearning method can too:

* :class:`UnlearningWrapper`: a LightningModule that unlearns a model it holds names it ``unlearning_target``
  (``JiTUnlearning`` does). The evaluation judges that model, not the wrapper.
* :class:`UnlearningHook`: a callback that unlearns inside a Trainer hook names that hook ``unlearns_at``
  (``JiTUnlearningCallback`` does). The evaluation keeps the weights from right before that hook as the original.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn

from lightning_jit.core.batch import BatchFormat
from lightning_jit.core.outcome import Verification
from lightning_jit.evaluation.evaluate import Split, check_batch_format, evaluate_unlearning
from lightning_jit.evaluation.information import check_tau
from lightning_jit.evaluation.report import UnlearningReport

#: The Trainer hooks in which :class:`UnlearningEvaluation` can keep the weights from before unlearning: the hooks an
#: :class:`UnlearningHook` may name in ``unlearns_at``.
SNAPSHOT_HOOKS = ("on_train_start", "on_train_epoch_end", "on_train_end")


class UnlearningWrapper(Protocol):
    """A LightningModule that unlearns a model it holds, e.g. :class:`~lightning_jit.lightning.module.JiTUnlearning`.

    ``unlearning_target`` is that model: the one to evaluate (and to snapshot as the original). A module without the
    attribute is itself the model under unlearning.
    """

    @property
    def unlearning_target(self) -> nn.Module: ...


class UnlearningHook(Protocol):
    """A callback that unlearns inside a Trainer hook, e.g.
    :class:`~lightning_jit.lightning.callback.JiTUnlearningCallback`.

    ``unlearns_at`` is the name of that hook, one of :data:`SNAPSHOT_HOOKS`. Optionally, a ``ledger`` whose ``runs`` are
    dicts with ``"wall_time_s"`` (as the JiT callback's deletion ledger) gives the time its latest run took.
    """

    @property
    def unlearns_at(self) -> str: ...


def unlearning_target(pl_module: pl.LightningModule) -> nn.Module:
    """The model under unlearning: ``pl_module.unlearning_target`` (:class:`UnlearningWrapper`), else ``pl_module``.

    Raises:
        MisconfigurationException: if ``unlearning_target`` is there but is not an ``nn.Module``.

    Example:
        >>> from lightning_jit import JiTUnlearning
        >>> net = torch.nn.Linear(4, 2)
        >>> unlearning_target(JiTUnlearning(net, sigma=0.1, lr=0.01)) is net
        True
    """
    if not hasattr(pl_module, "unlearning_target"):
        return pl_module
    target = pl_module.unlearning_target
    if not isinstance(target, nn.Module):
        raise MisconfigurationException(
            f"{type(pl_module).__name__}.unlearning_target must be the nn.Module under unlearning, got"
            f" {type(target).__name__}. Return the wrapped model, or remove the attribute to evaluate the module"
            " itself."
        )
    return target


def find_unlearning_hook(callbacks: Iterable[Any]) -> Any | None:
    """The first callback with an ``unlearns_at`` attribute (:class:`UnlearningHook`), or ``None``.

    Raises:
        MisconfigurationException: if its ``unlearns_at`` is not one of :data:`SNAPSHOT_HOOKS`.

    Example:
        >>> from lightning_jit import JiTUnlearningCallback
        >>> from torch.utils.data import TensorDataset
        >>> jit = JiTUnlearningCallback(TensorDataset(torch.zeros(2, 3)), sigma=0.1, lr=0.01, when="fit_start")
        >>> find_unlearning_hook([pl.callbacks.Timer(), jit]).unlearns_at
        'on_train_start'
    """
    for callback in callbacks:
        if hasattr(callback, "unlearns_at"):
            hook = callback.unlearns_at
            if hook not in SNAPSHOT_HOOKS:
                raise MisconfigurationException(
                    f"{type(callback).__name__}.unlearns_at is {hook!r}; UnlearningEvaluation can keep the original"
                    f" weights only before one of {SNAPSHOT_HOOKS}. Name the Trainer hook the unlearning runs in, or"
                    " pass `original=` to UnlearningEvaluation."
                )
            return callback
    return None


class UnlearningEvaluation(pl.Callback):
    """Evaluate unlearning at the end of a run: log the metrics and write the report into the Trainer's log dir.

    Use it with :class:`~lightning_jit.lightning.module.JiTUnlearning` (``trainer.fit(wrapper, forget_loader)``) or
    with :class:`~lightning_jit.lightning.callback.JiTUnlearningCallback`, or with any unlearning method that follows
    :class:`UnlearningWrapper` or :class:`UnlearningHook`. The model evaluated is the wrapper's ``unlearning_target``
    (else the LightningModule itself).

    It keeps a CPU copy of that model's weights as the "original" (unless ``original`` is given, or
    :meth:`snapshot_original` was called): at ``on_train_start`` with a wrapper; with an unlearning callback, right
    before that callback's ``unlearns_at`` hook fires (place ``UnlearningEvaluation`` before it in
    ``callbacks=[...]``; with the JiT callback's ``when="train_epoch_end"`` the snapshot is taken at the end of the
    first epoch). It times the run (or takes the unlearning callback's own wall time from its ledger) and, at
    ``on_fit_end`` (after every ``on_train_end`` hook, so after any unlearning callback), calls
    :func:`~lightning_jit.evaluation.evaluate.evaluate_unlearning` on global rank zero.

    Lightning forbids ``self.log`` in ``on_train_end`` / ``on_fit_end``, so the figures of the unlearned model go to
    every logger of the Trainer via ``logger.log_metrics`` (at the last global step) and into
    ``trainer.callback_metrics``, named ``forget/acc``, ``forget/mia``, ``retain/acc``, ``test/acc``, ``test/tow``...
    The reference models' figures carry a ``_original`` / ``_retrained`` suffix. The report is kept as
    ``self.report`` and written as ``report.json``, ``report.md`` and ``report.png`` into ``dirpath`` or else
    ``trainer.log_dir`` (the ``default_root_dir`` when there is no logger).

    Args:
        forget: The forget set (DataLoader or ``(x, y)``).
        retain: Optional retain set.
        test: Optional test set.
        retrained: Optional model retrained without the forget set.
        original: The model before unlearning; default: a snapshot taken before unlearning (see above).
        retrain_seconds: Time the retraining took, for the report.
        tau: Information threshold, as in :func:`~lightning_jit.evaluation.evaluate.evaluate_unlearning`.
        k: Neighbours for alpha.
        feature_layer: Layer of the original model whose features alpha is measured in; default: input space.
        num_classes: Expected number of classes.
        seed: Seed of the random model of the ZRF score.
        batch_size: Batch size for ``(x, y)`` pairs.
        batch_format: How the splits' batches and the models' outputs are read
            (:class:`~lightning_jit.core.batch.BatchFormat`); give the one JiT was given. Default: automatic.
        dirpath: Where to write the report files; default the Trainer's log dir.
        write_files: Set ``False`` to only log.

    Example:
        >>> import lightning.pytorch as pl, tempfile
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from lightning_jit import JiTUnlearning
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        >>> x, y = torch.randn(30, 1, 4, 4), torch.randint(0, 3, (30,))
        >>> evaluation = UnlearningEvaluation(
        ...     forget=(x[:10], y[:10]), retain=(x[10:20], y[10:20]), test=(x[20:], y[20:])
        ... )
        >>> trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                      enable_model_summary=False, default_root_dir=tempfile.mkdtemp(),
        ...                      callbacks=[evaluation])
        >>> trainer.fit(JiTUnlearning(net, sigma=0.5, lr=0.01), DataLoader(TensorDataset(x[:10], y[:10]), batch_size=5))
        >>> sorted(p.name for p in evaluation.paths.values())
        ['report.json', 'report.md', 'report.png']
    """

    def __init__(
        self,
        forget: Split,
        retain: Split | None = None,
        test: Split | None = None,
        retrained: nn.Module | None = None,
        *,
        original: nn.Module | None = None,
        retrain_seconds: float | None = None,
        tau: float = 0.5,
        k: int = 10,
        feature_layer: str | None = None,
        num_classes: int | None = None,
        seed: int = 0,
        batch_size: int = 512,
        batch_format: BatchFormat | None = None,
        dirpath: str | os.PathLike | None = None,
        write_files: bool = True,
    ) -> None:
        if forget is None:
            raise MisconfigurationException("`forget` is required: the forget set to evaluate on.")
        self.tau = check_tau(tau)
        for name, value in (("k", k), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MisconfigurationException(f"`{name}` must be a positive integer, got {value!r}.")
        for name, model in (("retrained", retrained), ("original", original)):
            if model is not None and not isinstance(model, nn.Module):
                raise MisconfigurationException(f"`{name}` must be a torch.nn.Module, got {type(model).__name__}.")
        self.forget, self.retain, self.test = forget, retain, test
        self.retrained, self.original = retrained, original
        self.retrain_seconds = retrain_seconds
        self.k, self.feature_layer, self.num_classes = k, feature_layer, num_classes
        self.seed, self.batch_size = seed, batch_size
        self.batch_format = check_batch_format(batch_format)
        self.dirpath = dirpath
        self.write_files = write_files
        self.report: UnlearningReport | None = None
        self.paths: dict[str, Path] = {}
        self._snapshot: dict[str, Tensor] | None = None
        self._start: float | None = None
        self._seconds: float | None = None
        self._unlearning_hook: Any = None
        self._snapshot_hook = "on_train_start"

    @staticmethod
    def target_model(pl_module: pl.LightningModule) -> nn.Module:
        """The model being unlearned: the ``unlearning_target`` of an :class:`UnlearningWrapper` such as
        :class:`~lightning_jit.lightning.module.JiTUnlearning`, else the module itself (:func:`unlearning_target`)."""
        return unlearning_target(pl_module)

    def snapshot_original(self, model: nn.Module) -> None:
        """Keep a CPU copy of ``model``'s current weights as the "original" (call it right before unlearning)."""
        self._snapshot = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Find when to snapshot the original: at the start of training, or right before an unlearning callback."""
        self._unlearning_hook = find_unlearning_hook(trainer.callbacks)
        self._snapshot_hook = "on_train_start"
        if self._unlearning_hook is not None and self.original is None and self._snapshot is None:
            if trainer.callbacks.index(self) > trainer.callbacks.index(self._unlearning_hook):
                name = type(self._unlearning_hook).__name__
                raise MisconfigurationException(
                    f"UnlearningEvaluation comes after {name} in the Trainer's callbacks, so it cannot keep the weights"
                    f" from before unlearning. Put it before {name} in `callbacks=[...]` (it still evaluates after it,"
                    " at `on_fit_end`), or pass `original=`."
                )
            self._snapshot_hook = self._unlearning_hook.unlearns_at

    def _maybe_snapshot(self, hook: str, pl_module: pl.LightningModule) -> None:
        if hook == self._snapshot_hook and self.original is None and self._snapshot is None:
            self.snapshot_original(self.target_model(pl_module))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_snapshot("on_train_start", pl_module)
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_snapshot("on_train_epoch_end", pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_snapshot("on_train_end", pl_module)
        if self._start is not None:
            self._seconds = time.perf_counter() - self._start

    def _original_model(self, model: nn.Module) -> nn.Module:
        if self.original is not None:
            return self.original
        if self._snapshot is None:
            raise MisconfigurationException(
                "UnlearningEvaluation has no snapshot of the original weights: the training loop did not run."
                " Pass `original=` or call `snapshot_original(model)` before unlearning."
            )
        trainer = getattr(model, "_trainer", None)
        memo: dict[int, Any] = {id(trainer): None} if trainer is not None else {}
        original = copy.deepcopy(model, memo)
        original.load_state_dict(self._snapshot)
        return original

    def _unlearning_seconds(self) -> float | None:
        """The unlearning callback's own wall time of its latest run, when its ledger records it; else the timed run."""
        runs = getattr(getattr(self._unlearning_hook, "ledger", None), "runs", None)
        if runs and isinstance(runs[-1], dict) and runs[-1].get("wall_time_s") is not None:
            return float(runs[-1]["wall_time_s"])
        return self._seconds

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        directory = self.dirpath if self.dirpath is not None else (trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            model = self.target_model(pl_module)
            self.report = evaluate_unlearning(
                self._original_model(model),
                model,
                self.forget,
                self.retain,
                self.test,
                self.retrained,
                unlearning_seconds=self._unlearning_seconds(),
                retrain_seconds=self.retrain_seconds,
                tau=self.tau,
                k=self.k,
                feature_layer=self.feature_layer,
                num_classes=self.num_classes,
                seed=self.seed,
                batch_size=self.batch_size,
                batch_format=self.batch_format,
                verification=_verification(pl_module),
            )
            metrics = self.report.metrics("unlearned")
            for ref in ("original", "retrained"):
                if ref in self.report.models:
                    metrics.update({f"{k}_{ref}": v for k, v in self.report.metrics(ref).items()})
            if self.report.timing.get("unlearning_seconds") is not None:
                metrics["unlearning/seconds"] = float(self.report.timing["unlearning_seconds"])
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
                logger.save()
            trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
            if self.write_files:
                self.paths = self.report.save(directory)
                rank_zero_info(f"Unlearning report written to {Path(directory).resolve()} (report.md, .json, .png).")
            for note in self.report.notes:
                rank_zero_info(f"Unlearning report: {note}")
        trainer.strategy.barrier("UnlearningEvaluation.on_fit_end")


__all__ = [
    "SNAPSHOT_HOOKS",
    "UnlearningEvaluation",
    "UnlearningHook",
    "UnlearningWrapper",
    "find_unlearning_hook",
    "unlearning_target",
]


def _verification(pl_module: pl.LightningModule) -> Verification | None:
    """The verified outcome of the run a module holds (``JiTUnlearning.verification``), if it has one."""
    found = getattr(pl_module, "verification", None)
    return found if isinstance(found, Verification) else None
