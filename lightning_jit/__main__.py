"""``python -m lightning_jit`` is the ``lightning-jit`` console script."""

from lightning_jit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
