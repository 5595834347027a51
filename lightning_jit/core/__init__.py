"""The JiT method in pure torch: settings, batch format, noise, objective, retain terms, guard and run engine.

Nothing here depends on Lightning but its configuration exception; the Lightning fronts
(:mod:`lightning_jit.lightning`) hand the run engine what only a Trainer knows.
"""

from typing import Any

from lightning_jit.core.batch import BatchFormat, select_output
from lightning_jit.core.cost import CostCounter, reference_cost
from lightning_jit.core.distillation import DistillationSet
from lightning_jit.core.engine import Collectives, JiTRun, StepReport
from lightning_jit.core.errors import JiTDivergenceError, JiTInputError, JiTSettingError
from lightning_jit.core.guard import CollapseCheck, GuardSettings
from lightning_jit.core.noise import register_perturbation
from lightning_jit.core.objective import jit_objective
from lightning_jit.core.penalties import logit_norm_penalty
from lightning_jit.core.probes import probe_confidence, synthesize_class_probes
from lightning_jit.core.reference import FrozenReference
from lightning_jit.core.settings import JiTSettings
from lightning_jit.core.site import InputSite, ModuleSite, PerturbationSite, site_for
from lightning_jit.core.weights import WeightSnapshot

__all__ = [
    "BatchFormat",
    "Collectives",
    "CollapseCheck",
    "CostCounter",
    "DistillationSet",
    "FrozenReference",
    "GuardSettings",
    "InputSite",
    "JiTDivergenceError",
    "JiTInputError",
    "JiTRun",
    "JiTSettingError",
    "JiTSettings",
    "ModuleSite",
    "PerturbationSite",
    "StepReport",
    "WeightSnapshot",
    "jit_objective",
    "logit_norm_penalty",
    "probe_confidence",
    "reference_cost",
    "register_perturbation",
    "select_output",
    "site_for",
    "synthesize_class_probes",
]


def __getattr__(name: str) -> Any:
    # The old public names (``CollapseGuard``, ``ProbeDistillation``): :mod:`lightning_jit.core.renamed`.
    from lightning_jit.core.renamed import renamed as resolve

    return resolve(name, __name__)
