"""Write-through: keys an application names right after its commit are embedded and stored by
the call (pgembed.writethrough.sync_keys, Client.sync_now), fenced as a worker's batch is;
whatever fails stays queued and a worker converges it."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pgembed.client import Client
from pgembed.search import search
from pgembed.worker import Worker, WorkerConfig
from pgembed.writethrough import WriteThroughError, sync_keys
from tests.conftest import drain
from tests.reliability.convergence import converge
from tests.reliability.harness import api_pipeline, body_expect, make_docs
from tests.test_privileges import login  # noqa: F401 (a fixture)


def statuses(result) -> dict[str, str]:
    return {k.key[0]: k.status for k in result.keys}


def outbox(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute("SELECT key->>0, lease_id IS NULL, available_at <= now() FROM pgembed.outbox "
                        "ORDER BY (key->>0)::int").fetchall()


def stored(conn: psycopg.Connection, name: str) -> dict[str, str]:
    """Key → chunk text of the destination (one chunk a row here)."""
    (table,) = conn.execute("SELECT destination FROM pgembed.pipelines WHERE name = %s",
                            (name,)).fetchone()
    return {str(k): c for k, c in conn.execute(f"SELECT id, chunk FROM pgembed.{table}").fetchall()}


@pytest.fixture
def notes(conn: psycopg.Connection) -> str:
    make_docs(conn, "notes", 20)
    name = conn.execute("SELECT pgembed.create_pipeline('notes', 'body', 'hash:64', name => 'notes_hash')"
                        ).fetchone()[0]
    drain(conn.info.dsn)
    return name


def test_named_rows_are_searchable_when_the_call_returns(conn, notes):
    conn.execute("INSERT INTO notes VALUES (101, 'the zebra crossing on elm street'), "
                 "(102, 'a note about quarterly taxes')")
    conn.execute("UPDATE notes SET body = 'rewritten: the heron by the lake' WHERE id = 3")
    conn.execute("SELECT pgembed.set_alias('notes', %s)", (notes,))
    with Client(conn.info.dsn) as client:
        result = client.sync_now("notes", [101, "102", 3, 4])
    assert result.pipeline == notes and result.ok
    assert statuses(result) == {"101": "stored", "102": "stored", "3": "stored", "4": "fresh"}
    assert outbox(conn) == []
    assert search(conn, "notes", "the zebra crossing on elm street", k=1)[0].key == {"id": 101}
    assert stored(conn, notes)["3"] == "rewritten: the heron by the lake"
    # JSON-friendly, for the gateway's POST /v1/sync
    assert result.as_dict()["keys"][0] == {"key": ["101"], "status": "stored", "error": None, "holder": None}
    # again: nothing is queued, nothing is embedded
    with Client(conn.info.dsn) as client:
        assert statuses(client.sync_now(notes, [101])) == {"101": "fresh"}


def test_a_key_queued_for_bulk_work_goes_in_the_live_lane(conn):
    make_docs(conn, "docs", 50)
    name = conn.execute("SELECT pgembed.create_pipeline('docs', 'body', 'hash:32')").fetchone()[0]
    result = asyncio.run(sync_keys(conn.info.dsn, name, [7]))
    assert statuses(result) == {"7": "stored"}
    assert conn.execute("SELECT count(*) FROM pgembed.outbox").fetchone()[0] == 49  # the rest still queued
    assert conn.execute("SELECT purpose, inputs FROM pgembed.usage").fetchall() == [("sync", 1)]


def test_a_deleted_row_has_nothing_to_search(conn, notes):
    conn.execute("UPDATE notes SET body = 'changed, then deleted' WHERE id = 6")
    conn.execute("DELETE FROM notes WHERE id IN (5, 6)")
    result = asyncio.run(sync_keys(conn.info.dsn, notes, [5, 6, 7, 12345]))
    assert statuses(result) == {"5": "no_row", "6": "no_row", "7": "fresh", "12345": "no_row"} and result.ok
    assert {"5", "6"}.isdisjoint(stored(conn, notes)) and outbox(conn) == []


@pytest.mark.parametrize("target, keys, message", [
    ("nosuch", [1], "no pipeline or alias named 'nosuch'"),
    ("notes_hash", [[1, 2]], "key has 1 column(s)"),
    ("notes_hash", [True], "key has 1 column(s)"),
    ("notes_hash", [1.5], "as text or a whole number"),
    ("notes_hash", "1", "keys must be a list"),
    ("notes_hash", list(range(1001)), "at most 1000 keys"),
    ("notes_hash", [1, "abc"], "key ['abc'] of pipeline notes_hash: invalid input syntax for type integer"),
])
def test_bad_input_is_refused_and_nothing_is_taken(conn, notes, target, keys, message):
    conn.execute("UPDATE notes SET body = body || ' changed' WHERE id = 1")
    with pytest.raises(WriteThroughError) as raised:
        asyncio.run(sync_keys(conn.info.dsn, target, keys))
    assert message in str(raised.value)
    assert outbox(conn) == [("1", True, True)]  # still queued, in its place, leased to nobody
    assert drain(conn.info.dsn).written == 1


def test_with_the_api_down_the_row_stays_queued_and_the_worker_converges_it(conn, fake_api):
    make_docs(conn, "docs", 3)
    name = api_pipeline(conn, "docs")
    drain(conn.info.dsn)
    conn.execute("INSERT INTO docs VALUES (10, 'written during the outage'), (11, 'another one')")
    fake_api.fail_next(10**6, status=500)
    result = asyncio.run(sync_keys(conn.info.dsn, name, [10, 11]))
    assert {k.status for k in result.keys} == {"failed"} and not result.ok
    assert all("500" in (k.error or "") for k in result.keys), result.keys
    assert outbox(conn) == [("10", True, True), ("11", True, True)]  # back in line, not leased
    assert conn.execute("SELECT count(*) FROM pgembed.failures").fetchone()[0] == 0  # not the rows' fault
    fake_api.fail_next(0)
    drain(conn.info.dsn)
    converge(conn, [body_expect(name, "docs")])
    assert {"10", "11"} <= set(stored(conn, name))


def test_a_rejected_text_is_recorded_as_the_worker_records_it(conn, fake_api):
    make_docs(conn, "docs", 1)
    name = api_pipeline(conn, "docs", backfill=False)
    conn.execute("INSERT INTO docs VALUES (20, 'a fine text'), (21, 'POISON text')")
    fake_api.always_reject("POISON")
    result = asyncio.run(sync_keys(conn.info.dsn, name, [20, 21]))
    assert statuses(result) == {"20": "stored", "21": "failed"}
    assert "rejected" in (result.keys[1].error or "")
    assert conn.execute("SELECT key->>0, class, parked_at IS NOT NULL FROM pgembed.failures").fetchall() == [
        ("21", "input_rejected", True)]
    # parked: asked again, it is reported with the failure's message, not embedded
    fake_api.always_reject(None)
    again = asyncio.run(sync_keys(conn.info.dsn, name, [21]))
    assert again.keys[0].status == "failed" and again.keys[0].error.startswith("parked: ")


def test_a_row_updated_while_it_is_embedded_gets_its_newer_content(conn, fake_api):
    make_docs(conn, "docs", 1)
    name = api_pipeline(conn, "docs", backfill=False)
    conn.execute("INSERT INTO docs VALUES (30, 'the old text')")
    fake_api.hang(1, seconds=30)
    outcome: list = []
    call = threading.Thread(target=lambda: outcome.append(asyncio.run(sync_keys(conn.info.dsn, name, [30]))))
    call.start()
    try:
        deadline = time.monotonic() + 10
        while fake_api.stats()["requests"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        conn.execute("UPDATE docs SET body = 'the new text' WHERE id = 30")  # committed mid-call
    finally:
        fake_api.release()
        call.join(30)
    assert statuses(outcome[0]) == {"30": "stored"}
    assert stored(conn, name) == {"30": "the new text"} and outbox(conn) == []
    assert fake_api.received == ["the old text", "the new text"]  # the old vector was never stored


def test_a_key_another_worker_holds_is_waited_for_then_reported(conn, notes):
    conn.execute("UPDATE notes SET body = 'held elsewhere' WHERE id = 8")
    lease = uuid.uuid4()
    assert conn.execute("SELECT key->>0 FROM pgembed.claim('other', %s, 10, 60)", (lease,)).fetchall() == [("8",)]
    result = asyncio.run(sync_keys(conn.info.dsn, notes, [8], timeout=0.3))
    assert [(k.status, k.holder) for k in result.keys] == [("in_flight", "other")]
    assert conn.execute("SELECT lease_id FROM pgembed.outbox").fetchall() == [(lease,)]  # untouched

    # the holder gives it back while the call waits: the call takes it
    def give_back() -> None:
        time.sleep(0.3)
        with psycopg.connect(conn.info.dsn, autocommit=True) as other:
            other.execute("UPDATE pgembed.outbox SET lease_id = NULL, leased_by = NULL, available_at = now()")

    helper = threading.Thread(target=give_back)
    helper.start()
    result = asyncio.run(sync_keys(conn.info.dsn, notes, [8], timeout=20))
    helper.join()
    assert statuses(result) == {"8": "stored"} and stored(conn, notes)["8"] == "held elsewhere"


@pytest.fixture
def running_worker(dsn: str) -> Iterator[Worker]:
    worker = Worker(dsn, WorkerConfig(poll_interval=0.05, concurrency=2, batch_size=8, handle_signals=False))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(worker.run(),))
    thread.start()
    try:
        yield worker
    finally:
        loop.call_soon_threadsafe(worker.stop)
        thread.join(30)
        loop.close()


def test_beside_a_running_worker_nothing_is_lost_or_stored_twice(conn, notes, running_worker):
    async def application() -> list:
        results = []
        async with await psycopg.AsyncConnection.connect(conn.info.dsn, autocommit=True) as app:
            for n in range(10):
                ids = list(range(1000 + 10 * n, 1010 + 10 * n))
                await app.execute("INSERT INTO notes SELECT g, 'note ' || g FROM unnest(%s::int[]) g", (ids,))
                await app.execute("UPDATE notes SET body = body || ' again' WHERE id = %s", (n + 1,))
                results.append(await sync_keys(conn.info.dsn, notes, [*ids, n + 1]))
        return results

    results = asyncio.run(application())
    assert all(r.ok for r in results), [k for r in results for k in r.keys if k.status not in ("stored", "fresh")]
    converge(conn, [body_expect(notes, "notes")])  # exactly the current content, no duplicates


def test_the_command_line(conn, dsn, notes):
    from typer.testing import CliRunner

    from pgembed.cli import app

    def cli(*args: str):
        return CliRunner().invoke(app, [*args, "--dsn", dsn], catch_exceptions=False)

    conn.execute("INSERT INTO notes VALUES (201, 'typed at the shell')")
    shown = cli("sync-now", notes, "201", "2")
    assert shown.exit_code == 0, shown.output
    assert "201" in shown.output and "stored" in shown.output and "fresh" in shown.output
    assert all(len(line) <= 80 for line in shown.output.splitlines())
    conn.execute("UPDATE notes SET body = 'again' WHERE id = 2")
    as_json = json.loads(cli("sync-now", notes, "2", "--json").stdout)
    assert as_json["ok"] and as_json["keys"] == [{"key": ["2"], "status": "stored", "error": None, "holder": None}]
    for args, message in [((notes, "[1, 2"), "not one"), ((notes, "[1, 2]"), "key has 1 column(s)"),
                          (("nosuch", "1"), "no pipeline or alias named 'nosuch'")]:
        refused = cli("sync-now", *args)
        assert refused.exit_code == 2 and message in refused.output and "Traceback" not in refused.output
    # a key that is not searchable yet (held elsewhere past the timeout) exits 1
    conn.execute("UPDATE notes SET body = 'held' WHERE id = 3")
    conn.execute("SELECT * FROM pgembed.claim('other', gen_random_uuid(), 10, 60)")
    held = cli("sync-now", notes, "3", "--timeout", "0.2")
    assert held.exit_code == 1 and "in_flight" in held.output and "held by other" in held.output


def test_from_sql_the_keys_go_first_and_the_wait_sees_the_worker_store_them(conn, notes):
    conn.execute("INSERT INTO notes SELECT g, 'backlog ' || g FROM generate_series(300, 399) g")
    conn.execute("SELECT pgembed.queue_all(%s, 'backfill')", (notes,))  # bulk work behind them
    conn.execute("SELECT pgembed.set_alias('notes', %s)", (notes,))
    with conn.transaction():  # in the application's own transaction, before its COMMIT
        conn.execute("INSERT INTO notes VALUES (400, 'the one the user waits for')")
        assert conn.execute("SELECT pgembed.sync_now('notes', '[400, 7, [\"399\"]]')").fetchone() == (3,)
    # first in line: the next claim takes exactly them (one pipeline, oldest first)
    lease = uuid.uuid4()
    claimed = conn.execute("SELECT key->>0, purpose FROM pgembed.claim('w', %s, 3, 60)", (lease,)).fetchall()
    assert sorted(claimed) == [("399", "sync"), ("400", "sync"), ("7", "sync")]
    conn.execute("UPDATE pgembed.outbox SET lease_id = NULL, leased_by = NULL, available_at = now() - "
                 "interval '1 hour' WHERE lease_id = %s", (lease,))
    # no worker: the wait ends at its timeout and says so
    assert conn.execute("SELECT key->>0, status FROM pgembed.wait_synced('notes', '[400]', 0.2)").fetchall() == [
        ("400", "queued")]


def test_from_sql_waiting_beside_a_running_worker(conn, notes, running_worker):
    conn.execute("INSERT INTO notes VALUES (500, 'waited for in SQL'), (501, 'and this one')")
    conn.execute("SELECT pgembed.sync_now(%s, '[500, 501]')", (notes,))
    rows = conn.execute("SELECT key->>0, status, error FROM pgembed.wait_synced(%s, '[500, 501, 12345]', 20)",
                        (notes,)).fetchall()
    assert rows == [("500", "searchable", None), ("501", "searchable", None), ("12345", "searchable", None)]
    assert {"500", "501"} <= set(stored(conn, notes))


def test_from_sql_a_parked_key_is_reported_failed(conn, notes):
    conn.execute("INSERT INTO pgembed.failures (pipeline, key, error, parked_at, class) "
                 "VALUES (%s, '[\"9\"]', 'rejected by the API', now(), 'input_rejected')", (notes,))
    assert conn.execute("SELECT status, error FROM pgembed.wait_synced(%s, '[9]', 5)", (notes,)).fetchall() == [
        ("failed", "rejected by the API")]
    # failed and backing off (retrying): failed too, with its error, once the wait is over
    conn.execute("UPDATE notes SET body = 'will fail' WHERE id = 10")
    conn.execute("UPDATE pgembed.outbox SET available_at = now() + interval '1 hour', attempts = 1")
    conn.execute("INSERT INTO pgembed.failures (pipeline, key, error) VALUES (%s, '[\"10\"]', 'HTTP 500')",
                 (notes,))
    assert conn.execute("SELECT status, error FROM pgembed.wait_synced(%s, '[10]', 0.1)", (notes,)).fetchall() == [
        ("failed", "HTTP 500")]


@pytest.mark.parametrize("call, message", [
    ("SELECT pgembed.sync_now('nosuch', '[1]')", "no pipeline or alias named 'nosuch'"),
    ("SELECT pgembed.sync_now('notes_hash', '{\"a\": 1}')", "keys must be a JSON array"),
    ("SELECT pgembed.sync_now('notes_hash', '[[1, 2]]')", "has a key of 1 column(s)"),
    ("SELECT pgembed.sync_now('notes_hash', '[null]')", "(not NULL)"),
    ("SELECT * FROM pgembed.wait_synced('notes_hash', '[1]', 1)", "COMMIT first"),
])
def test_from_sql_bad_calls_are_refused(conn, notes, call, message):
    with pytest.raises(psycopg.Error) as raised, conn.transaction():
        conn.execute("UPDATE notes SET body = 'written in this transaction' WHERE id = 1")
        conn.execute(call)
    text = str(raised.value) + (raised.value.diag.message_hint or "")
    assert message in text
    assert outbox(conn) == []  # the transaction's write rolled back with it


def test_from_sql_the_wait_refuses_a_fixed_snapshot(conn, notes):
    with pytest.raises(psycopg.Error, match="needs READ COMMITTED"), conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        conn.execute("SELECT * FROM pgembed.wait_synced('notes_hash', '[1]', 1)")


def test_who_may_write_through(conn, dsn, notes, login):  # noqa: F811 (the fixture)
    """A pgembed_worker login may run sync_keys (the worker's rights: the queue, the cache,
    failures, usage); an application role may call the SQL pair once the DBA grants it, and
    still reads nothing of pgembed's."""
    conn.execute("GRANT SELECT ON notes TO pgembed_worker")
    conn.execute("INSERT INTO notes VALUES (600, 'through a worker login'), (601, 'from the application')")
    worker = login("IN ROLE pgembed_worker")
    result = asyncio.run(sync_keys(make_conninfo(dsn, user=worker), notes, [600]))
    assert statuses(result) == {"600": "stored"}
    app = login()
    conn.execute(f"GRANT USAGE ON SCHEMA pgembed TO {app}")
    with psycopg.connect(make_conninfo(dsn, user=app), autocommit=True) as a:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            a.execute("SELECT pgembed.sync_now(%s, '[601]')", (notes,))
        conn.execute(f"GRANT EXECUTE ON FUNCTION pgembed.sync_now(text, jsonb), "
                     f"pgembed.wait_synced(text, jsonb, double precision) TO {app}")
        assert a.execute("SELECT pgembed.sync_now(%s, '[601]')", (notes,)).fetchone() == (1,)
        assert a.execute("SELECT status FROM pgembed.wait_synced(%s, '[601]', 0.1)", (notes,)).fetchall() == [
            ("queued",)]
        for forbidden in ("SELECT * FROM pgembed.outbox", "SELECT * FROM pgembed.failures"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                a.execute(forbidden)


def test_keys_of_a_big_statement_and_a_retrying_key_are_taken_at_once(conn, notes):
    conn.execute("INSERT INTO notes SELECT g, 'bulk ' || g FROM generate_series(2000, 3499) g")  # a statement
    assert conn.execute("SELECT pgembed.statement_keys()").fetchone() == (1500,)
    conn.execute("UPDATE notes SET body = 'backing off' WHERE id = 11")
    conn.execute("UPDATE pgembed.outbox SET available_at = now() + interval '1 hour', attempts = 2 "
                 "WHERE key = '[\"11\"]'")
    result = asyncio.run(sync_keys(conn.info.dsn, notes, [3499, 11]))
    assert statuses(result) == {"3499": "stored", "11": "stored"}
    assert stored(conn, notes)["11"] == "backing off"
    assert drain(conn.info.dsn).written == 1499  # the rest of the statement, by the worker
