"""The token classifier of ``examples/token_classifier.py`` on the command line: train it, then forget a class.

``JiTCLI`` is ``LightningCLI`` with an ``unlearn`` subcommand. Token ids cannot take Gaussian noise, so the unlearn
config sets ``jit: {perturb_at: embed}`` (the noise goes into the token embedding's output, see ``docs/sites.md``) and
``batch: {input_key: input_ids, label_key: labels}`` (the batches are dicts). Run from the repository root::

    python examples/token_cli.py fit --config examples/configs/token_train.yaml
    python examples/token_cli.py unlearn --config examples/configs/token_full_class.yaml

The same unlearn config runs with the console script, ``lightning-jit unlearn --config
examples/configs/token_full_class.yaml`` (its ``class_path: examples.token_classifier.TokenClassifier`` is found from
the repository root), and ``--jit.perturb_at=embed`` on the command line does what the config's line does.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `examples.token_classifier`, as the configs name it

from examples.token_classifier import TokenClassifier, TokenDigitsDataModule  # noqa: E402
from lightning_jit.cli import JiTCLI  # noqa: E402


def cli_main(args: list[str] | None = None) -> JiTCLI:
    return JiTCLI(TokenClassifier, TokenDigitsDataModule, subclass_mode_model=True, subclass_mode_data=True, args=args)


if __name__ == "__main__":
    cli_main()
