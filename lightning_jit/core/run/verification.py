"""Verification: measuring the forget set on the current weights, the per-sample scores of the held-out test, the
sibling check and the outcome a run's figures support."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_jit.core import batching
from lightning_jit.core.accuracy import top1_hits
from lightning_jit.core.batch import BatchFormat, ModelInput, batch_size, concat, device_of, index, same_layout
from lightning_jit.core.cost import CostCounter
from lightning_jit.core.errors import JiTInputError
from lightning_jit.core.guard import monitor_logits
from lightning_jit.core.matching import label_margin
from lightning_jit.core.membership import SampleTest
from lightning_jit.core.outcome import Outcome, Verification
from lightning_jit.core.reference import call_with_state
from lightning_jit.core.run.collectives import Collectives, ForwardContext, gather, take_shard, to_device, within
from lightning_jit.core.weights import normalization_mode


@dataclass
class Scores:
    """Per-sample scores of one pass in eval mode, gathered over the processes (float64, one entry per sample): the
    loss of the label, whether the label is predicted, the label's margin, its probability and the entropy of the
    prediction."""

    loss: Tensor
    hits: Tensor
    margins: Tensor
    confidence: Tensor
    entropy: Tensor
    measured_against: str = "labels"

    def measurement(self, target: float | None) -> Verification:
        """The forget-set measurement these scores make (as :meth:`Verifier.measure_forget` would)."""
        n = int(self.loss.shape[0])
        return Verification(
            outcome=Outcome.NOT_FORGOTTEN,
            n_forget=n,
            forget_accuracy=100.0 * float(self.hits.double().sum()) / n if n else None,
            forget_confidence=100.0 * float(self.confidence.sum()) / n if n else None,
            forget_entropy=float(self.entropy.sum()) / n if n else None,
            target=target,
            measured_against=self.measured_against,
        )


@dataclass
class RunFigures:
    """What the outcome of a run rests on besides its measurement."""

    diverged: bool = False
    unverifiable: bool = False
    unverifiable_reason: str | None = None
    guard_events: int = 0
    rolled_back_to_start: bool = False


def outcome_of(
    measured: Verification, figures: RunFigures, sample: SampleTest | None = None
) -> tuple[Outcome, str | None]:
    """The outcome a measurement (and, for a sample request, the held-out test) supports, and its reason.

    Example:
        >>> measured = Verification(Outcome.NOT_FORGOTTEN, n_forget=10, forget_accuracy=0.0, target=2.5)
        >>> outcome_of(measured, RunFigures())
        (<Outcome.FORGOTTEN: 'forgotten'>, None)
        >>> outcome_of(dataclasses.replace(measured, forget_accuracy=10.0), RunFigures(guard_events=1,
        ...            rolled_back_to_start=True))
        (<Outcome.ROLLED_BACK: 'rolled_back'>, None)
    """
    target, accuracy = measured.target, measured.forget_accuracy
    if figures.diverged:
        return Outcome.DIVERGED, None
    if figures.unverifiable:
        return Outcome.UNVERIFIABLE, figures.unverifiable_reason
    if sample is not None and sample.verified:
        return Outcome.FORGOTTEN, None
    if sample is None and target is not None and accuracy is not None and accuracy <= target:
        return Outcome.FORGOTTEN, None
    if figures.guard_events and figures.rolled_back_to_start:
        return Outcome.ROLLED_BACK, None
    return Outcome.NOT_FORGOTTEN, sample.failure if sample is not None else None


class Verifier:
    """Measures the forget set (and held samples) on the current weights, in eval mode, with no gradient.

    Args:
        model: The model being unlearned.
        batch_format: How to read batches and outputs.
        cost: The run's counter (each pass is booked under the kind it is given).
        collectives: How the processes split batches and agree.
        like: The model's first trainable parameter (where the model is, and its dtype).

    Example:
        >>> net = torch.nn.Linear(4, 3)
        >>> with torch.no_grad():
        ...     _ = net.weight.zero_(), net.bias.copy_(torch.tensor([0.0, 1.0, 0.0]))
        >>> verifier = Verifier(net, BatchFormat(), CostCounter())
        >>> forget = [(torch.randn(4, 4), torch.tensor([1, 1, 0, 2]))]
        >>> measured = verifier.measure_forget(forget, None, None, "verification", target=2.5)
        >>> measured.forget_accuracy, measured.n_forget  # class 1 for every input: 2 of 4 recognised
        (50.0, 4)
    """

    def __init__(
        self,
        model: nn.Module,
        batch_format: BatchFormat,
        cost: CostCounter,
        collectives: Collectives | None = None,
        like: Tensor | None = None,
    ) -> None:
        self.model = model
        #: A trainable parameter: held-out inputs are cast to its device and dtype.
        self.like = like
        self.batch_format = batch_format
        self.cost = cost
        self.collectives = collectives if collectives is not None else Collectives()
        self.device = like.device if like is not None else torch.device("cpu")

    def _original_labels(self, x: ModelInput, original: dict[str, Tensor]) -> Tensor:
        unpack = self.batch_format.unpack_input
        return self.batch_format.logits(call_with_state(self.model, original, x, unpack)).argmax(1)

    @torch.no_grad()
    def measure_forget(
        self,
        forget: Iterable[Any],
        original: dict[str, Tensor] | None,
        forward_context: ForwardContext,
        kind: str,
        *,
        target: float | None,
    ) -> Verification:
        """The share of the forget set the current weights still recognise (a no-grad pass, booked under ``kind``;
        consecutive small batches go through the model together, up to
        :data:`~lightning_jit.core.batching.MAX_BATCH` samples at a time).

        A sample is *recognised* when the model predicts its label (or, for unlabelled batches, the class the model
        predicted before the run: ``original``, its weights). Under DDP each process measures its share of the
        batches and the counts are summed.
        """
        fmt, coll, device = self.batch_format, self.collectives, self.device
        # recognised, confidence sum, n, labelled, entropy sum
        totals = torch.zeros(5, dtype=torch.float64, device=device)
        measured_against = "labels"

        def share(batch: Any) -> tuple[ModelInput, Tensor | None]:
            batch = to_device(batch, device)
            x, labels = fmt.forget_input(batch, structured=True), fmt.labels(batch)
            if coll.split == "shard":
                x, labels, _ = take_shard(x, labels, None, coll.rank, coll.world_size)
            return x, labels

        with normalization_mode(self.model, "eval"), self.cost.kind(kind):
            for x, labels in coalesced((share(batch) for batch in forget), batching.MAX_BATCH):
                with within(forward_context):
                    logits = fmt.logits(fmt.call(self.model, x), batch_size(x)).float()
                    if labels is None and original is not None:
                        measured_against = "original predictions"
                        labels = self._original_labels(x, original)
                if labels is None:
                    continue
                labels = labels.to(logits.device)
                probs = torch.softmax(logits, dim=1)
                log_p = torch.log_softmax(logits, dim=1)
                entropy = -(log_p.exp() * log_p).sum(dim=1).double().sum()
                valid = (labels >= 0) & (labels < logits.shape[1])
                labels = labels.clamp(0, logits.shape[1] - 1)
                hit = top1_hits(logits, labels) & valid
                confidence = (probs.gather(1, labels[:, None]).squeeze(1) * valid).sum().double()
                size = torch.tensor(float(batch_size(x)), dtype=torch.float64, device=confidence.device)
                step = torch.stack([hit.sum().double(), confidence, size, valid.sum().double(), entropy])
                totals += step.to(totals)
        if coll.world_size > 1:
            totals = coll.sum(totals)
        recognised, confidence, n, labelled, entropy = (float(v) for v in totals)
        return Verification(
            outcome=Outcome.NOT_FORGOTTEN,
            n_forget=int(n),
            forget_accuracy=100.0 * recognised / labelled if labelled else None,
            forget_confidence=100.0 * confidence / labelled if labelled and math.isfinite(confidence) else None,
            forget_entropy=entropy / n if n else None,
            target=target,
            measured_against=measured_against,
        )

    @staticmethod
    def from_window(correct: int, count: int, target: float | None) -> Verification:
        """The measurement when the forget set cannot be read again: the stopping rule's window (its last pass)."""
        return Verification(
            outcome=Outcome.NOT_FORGOTTEN,
            n_forget=int(count),
            forget_accuracy=100.0 * correct / count if count else None,
            target=target,
            measured_against="last pass",
        )

    @torch.no_grad()
    def per_sample(
        self,
        batches: Iterable[Any],
        name: str,
        forward_context: ForwardContext,
        original: dict[str, Tensor] | None,
    ) -> Scores:
        """Each sample's scores (:class:`Scores`), in eval mode (a no-grad pass booked as ``heldout``), gathered over
        the processes. ``name`` is ``"forget"`` or ``"monitor"``; forget batches without labels are measured against
        the original's predictions (``original``: its weights)."""
        fmt, device = self.batch_format, self.device
        like = self.like
        columns: list[list[Tensor]] = [[], [], [], [], []]
        measured_against = "labels"
        with normalization_mode(self.model, "eval"), self.cost.kind("heldout"):
            coll = self.collectives
            same_everywhere = name == "monitor" or coll.split == "shard"  # else each process holds its own batches
            for index, batch in enumerate(batches):
                if coll.world_size > 1 and same_everywhere and index % coll.world_size != coll.rank:
                    continue  # every process reads the same batches and scores its share of them
                with within(forward_context):
                    if name == "monitor":
                        logits, labels = monitor_logits(self.model, fmt, batch, like)
                    else:
                        batch = to_device(batch, device)
                        x, labels = fmt.forget_input(batch, structured=True), fmt.labels(batch)
                        logits = fmt.logits(fmt.call(self.model, x), batch_size(x))
                        if labels is None:
                            if original is None:
                                raise JiTInputError("The forget batches carry no labels; the held-out test needs them.")
                            measured_against = "original predictions"
                            labels = self._original_labels(x, original)
                logits = logits.float()
                labels = labels.to(logits.device).long()
                log_p = torch.log_softmax(logits, dim=1)
                columns[0].append(torch.nn.functional.cross_entropy(logits, labels, reduction="none").double())
                columns[1].append(top1_hits(logits, labels).double())
                columns[2].append(label_margin(logits, labels).double())
                columns[3].append(torch.softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1).double())
                columns[4].append(-(log_p.exp() * log_p).sum(dim=1).double())
        joined = []
        for values in columns:
            flat = torch.cat(values) if values else torch.zeros(0, dtype=torch.float64, device=device)
            joined.append(gather(self.collectives, flat))
        return Scores(joined[0], joined[1].bool(), joined[2], joined[3], joined[4], measured_against)

    def recognised(self, x: ModelInput, labels: Tensor, forward_context: ForwardContext) -> tuple[float, float]:
        """How many of the held samples ``x`` the current weights give their ``labels``, and how many there are, over
        all processes (a no-grad pass in eval mode, :data:`~lightning_jit.core.batching.MAX_BATCH` at a time,
        counted as retain cost)."""
        hits = torch.zeros(2, dtype=torch.float64, device=device_of(x))
        fmt = self.batch_format
        with torch.no_grad(), normalization_mode(self.model, "eval"), within(forward_context), self.cost.kind("retain"):
            for i in range(0, batch_size(x), batching.MAX_BATCH):
                chunk = index(x, slice(i, i + batching.MAX_BATCH))
                logits = fmt.logits(fmt.call(self.model, chunk), batch_size(chunk))
                hits[0] += top1_hits(logits, labels[i : i + batching.MAX_BATCH]).sum()
                hits[1] += batch_size(chunk)
        if self.collectives.world_size > 1:
            hits = self.collectives.sum(hits)
        return float(hits[0]), float(hits[1])

    def siblings_lost(self, siblings: tuple[ModelInput, Tensor], forward_context: ForwardContext) -> str | None:
        """Sub-class forgetting: why the forgetting took the whole label with it (retained samples of a forgotten
        label, recognised by the original, are no longer recognised), or ``None``."""
        hits, n = self.recognised(*siblings, forward_context)
        if hits == n:
            return None
        return (
            f"{int(n - hits)} of {int(n)} retained sample(s) of the forgotten label(s) were no longer recognised,"
            " so the forgetting took the whole label with it (sub-class forgetting)"
        )


def rolled_back(verification: Verification, reason: str) -> Verification:
    """``verification`` with the outcome ``rolled_back`` and ``reason``."""
    return dataclasses.replace(verification, outcome=Outcome.ROLLED_BACK, reason=reason)


def coalesced(
    pairs: Iterable[tuple[ModelInput, Tensor | None]], limit: int
) -> Iterator[tuple[ModelInput, Tensor | None]]:
    """Join consecutive ``(inputs, labels)`` batches into batches of up to ``limit`` samples, so that a no-grad pass
    over a loader of small batches (batch 1) takes few forward passes. Batches join only when their inputs have the same
    sample shape, dtype and device and all or none have labels (one per input); a batch whose labels do not match its
    inputs one to one goes as it is; empty ones are dropped. Every sample is scored on its own, so the grouping changes
    no result beyond float rounding.

    Example:
        >>> pairs = [(torch.zeros(1, 2), torch.zeros(1)), (torch.ones(1, 2), torch.ones(1)), (torch.ones(3, 2), None)]
        >>> [(tuple(x.shape), None if y is None else tuple(y.shape)) for x, y in coalesced(pairs, 4)]
        [((2, 2), (2,)), ((3, 2), None)]
    """
    xs: list[ModelInput] = []
    ys: list[Tensor | None] = []
    count = 0

    def joined() -> tuple[ModelInput, Tensor | None]:
        x = xs[0] if len(xs) == 1 else concat(xs)
        labels = [y for y in ys if y is not None]
        if len(labels) < len(ys):
            return x, None
        return x, labels[0] if len(labels) == 1 else torch.cat(labels)

    for x, labels in pairs:
        n = batch_size(x)
        if n == 0:
            continue
        if labels is not None and (labels.dim() == 0 or labels.shape[0] != n):
            if xs:  # labels that do not match the inputs one to one are scored as the batch gave them
                yield joined()
                xs, ys, count = [], [], 0
            yield x, labels
            continue
        fits = bool(xs) and (
            same_layout(x, xs[0])
            and (labels is None) == (ys[0] is None)
            and (labels is None or labels.shape[1:] == ys[0].shape[1:])  # type: ignore[union-attr]
            and count + n <= limit
        )
        if xs and not fits:
            yield joined()
            xs, ys, count = [], [], 0
        xs.append(x)
        ys.append(labels)
        count += n
    if xs:
        yield joined()


__all__ = ["RunFigures", "Scores", "Verifier", "outcome_of", "rolled_back"]
