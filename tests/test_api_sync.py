"""The worker against a real openai client and a local OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from pgembed import pipelines
from pgembed.worker import Worker, WorkerConfig
from tests.conftest import drain

MODEL = "openai:text-embedding-3-small"
SMALL = pipelines.PipelineOptions(dimensions=64)


@pytest.mark.parametrize("prefetch", [0, 3])
def test_identical_text_is_embedded_once_across_tables(conn, dsn, fake_api, prefetch):
    """With batches read ahead, several ask for the text before any has cached it: the
    worker still sends it once (the others wait for that answer)."""
    for table in ("a", "b"):
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, body text)")
        conn.execute(f"INSERT INTO {table} SELECT g, 'the same sentence' FROM generate_series(1, 500) g")
        pipelines.create(conn, table, "body", MODEL, SMALL)
    drain(dsn, batch_size=100, prefetch=prefetch)
    assert fake_api.inputs == 1
    assert conn.execute("SELECT count(*) FROM pgembed.a_te3s_64").fetchone()[0] == 500
    assert conn.execute("SELECT count(*) FROM pgembed.b_te3s_64").fetchone()[0] == 500
    hits, misses = conn.execute("SELECT sum(cache_hits), sum(cache_misses) FROM pgembed.usage").fetchone()
    assert (hits, misses) == (999, 1)

    requests = fake_api.requests
    conn.execute("SELECT pgembed.queue_all('a_te3s_64', 'repair'), pgembed.queue_all('b_te3s_64', 'repair')")
    drain(dsn, batch_size=100)
    assert fake_api.requests == requests, "a second run over unchanged rows calls nobody"


def test_row_updated_while_embedded_ends_with_newest_content(conn, dsn, fake_api):
    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO notes VALUES (1, 'first draft')")
    pipelines.create(conn, "notes", "body", MODEL, SMALL)
    fake_api.latency(1.0)
    worker = Worker(dsn, WorkerConfig(until_empty=True, concurrency=1))
    thread = threading.Thread(target=lambda: asyncio.run(worker.run()))
    thread.start()
    deadline = time.monotonic() + 10
    while fake_api.in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake_api.in_flight == 1, "the embedding request is under way"
    conn.execute("UPDATE notes SET body = 'final text' WHERE id = 1")
    thread.join(30)
    assert not thread.is_alive()
    assert worker.stats.changed == 1
    assert conn.execute("SELECT chunk FROM pgembed.notes_te3s_64").fetchall() == [("final text",)]
    assert conn.execute("SELECT count(*) FROM pgembed.outbox").fetchone()[0] == 0


def test_transient_api_errors_are_retried_until_every_row_lands(conn, dsn, fake_api):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO t SELECT g, 'text number ' || g FROM generate_series(1, 200) g")
    pipelines.create(conn, "t", "body", MODEL, SMALL)
    fake_api.fail_next(2, status=429, retry_after=0.1)
    drain(dsn, batch_size=50)
    fake_api.fail_next(2, status=500)
    conn.execute("UPDATE t SET body = body || ' v2' WHERE id <= 100")
    drain(dsn, batch_size=50)
    fake_api.hang(1, seconds=5)
    conn.execute("UPDATE t SET body = body || ' v3' WHERE id <= 50")
    drain(dsn, batch_size=50)
    assert fake_api.statuses[429] == 2 and fake_api.statuses[500] == 2
    rows = conn.execute("SELECT t.body = d.chunk FROM t JOIN pgembed.t_te3s_64 d USING (id)").fetchall()
    assert len(rows) == 200 and all(ok for (ok,) in rows)
    assert conn.execute("SELECT count(*) FROM pgembed.failures").fetchone()[0] == 0


def test_outage_beyond_retries_releases_the_batch_without_losing_it(conn, dsn, fake_api, monkeypatch):
    monkeypatch.setenv("PGEMBED_OPENAI_MAX_ATTEMPTS", "2")
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 10) g")
    pipelines.create(conn, "t", "body", MODEL, SMALL)
    fake_api.fail_next(2, status=503)
    stats = drain(dsn)
    assert stats.provider_errors == 1
    assert conn.execute("SELECT count(*) FROM pgembed.failures").fetchone()[0] == 0, "not the rows' fault"
    drain(dsn)
    assert conn.execute("SELECT count(*) FROM pgembed.t_te3s_64").fetchone()[0] == 10


def test_rejected_input_fails_alone_and_the_rest_of_the_batch_lands(conn, dsn, fake_api):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO t SELECT g, 'fine text ' || g FROM generate_series(1, 63) g")
    conn.execute("INSERT INTO t VALUES (64, 'poison pill')")
    pipelines.create(conn, "t", "body", MODEL, SMALL)
    fake_api.always_reject("poison")
    drain(dsn, batch_size=64, max_attempts=1)
    assert conn.execute("SELECT count(*) FROM pgembed.t_te3s_64").fetchone()[0] == 63
    key, error, parked = conn.execute("SELECT key, error, parked_at IS NOT NULL FROM pgembed.failures").fetchone()
    assert key == ["64"] and parked
    assert "poison" in error or "invalid" in error.lower()
    assert conn.execute("SELECT count(*) FROM pgembed.outbox").fetchone()[0] == 0


def test_failures_park_and_can_be_retried(conn, dsn, fake_api):
    """A content expression that raises raises again: its class (content_error) parks it at
    the first attempt (backoff up to --max-attempts: tests/test_failure_classes.py)."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO t VALUES (1, 'ok'), (2, ''), (3, ''), (4, '')")
    pipelines.create(conn, "t", "body || (1 / length(body))::text", MODEL, SMALL)
    drain(dsn, max_attempts=3)  # retry_base 0: each failure is retried at once
    failures = dict(conn.execute("SELECT key->>0, error FROM pgembed.failures WHERE parked_at IS NOT NULL"))
    assert failures == {k: "content expression failed: division by zero" for k in ("2", "3", "4")}
    assert conn.execute("SELECT max(attempts) FROM pgembed.failures").fetchone()[0] == 1
    conn.execute("UPDATE t SET body = 'now fine' WHERE id = 2")
    drain(dsn, max_attempts=3)
    assert conn.execute("SELECT count(*) FROM pgembed.failures WHERE key = '[\"2\"]'").fetchone()[0] == 0
    assert conn.execute("SELECT pgembed.retry_failures()").fetchone()[0] == 2
    assert conn.execute("SELECT count(*) FROM pgembed.outbox WHERE purpose = 'retry'").fetchone()[0] == 2


def test_garbage_from_the_api_is_never_stored(conn, dsn, fake_api):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO t SELECT g, 'text ' || g FROM generate_series(1, 4) g")
    pipelines.create(conn, "t", "body", MODEL, SMALL)
    fake_api.garbage("nan", 1)
    drain(dsn, max_attempts=1)
    stored = conn.execute("SELECT count(*) FROM pgembed.t_te3s_64").fetchone()[0]
    errors = [e for (e,) in conn.execute("SELECT error FROM pgembed.failures")]
    assert errors and all("NaN" in e for e in errors)
    assert stored + len(errors) == 4


@pytest.mark.parametrize(("kind", "message"), [("huge", "out of range for a float4 vector"),
                                               ("zero", "all-zero vector")])
def test_a_vector_float4_cannot_hold_or_without_direction_is_a_row_failure(conn, dsn, fake_api, kind, message):
    """1e39 is finite in JSON but infinite in float4 (storing it crashed the acknowledgement,
    and the rows came back to crash it again); an all-zero vector was stored, and its cosine
    distance is NaN, so search silently found nothing."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO t SELECT g, 'text ' || g FROM generate_series(1, 4) g")
    pipelines.create(conn, "t", "body", MODEL, SMALL)
    fake_api.garbage(kind, 1)
    stats = drain(dsn, max_attempts=1, batch_size=4)
    errors = [e for (e,) in conn.execute("SELECT error FROM pgembed.failures")]
    assert stats.failed == 1 and len(errors) == 1 and message in errors[0], errors
    assert conn.execute("SELECT count(*) FROM pgembed.t_te3s_64").fetchone()[0] == 3
    assert conn.execute("SELECT count(*) FROM pgembed.t_te3s_64 WHERE embedding <=> embedding = 'NaN'"
                        ).fetchone()[0] == 0
