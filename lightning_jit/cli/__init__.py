"""The command line: ``JiTCLI`` (LightningCLI with an ``unlearn`` subcommand) and the ``lightning-jit`` script.

* :mod:`~lightning_jit.cli.trainer`: ``JiTTrainer`` and its ``unlearn`` method (the subcommand's interface);
* :mod:`~lightning_jit.cli.lightning_cli`: ``JiTCLI``;
* :mod:`~lightning_jit.cli.commands`: the ``lightning-jit`` script's command dispatch (``demo``, ``unlearn``,
  ``evaluate``, ``tune``), each subcommand parsed by jsonargparse from its signature;
* :mod:`~lightning_jit.cli.forget`: the forget-set selection; :mod:`~lightning_jit.cli.checkpoints`: reading
  checkpoints; :mod:`~lightning_jit.cli.job`: reading an unlearn config for ``evaluate`` and ``tune``;
* :mod:`~lightning_jit.cli.errors`, :mod:`~lightning_jit.cli.diagnose`, :mod:`~lightning_jit.cli.migration`: one-line
  usage errors naming the flag, and where the previous version's keys went.
"""

from lightning_jit.cli.commands import main
from lightning_jit.cli.errors import JiTUsageError
from lightning_jit.cli.forget import ForgetSelection
from lightning_jit.cli.lightning_cli import JiTCLI
from lightning_jit.cli.trainer import UNLEARN_RECORD_KEY, JiTTrainer

__all__ = ["UNLEARN_RECORD_KEY", "ForgetSelection", "JiTCLI", "JiTTrainer", "JiTUsageError", "main"]
