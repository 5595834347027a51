"""How a run ended, verified: the outcome a machine can act on, and the record that backs the claim.

Every run ends with a verification on the final weights (:meth:`lightning_jit.core.engine.JiTRun.finish`): the share
of forget samples the model still recognises, against the target. Only :attr:`Outcome.FORGOTTEN` is success: for the
command line's exit code, for the deletion ledger, and for the report's first line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any


class Outcome(str, Enum):
    """How a JiT run ended.

    * ``forgotten``: verified on the final weights: at most ``target_forget_accuracy`` percent of the forget samples
      are still recognised.
    * ``not_forgotten``: the run ended (its epoch bound, or the guard halved its step to the limit) with more of the
      forget set still recognised than the target allows, or without a target to verify against.
    * ``rolled_back``: the collapse guard restored the weights from before the run and stopped it: the model is the
      original.
    * ``diverged``: the run diverged; the weights from before the run were restored and an error was raised.
    * ``unverifiable``: a request that names individual samples came without held-out data to verify it against
      (``monitor=``), or with too few samples for the held-out test to tell a memorised set; the run made no update.
      Not a failure of the method: give held-out data, or join the request with later ones.

    Example:
        >>> Outcome.FORGOTTEN.succeeded, Outcome("rolled_back").succeeded
        (True, False)
        >>> Outcome.ROLLED_BACK == "rolled_back"
        True
    """

    FORGOTTEN = "forgotten"
    NOT_FORGOTTEN = "not_forgotten"
    ROLLED_BACK = "rolled_back"
    DIVERGED = "diverged"
    UNVERIFIABLE = "unverifiable"

    @property
    def succeeded(self) -> bool:
        """Whether the deletion can be claimed as done."""
        return self is Outcome.FORGOTTEN

    @property
    def advice(self) -> str:
        """What to do next, in one line."""
        return _ADVICE[self]

    def __str__(self) -> str:
        return self.value


_ADVICE = {
    Outcome.FORGOTTEN: "Nothing to do: the deletion is verified.",
    Outcome.NOT_FORGOTTEN: (
        "Allow a longer run (`epochs`), give a `retain=` loader of data you keep, or search the settings with"
        " `lightning-jit tune`."
    ),
    Outcome.ROLLED_BACK: (
        "The model is the original. Give a `monitor=` (or `retain=`) loader of data you keep so that the guard can"
        " tell forgetting from damage, or search the settings with `lightning-jit tune`."
    ),
    Outcome.DIVERGED: "The model is the original. Try a smaller `lr` or a larger `sigma`, or let them be calibrated.",
    Outcome.UNVERIFIABLE: (
        "The model is unchanged. Give `monitor=` a labelled loader of data the model never trained on (your"
        " validation split); a request too small to verify against it can be joined with later ones."
    ),
}


_SAMPLE_ADVICE = (
    "The model memorised these samples, and this version has no update that verifiably forgets memorised samples"
    " without costing accuracy on other data (docs/sample_requests.md): retraining without them is the verified way."
)


@dataclass
class Verification:
    """What the end-of-run check measured on the final weights, and the outcome it supports.

    Attributes:
        outcome: The :class:`Outcome`.
        n_forget: Forget samples measured.
        forget_accuracy: Percent of them still recognised (their label, or without labels the original model's
            prediction); ``None`` if nothing was measured.
        forget_confidence: Mean probability the model gives the recognised class, in percent.
        forget_entropy: Mean entropy (nats) of the model's prediction on the forget samples.
        target: The target (``target_forget_accuracy``) the claim is checked against; ``None`` when none was set.
        measured_against: ``"labels"``, ``"original predictions"`` or ``"last pass"`` (the stopping rule's window,
            when the forget set could not be read again).
        passes: Passes over the forget set that ran.
        guard_events: Interventions of the collapse guard.
        monitor_accuracy: The monitor loader's accuracy on the final weights, if one was given.
        retain_accuracy: The retain loader's accuracy on the final weights, if one was given.
        cost: Samples through the model by kind (see :mod:`lightning_jit.core.cost`).
        settings: The settings of the run (calibrated values included).
        extra: Anything a front adds (e.g. the checkpoint's sha256).
        reason: Why the run was rolled back when not by the guard, why a sample request failed its held-out test,
            or why it could not be verified.
        heldout_test: A sample request's held-out test on the final weights
            (:class:`~lightning_jit.core.membership.SampleTest` as a dict): the sizes, both accuracies, the membership
            AUC with its interval, the p-values and the gaps these sizes can detect.
        restored: Whether the model holds the weights from before the run once the run is over: always for
            ``rolled_back`` and ``diverged``; for ``not_forgotten``, as ``on_unverified`` (or ``strict``) decided;
            never for ``forgotten``. ``None``: not decided by a run (a record built by hand).
    """

    outcome: Outcome
    n_forget: int = 0
    forget_accuracy: float | None = None
    forget_confidence: float | None = None
    forget_entropy: float | None = None
    target: float | None = None
    measured_against: str = "labels"
    passes: int = 0
    guard_events: int = 0
    monitor_accuracy: float | None = None
    retain_accuracy: float | None = None
    cost: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    heldout_test: dict[str, Any] | None = None
    restored: bool | None = None

    @property
    def verdict(self) -> str:
        """The one-line claim, for the report's first line, the log and the command line.

        Example:
            >>> Verification(Outcome.FORGOTTEN, n_forget=127, forget_accuracy=0.0, target=5.0).verdict
            'forgotten: 0.0% of 127 forget samples still recognised (target 5%)'
            >>> Verification(Outcome.ROLLED_BACK, n_forget=9, forget_accuracy=100.0, guard_events=3).verdict
            'NOT forgotten: rolled back to the original weights after 3 guard interventions'
            >>> v = Verification(Outcome.NOT_FORGOTTEN, n_forget=9, forget_accuracy=50.0, target=5.0, restored=True)
            >>> v.verdict.split("; ")[1]
            'the weights from before the run were restored'
        """
        if self.heldout_test is not None and self.outcome in (Outcome.FORGOTTEN, Outcome.NOT_FORGOTTEN):
            kept = _kept(self.restored) if self.outcome is Outcome.NOT_FORGOTTEN else ""
            return _sample_verdict(self.outcome, self.heldout_test, self.reason) + kept
        if self.outcome is Outcome.UNVERIFIABLE:
            return f"NOT verified: {self.n_forget} forget samples; {self.reason}"
        share = (
            f"{self.forget_accuracy:.1f}% of {self.n_forget} forget samples still recognised"
            if self.forget_accuracy is not None
            else f"{self.n_forget} forget samples, not measured"
        )
        target = f"target {self.target:g}%" if self.target is not None else "no target set"
        if self.outcome is Outcome.FORGOTTEN:
            return f"forgotten: {share} ({target})"
        if self.outcome is Outcome.ROLLED_BACK and self.reason:
            return f"NOT forgotten: rolled back to the original weights: {self.reason}"
        if self.outcome is Outcome.ROLLED_BACK:
            plural = "s" if self.guard_events != 1 else ""
            events = f"{self.guard_events} guard intervention{plural}"
            return f"NOT forgotten: rolled back to the original weights after {events}"
        if self.outcome is Outcome.DIVERGED:
            return "NOT forgotten: the run diverged and the original weights were restored"
        passes = f" after {self.passes} pass{'es' if self.passes != 1 else ''}" if self.passes else ""
        return f"NOT forgotten: {share}{passes} ({target}){_kept(self.restored)}"

    @property
    def advice(self) -> str:
        """What to do next, in one line: the outcome's, or for a sample request that was not forgotten, what is known
        about memorised samples."""
        if self.heldout_test is not None and self.outcome is Outcome.NOT_FORGOTTEN:
            return _SAMPLE_ADVICE
        return self.outcome.advice

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Verification:
        """The verification :meth:`as_dict` wrote (its verdict and advice are derived again).

        Example:
            >>> v = Verification(Outcome.FORGOTTEN, n_forget=3, forget_accuracy=0.0, target=2.5)
            >>> Verification.from_dict(v.as_dict()) == v
            True
        """
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in record.items() if k in names}
        return cls(**{**values, "outcome": Outcome(record["outcome"])})

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the outcome as its string), with the verdict and the advice."""
        out = asdict(self)
        out["outcome"] = self.outcome.value
        out["verdict"] = self.verdict
        out["advice"] = self.advice
        return out


def _kept(restored: bool | None) -> str:
    """What a ``not_forgotten`` run left in memory, for its verdict (nothing to say when no run decided it)."""
    if restored is None:
        return ""
    if restored:
        return "; the weights from before the run were restored"
    return "; the run's partial weights were kept (on_unverified='keep'): they are not a deletion"


def _sample_verdict(outcome: Outcome, test: dict[str, Any], reason: str | None) -> str:
    """The verdict of a sample request: the held-out comparison and what these sizes can detect.

    Example:
        >>> test = dict(n_forget=10, n_heldout=300, forget_accuracy=90.0, heldout_accuracy=92.0, accuracy_p=0.6,
        ...             detectable_accuracy_gap=16.8, auc=0.55, auc_low=0.4, auc_high=0.7, auc_p=0.6,
        ...             detectable_auc_gap=0.18)
        >>> _sample_verdict(Outcome.FORGOTTEN, test, None)  # doctest: +NORMALIZE_WHITESPACE
        'forgotten: the 10 forget samples are indistinguishable from 300 held-out samples (forget 90.0% vs held-out
        92.0% accurate, p=0.6; membership AUC 0.55 [0.40, 0.70], p=0.6; at these sizes only an accuracy gap of 16.8
        points or an AUC gap of 0.18 would show)'
    """
    figures = (
        f"forget {test['forget_accuracy']:.1f}% vs held-out {test['heldout_accuracy']:.1f}% accurate,"
        f" p={test['accuracy_p']:.2g}; membership AUC {test['auc']:.2f} [{test['auc_low']:.2f},"
        f" {test['auc_high']:.2f}], p={test['auc_p']:.2g}"
    )
    power = (
        f"at these sizes only an accuracy gap of {test['detectable_accuracy_gap']:.1f} points or an AUC gap of"
        f" {test['detectable_auc_gap']:.2f} would show"
    )
    sizes, heldout = f"{test['n_forget']} forget samples", f"{test['n_heldout']} held-out samples"
    if outcome is Outcome.FORGOTTEN:
        return f"forgotten: the {sizes} are indistinguishable from {heldout} ({figures}; {power})"
    return f"NOT forgotten: the {sizes} still differ from {heldout}: {reason} ({figures})"


class JiTOutcomeWarning(UserWarning):
    """The warning a front gives when a run's verified outcome is not ``forgotten`` (filter it by this category)."""


class JiTUnlearningFailed(RuntimeError):
    """Raised under ``strict=True`` when a run's outcome is not ``forgotten``, after the weights from before the run
    were restored. :attr:`verification` holds the record."""

    def __init__(self, verification: Verification) -> None:
        self.verification = verification
        super().__init__(f"{verification.verdict}. {verification.advice}")
