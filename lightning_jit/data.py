"""Where the digits data and models lived before 0.2: kept so that configs and checkpoints naming
``lightning_jit.data.DigitsCNN`` (``class_path``, ``_class_path``) still load. New code imports
:mod:`lightning_jit.demo.data`."""

from lightning_jit.demo.data import *  # noqa: F403
from lightning_jit.demo.data import __all__  # noqa: F401
