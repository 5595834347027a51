"""``--set KEY=VALUE`` for the benchmarks: override one of the library's settings to measure a variant."""

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
    """``["a=1", "b=true"]`` -> ``{"a": 1, "b": True}``: numbers, true/false, none/null, else the text.

    Example:
        >>> parse_overrides(["logit_norm_penalty=3", "normalize_logits=false", "clamp=none", "reduction=sum"])
        {'logit_norm_penalty': 3, 'normalize_logits': False, 'clamp': None, 'reduction': 'sum'}
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        out[key] = _value(text)
    return out


def _value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
