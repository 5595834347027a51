"""The ``lightning-jit`` console script."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lightning-jit", description="JiT zero-shot unlearning for Lightning.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="Train on scikit-learn's digits, forget one class with JiT, compare to retraining.")
    demo.add_argument("--forget-class", type=int, default=3, help="The digit to forget (default: 3).")
    demo.add_argument("--seed", type=int, default=0, help="Seed (default: 0).")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from lightning_jit.demo import run_demo

        run_demo(forget_class=args.forget_class, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
