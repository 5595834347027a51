"""A sample request (``task="random"`` with no forget-accuracy target): its settlement before any update, the held-out
test (:mod:`lightning_jit.core.membership`) and its matching update (:mod:`lightning_jit.core.matching`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_jit.core.accuracy import top1_hits
from lightning_jit.core.batch import BatchFormat, describe_input, move
from lightning_jit.core.cost import CostCounter
from lightning_jit.core.errors import JiTInputError
from lightning_jit.core.matching import MAX_BASIS, HeldoutProjection, MarginTargets, label_margin, matching_loss
from lightning_jit.core.membership import SampleTest, sample_test
from lightning_jit.core.outcome import Outcome, Verification
from lightning_jit.core.run.collectives import Collectives, ForwardContext, gather
from lightning_jit.core.run.verification import Scores, Verifier
from lightning_jit.core.weights import normalization_mode

#: Why a sample request without held-out data ends ``unverifiable``.
UNVERIFIABLE_REASON = (
    "a request that names individual samples is verified against held-out data the model never trained on, and none"
    " was given: pass `monitor=` a labelled loader such as your validation split"
)

#: The figures of a forget-set measurement a sample request keeps from the held-out test on the original weights.
_FIGURES = ("n_forget", "forget_accuracy", "forget_confidence", "forget_entropy", "measured_against")


class SampleRequest:
    """The held-out test and the matching update of a sample request.

    Args:
        monitor: The held-out labelled batches (``None``: the request cannot be verified).
        verifier: Scores the forget set and the held-out data on the current weights.
        collectives: How the processes agree.

    Example:
        >>> request = SampleRequest(None, Verifier(torch.nn.Linear(2, 2), BatchFormat(), CostCounter()))
        >>> request.prepare([], None, {}), request.unverifiable, request.settled
        (False, True, True)
    """

    def __init__(
        self, monitor: Iterable[Any] | None, verifier: Verifier, collectives: Collectives | None = None
    ) -> None:
        self.monitor = monitor
        self.verifier = verifier
        self.collectives = collectives if collectives is not None else Collectives()
        #: Nothing can be verified (no held-out data, or too few forget samples for the test): no update.
        self.unverifiable = False
        self.unverifiable_reason: str | None = None
        #: The forget samples already look like held-out data on the original weights: no update.
        self.nothing_to_do = False
        #: The held-out test on the original weights.
        self.test_before: SampleTest | None = None
        #: The forget set as that test measured it (what the record says when no update is made).
        self.measured_before: dict[str, Any] | None = None
        #: ``(forget, heldout)`` per-sample ``(loss, hits, margins)`` on the original weights.
        self.scores: tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]] | None = None
        #: The update: its margin targets and held-out projection.
        self.matching: tuple[MarginTargets, HeldoutProjection] | None = None
        self._pass_scores: list[tuple[Tensor, Tensor]] = []

    @property
    def settled(self) -> bool:
        """Whether the request was settled before any update (no update is made)."""
        return self.unverifiable or self.nothing_to_do

    def test(
        self, forget: Iterable[Any], forward_context: ForwardContext, original: dict[str, Tensor] | None
    ) -> tuple[SampleTest, Scores, Scores]:
        """The held-out test on the current weights, and the scores of the forget set and the held-out data."""
        assert self.monitor is not None
        scored = self.verifier.per_sample(forget, "forget", forward_context, original)
        heldout = self.verifier.per_sample(self.monitor, "monitor", forward_context, None)
        return sample_test(scored.loss, scored.hits, heldout.loss, heldout.hits), scored, heldout

    def prepare(self, forget: Iterable[Any], original: dict[str, Tensor] | None, calibrated: dict[str, Any]) -> bool:
        """Before any update: without held-out data, or with too few forget samples for the held-out test to tell a
        memorised set, the request settles as ``unverifiable``; if the forget samples already look like held-out
        data on the original weights, there is nothing to undo. Returns whether the update must start."""
        if self.monitor is None:
            self.unverifiable, self.unverifiable_reason = True, UNVERIFIABLE_REASON
            return False
        test, scored, heldout = self.test(forget, None, original)
        self.test_before = test
        self.scores = ((scored.loss, scored.hits, scored.margins), (heldout.loss, heldout.hits, heldout.margins))
        measured = scored.measurement(None)
        self.measured_before = {name: getattr(measured, name) for name in _FIGURES}
        calibrated["heldout_test_before"] = test.as_dict()
        if not test.powered:  # even a memorised set would pass: nothing the run does could be verified
            self.unverifiable, self.unverifiable_reason = True, test.too_small
        self.nothing_to_do = test.passed
        return not self.settled

    def basis_samples(self, batch_format: BatchFormat, like: Tensor) -> tuple[Tensor, Tensor]:
        """The first :data:`~lightning_jit.core.matching.MAX_BASIS` held-out samples, on ``like``'s device, floating
        inputs in its dtype (token ids keep theirs; the same on every process)."""
        xs, ys, count = [], [], 0
        for batch in self.monitor or ():
            x, y = batch_format.input_and_labels(batch, "monitor", structured=True)
            if not isinstance(x, Tensor):
                raise JiTInputError(
                    f"A sample request (`task='random'`) takes its update off held-out margin gradients computed per"
                    f" sample, which need one input tensor, and the `monitor` input is a {type(x).__name__}"
                    f" ({describe_input(x)}). Sample requests on dict or tuple inputs are not supported yet: set"
                    " `input_key` or `batch_to_input` so that the input is one tensor, or forget whole classes"
                    " (`task='class'`)."
                )
            xs.append(move(x, like.device, like.dtype))
            ys.append(y.to(like.device).long())
            count += int(x.shape[0])
            if count >= MAX_BASIS:
                break
        return torch.cat(xs)[:MAX_BASIS], torch.cat(ys)[:MAX_BASIS]

    def start_matching(
        self,
        model: nn.Module,
        params: list[nn.Parameter],
        batch_format: BatchFormat,
        cost: CostCounter,
        norm_policy: str,
        basis: tuple[Tensor, Tensor],
    ) -> int:
        """The update: margin targets from the scores of the held-out test on the original weights, and the
        projection off held-out margin gradients of the ``basis`` samples. Returns the projection's directions."""
        assert self.scores is not None
        (_, _, forget_margins), (_, _, heldout_margins) = self.scores
        cost.detach()  # the per-sample gradients go through torch.func, which the forward hook cannot count
        with normalization_mode(model, norm_policy):
            projection = HeldoutProjection.build(model, params, *basis, batch_format.logits)
        cost.attach(model)
        directions = int(projection.basis.shape[0])
        cost.counts["heldout"] += 3 * directions
        self.matching = (MarginTargets(forget_margins, heldout_margins), projection)
        return directions

    def loss(self, clean: Tensor, reference: Tensor, labels: Tensor | None) -> Tensor:
        """The one-sided pull of each forget sample's margin to its target (summed over this process's samples; the
        original's logits ``reference`` give the targets and, without labels, the labels), and the scores the pass
        check reads at the end of the pass."""
        assert self.matching is not None
        targets, _ = self.matching
        reference = reference.float()
        labels = labels.to(clean.device).long() if labels is not None else reference.argmax(1)
        logits = clean.float()
        with torch.no_grad():
            self._pass_scores.append(
                (
                    torch.nn.functional.cross_entropy(logits, labels, reduction="none").double(),
                    top1_hits(logits, labels),
                )
            )
        return matching_loss(label_margin(logits, labels), targets(label_margin(reference, labels)))

    def project(self) -> None:
        """Project the gradients off the directions held-out margins use (the same on every process)."""
        if self.matching is not None:
            self.matching[1].project_()

    def matched_during_pass(self) -> bool:
        """Whether the forget samples, as measured by the clean passes of this pass (before each update), look like
        the held-out data did on the original weights: the held-out test passes, and the forget accuracy is not above
        the held-out accuracy or the membership AUC is down to chance (going on would make them stand out the other
        way). The outcome is decided on the final weights, not here."""
        assert self.scores is not None
        scored, self._pass_scores = self._pass_scores, []
        if not scored:
            return False
        loss = gather(self.collectives, torch.cat([s[0] for s in scored]))
        hits = gather(self.collectives, torch.cat([s[1] for s in scored]).double()).bool()
        _, (heldout_loss, heldout_hits, _) = self.scores
        test = sample_test(loss, hits, heldout_loss, heldout_hits)
        return test.passed and (test.forget_accuracy <= test.heldout_accuracy or test.auc <= 0.5)

    def verify(
        self, forget: Iterable[Any], forward_context: ForwardContext, original: dict[str, Tensor] | None
    ) -> tuple[Verification, SampleTest]:
        """The final measurement and held-out test (with held-out data), from one per-sample pass over the forget
        set; none when the request settled before any update: the weights are those the test before the run
        scored."""
        if self.nothing_to_do or self.unverifiable:
            assert self.test_before is not None and self.measured_before is not None
            return Verification(outcome=Outcome.NOT_FORGOTTEN, **self.measured_before), self.test_before
        test, scored, _ = self.test(forget, forward_context, original)
        return scored.measurement(None), test

    def state_dict(self) -> dict[str, Any]:
        targets, projection = self.matching if self.matching is not None else (None, None)
        return {
            "unverifiable": self.unverifiable,
            "unverifiable_reason": self.unverifiable_reason,
            "nothing_to_do": self.nothing_to_do,
            "test_before": self.test_before.as_dict() if self.test_before is not None else None,
            "measured_before": self.measured_before,
            "scores": self.scores,
            "targets": (targets.forget, targets.heldout) if targets is not None else None,
            "basis": projection.basis if projection is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any], params: list[nn.Parameter], device: torch.device) -> None:
        self.unverifiable, self.unverifiable_reason = state["unverifiable"], state["unverifiable_reason"]
        self.nothing_to_do = state["nothing_to_do"]
        self.test_before = SampleTest(**state["test_before"]) if state["test_before"] is not None else None
        self.measured_before = state.get("measured_before")
        if state["scores"] is not None:
            self.scores = tuple(tuple(t.to(device) for t in side) for side in state["scores"])  # type: ignore[assignment]
        if state["targets"] is not None:
            self.matching = (MarginTargets(*state["targets"]), HeldoutProjection(state["basis"].to(device), params))


__all__ = ["UNVERIFIABLE_REASON", "SampleRequest"]
