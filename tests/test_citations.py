"""Every file that the code, the docs and the README cite is in the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Where citations are read: the package, its tests, benchmarks, examples, docs and the README.
READ = ("lightning_jit", "tests", "benchmarks", "examples", "docs", "README.md", "research/README.md")
#: Records of past releases, which name files as they were then: the changelog, and the 0.1 screening record (whose
#: scripts it cites at the commit they ran on, ``bd11971``).
HISTORY = ("CHANGELOG.md", "docs/results/quality_exploration.md")
#: A repository path: a top-level folder of the repository, then the file.
PATH = re.compile(
    r"(?<![\w/.:-])((?:docs|benchmarks|research|examples|tests|lightning_jit|\.ci|\.github)/[\w./-]*\w\.(?:md|py|sh|png"
    r"|json|yaml|yml|toml|ckpt|csv))"
)
#: A relative link in Markdown.
LINK = re.compile(r"\]\(([^)#\s:]+)(?:#[^)]*)?\)")


def _files() -> list[Path]:
    found = []
    for entry in READ:
        path = ROOT / entry
        found += [path] if path.is_file() else [p for p in path.rglob("*") if p.suffix in {".py", ".md", ".sh"}]
    own = Path(__file__).resolve()  # this file cites missing paths on purpose
    return [p for p in found if str(p.relative_to(ROOT)) not in HISTORY and "fixtures" not in p.parts and p != own]


def _missing(path: Path, text: str) -> list[str]:
    name = path.relative_to(ROOT)
    wrong = [f"{name} cites {m}" for m in PATH.findall(text) if not (ROOT / m).exists()]
    if path.suffix == ".md":
        wrong += [f"{name} links {m}" for m in LINK.findall(text) if not (path.parent / m).exists()]
    return wrong


def test_every_cited_file_is_in_the_repository():
    if not (ROOT / "docs").is_dir():
        pytest.skip("needs the repository checkout, not an installed package")
    wrong = [w for path in _files() for w in _missing(path, path.read_text())]
    assert sorted(wrong) == []


def test_the_check_finds_a_missing_file():
    """The check reports a cited path and a link that are not there, and passes ones that are."""
    readme = ROOT / "docs" / "metrics.md"
    text = "see `docs/results/nothing.md`, [x](results/none.md), `docs/metrics.md` and [y](results/generalise.md)"
    assert _missing(readme, text) == [
        "docs/metrics.md cites docs/results/nothing.md",
        "docs/metrics.md links results/none.md",
    ]
