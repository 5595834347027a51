"""The README starts with the two set-up commands, and CI runs exactly those (with the virtualenv's ``python``)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block is not None and text.index(block.group(0)) < text.index("\n## "), "the commands open the README"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_the_install_and_the_test_command():
    install, tests = _readme_commands()
    assert install.startswith("python3 -m pip install -e") and install.endswith("lightning-jit demo")
    assert tests.startswith("python3 -m pytest") and '-m "slow or not slow"' in tests  # CI runs everything


def test_ci_runs_the_readme_commands():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for command in _readme_commands():
        assert command.replace("python3 ", "python ", 1) in ci, command
