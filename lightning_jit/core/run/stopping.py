"""The stopping rule: a recent window of the forget accuracy the steps measure anyway, and a check of the whole forget
set once the window reads the target."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning_jit.core.outcome import Verification

#: The stopping rule looks at the whole forget set once this many recent samples (or all, if fewer) read the target.
STOP_WINDOW = 64


class ForgetAccuracyWindow:
    """Forget-set accuracy over the most recent forget samples, from the clean logits the JiT step computes anyway.

    It costs no extra forward pass: it keeps the latest batches that together hold at least ``min_samples`` samples,
    each measured just before that batch's update. It only says when to look: once it reads at most the target, the
    run checks the whole forget set on the current weights (a no-grad pass) before it stops.

    Example:
        >>> w = ForgetAccuracyWindow(min_samples=8)
        >>> w.update(3, 4); w.ready()
        False
        >>> w.update(0, 4); w.accuracy()
        37.5
        >>> w.update(0, 4); w.totals()  # the oldest batch left the window
        (0, 8)
    """

    def __init__(self, min_samples: int = STOP_WINDOW) -> None:
        self.min_samples = max(1, int(min_samples))
        self._items: list[tuple[int, int]] = []

    def update(self, correct: int, count: int) -> None:
        self._items.append((int(correct), int(count)))
        while len(self._items) > 1 and sum(n for _, n in self._items[1:]) >= self.min_samples:
            self._items.pop(0)

    def totals(self) -> tuple[int, int]:
        return sum(c for c, _ in self._items), sum(n for _, n in self._items)

    def ready(self) -> bool:
        """Whether the window holds at least ``min_samples`` samples."""
        return self.totals()[1] >= self.min_samples

    def accuracy(self) -> float:
        correct, count = self.totals()
        return 100.0 * correct / count if count else float("nan")

    def reset(self) -> None:
        """Forget the measurements (e.g. they were made on weights the guard discarded)."""
        self._items = []

    def state_dict(self) -> dict[str, Any]:
        return {"items": list(self._items), "min_samples": self.min_samples}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ForgetAccuracyWindow:
        window = cls(int(state["min_samples"]))
        window._items = [(int(c), int(n)) for c, n in state["items"]]
        return window


class StoppingRule:
    """When a class (or targeted) run may stop: its recent window reads the target, and then so does the whole forget
    set on the current weights.

    Example:
        >>> rule = StoppingRule()
        >>> rule.resize(8)
        >>> rule.update(2, 4, target=5.0, measure=None, step=1)  # 2 of 4 recognised: 50%, the window is not full
        50.0
        >>> rule.update(0, 4, target=5.0, measure=None, step=2), rule.stopped  # 2 of 8: 25% > 5%
        (25.0, False)
        >>> rule.update(0, 4, target=5.0, measure=None, step=3), rule.stopped  # no forget set: the window's word
        (0.0, True)
    """

    def __init__(self) -> None:
        self.window = ForgetAccuracyWindow()
        #: Whether the rule (or a sample request's pass check) ended the run.
        self.stopped = False
        #: The step at which the whole forget set was last measured, and that measurement.
        self.measured: tuple[int, Verification] | None = None

    def resize(self, n_forget: int) -> None:
        """A window of :data:`STOP_WINDOW` samples, or the whole forget set if it is smaller."""
        self.window = ForgetAccuracyWindow(min(max(1, n_forget), STOP_WINDOW))

    def update(
        self,
        correct: int,
        count: int,
        *,
        target: float | None,
        measure: Callable[[], Verification] | None,
        step: int,
    ) -> float:
        """Add this step's counts (over all processes) to the window; once it reads ``target``, ``measure`` the whole
        forget set (``None``: there is none, the window's word is all there is) and stop if that reads it too.
        Returns the window's accuracy."""
        self.window.update(correct, count)
        accuracy = self.window.accuracy()
        if target is None or not self.window.ready() or not accuracy <= target:
            return accuracy
        self.window.reset()
        if measure is None:
            self.stopped = True
            return accuracy
        measured = measure()
        self.measured = (step, measured)
        if measured.forget_accuracy is not None and measured.forget_accuracy <= target:
            self.stopped = True
        return accuracy

    def measured_at(self, step: int) -> Verification | None:
        """The measurement of the whole forget set made at ``step``, if any (the weights have not moved since)."""
        return self.measured[1] if self.measured is not None and self.measured[0] == step else None

    def discard(self) -> None:
        """Forget everything measured on weights the guard discarded."""
        self.window.reset()
        self.measured = None
        self.stopped = False

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window = ForgetAccuracyWindow.from_state(state["window"])


__all__ = ["STOP_WINDOW", "ForgetAccuracyWindow", "StoppingRule"]
