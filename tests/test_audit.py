"""Consistency audit: each gap kind made on purpose is reported exactly, with its `since`;
a repair plus a drain closes every gap; the gap queries stay index-driven on a big table."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from typer.testing import CliRunner

from pgembed import audit, pipelines
from pgembed.cache import document_hash
from pgembed.cli import app
from tests.conftest import drain

runner = CliRunner()


def gaps(conn: psycopg.Connection) -> set[tuple[str, tuple[str, ...], str, Any]]:
    return {(p, tuple(k), kind, since) for p, k, kind, since in
            conn.execute("SELECT pipeline, key, kind, since FROM pgembed.consistency_gaps")}


def status(conn: psycopg.Connection, name: str) -> dict[str, Any]:
    rows = audit.status(conn, name)
    assert len(rows) == 1
    return rows[0]


def embedded_at(conn: psycopg.Connection, table: str, key: int) -> Any:
    return conn.execute(f"SELECT embedded_at FROM pgembed.{table} WHERE id = %s AND chunk_seq = 0",
                        (key,)).fetchone()[0]


def make_docs(conn: psycopg.Connection, n: int = 20) -> str:
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, title text NOT NULL, body text)")
    conn.execute("INSERT INTO docs SELECT g, 'title ' || g, 'body of ' || g "
                 "FROM generate_series(1, %s) g", (n,))
    return pipelines.create(conn, "docs", "title || ' ' || body", "hash:16")


def triggers_off(conn: psycopg.Connection, *statements: str) -> None:
    """Changes the triggers never see, as a restore or a replica would."""
    conn.execute("ALTER TABLE docs DISABLE TRIGGER USER")
    for statement in statements:
        conn.execute(statement)
    conn.execute("ALTER TABLE docs ENABLE TRIGGER USER")


def test_each_gap_kind_is_reported_then_repaired(conn, dsn):
    name = make_docs(conn)
    drain(dsn)
    clean = status(conn, name)
    assert (clean["source_rows"], clean["embedded_rows"], clean["oldest_gap"]) == (20, 20, None)
    assert audit.gaps(conn) == []

    created = conn.execute("SELECT created_at FROM pgembed.pipelines").fetchone()[0]
    orphan_since, stale_since = embedded_at(conn, name, 2), embedded_at(conn, name, 3)
    conn.execute(f"DELETE FROM pgembed.{name} WHERE id = 1")                  # missing
    triggers_off(conn, "DELETE FROM docs WHERE id = 2",                        # orphaned
                 "UPDATE docs SET body = 'rewritten behind our back' WHERE id = 3")  # stale
    # failed: changed, and the provider refused the new text (NULL content would be "empty")
    triggers_off(conn, "UPDATE docs SET body = 'refused by the API' WHERE id = 4")
    conn.execute("INSERT INTO pgembed.failures (pipeline, key, error, attempts, parked_at) "
                 "VALUES (%s, '[\"4\"]', 'the API refused it', 1, now())", (name,))
    drain(dsn, max_attempts=1)
    failed_since = conn.execute("SELECT first_failed_at FROM pgembed.failures "
                                "WHERE parked_at IS NOT NULL").fetchone()[0]
    # queued rows are the worker's business, not gaps: one ready, one leased, one backing off
    conn.execute("UPDATE docs SET body = body || '!' WHERE id IN (5, 6, 7)")
    conn.execute("UPDATE pgembed.outbox SET lease_id = gen_random_uuid(), leased_by = 'w', "
                 "available_at = now() + interval '5 minutes' WHERE key = '[\"6\"]'")
    conn.execute("UPDATE pgembed.outbox SET available_at = now() + interval '1 hour' "
                 "WHERE key = '[\"7\"]'")

    assert gaps(conn) == {
        (name, ("1",), "missing", created),
        (name, ("2",), "orphaned", orphan_since),
        (name, ("3",), "stale", stale_since),
        (name, ("4",), "failed", failed_since),
    }, "row 4 keeps its old vectors but counts once, as failed"
    row = status(conn, name)
    assert {k: row[k] for k in ("model", "source_rows", "embedded_rows", "queued", "in_flight",
                                "retrying", "failed", "missing", "orphaned", "stale")} == {
        "model": "hash:16", "source_rows": 19, "embedded_rows": 19, "queued": 1, "in_flight": 1,
        "retrying": 1, "failed": 1, "missing": None, "orphaned": None, "stale": None}
    assert row["gaps_checked_at"] is None, "gaps are counted by an audit, not by a status glance"

    report = audit.run_audit(conn)
    assert (report["missing"], report["orphaned"], report["stale"], report["failed"],
            report["oldest_gap_since"], report["repaired"]) == (1, 1, 1, 1, created, False)
    assert gaps(conn), "an audit without repair changes nothing"
    row = status(conn, name)
    assert (row["missing"], row["orphaned"], row["stale"], row["gaps_checked_at"]) == \
        (1, 1, 1, report["started_at"])
    assert conn.execute(
        "SELECT s.oldest_gap = now() - p.created_at, s.last_embedded_at = "
        f"(SELECT max(embedded_at) FROM pgembed.{name}) FROM pgembed.pipeline_status s "
        "JOIN pgembed.pipelines p ON p.name = s.pipeline").fetchone() == (True, True)

    # the failed row needs its data fixed (a DBA's decision); the rest is the audit's job
    conn.execute("UPDATE docs SET body = 'fixed' WHERE id = 4")
    conn.execute("UPDATE pgembed.outbox SET lease_id = NULL, leased_by = NULL, available_at = now()")
    repaired = audit.run_audit(conn, repair=True)
    assert (repaired["requeued"], repaired["orphans_deleted"]) == (2, 1)
    assert [status(conn, name)[k] for k in ("missing", "orphaned", "stale")] == [0, 0, 0], \
        "what a repair found is queued or deleted now, not a gap"
    assert sorted(conn.execute("SELECT key->>0, purpose FROM pgembed.outbox "
                               "WHERE purpose = 'repair' ORDER BY 1").fetchall()) == [
        ("1", "repair"), ("3", "repair")]
    assert conn.execute(f"SELECT count(*) FROM pgembed.{name} WHERE id = 2").fetchone()[0] == 0
    drain(dsn)

    after = audit.run_audit(conn)
    assert [after[k] for k in ("missing", "orphaned", "stale", "failed", "oldest_gap")] == \
        [0, 0, 0, 0, None]
    final = status(conn, name)
    assert [final[k] for k in ("queued", "in_flight", "retrying", "failed", "missing",
                               "orphaned", "stale", "oldest_gap")] == [0] * 7 + [None]
    assert final["source_rows"] == final["embedded_rows"] == 19
    hashes = dict(conn.execute(f"SELECT id, content_hash FROM pgembed.{name}").fetchall())
    for key, text in conn.execute("SELECT id, title || ' ' || body FROM docs"):
        assert bytes(hashes[key]) == document_hash(text)
    runs = conn.execute("SELECT repaired, missing + orphaned + stale + failed, finished_at IS NOT NULL "
                        "FROM pgembed.audit_runs ORDER BY id").fetchall()
    assert runs == [(False, 4, True), (True, 4, True), (False, 0, True)]


@pytest.fixture
def hostile(conn) -> Iterator[str]:
    """Composite key with awkward names, source columns named like the destination's, and a
    content expression that only resolves on its creator's search_path."""
    conn.execute("CREATE SCHEMA shop")
    conn.execute('CREATE TABLE shop."Order Lines" ("tenant id" text, "order" int, '
                 "chunk text, content_hash text, PRIMARY KEY (\"tenant id\", \"order\"))")
    conn.execute("CREATE FUNCTION shop.label(a text, b text) RETURNS text "
                 "LANGUAGE sql IMMUTABLE AS $$ SELECT a || ' / ' || b $$")
    conn.execute("INSERT INTO shop.\"Order Lines\" SELECT 't' || (g % 2), g, 'line ' || g, 'x' "
                 "FROM generate_series(1, 6) g")
    conn.execute("SET search_path = shop, public")
    name = pipelines.create(conn, '"Order Lines"', "label(chunk, content_hash)", "hash:8")
    conn.execute("RESET search_path")
    yield name


def test_composite_keys_odd_names_and_the_creators_search_path(conn, dsn, hostile):
    drain(dsn)
    assert audit.gaps(conn, hostile) == []
    conn.execute('ALTER TABLE shop."Order Lines" DISABLE TRIGGER USER')
    conn.execute('UPDATE shop."Order Lines" SET content_hash = \'y\' WHERE "order" = 3')
    conn.execute('DELETE FROM shop."Order Lines" WHERE "order" = 4')
    conn.execute('ALTER TABLE shop."Order Lines" ENABLE TRIGGER USER')
    found = {(tuple(g["key"]), g["kind"]) for g in audit.gaps(conn, hostile)}
    assert found == {(("t1", "3"), "stale"), (("t0", "4"), "orphaned")}
    audit.run_audit(conn, repair=True, pipeline=hostile)
    drain(dsn)
    assert audit.gaps(conn, hostile) == []
    assert status(conn, hostile)["embedded_rows"] == 5


def test_a_content_expression_that_raises_warns_and_the_rest_is_still_checked(conn, dsn):
    conn.execute("CREATE FUNCTION fragile(t text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS "
                 "$$ BEGIN IF t = 'boom' THEN RAISE EXCEPTION 'cannot read %', t; END IF; "
                 "RETURN t; END $$")
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, title text NOT NULL, body text)")
    conn.execute("INSERT INTO docs SELECT g, 'title ' || g, 'body' FROM generate_series(1, 5) g")
    name = pipelines.create(conn, "docs", "fragile(body)", "hash:8")
    drain(dsn)
    warnings: list[str] = []
    conn.add_notice_handler(lambda d: warnings.append(d.message_primary or ""))
    triggers_off(conn, "UPDATE docs SET body = 'boom' WHERE id = 1")
    conn.execute(f"DELETE FROM pgembed.{name} WHERE id = 2")
    assert {(tuple(g["key"]), g["kind"]) for g in audit.gaps(conn)} == {(("2",), "missing")}
    assert any("stale rows not checked" in w and "cannot read boom" in w for w in warnings)


def test_unknown_pipeline_and_dropped_source_table(conn, dsn):
    with pytest.raises(pipelines.PipelineError, match='no pipeline named "nope"'):
        audit.run_audit(conn, pipeline="nope")
    with pytest.raises(pipelines.PipelineError, match='no pipeline named "nope"'):
        audit.gaps(conn, "nope")
    name = make_docs(conn, 3)
    drain(dsn)
    conn.execute("DROP TABLE docs")
    warnings: list[str] = []
    conn.add_notice_handler(lambda d: warnings.append(d.message_primary or ""))
    assert status(conn, name)["source_rows"] is None
    assert any("source table was dropped" in w for w in warnings)


def test_status_and_audit_commands(conn, dsn):
    empty = runner.invoke(app, ["status", "--dsn", dsn], catch_exceptions=False)
    assert empty.exit_code == 0 and "no pipelines yet" in empty.output
    name = make_docs(conn, 5)
    drain(dsn)
    conn.execute(f"DELETE FROM pgembed.{name} WHERE id IN (1, 2)")
    shown = runner.invoke(app, ["status", "--dsn", dsn], catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    assert name in shown.output and "missing" in shown.output
    found = runner.invoke(app, ["audit", "--dsn", dsn], catch_exceptions=False)
    assert found.exit_code == 0, found.output
    assert "audit #1 of all pipelines" in found.output and "pgembed audit --repair" in found.output
    fixed = runner.invoke(app, ["audit", "--repair", "--pipeline", name, "--dsn", dsn],
                          catch_exceptions=False)
    assert fixed.exit_code == 0 and "2 rows queued for the worker" in fixed.output
    drain(dsn)
    assert status(conn, name)["missing"] == 0
    unknown = runner.invoke(app, ["audit", "--pipeline", "nope", "--dsn", dsn])
    assert unknown.exit_code == 1 and 'no pipeline named "nope"' in unknown.output
    assert "Traceback" not in unknown.output


def plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from plan_nodes(child)


def test_gap_queries_use_indexes_on_50000_rows(conn):
    """The anti-joins must be hash/merge joins or index probes, never a nested loop that
    scans a whole table once per outer row (what makes a view unusable on a million rows)."""
    rows = 50_000
    conn.execute("CREATE TABLE big (id bigint PRIMARY KEY, body text NOT NULL)")
    conn.execute("INSERT INTO big SELECT g, 'document number ' || g FROM generate_series(1, %s) g",
                 (rows,))
    name = pipelines.create(conn, "big", "body", "hash:4",
                            pipelines.PipelineOptions(index="none", backfill=False))
    # vectors written directly: every 50th row missing, every 100th stale, ~300 orphans
    conn.execute(f"""
        INSERT INTO pgembed.{name} (id, chunk_seq, chunk, content_hash, chunk_hash, embedding)
        SELECT g, 0, 'x',
               sha256(convert_to(CASE WHEN g %% 100 = 1 THEN 'old' ELSE 'document number ' || g END,
                                 'UTF8')),
               '\\x00'::bytea, '[1,0,0,0]'
          FROM generate_series(1, %s) g WHERE g %% 50 <> 0""", (rows + 300,))
    conn.execute("INSERT INTO pgembed.outbox (pipeline, key) "
                 "SELECT %s, jsonb_build_array(g::text) FROM generate_series(1, 2000, 2) g", (name,))
    conn.execute("INSERT INTO pgembed.failures (pipeline, key, error, parked_at) "
                 "SELECT %s, jsonb_build_array(g::text), 'test', now() "
                 "FROM generate_series(2, 200, 2) g", (name,))
    for t in ("big", f"pgembed.{name}", "pgembed.outbox", "pgembed.failures"):
        conn.execute(f"ANALYZE {t}")

    summary = {}
    for kind, plan in conn.execute("SELECT kind, plan FROM pgembed.explain_gaps(%s)", (name,)):
        nodes = list(plan_nodes(plan[0]["Plan"]))
        for node in nodes:
            if node["Node Type"] == "Nested Loop":
                inner = [c for c in node["Plans"] if c.get("Parent Relationship") == "Inner"]
                assert all(c["Node Type"] != "Seq Scan" for c in inner), json.dumps(plan)
        joins = [f"{n['Node Type']}({n.get('Join Type')})" for n in nodes if "Join Type" in n]
        assert joins and all(j.startswith(("Hash Join", "Merge Join", "Nested Loop"))
                             for j in joins)
        summary[kind] = joins
    print("gap plans:", summary)

    started = time.monotonic()
    counts = dict(conn.execute("SELECT kind, count(*) FROM pgembed.gaps(%s) GROUP BY kind",
                               (name,)).fetchall())
    # missing: multiples of 50 not queued and not failed; stale: g % 100 = 1, not queued
    # (odd keys up to 1999 are) and not failed; orphans: keys above the table
    missing = sum(1 for g in range(50, rows + 1, 50) if not (g <= 200 and g % 2 == 0))
    stale = sum(1 for g in range(1, rows + 1, 100) if g > 2000)
    orphaned = sum(1 for g in range(rows + 1, rows + 301) if g % 50)
    assert counts == {"missing": missing, "stale": stale, "orphaned": orphaned, "failed": 100}
    assert time.monotonic() - started < 10
