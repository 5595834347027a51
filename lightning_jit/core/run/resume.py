"""The versions of a run's state (:meth:`lightning_jit.core.engine.JiTRun.state_dict`).

Version 2 holds one entry per stage, each that stage's own ``state_dict``. Version 1 (lightning-jit 0.2) was one flat
dict; :func:`upgrade` reads it as version 2, so a checkpoint written during a 0.2 run resumes.
"""

from __future__ import annotations

from typing import Any

from lightning_jit.core.errors import JiTSettingError

#: The version :meth:`~lightning_jit.core.engine.JiTRun.state_dict` writes.
RUN_STATE_VERSION = 2


def upgrade(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` as version :data:`RUN_STATE_VERSION`.

    Raises:
        JiTSettingError: for a version this package cannot read.

    Example:
        >>> upgrade({"version": 2, "life_cycle": {}})["version"]
        2
        >>> upgrade({"version": 0})
        Traceback (most recent call last):
        ...
        lightning_jit.core.errors.JiTSettingError: ...
    """
    version = state.get("version")
    if version == RUN_STATE_VERSION:
        return state
    if version != 1:
        raise JiTSettingError("state", f"cannot resume a run state of version {version!r}.")
    counters = state["counters"]
    sample = state.get("sample_request")
    return {
        "version": RUN_STATE_VERSION,
        "life_cycle": {
            "pre_run": state["pre_run"],
            "steps": counters["steps"],
            "passes": counters["passes"],
            "cost": state["cost"],
        },
        "calibration": {
            "calibrated": state["calibrated"],
            "survey": state["survey"],
            "scope": state["scope"],
            "step_calibrated": counters["step_calibrated"],
        },
        "held": {
            "reference": state["reference"],
            "held": {k: (*v, None)[:5] if v is not None else None for k, v in state["held"].items()},
            "siblings": state.get("siblings"),
        },
        "loss": {"generator": state["generator"]},
        "divergence": {"skipped_steps": counters["skipped_steps"], "nonfinite_streak": counters["nonfinite_streak"]},
        "stopping": {"window": {"items": state["window"], "min_samples": state["window_size"]}},
        "budget": {"retain_setup": counters["retain_setup"]},
        "rollback": {"guard": state["guard"], "last_good": state["last_good"]},
        "sample_request": {**sample, "measured_before": None} if sample is not None else None,
    }


__all__ = ["RUN_STATE_VERSION", "upgrade"]
