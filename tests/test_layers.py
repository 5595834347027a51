"""The package's layers, checked exactly as the package docstring (``lightning_jit/__init__.py``) states them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lightning_jit

ROOT = Path(lightning_jit.__file__).parent
#: Each layer and the layers it may import from, as the package docstring states them. ``evaluation`` does not
#: import ``lightning``: it finds the fronts through its two protocols (``evaluation/callback.py``).
LAYERS = {
    "core": set(),
    "lightning": {"core"},
    "evaluation": {"core"},
    "tune": {"core", "lightning", "evaluation"},
    "demo": {"core", "lightning", "evaluation"},
    "cli": {"core", "lightning", "evaluation", "tune", "demo"},
}
#: The shared utilities below every layer: any layer may import them, and they import no layer.
SHARED = {"io", "_version"}
#: Modules at the package's top that belong to a layer: ``data`` is the 0.1 import path of ``demo.data`` (kept so that
#: old checkpoints naming it still load), so importing it is importing the demo; ``__main__`` is the command line.
ALIASES = {"data": "demo", "__main__": "cli"}


def _unit(module: str) -> str | None:
    """The layer (or shared utility) that an absolute module name inside the package belongs to; ``None`` outside."""
    parts = module.split(".")
    if parts[0] != "lightning_jit":
        return None
    if len(parts) == 1:
        return "lightning_jit"
    return ALIASES.get(parts[1], parts[1])


def _imported_units(source: str, path: Path) -> list[tuple[str, str]]:
    """``(module as written, layer it reaches)`` for every import of the package in ``source`` (the text of ``path``,
    a file under ``ROOT``): absolute and relative, ``import`` and ``from``, at the top, in functions and under
    ``TYPE_CHECKING``. ``from lightning_jit import X`` reaches the module that defines ``X`` (``_EXPORTS``), or the
    subpackage ``X``."""
    package = ["lightning_jit", *path.relative_to(ROOT).parent.parts]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                unit = _unit(alias.name)
                if unit is not None:
                    found.append((alias.name, unit))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            if module == "lightning_jit":
                for alias in node.names:
                    exports = {**lightning_jit._EXPORTS, "__version__": "lightning_jit._version"}
                    target = exports.get(alias.name, f"lightning_jit.{alias.name}")
                    found.append((f"{module}.{alias.name}", _unit(target) or ""))
            elif _unit(module) is not None:
                found.append((module, _unit(module) or ""))
    return found


def _violations(source: str, path: Path) -> list[str]:
    relative = path.relative_to(ROOT)
    own = relative.parts[0] if len(relative.parts) > 1 else ALIASES.get(relative.stem, relative.stem)
    allowed = LAYERS.get(own, set()) | SHARED | {own}
    return [f"{relative} imports {module}" for module, unit in _imported_units(source, path) if unit not in allowed]


def _files() -> list[Path]:
    return [path for path in ROOT.rglob("*.py") if path != ROOT / "__init__.py"]


def test_imports_only_point_down():
    wrong = [v for path in _files() for v in _violations(path.read_text(), path)]
    assert wrong == []


def test_every_file_belongs_to_a_layer_or_the_shared_utilities():
    """A new top-level module must be placed in the rule before the check above can judge it."""
    units = {path.relative_to(ROOT).parts[0] for path in _files()}
    units = {ALIASES.get(u.removesuffix(".py"), u.removesuffix(".py")) for u in units}
    assert units <= set(LAYERS) | SHARED


@pytest.mark.parametrize(
    ("file", "source", "reached"),
    [
        # The public names resolve to the module that defines them.
        ("core/noise.py", "from lightning_jit import JiTUnlearning", "lightning"),
        ("evaluation/metrics.py", "from lightning_jit import JiTUnlearningCallback", "lightning"),
        ("core/noise.py", "from lightning_jit import tune", "tune"),
        # Relative imports, one and two levels up.
        ("evaluation/metrics.py", "from ..lightning.callback import JiTUnlearningCallback", "lightning"),
        ("evaluation/metrics.py", "from .. import lightning", "lightning"),
        ("core/noise.py", "from ..demo import data", "demo"),
        # The 0.1 shim is the demo, not a shared utility.
        ("core/noise.py", "from lightning_jit.data import DigitsCNN", "demo"),
        ("lightning/module.py", "import lightning_jit.data", "demo"),
        # Imports inside functions and under TYPE_CHECKING count too.
        ("lightning/module.py", "def f():\n    from lightning_jit.evaluation import evaluate_unlearning", "evaluation"),
        ("core/noise.py", "if TYPE_CHECKING:\n    from lightning_jit.tune import tune_jit", "tune"),
        # The shared utilities reach no layer.
        ("io.py", "from lightning_jit.core.batch import BatchFormat", "core"),
    ],
)
def test_the_check_finds_each_way_of_reaching_up(file, source, reached):
    """Each way a file can import a higher layer is resolved to that layer and reported."""
    path = ROOT / file
    assert [unit for _, unit in _imported_units(source, path)] == [reached]
    assert len(_violations(source, path)) == 1


def test_allowed_imports_pass_the_check():
    """The same resolution lets the allowed directions through, so the check above is not merely strict."""
    assert _violations("from ..core.batch import BatchFormat", ROOT / "evaluation" / "evaluate.py") == []
    assert _violations("from . import report", ROOT / "evaluation" / "evaluate.py") == []
    assert _violations("from lightning_jit import JiTRun", ROOT / "lightning" / "module.py") == []
    assert _violations("from lightning_jit.data import DigitsCNN", ROOT / "cli" / "console.py") == []
    assert _violations("from lightning_jit.io import json_safe", ROOT / "core" / "noise.py") == []


def test_core_needs_no_lightning_but_its_exception():
    """The run engine knows nothing of Lightning: only `core/errors.py` imports from it, for its exception type."""
    users = {}
    for path in (ROOT / "core").rglob("*.py"):
        modules = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                modules.append(node.module)
        modules = [m for m in modules if m.split(".")[0] == "lightning"]
        if modules:
            users[str(path.relative_to(ROOT))] = modules
    assert users == {"core/errors.py": ["lightning.fabric.utilities.exceptions"]}


@pytest.mark.slow  # a new Python process that imports Lightning
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
