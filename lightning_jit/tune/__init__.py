"""``tune_jit``: search JiT's ``sigma`` and ``lr`` for a model and forget set, by successive halving.

One idea per module: :mod:`~lightning_jit.tune.settings` (the search's settings, :class:`TuneSettings`, and the
routing of ``tune_jit``'s keyword arguments), :mod:`~lightning_jit.tune.search` (the points, the schedule, the
confirmation and the choice), :mod:`~lightning_jit.tune.judge` (how a trial is measured and judged),
:mod:`~lightning_jit.tune.runner` (one trial's JiT run), :mod:`~lightning_jit.tune.result` (the trials and the chosen
settings) and :mod:`~lightning_jit.tune.tune` (:func:`tune_jit`, which puts them together).
"""

from lightning_jit.tune.result import TuneResult
from lightning_jit.tune.settings import TuneSettings
from lightning_jit.tune.tune import tune_jit

__all__ = ["TuneResult", "TuneSettings", "tune_jit"]
