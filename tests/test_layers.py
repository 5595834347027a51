"""The package's layers: imports only point down (core -> lightning -> evaluation -> tune, cli, demo)."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning_jit

ROOT = Path(lightning_jit.__file__).parent
#: Each layer and the layers it may import from (shared utilities `io` and `_version` are below all of them, and
#: `data` is the 0.1 import path of the demo's classes, kept so that old checkpoints naming it still load).
LAYERS = {
    "core": set(),
    "lightning": {"core"},
    "evaluation": {"core", "lightning"},
    "tune": {"core", "lightning", "evaluation"},
    "cli": {"core", "lightning", "evaluation", "tune", "demo"},
    "demo": {"core", "lightning", "evaluation"},
}
SHARED = {"io", "_version", "data"}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return found


def test_imports_only_point_down():
    wrong = []
    for layer, allowed in LAYERS.items():
        for path in (ROOT / layer).rglob("*.py"):
            for module in _imports(path):
                parts = module.split(".")
                if parts[0] != "lightning_jit" or len(parts) < 2:
                    continue
                target = parts[1]
                if target not in allowed | SHARED | {layer}:
                    wrong.append(f"{path.relative_to(ROOT)} imports {module}")
    assert wrong == []


def test_core_needs_no_lightning_but_its_exception():
    """The run engine knows nothing of Lightning: only `core/errors.py` imports from it, for its exception type."""
    users = {
        str(path.relative_to(ROOT)): [m for m in _imports(path) if m.split(".")[0] == "lightning"]
        for path in (ROOT / "core").rglob("*.py")
    }
    users = {k: v for k, v in users.items() if v}
    assert users == {"core/errors.py": ["lightning.fabric.utilities.exceptions"]}


def test_every_public_name_resolves_lazily_to_its_module():
    """``lightning_jit`` imports its public names on first use; each one must exist where it says."""
    import importlib
    import subprocess
    import sys

    assert set(lightning_jit.__all__) == {"__version__", *lightning_jit._EXPORTS}
    for name in lightning_jit._EXPORTS:
        assert getattr(lightning_jit, name) is getattr(importlib.import_module(lightning_jit._EXPORTS[name]), name)
    # Importing the core loads no upper layer.
    upper = ("lightning_jit.tune", "lightning_jit.cli", "lightning_jit.evaluation", "lightning_jit.lightning")
    code = f"import sys, lightning_jit.core; print(any(m.startswith({upper!r}) for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
