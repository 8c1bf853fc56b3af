"""User text reaches generated code as the content and cost_center expressions, the pipeline
name, and the table and column names. Fed quotes, dollar quotes of several tags,
backslashes, newlines, comments and semicolons, with check_function_bodies on and off, a
pipeline either works or is refused with pgembed's own message, and nothing else in the
database changes (a canary table stands for "nothing else")."""

from __future__ import annotations

import random

import psycopg
import pytest

from tests.conftest import drain

PIECES = ["'", "''", '"', "$$", "$body$", "$f$", "$q$", "\\", "\n", "--", "/*", "*/", ";",
          "; DROP TABLE public.canary; --", "$body$; DROP TABLE public.canary; SELECT $body$", "%s", "%I", "{{id}}"]


def literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def ident(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def cases(n: int) -> list[dict[str, str]]:
    rng = random.Random(11)
    out = []
    for i in range(n):
        piece = lambda: "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 3)))  # noqa: E731
        column = f"c{i}{piece()}"
        out.append({
            "table": f"t{i}{piece()}",
            "column": column,
            # half the contents are a valid expression with the piece in a string, half are raw
            "content": (f"{ident(column)} || {literal(piece())}" if i % 2 == 0 else f"{ident(column)} || {piece()}"),
            "cost_center": literal(piece()) if i % 3 == 0 else f"{piece()}",
            "name": f"p{i}{piece()}",
        })
    return out


def objects(conn: psycopg.Connection) -> list[tuple[str, str]]:
    return conn.execute("SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                        "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') "
                        "AND n.nspname NOT LIKE 'pg_temp%' AND n.nspname NOT LIKE 'pg_toast_temp%' "
                        "ORDER BY 1, 2").fetchall()


@pytest.mark.parametrize("check_bodies", ["on", "off"])
def test_hostile_text_is_embedded_or_refused_and_changes_nothing_else(conn, dsn, check_bodies):
    conn.execute("CREATE TABLE public.canary (id int)")
    conn.execute(f"SET check_function_bodies = {check_bodies}")
    created, refused = [], []
    for case in cases(16):
        table = f"public.{ident(case['table'])}"
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, {ident(case['column'])} text)")
        conn.execute(f"INSERT INTO {table} VALUES (1, 'x')")
        before = objects(conn)
        try:
            conn.execute("SELECT pgembed.create_pipeline(%s::regclass, %s, 'hash:8', cost_center => %s, name => %s)",
                         (table, case["content"], case["cost_center"], case["name"]))
        except psycopg.Error as error:
            assert (error.diag.message_primary or "").startswith("pgembed:"), (case, error)
            assert objects(conn) == before, ("a refused pipeline left objects behind", case)
            refused.append(case["name"])
            continue
        created.append(case["name"])
        conn.execute(f"INSERT INTO {table} VALUES (2, 'y')")
    conn.execute("RESET check_function_bodies")
    drain(dsn)
    assert conn.execute("SELECT to_regclass('public.canary') IS NOT NULL").fetchone() == (True,)
    assert created and refused, (created, refused)
    for name in created:
        rows = conn.execute("SELECT count(*) FROM pgembed.pipeline_status s WHERE s.pipeline = %s "
                            "AND s.embedded_rows = 2", (name,)).fetchone()
        assert rows == (1,), f"pipeline {name!r} did not embed its rows"
    assert conn.execute("SELECT count(*) FROM pgembed.failures").fetchone() == (0,)
