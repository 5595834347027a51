"""``JiTUnlearningCallback``: unlearn deletion requests inside a Trainer run the user already has.

The callback drives the same run engine as :class:`~lightning_jit.lightning.module.JiTUnlearning`
(:class:`lightning_jit.core.engine.JiTRun`: the step, the stopping rule, divergence handling, the collapse guard, the
cost counters and the outcome) from a Trainer hook, on the user's own model as the Trainer's strategy has wrapped and
placed it, under the precision plugin's autocast, with the strategy's backward. It keeps a
:class:`~lightning_jit.lightning.ledger.DeletionLedger` of the ids it has forgotten in its ``state_dict`` (so
checkpoints carry it) and appends one JSON line per run of the hook to an audit file next to the checkpoints.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, IterableDataset, SequentialSampler, Subset, default_collate

from lightning_jit.core.accuracy import top1_hits
from lightning_jit.core.batch import BatchFormat, batch_size
from lightning_jit.core.batching import batch_size_for
from lightning_jit.core.engine import JiTRun, StepReport
from lightning_jit.core.errors import forward_failure
from lightning_jit.core.guard import GuardSettings, check_monitor
from lightning_jit.core.outcome import JiTOutcomeWarning, Outcome, Verification
from lightning_jit.core.settings import JiTSettings, split_settings
from lightning_jit.core.weights import normalization_mode, trainable_parameters
from lightning_jit.io import file_sha256
from lightning_jit.lightning.distributed import check_strategy, collectives, gradient_scaler
from lightning_jit.lightning.launcher import expect_from_rank_zero, send_to_launcher
from lightning_jit.lightning.ledger import (
    AUDIT_FILENAME,
    DeletionLedger,
    SampleId,
    check_unique,
    content_id,
    environment_versions,
    id_key,
    item_id,
    normalize_id,
    utc_now,
    write_audit_record,
)

#: The moments at which the callback can unlearn.
WHEN = ("fit_start", "train_epoch_end", "fit_end")

ForgetSet = DataLoader | Dataset
ForgetSource = ForgetSet | Callable[[], ForgetSet | None]


@dataclass
class _Forget:
    """A resolved forget set: a map-style dataset, each sample's id, and how to batch it."""

    dataset: Dataset
    ids: list[SampleId]
    id_source: str
    batch_size: int | None
    collate_fn: Callable[[list[Any]], Any]
    num_workers: int


class _StrategyForward:
    """Call the model as the strategy wrapped it, for the passes that need gradients.

    The clean, grad-enabled pass goes through the strategy's wrapper (e.g. ``DistributedDataParallel``), as
    Lightning's manual optimisation does: DDP does not prepare its reducer in the forward, the strategy's backward does.
    The no-grad perturbed passes call the LightningModule directly: they need no gradient synchronisation, so they start
    no collective, and their number may then differ between ranks (a rank's share of a batch may be smaller).
    """

    def __init__(self, wrapped: nn.Module, module: nn.Module) -> None:
        self.wrapped = wrapped
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The model on its arguments (one input tensor, or a dict input's fields as keyword arguments)."""
        if not torch.is_grad_enabled() or self.wrapped is self.module:
            return self.module(*args, **kwargs)
        if isinstance(self.wrapped, DistributedDataParallel):
            previous = self.wrapped.require_backward_grad_sync
            self.wrapped.require_backward_grad_sync = False
            try:
                return self.wrapped(*args, **kwargs)
            finally:
                self.wrapped.require_backward_grad_sync = previous
        return self.wrapped(*args, **kwargs)


def _do_nothing_closure() -> None:
    return None


class _Batches:
    """The pending forget batches of one request, readable again (the run reads them to calibrate and to verify)."""

    def __init__(self, callback: JiTUnlearningCallback, forget: _Forget, indices: list[int]) -> None:
        self.callback, self.forget, self.indices = callback, forget, indices

    def __iter__(self) -> Iterator[Any]:
        return self.callback._batches(self.forget, self.indices)

    def __len__(self) -> int:
        size = self.forget.batch_size or batch_size_for(len(self.indices))
        return -(-len(self.indices) // size)


class JiTUnlearningCallback(Callback):
    r"""Unlearn deletion requests with JiT inside an existing Trainer run, and keep a ledger and an audit file.

    Add it to the Trainer of a training or fine-tuning job. When the hook picked by ``when`` fires, the callback reads
    the forget set, leaves out the ids it has already forgotten, and runs JiT on the rest with the Trainer's own
    strategy (the model as DDP wrapped it), device placement and precision plugin (its autocast, its backward and, under
    ``"16-mixed"``, its GradScaler). It uses its own optimizer (JiT's calibrated step) over the module's parameters; the
    job's optimizer is not touched. The run is :class:`lightning_jit.core.engine.JiTRun`, the one
    :class:`~lightning_jit.lightning.module.JiTUnlearning` runs (with its stopping rule, divergence handling and
    collapse guard), so with the same seed, settings and batches the two give the same weights; ``callback.outcome``
    says how the latest run ended.

    **Ids.** Every forget sample has an id: the third element of a dataset item ``(x, y, id)`` (or ``item["id"]``),
    else the entry of ``ids``, else a SHA-256 content hash of the sample. The noise of each sample is keyed by
    ``(seed, id, epoch)``, so it does not depend on batch composition or rank.

    **Ledger.** The callback's ``state_dict`` holds a :class:`~lightning_jit.lightning.ledger.DeletionLedger`: which
    ids were forgotten, when, with which settings, and the forget-set accuracy and mean entropy before and after.
    Checkpoints carry it, so resuming never forgets an id twice and a request with new ids forgets only those. An id
    moves to "forgotten" only when its run's outcome is verified ``forgotten`` (the forget set is measured again on
    the final weights, :class:`~lightning_jit.core.outcome.Verification`); the ids of any other run stay pending,
    with the failure in the run's record, and are retried at the next request. Such a run restores the weights from
    before it (``on_unverified="restore"``, the default), so the job trains on from the original weights and what it
    saves is never a partial unlearning; ``on_unverified="keep"`` keeps the partial weights instead.

    **Checkpoints and audit.** After a run that forgot something, the callback saves ``checkpoint_filename``
    (``unlearned.ckpt``) in the first ``ModelCheckpoint``'s directory with ``trainer.save_checkpoint``; any
    ``ModelCheckpoint`` save after the hook also holds the unlearned weights, and loads with
    ``UserModel.load_from_checkpoint(path, strict=True)``. Earlier checkpoints still hold the data's influence: delete
    them as your retention policy requires. Rank 0 appends one JSON line per run of the hook to ``audit_path``
    (default ``jit_audit.jsonl`` next to the checkpoints, else in ``trainer.default_root_dir``).

    **Distributed.** Under DDP every rank reads the same global forget batches and processes its contiguous share; the
    loss is scaled so that DDP's averaged gradient is the one-process gradient of the global batch. Ranks check that
    they see the same pending ids, and agree on every step with ``reduce_boolean_decision``; every rank records rank
    0's run record, so all hold the same ledger. Under a launcher that runs the fit in other processes
    (``ddp_spawn``, ``ddp_fork``), rank 0 sends its ledger and the latest run's verification back with the weights,
    so ``callback.outcome``, ``callback.verification`` and ``callback.ledger`` read the same in the launching process
    (:mod:`lightning_jit.lightning.launcher`). A module sharded with FSDP2
    (``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)``, ``fully_shard`` in its
    ``configure_model``) is supported the same way; DeepSpeed, FSDP1, tensor-parallel and XLA strategies are refused
    at ``setup``. Everything the callback holds pickles (for ``ddp_spawn``, ``forget`` must then be a picklable object:
    a dataset, loader, or top-level function).

    **Moments.** ``"fit_start"`` runs in ``on_train_start`` (after a resumed checkpoint is restored, before the first
    training batch); ``"train_epoch_end"`` in every ``on_train_epoch_end`` (before ``ModelCheckpoint`` saves at the end
    of the training epoch; a ``ModelCheckpoint`` that saves at validation end saves *before* it); ``"fit_end"`` in
    ``on_train_end``, while the model is still wrapped and on its device. A fit whose training loop does not run (no
    batches, or ``max_epochs`` already reached) fires none of them.

    Args:
        forget: The forget set: a map-style ``Dataset``, a ``DataLoader`` over one (its ``batch_size`` and
            ``collate_fn`` are used; its sampler is not, the set is read in order), or a callable returning either
            (or ``None`` when no request is pending), called each time the hook fires.
        settings: The JiT settings (:class:`~lightning_jit.core.settings.JiTSettings`); its fields may also be given
            as keyword arguments. The retain terms hold the model as it is when each run of the hook starts.
        when: ``"fit_start"``, ``"train_epoch_end"`` or ``"fit_end"`` (see above).
        ids: One id (int or str) per sample of the forget set, when its items do not carry them.
        batch_size: Batch size when ``forget`` is (or returns) a ``Dataset``. ``None``: the pending samples in
            :data:`~lightning_jit.core.batching.STEPS_PER_PASS` batches (at most
            :data:`~lightning_jit.core.batching.MAX_BATCH` samples each).
        batch_format: How batches and outputs are read (:class:`~lightning_jit.core.batch.BatchFormat`). With a
            ``batch_to_input``, batches that are not dicts are passed to it unchanged, and the noise comes from a
            generator seeded with ``seed`` instead of being keyed by id.
        guard: The collapse guard, as in :class:`~lightning_jit.lightning.module.JiTUnlearning`.
        monitor: Optional labelled loader of held-out data the model never trained on (e.g. the validation
            split), never used for gradients: the guard watches its accuracy, and a request that names individual
            samples is verified against it (:mod:`lightning_jit.core.membership`). Without it, or when the request is
            too small for the test to tell a memorised set, its ids are recorded as unverifiable, the model is left
            unchanged, and they are tried again only with new ids or once a monitor is given.
        retain: Optional loader of samples the job keeps, as in :class:`~lightning_jit.lightning.module.JiTUnlearning`.
        audit_path: The audit file (default: ``jit_audit.jsonl`` next to the checkpoints).
        checkpoint_filename: File name of the checkpoint saved after each run that forgot something, in the first
            ``ModelCheckpoint``'s directory; ``None`` saves none.
        ledger_name: Names the ledger in checkpoints (the callback's ``state_key``). Jobs that resume from each other
            must use the same name; two callbacks in one Trainer need different names.
        strict: Raise :class:`~lightning_jit.core.outcome.JiTUnlearningFailed` (after restoring the weights from
            before the run) when a run's verified outcome is not ``forgotten``, instead of warning and leaving its ids
            pending.
        settings_kwargs: Fields of ``JiTSettings``, ``BatchFormat`` or ``GuardSettings``.

    Example:
        >>> import lightning.pytorch as pl, torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> _ = torch.manual_seed(0)
        >>> forget = TensorDataset(torch.randn(8, 32), torch.zeros(8, dtype=torch.long), torch.arange(8))
        >>> callback = JiTUnlearningCallback(forget, sigma=0.5, lr=0.01, n_perturbations=4, when="fit_end",
        ...                                  checkpoint_filename=None, audit_path=None)
        >>> trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        ...                      default_root_dir=__import__("tempfile").mkdtemp(), callbacks=[callback])
        >>> trainer.fit(BoringModel())
        >>> run = callback.ledger.runs[0]  # the target was not verified, so no id is claimed: they stay pending
        >>> run["outcome"], run["counts"]["attempted"], run["counts"]["forgotten"], len(callback.ledger)
        ('not_forgotten', 8, 0, 0)
    """

    def __init__(
        self,
        forget: ForgetSource,
        settings: JiTSettings | None = None,
        *,
        when: str = "fit_end",
        ids: Sequence[SampleId] | None = None,
        batch_size: int | None = None,
        batch_format: BatchFormat | None = None,
        guard: bool | GuardSettings = True,
        monitor: Iterable[Any] | None = None,
        retain: Iterable[Any] | None = None,
        audit_path: str | os.PathLike | None = None,
        checkpoint_filename: str | None = "unlearned.ckpt",
        ledger_name: str = "default",
        strict: bool = False,
        **settings_kwargs: Any,
    ) -> None:
        if when not in WHEN:
            raise MisconfigurationException(
                f"`when` must be one of {WHEN}, got {when!r}. 'fit_start' forgets before training continues,"
                " 'train_epoch_end' after every epoch (for requests that keep arriving), 'fit_end' after training."
            )
        if not isinstance(forget, (DataLoader, Dataset)) and not callable(forget):
            raise MisconfigurationException(
                f"`forget` must be a DataLoader, a map-style Dataset, or a callable returning one, got"
                f" {type(forget).__name__}."
            )
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise MisconfigurationException(
                f"`batch_size` must be an integer >= 1 or None (automatic), got {batch_size!r}."
            )
        if ids is not None and (isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, Tensor))):
            raise MisconfigurationException("`ids` must be a sequence with one int or str id per forget sample.")
        if checkpoint_filename is not None and (not checkpoint_filename or os.sep in str(checkpoint_filename)):
            raise MisconfigurationException(
                f"`checkpoint_filename` must be a plain file name such as 'unlearned.ckpt', or None; got"
                f" {checkpoint_filename!r}."
            )
        self.settings, self.batch_format, self.guard = split_settings(settings, batch_format, guard, settings_kwargs)
        self.monitor = check_monitor(monitor)
        self.retain = check_monitor(retain, "retain")
        self.strict = bool(strict)
        self.when = when
        self.forget = forget
        self.ids = (
            [normalize_id(i) for i in (ids.tolist() if isinstance(ids, Tensor) else ids)] if ids is not None else None
        )
        if self.ids is not None:
            check_unique(self.ids, "ids")
        self.batch_size = batch_size
        self.audit_path = os.fspath(audit_path) if audit_path is not None else None
        self.checkpoint_filename = checkpoint_filename
        self.ledger_name = str(ledger_name)
        self.ledger = DeletionLedger()
        self.run: JiTRun | None = None
        self._log_step = 0
        self._static: _Forget | None = None
        #: The latest run's verification as rank 0 sent it to a launching process that ran no run itself.
        self._from_rank_zero: Verification | None = None
        self.launcher_token = expect_from_rank_zero(self)

    @property
    def outcome(self) -> Outcome | None:
        """How the latest run of the hook ended, verified (:class:`~lightning_jit.core.outcome.Outcome`); ``None``
        before. Under a launcher that runs the fit in other processes (``ddp_spawn``), the launching process gets rank
        0's (with its verification and ledger)."""
        if self.run is not None:
            return self.run.outcome
        return self._from_rank_zero.outcome if self._from_rank_zero is not None else None

    @property
    def verification(self) -> Verification | None:
        """What the end-of-run check of the latest run measured (:class:`~lightning_jit.core.outcome.Verification`);
        ``None`` before any run, and after a hook that found no new id to forget."""
        if self.run is not None:
            return self.run.verification
        return self._from_rank_zero

    @property
    def unlearns_at(self) -> str:
        """The Trainer hook the unlearning runs in (the protocol evaluation code uses to snapshot the original)."""
        return {"fit_start": "on_train_start", "train_epoch_end": "on_train_epoch_end", "fit_end": "on_train_end"}[
            self.when
        ]

    @property
    def state_key(self) -> str:
        # Independent of `when` and the settings: a job that resumes with other settings keeps the same ledger.
        return self._generate_state_key(ledger=self.ledger_name)

    # ----------------------------------------------------------------------------------------------------------------
    # Lightning hooks
    # ----------------------------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, type(self).__name__)
        send_to_launcher(trainer, self)  # under ddp_spawn: the launching process gets rank 0's outcome and ledger
        if not trainable_parameters(pl_module):
            raise MisconfigurationException(
                "The LightningModule has no trainable parameters (all have requires_grad=False), so JiT cannot change"
                " it. Unfreeze the layers JiT should update."
            )
        if self.monitor is None:
            rank_zero_info(
                "JiTUnlearningCallback: no `monitor=` held-out data, so a request that names individual samples (not"
                " whole classes) cannot be verified: its ids are recorded as unverifiable, the model is left"
                " unchanged, and they are tried again once a `monitor=` loader (e.g. the validation split) is given."
            )
        if isinstance(self.forget, (DataLoader, Dataset)):
            # A fixed forget set is checked now, before any training or weight change.
            self._static = self._resolve(self.forget)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "fit_start":
            self._handle_request(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "train_epoch_end":
            self._handle_request(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "fit_end":
            self._handle_request(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"ledger": self.ledger.state_dict(), "log_step": self._log_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ledger.load_state_dict(state_dict["ledger"])
        self._log_step = int(state_dict.get("log_step", 0))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_static"] = None  # re-resolved in `setup` of each process
        state["run"] = None  # the model's run engine stays with the model; its verification travels
        state["_from_rank_zero"] = self.verification
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> JiTUnlearningCallback:
        # A copy is another callback: it receives its own results from rank 0, not those of the original. (A pickled
        # copy, as a spawning launcher sends it, keeps the token: its results come back to this callback.)
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__dict__.update(copy.deepcopy(self.__getstate__(), memo))
        copied.launcher_token = expect_from_rank_zero(copied)
        return copied

    def state_for_launcher(self) -> dict[str, Any]:
        """Rank 0's results, for the launching process (:mod:`lightning_jit.lightning.launcher`)."""
        return {**self.state_dict(), "verification": self.verification}

    def load_from_rank_zero(self, state: dict[str, Any]) -> None:
        """Take rank 0's results in the launching process: the ledger and the latest run's verification."""
        self.load_state_dict(state)
        self.run = None
        self._from_rank_zero = state.get("verification")

    # ----------------------------------------------------------------------------------------------------------------
    # The forget set and its ids
    # ----------------------------------------------------------------------------------------------------------------
    def _resolve(self, source: Any) -> _Forget:
        if isinstance(source, DataLoader):
            loader = source
            dataset = loader.dataset
            batch_size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None)
            if not batch_size:
                raise MisconfigurationException(
                    "The forget DataLoader has no `batch_size` (a custom `batch_sampler`); pass the Dataset and"
                    " `batch_size=` to JiTUnlearningCallback instead."
                )
            if not isinstance(loader.sampler, SequentialSampler) and not isinstance(dataset, IterableDataset):
                rank_zero_warn(
                    "The forget DataLoader's sampler is ignored: JiTUnlearningCallback reads the forget set in order"
                    " (unshuffled), so that every rank sees the same batches."
                )
            collate_fn, num_workers = loader.collate_fn, 0
        elif isinstance(source, Dataset):
            dataset, batch_size, collate_fn, num_workers = source, self.batch_size, default_collate, 0
        else:
            raise MisconfigurationException(
                f"The `forget` callable must return a DataLoader, a map-style Dataset or None, got"
                f" {type(source).__name__}."
            )
        if (
            isinstance(dataset, IterableDataset)
            or not hasattr(dataset, "__len__")
            or not hasattr(dataset, "__getitem__")
        ):
            raise MisconfigurationException(
                f"The forget set must be a map-style Dataset (with __len__ and __getitem__), got"
                f" {type(dataset).__name__}: every sample needs an id and each rank must read the same batches."
            )
        n = len(dataset)
        if n == 0:
            raise MisconfigurationException(
                "The forget set is empty: there is nothing to unlearn. Check the deletion request, or return None from"
                " the `forget` callable when no request is pending."
            )
        item_ids: list[Any] = []
        hashes: list[str] = []
        need_hash = self.ids is None
        for index in range(n):
            item = dataset[index]
            found = item_id(item)
            item_ids.append(found)
            if need_hash and found is None:
                hashes.append(content_id(item))
        carried = [i for i in item_ids if i is not None]
        if carried and len(carried) != n:
            raise MisconfigurationException(
                f"{len(carried)} of {n} forget samples carry an id: either every item is `(x, y, id)` / has an 'id', or"
                " none is."
            )
        if carried:
            ids, id_source = [normalize_id(i) for i in carried], "dataset"
            if self.ids is not None and [id_key(i) for i in self.ids] != [id_key(i) for i in ids]:
                raise MisconfigurationException(
                    "The forget samples carry ids that differ from `ids`: pass one or the other, not both."
                )
        elif self.ids is not None:
            if len(self.ids) != n:
                raise MisconfigurationException(
                    f"`ids` has {len(self.ids)} entries for a forget set of {n} samples: give one id per sample."
                )
            ids, id_source = list(self.ids), "ids"
        else:
            ids, id_source = hashes, "content_hash"
        check_unique(ids, id_source)
        forget = _Forget(dataset, ids, id_source, batch_size, collate_fn, num_workers)
        # The step must find the input in these batches: check one now, before any weight changes.
        first_size = batch_size or batch_size_for(n)
        first = self._with_ids(collate_fn([dataset[i] for i in range(min(n, first_size))]), ids[:first_size])
        self.batch_format.forget_input(first, structured=True)  # the run's site checks what it can perturb
        return forget

    def _with_ids(self, batch: Any, ids: Sequence[SampleId]) -> Any:
        """Attach the samples' ids to a batch that does not carry them, where :meth:`BatchFormat.ids` finds them."""
        if BatchFormat.ids(batch) is not None:
            return batch
        value: Any = torch.tensor(ids) if all(isinstance(i, int) for i in ids) else list(ids)
        if isinstance(batch, dict):
            return {**batch, "id": value}
        if self.batch_format.batch_to_input is not None:
            return batch  # the user's own batch layout: leave it alone (unkeyed, seeded-generator noise)
        if isinstance(batch, Tensor) and self.batch_format.input_key in (None, 0):
            return [batch, None, value]
        if isinstance(batch, (tuple, list)) and len(batch) <= 2:
            return [*batch, *([None] * (2 - len(batch))), value]
        return batch

    def _batches(self, forget: _Forget, indices: list[int]) -> Iterator[Any]:
        batch_size = forget.batch_size or batch_size_for(len(indices))
        loader = DataLoader(
            Subset(forget.dataset, indices),
            batch_size=batch_size,
            shuffle=False,
            collate_fn=forget.collate_fn,
            num_workers=forget.num_workers,
        )
        # Unshuffled, drop_last=False: batch k holds indices[k * batch_size : (k + 1) * batch_size].
        for k, batch in enumerate(loader):
            chunk = indices[k * batch_size : (k + 1) * batch_size]
            yield self._with_ids(batch, [forget.ids[i] for i in chunk])

    # ----------------------------------------------------------------------------------------------------------------
    # One run of the hook
    # ----------------------------------------------------------------------------------------------------------------
    def _handle_request(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        started, wall_start = utc_now(), time.perf_counter()
        strategy = trainer.strategy
        source = self.forget() if not isinstance(self.forget, (DataLoader, Dataset)) else self.forget
        if source is None:
            forget = None
        elif source is self.forget and self._static is not None:
            forget = self._static
        else:
            forget = self._resolve(source)
        requested = list(forget.ids) if forget is not None else []
        pending_ids = self._pending(requested)
        pending_keys = {id_key(i) for i in pending_ids}
        indices = [k for k, i in enumerate(requested) if id_key(i) in pending_keys]

        # Every rank must see the same pending ids, or the shards and all-reduces would not match.
        digest = hashlib.sha256(json.dumps([id_key(i) for i in pending_ids]).encode()).hexdigest()
        same = strategy.broadcast(digest, src=0) == digest
        if not strategy.reduce_boolean_decision(same, all=True):
            raise MisconfigurationException(
                "The ranks see different pending forget ids. The `forget` source must return the same samples, in the"
                " same order, on every rank."
            )

        record: dict[str, Any] = {
            "record_version": 2,
            "time": started,
            "moment": self.when,
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "id_source": forget.id_source if forget is not None else None,
            "ids": pending_ids,
            "counts": {
                "requested": len(requested),
                "already_forgotten": len(requested) - len(pending_ids),
                "attempted": len(pending_ids),
                "forgotten": 0,
            },
            "settings": {**self.settings.hparams(), **self.batch_format.hparams(), "when": self.when},
            "world_size": trainer.world_size,
            "strategy": type(strategy).__name__,
            "precision": str(getattr(trainer.precision_plugin, "precision", "")),
        }
        checkpoint = None
        verified: list[SampleId] = []
        unverifiable: list[SampleId] = []
        if pending_ids:
            assert forget is not None
            rank_zero_info(
                f"JiT unlearning {len(pending_ids)} new sample(s) at {self.when} (epoch {trainer.current_epoch};"
                f" {record['counts']['already_forgotten']} of the request already forgotten)."
            )
            record.update(self._unlearn(trainer, pl_module, forget, indices))
            if record["outcome"] == Outcome.FORGOTTEN.value:
                # Only a verified run moves its ids to "forgotten", and only it writes the unlearned checkpoint.
                verified = pending_ids
                checkpoint = self._checkpoint_path(trainer)
                rank_zero_info(f"JiT: {record['verification']['verdict']}.")
            elif record["outcome"] == Outcome.UNVERIFIABLE.value:
                # Said once at set-up; the ids are not retried at every job, only once a `monitor=` is given.
                unverifiable = pending_ids
                rank_zero_info(
                    f"JiT: {record['verification']['verdict']}. The {len(pending_ids)} id(s) are recorded as"
                    " unverifiable and the model is unchanged; they are tried again with the next new ids, or once a"
                    " `monitor=` is given."
                )
            else:
                rank_zero_warn(
                    f"JiT: {record['verification']['verdict']}. The {len(pending_ids)} id(s) stay pending and are"
                    f" retried at the next request. {record['verification']['advice']}",
                    category=JiTOutcomeWarning,
                )
        else:
            rank_zero_info(f"JiT unlearning at {self.when}: no new id to forget ({len(requested)} requested).")
            record.update({"steps": 0, "skipped_steps": 0, "epochs_run": 0, "stopped_early": False, "outcome": None})
        record["counts"]["forgotten"] = len(verified)
        record["checkpoint"] = checkpoint
        record["wall_time_s"] = time.perf_counter() - wall_start
        record["time_end"] = utc_now()
        record["versions"] = environment_versions()
        record["audit_path"] = str(self._audit_path(trainer))
        record["counts"]["unverifiable"] = len(unverifiable)
        if trainer.world_size > 1:  # rank 0's record (its times), so that every rank holds the same ledger
            record = strategy.broadcast(record, src=0)
        record = self.ledger.add_run(
            record, forgotten=verified, unverifiable=unverifiable, with_heldout=self.monitor is not None
        )
        if checkpoint is not None:
            trainer.save_checkpoint(checkpoint)  # every rank calls it; it ends with a barrier
        if trainer.is_global_zero:
            audit = dict(record)
            if checkpoint is not None:
                audit["checkpoint_sha256"] = file_sha256(checkpoint)
            write_audit_record(record["audit_path"], audit)
        strategy.barrier("JiTUnlearningCallback.audit")
        self._log(trainer, {k: v for k, v in _summary(record).items() if v is not None and math.isfinite(v)})

    def _pending(self, requested: list[SampleId]) -> list[SampleId]:
        """The requested ids to attempt, in request order: those never attempted or not verified, and those recorded
        as unverifiable only when that could now change: new ids join them (a request too small to verify may not be
        once it grows), or held-out data is given where there was none. So a request that cannot be verified is not
        retried at every job."""
        new = {id_key(i) for i in self.ledger.pending(requested)}
        waiting = [i for i in requested if self.ledger.is_unverifiable(i)]
        heldout_now = self.monitor is not None
        retry = {
            id_key(i)
            for i in waiting
            if new or (heldout_now and not self.ledger.unverifiable[id_key(i)]["with_heldout"])
        }
        return [i for i in requested if id_key(i) in new or id_key(i) in retry]

    def _unlearn(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, forget: _Forget, indices: list[int]
    ) -> dict[str, Any]:
        strategy = trainer.strategy
        settings = self.settings
        before = self._forget_metrics(trainer, pl_module, forget, indices)
        run = self.run = JiTRun(
            pl_module,
            settings,
            batch_format=self.batch_format.for_model(pl_module),
            guard=self.guard,
            monitor=self.monitor,
            retain=self.retain,
            collectives=collectives(trainer, None, type(self).__name__),
            warn=rank_zero_warn,
            info=rank_zero_info,
        )
        optimizer = run.make_optimizer()
        forward = _StrategyForward(strategy.model if strategy.model is not None else pl_module, pl_module)
        forward_context = trainer.precision_plugin.forward_context
        batches = _Batches(self, forget, indices)
        epochs_run = 0

        def step_optimizer() -> None:
            strategy.optimizer_step(optimizer, _do_nothing_closure, model=pl_module)

        def on_step(report: StepReport) -> None:
            loss = strategy.reduce(report.loss, reduce_op="mean") if trainer.world_size > 1 else report.loss
            metrics = {"jit_loss": float(loss)}
            if report.forget_accuracy is not None:
                metrics["jit_forget_acc"] = report.forget_accuracy
            self._log(trainer, metrics)
            if bar is not None:
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
                bar.update(1)

        automatic = pl_module.automatic_optimization
        # The JiT step is a manual-optimisation step (as in the wrapper): the strategy's backward prepares DDP's
        # reducer, the precision plugin steps through its GradScaler, and the job's gradient clipping is not applied.
        pl_module.automatic_optimization = False
        bar = None
        try:
            run.start(batches, forward_context)
            passes = run.max_passes
            bar = self._progress_bar(trainer, total=passes * len(batches) if passes is not None else None)
            with torch.enable_grad():
                epochs_run = run.run_passes(
                    batches,
                    optimizer=optimizer,
                    backward=pl_module.manual_backward,
                    prepare=lambda batch: move_data_to_device(batch, strategy.root_device),
                    on_step=on_step,
                    step_optimizer=step_optimizer,
                    scaler=gradient_scaler(trainer),
                    forward=forward,
                    forward_context=forward_context,
                )
            verification = run.finish(optimizer, forward_context, strict=self.strict)
        except BaseException:
            if run.abort():
                rank_zero_warn(
                    "JiT unlearning failed; the model's weights were restored to their values before the run."
                )
            raise
        finally:
            pl_module.automatic_optimization = automatic
            optimizer.zero_grad(set_to_none=True)
            if bar is not None:
                bar.close()
        return {
            "metrics_before": before,
            # The engine's verification of the final weights (no second measurement).
            "metrics_after": {
                "n": verification.n_forget,
                "forget_accuracy": verification.forget_accuracy,
                "forget_mean_entropy": verification.forget_entropy,
            },
            "steps": run.steps,
            "skipped_steps": run.skipped_steps,
            "epochs_run": epochs_run,
            "stopped_early": run.stopped_early,
            "outcome": verification.outcome.value,
            "verification": verification.as_dict(),
            "safety": run.safety_report(),
            "cost": run.cost.report(len(indices), settings.n_perturbations),
        }

    @torch.no_grad()
    def _forget_metrics(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, forget: _Forget, indices: list[int]
    ) -> dict[str, float | int | None]:
        """Forget-set accuracy (percent; ``None`` without labels) and mean predictive entropy (nats), in eval mode.

        Every rank evaluates the whole pending set on its own copy of the (identical) weights: no collective.
        """
        correct = labelled = count = 0
        entropy = 0.0
        fmt = self.batch_format.for_model(pl_module)
        with normalization_mode(pl_module, "eval"), trainer.precision_plugin.forward_context():
            for batch in self._batches(forget, indices):
                batch = move_data_to_device(batch, trainer.strategy.root_device)
                x = fmt.forget_input(batch, structured=True)
                try:
                    output = fmt.call(pl_module, x)
                except (RuntimeError, TypeError) as err:  # the batch alone does not fit the model: name the cause
                    raise forward_failure(pl_module, x, err) from err
                logits = fmt.logits(output, batch_size(x)).float()
                log_p = torch.log_softmax(logits, dim=1)
                entropy += float(-(log_p.exp() * log_p).sum(dim=1).double().sum())
                count += int(logits.shape[0])
                labels = fmt.labels(batch)
                if labels is not None and labels.shape[0] == logits.shape[0]:
                    correct += int(top1_hits(logits, labels.to(logits.device)).sum())
                    labelled += int(labels.shape[0])
        return {
            "n": count,
            "forget_accuracy": 100.0 * correct / labelled if labelled else None,
            "forget_mean_entropy": entropy / count if count else None,
        }

    # ----------------------------------------------------------------------------------------------------------------
    # Output: loggers, progress bar, files
    # ----------------------------------------------------------------------------------------------------------------
    def _log(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        if not metrics:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=self._log_step)
        self._log_step += 1

    def _progress_bar(self, trainer: pl.Trainer, total: int) -> Any:
        bar_callback = trainer.progress_bar_callback
        if bar_callback is None or not trainer.is_global_zero or getattr(bar_callback, "is_disabled", False):
            return None
        from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

        return Tqdm(desc=f"JiT unlearning ({self.when})", total=total, leave=False, dynamic_ncols=True)

    def _checkpoint_dir(self, trainer: pl.Trainer) -> str | None:
        callback = trainer.checkpoint_callback
        dirpath = getattr(callback, "dirpath", None) if callback is not None else None
        return os.fspath(dirpath) if dirpath else None

    def _checkpoint_path(self, trainer: pl.Trainer) -> str | None:
        directory = self._checkpoint_dir(trainer)
        if self.checkpoint_filename is None or directory is None:
            return None
        return os.path.join(directory, self.checkpoint_filename)

    def _audit_path(self, trainer: pl.Trainer) -> Path:
        if self.audit_path is not None:
            return Path(self.audit_path)
        return Path(self._checkpoint_dir(trainer) or trainer.default_root_dir) / AUDIT_FILENAME


def _summary(record: dict[str, Any]) -> dict[str, float | None]:
    before = record.get("metrics_before") or {}
    after = record.get("metrics_after") or {}
    return {
        "jit_forgotten": float(record["counts"]["forgotten"]),
        "jit_forget_acc_before": before.get("forget_accuracy"),
        "jit_forget_acc_after": after.get("forget_accuracy"),
        "jit_forget_entropy_before": before.get("forget_mean_entropy"),
        "jit_forget_entropy_after": after.get("forget_mean_entropy"),
    }
