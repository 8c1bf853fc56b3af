"""Import rules between the parts (docs/architecture.md): providers embed text and know
nothing of the database; the worker never depends on the command line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pgembed"

DATABASE = ("psycopg", "psycopg_pool", "pgvector", "sqlalchemy", "alembic", "pgembed.db", "pgembed.queue",
            "pgembed.migrate", "pgembed.schema", "pgembed.sqlfiles")

RULES = [
    # (modules the rule is about, what they may not import)
    ("pgembed/providers/*.py", DATABASE),
    ("pgembed/worker.py", ("pgembed.cli",)),
    ("pgembed/[!_]*.py", ("pgembed.cli",)),  # no part but `python -m pgembed` needs the CLI
]


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def breaks(names: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names for f in forbidden if n == f or n.startswith(f + "."))


@pytest.mark.parametrize(("pattern", "forbidden"), RULES)
def test_import_rule(pattern, forbidden):
    files = sorted(PACKAGE.parent.glob(pattern))
    assert files, pattern
    found = {str(f.relative_to(PACKAGE.parent)): breaks(imported(f), forbidden) for f in files}
    assert not {f: b for f, b in found.items() if b}


def test_the_rule_sees_an_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from pgembed import db\nimport psycopg.rows\n")
    assert breaks(imported(probe), DATABASE) == ["pgembed.db", "psycopg.rows"]
