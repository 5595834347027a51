"""lightning-jit: JiT zero-shot machine unlearning for PyTorch Lightning.

The package is layered, and imports only point down this list:

* :mod:`lightning_jit.core`: the method in pure torch (settings, batch format, noise, objective, retain terms,
  collapse guard, run engine, cost counters); it imports no other layer;
* :mod:`lightning_jit.lightning`: the Lightning fronts (``JiTUnlearning``, ``JiTUnlearningCallback``), strategies,
  checkpoints and the deletion ledger; it imports the core;
* :mod:`lightning_jit.evaluation`: metrics, ``evaluate_unlearning`` and the report; it imports the core, and never the
  Lightning fronts (it finds them through the protocols of :mod:`lightning_jit.evaluation.callback`);
* :mod:`lightning_jit.tune` and :mod:`lightning_jit.demo` import the three layers above; :mod:`lightning_jit.cli`
  imports them all.

:mod:`lightning_jit.io` and ``lightning_jit._version`` are shared utilities below every layer. ``lightning_jit.data``
is the 0.1 import path of :mod:`lightning_jit.demo.data`, and belongs to the demo. ``tests/test_layers.py`` checks
this rule.

The names below are imported on first use, so that ``import lightning_jit.core`` does not load the upper layers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_jit._version import __version__

#: Public name -> the module that defines it.
_EXPORTS = {
    "AtomicCheckpointIO": "lightning_jit.lightning.checkpoint",
    "BatchFormat": "lightning_jit.core.batch",
    "GuardSettings": "lightning_jit.core.guard",
    "JiTDivergenceError": "lightning_jit.core.errors",
    "JiTInputError": "lightning_jit.core.errors",
    "JiTRun": "lightning_jit.core.engine",
    "JiTSettingError": "lightning_jit.core.errors",
    "JiTSettings": "lightning_jit.core.settings",
    "JiTUnlearning": "lightning_jit.lightning.module",
    "JiTUnlearningCallback": "lightning_jit.lightning.callback",
    "JiTUnlearningFailed": "lightning_jit.core.outcome",
    "Outcome": "lightning_jit.core.outcome",
    "TuneResult": "lightning_jit.tune",
    "UnlearningEvaluation": "lightning_jit.evaluation",
    "UnlearningReport": "lightning_jit.evaluation",
    "Verification": "lightning_jit.core.outcome",
    "evaluate_unlearning": "lightning_jit.evaluation",
    "jit_objective": "lightning_jit.core.objective",
    "register_perturbation": "lightning_jit.core.noise",
    "tune_jit": "lightning_jit.tune",
}

__all__ = [
    "AtomicCheckpointIO",
    "BatchFormat",
    "GuardSettings",
    "JiTDivergenceError",
    "JiTInputError",
    "JiTRun",
    "JiTSettingError",
    "JiTSettings",
    "JiTUnlearning",
    "JiTUnlearningCallback",
    "JiTUnlearningFailed",
    "Outcome",
    "TuneResult",
    "UnlearningEvaluation",
    "UnlearningReport",
    "Verification",
    "__version__",
    "evaluate_unlearning",
    "jit_objective",
    "register_perturbation",
    "tune_jit",
]

if TYPE_CHECKING:
    from lightning_jit.core.batch import BatchFormat
    from lightning_jit.core.engine import JiTRun
    from lightning_jit.core.errors import JiTDivergenceError, JiTInputError, JiTSettingError
    from lightning_jit.core.guard import GuardSettings
    from lightning_jit.core.noise import register_perturbation
    from lightning_jit.core.objective import jit_objective
    from lightning_jit.core.outcome import JiTUnlearningFailed, Outcome, Verification
    from lightning_jit.core.settings import JiTSettings
    from lightning_jit.evaluation import UnlearningEvaluation, UnlearningReport, evaluate_unlearning
    from lightning_jit.lightning.callback import JiTUnlearningCallback
    from lightning_jit.lightning.checkpoint import AtomicCheckpointIO
    from lightning_jit.lightning.module import JiTUnlearning
    from lightning_jit.tune import TuneResult, tune_jit


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name == "CollapseGuard":  # the old name of ``GuardSettings``: :mod:`lightning_jit.core.renamed`
        from lightning_jit.core.renamed import renamed

        return renamed(name, "lightning_jit")
    raise AttributeError(f"module 'lightning_jit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
