"""The tuner's own settings, declared, documented and validated once: :class:`TuneSettings`.

:func:`~lightning_jit.tune.tune_jit` takes its search's settings (this declaration) and, as keyword arguments, the
settings every trial shares, which it never restates: the fields of
:class:`~lightning_jit.core.settings.JiTSettings` (``target_forget_accuracy``, ``probes_per_class``, the retain
terms...), :class:`~lightning_jit.core.batch.BatchFormat` and :class:`~lightning_jit.core.guard.GuardSettings`
(``max_drop``, which also bounds the monitor's fall in monitored mode). :func:`split_tune_settings` routes the keyword
arguments to these four declarations. ``lightning-jit tune`` builds its flags from this class (``--n_configs``,
``--budget``, ...), so that its ``--help`` and its defaults are these.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_jit.core.batch import BatchFormat
from lightning_jit.core.calibration import CLASS_TARGET
from lightning_jit.core.checks import choice, integer, is_number, non_negative, optional, positive, validate
from lightning_jit.core.errors import JiTSettingError
from lightning_jit.core.guard import GuardSettings
from lightning_jit.core.settings import JiTSettings, split_settings
from lightning_jit.tune.result import Task

__all__ = ["PER_TRIAL", "REMOVED_ARGUMENTS", "TuneSettings", "forgetting_target", "split_tune_settings"]

#: JiT settings the tuner sets itself for each trial (the searched ones, the rung's epochs and the run's seed): a
#: keyword argument of these names is the tuner's own (:class:`TuneSettings`) or refused.
PER_TRIAL = ("sigma", "lr", "n_perturbations", "epochs", "seed")
#: Arguments of earlier versions that are gone -> why, and what to do instead (``lightning-jit tune`` says the same).
REMOVED_ARGUMENTS = {
    "search": "was removed in 0.2: successive halving is the only search (random search and Optuna measured no gain,"
    " docs/results/tune.md); remove the argument",
}


def _log_range(name: str, value: Any) -> Any:
    ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
    if not ok or not all(is_number(v) for v in value) or not 0 < value[0] <= value[1]:
        raise JiTSettingError(
            name, f"must be a (low, high) pair with 0 < low <= high, got {value!r}; it is searched on a log scale."
        )
    return (float(value[0]), float(value[1]))


def _counts(name: str, value: Any) -> Any:
    ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0
    if not ok or not all(not isinstance(n, bool) and isinstance(n, int) and n >= 1 for n in value):
        raise JiTSettingError(name, f"must be a list of integers >= 1, got {value!r}.")
    return tuple(value)


def _seed(name: str, value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int):
        raise JiTSettingError(name, f"must be an integer, got {value!r}.")
    return value


@dataclass
class TuneSettings:
    """The settings of a search of JiT's ``sigma`` and ``lr`` (:func:`~lightning_jit.tune.tune_jit`).

    The settings every trial shares are not here: they are the fields of ``JiTSettings`` (e.g.
    ``target_forget_accuracy``, the forgetting target and every run's stopping rule: by default a class task's
    calibrated target), ``BatchFormat`` and ``GuardSettings`` (e.g. ``max_drop``, also the largest fall of the
    monitor's accuracy in monitored mode), given to ``tune_jit`` as keyword arguments.

    Args:
        task: ``"class"``: the forget set is whole classes, and its accuracy must fall to the forgetting target;
            ``"random"``: a random sample of the training data, whose confidence must come down to the model's
            confidence on data it never saw.
        sigma_range: ``(low, high)`` of ``sigma``, searched on a log scale (for inputs standardised to unit std).
        lr_range: ``(low, high)`` of ``lr``, searched on a log scale.
        n_perturbations: The values of ``N`` to search (one value: not searched).
        n_configs: Points drawn at the first rung (a power of 2 keeps the Sobol sequence balanced).
        reduction_factor: Keep the best ``1 / reduction_factor`` of the trials at each rung.
        max_epochs: Epochs of the last rung (the most any trial runs), and the ``epochs`` of the chosen settings.
        budget: Wall-clock seconds. When they run out, the search ends with the best trial so far and says so
            (at least one run always completes). ``None``: no budget.
        finalists: How many of the best trials are confirmed by repeat runs (0: none).
        repeats: Repeat runs per finalist, from the original weights with other noise; a finalist is judged by its
            worst run, so that a setting that looked good by luck is not chosen.
        tie_tolerance: Among the feasible trials that met the target, those within this many points of the best score
            count as tied, and the one with the smallest ``lr`` is chosen: smaller steps stop closer to the target.
        confidence_tolerance: For ``task="random"``: how close (points) the forget set's confidence must get to the
            unseen data's.
        seed: Seed of the points, the probes and every run's noise: the same seed gives the same table.

    Example:
        >>> TuneSettings().n_configs, TuneSettings(n_perturbations=[10, 25]).n_perturbations
        (16, (10, 25))
        >>> TuneSettings(reduction_factor=1)
        Traceback (most recent call last):
        ...
        lightning_jit.core.errors.JiTSettingError: `reduction_factor` must be an integer >= 2, got 1.
    """

    task: Task = field(
        default="class",
        metadata=choice(("class", "random"), "'class': whole classes; 'random': a sample of the training data."),
    )
    sigma_range: tuple[float, float] = field(default=(0.02, 1.0), metadata={"check": _log_range})
    lr_range: tuple[float, float] = field(default=(3e-3, 0.3), metadata={"check": _log_range})
    n_perturbations: tuple[int, ...] = field(default=(25,), metadata={"check": _counts})
    n_configs: int = field(default=16, metadata=integer(1))
    reduction_factor: int = field(default=3, metadata=integer(2))
    max_epochs: int = field(default=30, metadata=integer(1))
    budget: float | None = field(default=None, metadata=optional(positive("It is in seconds; None: no budget.")))
    finalists: int = field(default=2, metadata=integer(0))
    repeats: int = field(default=1, metadata=integer(0))
    tie_tolerance: float = field(default=1.0, metadata=non_negative("It is in points of the score."))
    confidence_tolerance: float = field(default=2.0, metadata=non_negative("It is in points of confidence."))
    seed: int = field(default=0, metadata={"check": _seed})

    def __post_init__(self) -> None:
        validate(self)


def forgetting_target(task: Task, base: JiTSettings) -> float | None:
    """The forgetting target of a search: ``base.target_forget_accuracy`` if given, else a class task's calibrated
    target (:data:`~lightning_jit.core.calibration.CLASS_TARGET`, as a run would use) and none for a random task.

    Example:
        >>> forgetting_target("class", JiTSettings()) == CLASS_TARGET, forgetting_target("random", JiTSettings())
        (True, None)
        >>> forgetting_target("random", JiTSettings(target_forget_accuracy=7.0))
        7.0
    """
    given = base.target_forget_accuracy
    return given if given is not None or task != "class" else CLASS_TARGET


def split_tune_settings(kwargs: dict[str, Any]) -> tuple[TuneSettings, JiTSettings, BatchFormat, GuardSettings]:
    """Route :func:`~lightning_jit.tune.tune_jit`'s keyword arguments to the four declarations a search takes.

    A keyword that is a field of :class:`TuneSettings` is the search's; any other goes to ``JiTSettings``,
    ``BatchFormat`` or ``GuardSettings`` (:func:`~lightning_jit.core.settings.split_settings`). The returned
    ``JiTSettings`` are those every trial shares, with ``epochs`` the search's ``max_epochs``, ``seed`` its seed and
    the forgetting target resolved (:func:`forgetting_target`); each trial then sets its own ``sigma``, ``lr`` and
    ``n_perturbations``. The guard is on.

    Raises:
        JiTSettingError: naming the argument: a removed one, a JiT setting the search sets per trial, the guard's
            switch, one that no declaration takes (with the closest name), or an invalid value.

    Example:
        >>> tune, base, batch_format, guard = split_tune_settings({"n_configs": 4, "max_drop": 1.0, "label_key": "y"})
        >>> tune.n_configs, base.epochs, base.target_forget_accuracy, guard.max_drop, batch_format.label_key
        (4, 30, 2.5, 1.0, 'y')
    """
    for name, why in REMOVED_ARGUMENTS.items():
        if name in kwargs:
            raise JiTSettingError(name, f"{why}.")
    own = {f.name for f in dataclasses.fields(TuneSettings)}
    for name in PER_TRIAL:
        if name in kwargs and name not in own:
            raise JiTSettingError(name, "is set by `tune_jit` itself for each trial; remove it from the arguments.")
    for name in ("guard", "enabled"):
        if name in kwargs:
            raise JiTSettingError(
                name, "cannot be set: the collapse guard is on in every trial (a trial it rescues is infeasible)."
            )
    tune = TuneSettings(**{k: v for k, v in kwargs.items() if k in own})
    shared = {k: v for k, v in kwargs.items() if k not in own}
    base, batch_format, guard = split_settings(
        None, None, True, {**shared, "epochs": tune.max_epochs, "seed": tune.seed}
    )
    return tune, base.replace(target_forget_accuracy=forgetting_target(tune.task, base)), batch_format, guard
