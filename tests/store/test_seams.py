"""The store's seams: the interface and the shared claim plan know no backend, and the
backends do not know each other; only the factory picks one by URL."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import storno._store

STORE = Path(storno._store.__file__).parent
SQLITE = {"_sqlite", "_sqlite_connection", "_sqlite_sql"}
POSTGRES = {"_postgres", "_postgres_connection", "_postgres_sql"}


def _store_imports(module: str) -> set[str]:
    """The ``storno._store`` modules that ``module`` imports (by their last name)."""
    tree = ast.parse((STORE / f"{module}.py").read_text())
    for node in ast.walk(tree):  # imports for type checking only are no dependency
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            node.body = []
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("storno._store."):
                found.add(node.module.rsplit(".", 1)[1])
        elif isinstance(node, ast.Import):
            found.update(
                a.name.rsplit(".", 1)[1] for a in node.names if a.name.startswith("storno._store.")
            )
    return found


@pytest.mark.parametrize("module", ["_base", "_rows", "_claims"])
def test_the_interface_and_the_claim_plan_know_no_backend(module: str) -> None:
    assert _store_imports(module) & (SQLITE | POSTGRES | {"_migrations", "_factory"}) == set()


@pytest.mark.parametrize(("ours", "theirs"), [(SQLITE, POSTGRES), (POSTGRES, SQLITE)])
def test_the_backends_do_not_know_each_other(ours: set[str], theirs: set[str]) -> None:
    for module in ours:
        assert _store_imports(module) & theirs == set(), module
