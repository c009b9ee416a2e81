"""The package layout: which subpackage may import which, and where TensorFlow may be imported.

The rules are drawn in docs/concepts.md ("Layout"). Imports inside functions
(lazy ones, e.g. stats building an operator for a model) are not counted.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "hessop"
# Module-level imports allowed from each subpackage ("_shared": the top-level
# helpers _validation and _progress, which import no TensorFlow).
ALLOWED = {
    "autodiff": {"autodiff", "_shared"},
    "operators": {"operators", "autodiff", "dense", "structured", "_shared"},
    "dense": {"dense", "autodiff", "_shared"},
    "lowrank": {"lowrank", "dense", "_shared"},
    "structured": {"structured", "lowrank", "dense", "_shared"},
    "spectral": {"spectral", "dense", "_shared"},
    "stats": {"stats", "spectral", "structured", "lowrank", "dense", "_shared"},
    "training": {"training", "stats", "_shared"},
}
NUMPY_ONLY = ("lowrank", "structured", "spectral", "stats")


def _module_level_imports(path: Path) -> set[str]:
    """The hessop subpackages (or "_shared") imported at the top level of a module."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "hessop":
            parts = node.module.split(".")
            if len(parts) == 1:  # from hessop import x
                found.update("_shared" if name.name.startswith("_") else name.name for name in node.names)
            else:
                found.add("_shared" if parts[1] in ("_validation", "_progress") else parts[1])
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("hessop."))
    return found


@pytest.mark.parametrize("subpackage", sorted(ALLOWED))
def test_subpackages_import_only_what_the_layout_allows(subpackage: str) -> None:
    for path in sorted((PACKAGE / subpackage).glob("*.py")):
        extra = _module_level_imports(path) - ALLOWED[subpackage]
        assert not extra, f"{path.relative_to(PACKAGE.parent)} imports {sorted(extra)} at module level"


def test_every_module_lives_in_a_subpackage_of_the_layout() -> None:
    top_level = {path.stem for path in PACKAGE.glob("*.py")}
    assert top_level == {"__init__", "__main__", "_validation", "_progress"}
    assert {path.name for path in PACKAGE.iterdir() if path.is_dir() and path.name != "__pycache__"} == set(ALLOWED)


@pytest.mark.parametrize("subpackage", NUMPY_ONLY)
def test_numpy_side_imports_no_tensorflow(subpackage: str) -> None:
    code = (
        "import importlib, pkgutil, sys\n"
        f"import hessop.{subpackage} as package\n"
        "for module in pkgutil.iter_modules(package.__path__):\n"
        f"    importlib.import_module('hessop.{subpackage}.' + module.name)\n"
        "loaded = sorted(name for name in sys.modules if name.split('.')[0] in ('tensorflow', 'keras'))\n"
        "assert not loaded, loaded[:5]\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
