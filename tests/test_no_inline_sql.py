"""Every statement the Python code runs comes from a named query in sql/queries.sql: no
call of execute()/executemany() may pass a string literal (or an f-string) as its SQL."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pgembed"
METHODS = {"execute", "executemany"}


def _inline_sql_calls(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in METHODS and node.args):
            continue
        first = node.args[0]
        if isinstance(first, ast.JoinedStr) or (isinstance(first, ast.Constant)
                                                and isinstance(first.value, str | bytes)):
            lines.append(node.lineno)
    return lines


def test_no_inline_sql_outside_the_named_queries():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        offenders += [f"{relative}:{line}" for line in _inline_sql_calls(tree)]
    assert not offenders, ("SQL passed inline to execute(); name it in sql/queries.sql and call "
                           "it through pgembed.sqlfiles.query(): " + ", ".join(offenders))


def test_the_check_sees_literals_and_f_strings():
    tree = ast.parse('c.execute("SELECT 1")\nc.executemany(f"SELECT {x}", r)\n'
                     'c.execute(query("claim"))\nc.execute(sql.SQL("SELECT {}").format(f))\n')
    assert _inline_sql_calls(tree) == [1, 2]
