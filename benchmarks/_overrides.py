"""``--set KEY=VALUE`` for the benchmarks: override one of the library's settings to measure a variant (parsed
against the type :class:`~lightning_jit.JiTSettings` declares for it)."""

from __future__ import annotations

import argparse
from typing import Any


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--set KEY=VALUE`` (repeatable) to ``parser``."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override one of the library's settings (e.g. logit_norm_penalty=3), to measure a variant.",
    )


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a=1", "b=true"]`` -> ``{"a": 1.0, "b": True}``: each value parsed by jsonargparse as the type that
    :class:`~lightning_jit.JiTSettings` declares for its key (``null`` for ``None``); an unknown key or a value of the
    wrong type stops the benchmark with the parser's message.

    Example:
        >>> parse_overrides(["logit_norm_penalty=3", "normalize_logits=false", "clamp=null", "lr=1e-3"])
        {'logit_norm_penalty': 3.0, 'normalize_logits': False, 'clamp': None, 'lr': 0.001}
    """
    from jsonargparse import ArgumentParser

    from lightning_jit import JiTSettings

    for item in items:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
    parser = ArgumentParser(exit_on_error=False, default_env=False)
    parser.add_class_arguments(JiTSettings)
    try:
        parsed = parser.parse_args([f"--{item}" for item in items], defaults=False)
    except Exception as error:  # jsonargparse's ArgumentError names the key and the expected type
        raise SystemExit(f"--set: {error}") from None
    return parsed.as_dict()
