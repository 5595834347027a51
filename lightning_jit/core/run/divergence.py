"""Skipped and divergent steps: an isolated overflow is skipped and the run goes on; a divergence ends it."""

from __future__ import annotations

from typing import Any

from lightning_jit.core.settings import JiTSettings

#: Consecutive steps with a non-finite loss (or, without a ``GradScaler``, non-finite gradients) after which a run is
#: declared diverged. A single such step is an isolated overflow: it is skipped and the run goes on.
NONFINITE_PATIENCE = 3


def divergence_hint(settings: JiTSettings | None = None) -> str:
    """The advice given with every :class:`~lightning_jit.core.errors.JiTDivergenceError`.

    Example:
        >>> "smaller `lr` (e.g. 10x smaller, now 0.5" in divergence_hint(JiTSettings(lr=0.5))
        True
    """

    def now(value: float | None) -> str:
        return f"now {value:g}" if value is not None else "now calibrated"

    lr = f" (e.g. 10x smaller, {now(settings.lr)}; None calibrates it)" if settings is not None else ""
    sigma = f" ({now(settings.sigma)})" if settings is not None else ""
    return f"Try a smaller `lr`{lr} or a larger `sigma`{sigma}; a `sigma` far above the inputs' scale overflows too."


class Divergence:
    """Counts skipped steps and tells an isolated overflow from a divergence.

    Example:
        >>> d = Divergence()
        >>> [d.after_step(applied=False, loss_finite=False, scaled=False, weights_finite=True) for _ in range(3)]
        [None, None, '3 consecutive steps had a non-finite loss or gradients']
        >>> d.skipped_steps
        3
    """

    def __init__(self) -> None:
        self.skipped_steps = 0
        self.streak = 0
        self.diverged = False

    def after_step(self, *, applied: bool, loss_finite: bool, scaled: bool, weights_finite: bool) -> str | None:
        """Count a step; returns why the run diverged, or ``None``.

        Diverged: the weights are no longer finite after a step, or :data:`NONFINITE_PATIENCE` consecutive steps had
        a non-finite loss (without a ``GradScaler``: or non-finite gradients; with one (``scaled``), skipped steps are
        its normal scale search and do not count).
        """
        if not applied:
            self.skipped_steps += 1
        counts = not loss_finite if scaled else not applied
        self.streak = self.streak + 1 if counts else 0
        if applied and not weights_finite:
            return "the weights became NaN/Inf after an update"
        if self.streak >= NONFINITE_PATIENCE:
            return f"{self.streak} consecutive steps had a non-finite loss or gradients"
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "nonfinite_streak": self.streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps, self.streak = int(state["skipped_steps"]), int(state["nonfinite_streak"])


__all__ = ["NONFINITE_PATIENCE", "Divergence", "divergence_hint"]
