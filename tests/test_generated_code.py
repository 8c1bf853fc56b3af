"""What the generator writes for a table whose every name is hostile: quotes, `$body$`,
semicolons, comment markers (a pipeline name may not hold a newline: it is refused). The text is compared with a
reviewed copy (tests/golden/hostile_pipeline.sql; PGEMBED_UPDATE_GOLDEN=1 rewrites it after a
deliberate change), and the pipeline must work."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg

from tests.conftest import drain
from tests.reliability.convergence import Expect, converge

GOLDEN = Path(__file__).parent / "golden" / "hostile_pipeline.sql"
SCHEMA = 'We"ird $body$ schema'
TABLE = "tab'le; --"
CONTENT = """"bo$body$dy" || ' -- ' || "x-y\""""


def _generated(conn: psycopg.Connection) -> str:
    rows = conn.execute(
        "SELECT pg_get_functiondef(p.oid) FROM pg_proc p JOIN pgembed.pipelines q "
        "ON p.proname IN ('p' || q.id || '_capture', 'p' || q.id || '_read', 'p' || q.id || '_store') "
        "WHERE p.pronamespace = 'pgembed'::regnamespace ORDER BY p.proname").fetchall()
    return "\n".join(r[0] for r in rows)


def test_generated_code_for_a_hostile_table(conn):
    conn.execute(f'CREATE SCHEMA "{SCHEMA.replace(chr(34), chr(34) * 2)}"')
    qualified = f'"{SCHEMA.replace(chr(34), chr(34) * 2)}"."{TABLE}"'
    conn.execute(f'CREATE TABLE {qualified} ("id ""k""" int PRIMARY KEY, "bo$body$dy" text, "x-y" text)')
    conn.execute(f"INSERT INTO {qualified} VALUES (1, 'a $body$ b', 'c''d'), (2, E'e\\nf', '--g')")
    conn.execute("SELECT pgembed.create_pipeline(%s::regclass, %s, 'hash:8', name => %s)",
                 (qualified, CONTENT, "hostile 'name; --"))
    text = _generated(conn)
    if os.environ.get("PGEMBED_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "the generated code changed: review it, then PGEMBED_UPDATE_GOLDEN=1"
    conn.execute(f"UPDATE {qualified} SET \"x-y\" = 'changed' WHERE \"id \"\"k\"\"\" = 2")
    drain(conn.info.dsn)
    converge(conn, [Expect("hostile 'name; --", qualified, ['id "k"'], ["bo$body$dy", "x-y"],
                           lambda body, other: f"{body} -- {other}")], timeout=5)
