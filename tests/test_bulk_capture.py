"""Bulk statements: one batch row per statement (pgembed.outbox_statements) instead of one
outbox row per source row, expanded by workers. Whatever path a change took, the views
count it as queued and a drain ends in sync."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from pgembed import audit, pipelines
from tests.conftest import drain
from tests.test_sync import destination, expected

BULK = 3000  # above pgembed.statement_capture_rows()


def make_table(conn: psycopg.Connection, n: int = 0) -> str:
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, title text NOT NULL, body text NOT NULL)")
    if n:
        conn.execute("INSERT INTO docs SELECT g, 'title ' || g, 'body ' || g FROM generate_series(1, %s) g", (n,))
    return pipelines.create(conn, "docs", "title || ' ' || body", "hash:8")


def batches(conn: psycopg.Connection) -> list[tuple[int, int]]:
    return conn.execute("SELECT key_count, cardinality(keys) FROM pgembed.outbox_statements ORDER BY id").fetchall()


def outbox_rows(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM pgembed.outbox").fetchone()[0]


def status(conn: psycopg.Connection) -> tuple[int, int, int]:
    """(queued rows from pipeline_status, missing and orphaned keys from consistency_gaps)"""
    queued = conn.execute("SELECT queued FROM pgembed.pipeline_status").fetchone()[0]
    kinds = dict(conn.execute("SELECT kind, count(*) FROM pgembed.consistency_gaps GROUP BY kind").fetchall())
    return queued, kinds.get("missing", 0), kinds.get("orphaned", 0)


def test_a_bulk_insert_leaves_one_batch_counted_as_queued_and_drains(conn, dsn):
    name = make_table(conn)
    threshold = conn.execute("SELECT pgembed.statement_capture_rows()").fetchone()[0]
    assert threshold < BULK
    conn.execute("INSERT INTO docs SELECT g, 'title ' || g, 'body ' || g FROM generate_series(1, %s) g", (BULK,))
    assert batches(conn) == [(BULK, BULK)]
    assert outbox_rows(conn) == 0
    assert status(conn) == (BULK, 0, 0)
    assert conn.execute("SELECT count(*) FROM pgembed.consistency_gaps").fetchone()[0] == 0
    assert conn.execute("SELECT ready FROM pgembed.queue_depth()").fetchone()[0] == BULK
    drain(dsn, batch_size=500)
    assert batches(conn) == [] and outbox_rows(conn) == 0
    assert destination(conn, name, ["id"]) == expected(conn, "SELECT id, title, body FROM docs")
    assert status(conn) == (0, 0, 0)


def test_small_statements_and_composite_keys_queue_row_by_row(conn):
    make_table(conn)
    conn.execute("INSERT INTO docs SELECT g, 't', 'b' FROM generate_series(1, 10) g")
    assert batches(conn) == [] and outbox_rows(conn) == 10
    conn.execute("CREATE TABLE pairs (a int, b int, body text, PRIMARY KEY (a, b))")
    pipelines.create(conn, "pairs", "body", "hash:8")
    conn.execute("INSERT INTO pairs SELECT g, g, 'x' FROM generate_series(1, %s) g", (BULK,))
    assert batches(conn) == [] and outbox_rows(conn) == 10 + BULK


def test_expansion_bumps_queued_keys_and_a_bulk_update_converges(conn, dsn):
    name = make_table(conn, BULK)  # the backfill queues every row, version 1
    conn.execute("UPDATE docs SET body = body || ' changed'")
    assert batches(conn) == [(BULK, BULK)]
    moved = conn.execute("SELECT pgembed.expand_statements(%s, 1000000)", (name,)).fetchone()[0]
    assert moved == BULK and batches(conn) == []
    assert conn.execute("SELECT min(version), max(version), count(*) FROM pgembed.outbox").fetchone() == (2, 2, BULK)
    drain(dsn, batch_size=500)
    conn.execute("UPDATE docs SET body = 'again ' || body WHERE id > 100")
    conn.execute("DELETE FROM docs WHERE id <= 1500")  # some of them in the pending batch
    assert batches(conn) == [(BULK - 100, BULK - 100)]  # the delete took its path at once
    drain(dsn, batch_size=500)
    assert destination(conn, name, ["id"]) == expected(conn, "SELECT id, title, body FROM docs")
    assert status(conn) == (0, 0, 0)


def test_truncate_and_drop_remove_pending_batches(conn):
    name = make_table(conn)
    conn.execute("INSERT INTO docs SELECT g, 't', 'b' FROM generate_series(1, %s) g", (BULK,))
    conn.execute("TRUNCATE docs")
    assert batches(conn) == []
    conn.execute("INSERT INTO docs SELECT g, 't', 'b' FROM generate_series(1, %s) g", (BULK,))
    pipelines.drop(conn, name)
    assert batches(conn) == []


def test_missing_vectors_are_gaps_but_keys_in_a_batch_are_not(conn, dsn):
    name = make_table(conn, 20)
    drain(dsn)
    conn.execute("SET session_replication_role = replica")  # triggers off: a restore, say
    conn.execute("INSERT INTO docs VALUES (21, 't', 'unseen')")
    conn.execute("DELETE FROM docs WHERE id = 1")
    conn.execute("RESET session_replication_role")
    assert status(conn) == (0, 1, 1)
    gaps = conn.execute("SELECT key->>0, kind FROM pgembed.consistency_gaps ORDER BY 1").fetchall()
    assert gaps == [("1", "orphaned"), ("21", "missing")]
    conn.execute("INSERT INTO docs SELECT g, 't', 'b' FROM generate_series(1000, %s) g", (999 + BULK,))
    assert status(conn) == (BULK, 1, 1)
    audit.run_audit(conn)
    assert conn.execute("SELECT queued, missing, orphaned FROM pgembed.pipeline_status").fetchone() == (BULK, 1, 1)
    drain(dsn)
    assert conn.execute(f"SELECT count(*) FROM pgembed.{name}").fetchone()[0] == 20 + BULK


def test_expansion_waiting_on_an_application_lock_gives_up_and_keeps_the_batch(conn, dsn):
    name = make_table(conn)
    conn.execute("INSERT INTO docs SELECT g, 't', 'b' FROM generate_series(1, %s) g", (BULK,))
    with psycopg.connect(dsn) as app:  # an open transaction queueing key 7 row by row
        app.execute("UPDATE docs SET body = 'held' WHERE id = 7")
        assert app.execute("SELECT count(*) FROM pgembed.outbox").fetchone()[0] == 1
        moved = conn.execute("SELECT pgembed.expand_statements(%s)", (name,)).fetchone()[0]
        assert moved == 0
        assert batches(conn) == [(BULK, BULK)]
        assert conn.execute("SHOW lock_timeout").fetchone()[0] == "0"
        app.commit()
    drain(dsn, batch_size=500)
    assert destination(conn, name, ["id"]) == expected(conn, "SELECT id, title, body FROM docs")


def test_a_failing_bulk_statement_leaves_no_batch(conn):
    make_table(conn)
    conn.execute("INSERT INTO docs SELECT g, 't', 'b' FROM generate_series(1, %s) g", (BULK,))
    with pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute("INSERT INTO docs SELECT g, 't', 'b' FROM generate_series(%s::int, %s::int) g", (BULK, 2 * BULK))
    assert batches(conn) == [(BULK, BULK)]


def test_an_until_empty_worker_waits_for_a_batch_another_worker_is_expanding(conn, dsn):
    name = make_table(conn)
    conn.execute("INSERT INTO docs SELECT g, 't', 'b' || g FROM generate_series(1, %s) g", (BULK,))
    result: list = []
    with psycopg.connect(dsn) as other:  # "another worker", in the middle of expanding it
        other.execute("SELECT id FROM pgembed.outbox_statements FOR UPDATE").fetchall()
        runner = threading.Thread(target=lambda: result.append(drain(dsn, batch_size=500)))
        runner.start()
        time.sleep(1.0)  # its claims find nothing meanwhile; the queue is not empty for all that
        assert runner.is_alive(), "the worker stopped with a batch of keys still queued"
    runner.join(60)
    assert result and result[0].written == BULK
    assert conn.execute(f"SELECT count(*) FROM pgembed.{name}").fetchone()[0] == BULK


def test_a_big_batch_is_expanded_in_slices(conn, dsn):
    name = make_table(conn)
    conn.execute("INSERT INTO docs SELECT g, 't', 'b' || g FROM generate_series(1, %s) g", (BULK,))
    assert conn.execute("SELECT pgembed.expand_statements(%s, 1000)", (name,)).fetchone()[0] == 1000
    assert conn.execute("SELECT expanded FROM pgembed.outbox_statements").fetchone()[0] == 1000
    assert outbox_rows(conn) == 1000
    assert status(conn) == (BULK, 0, 0), "moved or not, every key counts once as queued"
    drain(dsn, batch_size=700)  # claims expand the rest, 10,000 keys at most each
    assert batches(conn) == [] and outbox_rows(conn) == 0
    assert destination(conn, name, ["id"]) == expected(conn, "SELECT id, title, body FROM docs")
