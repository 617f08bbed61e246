"""Declare what you import, import what you declare: pyproject's dependencies against bench/'s imports."""
from __future__ import annotations

import ast
import re
import sys
import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# import name -> distribution name, where they differ
DISTRIBUTION = {"yaml": "pyyaml", "optuna_integration": "optuna-integration", "markdown_it": "markdown-it-py"}


def _imported() -> set[str]:
    names = set()
    for path in (ROOT / "bench").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return {DISTRIBUTION.get(n, n) for n in names if n not in sys.stdlib_module_names and n != "bench"}


def _declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs):
        return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower() for r in reqs}

    optional = set().union(*(names(v) for v in project.get("optional-dependencies", {}).values()))
    return names(project["dependencies"]), optional


def test_every_import_is_declared_and_every_dependency_imported():
    core, optional = _declared()
    imported = _imported()
    assert imported - core - optional == set()  # e.g. sqlalchemy must be declared
    assert core - imported == set()  # e.g. no torchmetrics that nothing imports
