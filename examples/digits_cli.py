"""A LightningCLI script for a digits classifier, with JiT unlearning: ``LightningCLI`` swapped for ``JiTCLI``.

Train, then forget (see ``docs/cli.md`` for all three examples; ``--jit.*``, ``--batch.*``, ``--guard.*`` and
``--forget.*`` are the arguments of ``JiTTrainer.unlearn``, ``--help`` lists them)::

    python examples/digits_cli.py fit --config examples/configs/train.yaml
    python examples/digits_cli.py unlearn --config examples/configs/full_class.yaml

``subclass_mode_*=True`` lets the same ``class_path`` configs run with the ``lightning-jit unlearn`` console script
too; a plain ``JiTCLI(DigitsCNN, DigitsDataModule)`` works as well, with flat ``model:``/``data:`` sections.
"""

from __future__ import annotations

from lightning_jit.cli import JiTCLI
from lightning_jit.demo.data import DigitsCNN, DigitsDataModule


def cli_main(args: list[str] | None = None) -> JiTCLI:
    return JiTCLI(DigitsCNN, DigitsDataModule, subclass_mode_model=True, subclass_mode_data=True, args=args)


if __name__ == "__main__":
    cli_main()
