"""pgembed.acknowledge, the one statement that acknowledges a batch, driven directly through
the worker's Queue: what it writes for each kind of row (current, changed since the read,
no longer held, failed, gone), that a vector no stored chunk carries still reaches the cache,
and that a claim's commit is not waited for while an acknowledgement's is."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import psycopg

from pgembed import db, pipelines
from pgembed.cache import chunk_key, document_hash
from pgembed.queue import Chunk, Outcome, Queue, Usage

MODEL = "hash:4"
NO_INDEX = pipelines.PipelineOptions(index="none")


def vec(*values: float) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


async def _acknowledge(dsn: str, build) -> tuple:
    pool = db.worker_pool(dsn, "ack-test", max_size=2)
    await pool.open()
    try:
        queue = Queue(pool, "ack-test")
        info = (await queue.pipelines())["t_h4"]
        batch = await queue.claim(10, 60, "", None)
        assert batch is not None
        outcomes, new_cache, usage = build(info, {c.key: c for c in batch.rows})
        return await queue.acknowledge(info, batch, outcomes, new_cache, usage, max_attempts=3, retry_base=1.0), batch
    finally:
        await pool.close()


def test_each_kind_of_row_gets_its_due(dsn: str, conn: psycopg.Connection) -> None:
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO t SELECT i, 'row ' || i FROM generate_series(1, 5) AS i")
    assert pipelines.create(conn, "t", "body", MODEL, NO_INDEX) == "t_h4"
    cached_only = chunk_key(MODEL, 4, "a sibling chunk of a failed row")
    fresh = chunk_key(MODEL, 4, "row 1")

    def build(info, claimed):
        # row 3 changes after the read; row 4's lease is taken over by another worker
        conn.execute("UPDATE t SET body = 'row 3, again' WHERE id = 3")
        conn.execute("UPDATE pgembed.outbox SET lease_id = gen_random_uuid() WHERE key = '[\"4\"]'")
        ok = Outcome(claimed[("1",)], [Chunk(0, "row 1", fresh, vec(1, 0, 0, 0))], document_hash("row 1"))
        failed = Outcome(claimed[("2",)], error="chunk 1: provider returned an all-zero vector (it has no direction)")
        changed = Outcome(claimed[("3",)], [Chunk(0, "row 3", b"3" * 32, vec(0, 1, 0, 0))], document_hash("row 3"))
        lost = Outcome(claimed[("4",)], [Chunk(0, "row 4", b"4" * 32, vec(0, 0, 1, 0))], document_hash("row 4"))
        gone = Outcome(claimed[("5",)], gone=True)
        new_cache = {fresh: (vec(1, 0, 0, 0), 2), cached_only: (vec(0, 0, 0, 1), 7)}
        return [ok, failed, changed, lost, gone], new_cache, [Usage("backfill", None, 1, 2, 9, 0, 2)]

    result, batch = asyncio.run(_acknowledge(dsn, build))
    assert (result.written, result.removed, result.failed, result.changed, result.lost) == (1, 1, 1, 1, 1)
    assert result.skipped == [("4",)]
    assert conn.execute("SELECT id, chunk FROM pgembed.t_h4").fetchall() == [(1, "row 1")]
    assert dict(conn.execute("SELECT content_hash, tokens FROM pgembed.embedding_cache")) == {
        fresh: 2, cached_only: 7}
    outbox = {k[0]: (lease, v) for k, lease, v in conn.execute("SELECT key, lease_id, version FROM pgembed.outbox")}
    assert set(outbox) == {"2", "3", "4"}  # done and gone rows left the queue
    assert outbox["3"] == (None, 2)  # changed: back in line, unleased, for its new text
    assert outbox["4"][0] not in (None, batch.lease)  # not ours any more: untouched
    assert conn.execute("SELECT key->>0, class, attempts FROM pgembed.failures").fetchall() == [
        ("2", "bad_vector", 1)]
    assert conn.execute("SELECT purpose, requests, inputs, tokens, cache_misses, worker FROM pgembed.usage"
                        ).fetchall() == [("backfill", 1, 2, 9, 2, "ack-test")]


def test_a_worker_that_lost_its_lease_writes_nothing_but_what_it_paid_for(dsn: str, conn: psycopg.Connection) -> None:
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO t VALUES (1, 'one')")
    pipelines.create(conn, "t", "body", MODEL, NO_INDEX)
    h = chunk_key(MODEL, 4, "one")

    def build(info, claimed):
        conn.execute("UPDATE pgembed.outbox SET available_at = now() - interval '1 second'")  # expired
        outcome = Outcome(claimed[("1",)], [Chunk(0, "one", h, vec(1, 1, 0, 0))], document_hash("one"))
        return [outcome], {h: (vec(1, 1, 0, 0), 1)}, [Usage("backfill", None, 1, 1, 1, 0, 1)]

    result, _ = asyncio.run(_acknowledge(dsn, build))
    assert (result.written, result.lost, result.skipped) == (0, 1, [("1",)])
    assert conn.execute("SELECT count(*) FROM pgembed.t_h4").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM pgembed.embedding_cache").fetchone() == (1,)
    assert conn.execute("SELECT count(*) FROM pgembed.usage").fetchone() == (1,)
    assert conn.execute("SELECT count(*) FROM pgembed.outbox").fetchone() == (1,)


def test_a_claim_does_not_wait_for_its_flush_an_acknowledgement_does(conn: psycopg.Connection) -> None:
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO t VALUES (1, 'one')")
    pipelines.create(conn, "t", "body", MODEL, NO_INDEX)
    with conn.transaction():
        conn.execute("SELECT * FROM pgembed.claim('w', %s, 10, 60)", (uuid.uuid4(),))
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("off",)
    assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
