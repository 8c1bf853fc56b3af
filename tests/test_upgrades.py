"""A database created by revision 0001 as it first shipped, with rows in every stage of the
flow, upgrades to head with nothing lost, and a worker of this version then drains it."""

from __future__ import annotations

import psycopg
from pgvector.psycopg import register_vector

from pgembed import migrate
from pgembed.cache import chunk_key, document_hash
from pgembed.chunking import chunk_text
from pgembed.providers.hashing import hash_array
from pgembed.schema import revision_sql
from tests.conftest import drain
from tests.reliability.convergence import Expect, converge

BODIES = {i: f"note {i}: it's a $body$ with 'quotes'\nand a second line" for i in range(1, 9)}


def _as_0001_worker_left_it(conn: psycopg.Connection) -> None:
    """What a 0001 worker and application leave behind: notes 1-3 embedded (vectors and
    cache), 4-5 leased by a worker that is still embedding them, 6 parked as a failure,
    7-8 queued."""
    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text NOT NULL)")
    conn.execute("INSERT INTO notes SELECT * FROM unnest(%s::int[], %s::text[])",
                 (list(BODIES), list(BODIES.values())))
    conn.execute("SELECT pgembed.create_pipeline('notes', 'body', 'hash:8', name => 'notes')")
    for i in (1, 2, 3):
        text, vector = BODIES[i], hash_array(BODIES[i], 8)
        conn.execute("INSERT INTO pgembed.notes (id, chunk_seq, chunk, content_hash, chunk_hash, embedding) "
                     "VALUES (%s, 0, %s, %s, %s, %s)",
                     (i, text, document_hash(text), chunk_key("hash:8", 8, text), vector))
        conn.execute("INSERT INTO pgembed.embedding_cache (content_hash, model, dimensions, embedding, tokens) "
                     "VALUES (%s, 'hash:8', 8, %s, 5)", (chunk_key("hash:8", 8, text), vector))
    conn.execute("DELETE FROM pgembed.outbox WHERE key IN ('[\"1\"]', '[\"2\"]', '[\"3\"]', '[\"6\"]')")
    conn.execute("INSERT INTO pgembed.failures (pipeline, key, error, attempts, parked_at) "
                 "VALUES ('notes', '[\"6\"]', 'the API said no', 5, now())")
    conn.execute("UPDATE pgembed.outbox SET lease_id = gen_random_uuid(), leased_by = 'old-worker', "
                 "available_at = now() + interval '1 hour' WHERE key IN ('[\"4\"]', '[\"5\"]')")


def _state(conn: psycopg.Connection) -> dict[str, object]:
    return {
        "pipelines": conn.execute("SELECT name, content, model, destination FROM pgembed.pipelines").fetchall(),
        "vectors": conn.execute("SELECT id, chunk, embedding::text FROM pgembed.notes ORDER BY id").fetchall(),
        "cache": conn.execute("SELECT count(*) FROM pgembed.embedding_cache").fetchone(),
        "outbox": conn.execute("SELECT key, version, purpose, lease_id, leased_by, available_at "
                               "FROM pgembed.outbox ORDER BY key").fetchall(),
        "failures": conn.execute("SELECT key, error, parked_at FROM pgembed.failures").fetchall(),
    }


def test_first_shipped_0001_with_data_upgrades_and_drains(empty_dsn):
    migrate.upgrade(empty_dsn, "0001")
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        register_vector(conn)
        _as_0001_worker_left_it(conn)
        before = _state(conn)
    migrate.upgrade(empty_dsn)
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        register_vector(conn)
        assert _state(conn) == before, "the upgrade changed rows"
        capture = conn.execute("SELECT pg_get_functiondef('pgembed.p1_capture'::regproc)").fetchone()[0]
        assert "pgembed.enqueue" in capture, "pipeline code was not regenerated"
        conn.execute("UPDATE notes SET body = body || ' (edited)' WHERE id = 8")  # the new trigger queues it
        conn.execute("UPDATE pgembed.outbox SET available_at = now() WHERE leased_by = 'old-worker'")  # lease over
        drain(empty_dsn)
        conn.execute("SELECT pgembed.retry_failures()")
        drain(empty_dsn)
        converge(conn, [Expect("notes", "notes", ["id"], ["body"], lambda body: body)], timeout=5)
        assert conn.execute("SELECT count(*) FROM pgembed.notes").fetchone() == (8,)


FAILURES_0002 = {
    "2": ("content expression failed: division by zero", "content_error"),
    "3": ("chunk 1: input has 9000 tokens, over the model's limit of 8191", "too_long"),
    "4": ("rejected by the API (HTTP 400): Invalid 'input'", "input_rejected"),
    "5": ("provider returned a vector containing NaN or Infinity", "bad_vector"),
    "6": ("embedding API returned 3 embeddings for 4 inputs", "provider_unavailable"),
    "7": ("the API said no", "unknown"),
}


def test_0002_with_failures_and_workers_upgrades_classified_and_keeps_its_workers(empty_dsn):
    """Failures recorded before classes get the class their message says (else unknown);
    workers keep their rows, and one found dead after the upgrade is marked, not deleted."""
    migrate.upgrade(empty_dsn, "0001")
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        register_vector(conn)
        _as_0001_worker_left_it(conn)
    migrate.upgrade(empty_dsn, "0002")
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        # 0002 as it shipped: its definitions too (frozen for 0003's downgrade)
        conn.execute(revision_sql("0003_failure_classes_and_dead_workers.down.definitions.sql"))
        conn.execute("DELETE FROM pgembed.failures")
        for key, (error, _) in FAILURES_0002.items():
            conn.execute("INSERT INTO pgembed.failures (pipeline, key, error, attempts, parked_at) "
                         "VALUES ('notes', jsonb_build_array(%s::text), %s, 5, now())", (key, error))
        conn.execute("INSERT INTO pgembed.workers (name, host, pid, version, state, started_at, last_seen) "
                     "VALUES ('old-worker', 'h', 1, '0.2', 'running', now() - interval '1 hour', "
                     "now() - interval '1 hour'), ('live', 'h', 2, '0.2', 'stopping', now(), now())")
    migrate.upgrade(empty_dsn)
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        classes = dict(conn.execute("SELECT key->>0, class FROM pgembed.failures"))
        assert classes == {key: cls for key, (_, cls) in FAILURES_0002.items()}
        assert conn.execute("SELECT count(*) FROM pgembed.failures WHERE attempts = 5 AND parked_at IS NOT NULL"
                            ).fetchone() == (len(FAILURES_0002),), "nothing else changed"
        assert conn.execute("SELECT worker, rows FROM pgembed.release_dead_workers(60, 'live')").fetchall() == [
            ("old-worker", 2)]
        assert dict(conn.execute("SELECT name, state FROM pgembed.workers")) == {"old-worker": "dead",
                                                                                 "live": "stopping"}
        assert conn.execute("SELECT pgembed.retry_failures(class => 'too_long')").fetchone() == (1,)


def test_0002_with_data_upgrades_and_its_pipelines_keep_their_chunking(empty_dsn):
    """Revision 0004 (chunking that fits the model) keeps what pipelines did: chunk_tokens 0
    stays unchunked ('none'), chunk_tokens N stays cl100k windows ('tokens'); stored vectors
    stay, with truncated = false, and the regenerated store writes the new column."""
    migrate.upgrade(empty_dsn, "0002")
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        register_vector(conn)
        conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text NOT NULL)")
        conn.execute("INSERT INTO notes SELECT * FROM unnest(%s::int[], %s::text[])",
                     (list(BODIES), list(BODIES.values())))
        conn.execute("SELECT pgembed.create_pipeline('notes', 'body', 'hash:8', name => 'whole')")
        conn.execute("SELECT pgembed.create_pipeline('notes', 'body', 'hash:8', chunk_tokens => 6, "
                     "chunk_overlap => 2, name => 'windows')")
        text = BODIES[1]
        conn.execute("INSERT INTO pgembed.whole (id, chunk_seq, chunk, content_hash, chunk_hash, embedding) "
                     "VALUES (1, 0, %s, %s, %s, %s)",
                     (text, document_hash(text), chunk_key("hash:8", 8, text), hash_array(text, 8)))
        conn.execute("DELETE FROM pgembed.outbox WHERE pipeline = 'whole' AND key = '[\"1\"]'")
    migrate.upgrade(empty_dsn)
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        register_vector(conn)
        assert conn.execute("SELECT name, chunking, chunk_tokens, chunk_overlap FROM pgembed.pipelines "
                            "ORDER BY name").fetchall() == [("whole", "none", 0, 0), ("windows", "tokens", 6, 2)]
        assert conn.execute("SELECT chunk, truncated FROM pgembed.whole").fetchall() == [(text, False)]
        drain(empty_dsn)
        assert conn.execute("SELECT id, chunk FROM pgembed.whole ORDER BY id").fetchall() == sorted(BODIES.items())
        windows = conn.execute("SELECT id, chunk FROM pgembed.windows ORDER BY id, chunk_seq").fetchall()
        assert windows == [(i, c) for i, body in sorted(BODIES.items()) for c in chunk_text(body, 6, 2)]


def _pipelines_and_vectors(conn: psycopg.Connection) -> dict[str, object]:
    return {
        "pipelines": conn.execute("SELECT name, index_type, dimensions FROM pgembed.pipelines "
                                  "ORDER BY name").fetchall(),
        "vectors": conn.execute("SELECT id, chunk, embedding::text FROM pgembed.notes ORDER BY id").fetchall(),
        "halved": conn.execute("SELECT id, embedding::text FROM pgembed.halved ORDER BY id").fetchall(),
    }


def test_0004_with_vectors_upgrades_to_vector_storage_and_keeps_searching(empty_dsn):
    """A database at the previous revision (down from head: a vector pipeline and a halfvec
    one at 3,072 dimensions, which 0004 cannot index) upgrades: both are `vector`, without
    quantization, their vectors kept; new writes sync and searches answer."""
    migrate.upgrade(empty_dsn)
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        register_vector(conn)
        conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text NOT NULL)")
        conn.execute("INSERT INTO notes SELECT * FROM unnest(%s::int[], %s::text[])",
                     (list(BODIES), list(BODIES.values())))
        conn.execute("SELECT pgembed.create_pipeline('notes', 'body', 'hash:8', name => 'notes')")
        conn.execute("SELECT pgembed.create_pipeline('notes', 'body', 'hash:3072', name => 'halved', "
                     "storage => 'halfvec')")
        conn.execute("SELECT pgembed.create_pipeline('notes', 'body', 'hash:8', name => 'bits', "
                     "quantization => 'binary', index_options => '{\"m\": 8}')")
        drain(empty_dsn)
    migrate.downgrade(empty_dsn, "0004")
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        register_vector(conn)
        before = _pipelines_and_vectors(conn)
        assert before["pipelines"] == [("bits", "hnsw", 8), ("halved", "none", 3072), ("notes", "hnsw", 8)], \
            "0004 cannot index 3,072 dimensions: the downgrade leaves that pipeline without an index"
        [bits] = conn.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'bits' "
                              "AND indexdef LIKE '%hnsw%'").fetchone()
        assert "embedding vector_cosine_ops" in bits and "m='8'" in bits, "the index 0004 gives it, its options kept"
    migrate.upgrade(empty_dsn)
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        register_vector(conn)
        assert _pipelines_and_vectors(conn) == before, "the upgrade changed rows"
        assert conn.execute("SELECT DISTINCT storage, quantization, rerank FROM pgembed.pipelines").fetchall() == [
            ("vector", "none", None)]
        conn.execute("UPDATE notes SET body = body || ' (edited)' WHERE id = 8")
        drain(empty_dsn)
        hits = conn.execute("SELECT key->>'id' FROM pgembed.search('notes', %s::real[], 3)",
                            (list(map(float, hash_array(BODIES[8] + " (edited)", 8))),)).fetchall()
        assert len(hits) == 3 and hits[0] == ("8",)
        report = conn.execute("SELECT missing, orphaned, stale FROM pgembed.audit()").fetchall()
        assert report == [(0, 0, 0)]
