"""Deferred indexes: a large backfill loads first, a worker builds the HNSW index after; an
IVFFlat index waits for rows to train on. Until then search is exact."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import psycopg

from pgembed import indexes, pipelines, search
from pgembed.providers.hashing import hash_array
from tests.conftest import drain

ROWS = 10_000  # pgembed.defer_index_rows()


def vector_indexes(conn, destination: str) -> list[tuple[str, bool]]:
    return conn.execute(
        "SELECT am.amname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_am am ON am.oid = c.relam WHERE i.indrelid = format('pgembed.%%I', %s::text)::regclass "
        "AND NOT i.indisprimary", (destination,)).fetchall()


def populated(conn, rows: int) -> None:
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text NOT NULL)")
    conn.execute("INSERT INTO docs SELECT g, 'verse ' || g || CASE WHEN g %% 7 = 0 THEN ' light' ELSE '' END "
                 "FROM generate_series(1, %s) g", (rows,))


def test_a_large_backfill_defers_the_hnsw_index_until_the_worker_has_loaded_it(conn, dsn):
    populated(conn, ROWS)
    notices: list[str] = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
    name = pipelines.create(conn, "docs", "body", "hash:64")
    assert vector_indexes(conn, name) == []
    assert any("built once its 10000 rows are embedded" in n for n in notices), notices
    assert conn.execute("SELECT rows_queued FROM pgembed.deferred_indexes").fetchone() == (ROWS,)

    drain(dsn, batch_size=500)

    assert vector_indexes(conn, name) == [("hnsw", True)]
    assert conn.execute("SELECT count(*) FROM pgembed.deferred_indexes").fetchone() == (0,)
    assert conn.execute(f"SELECT count(*) FROM pgembed.{name}").fetchone() == (ROWS,)
    conn.execute("UPDATE docs SET body = 'a lighthouse on the rocky shore' WHERE id = 4242")
    drain(dsn)
    # through the index that was built (approximate: a parallel build's graph differs run to
    # run, so the exact match is asked for among ten, not first of three)
    hits = search.search(conn, name, "a lighthouse on the rocky shore", k=10)
    assert {"id": 4242} in [h.key for h in hits]
    assert min(h.distance for h in hits) < 1e-6


def test_a_small_backfill_and_a_backfill_without_index_get_their_index_at_once(conn):
    populated(conn, ROWS - 1)
    small = pipelines.create(conn, "docs", "body", "hash:16")
    assert vector_indexes(conn, small) == [("hnsw", True)]
    conn.execute("INSERT INTO docs VALUES (%s, 'one more')", (ROWS,))
    none = pipelines.create(conn, "docs", "body", "hash:8", pipelines.PipelineOptions(index="none"))
    assert vector_indexes(conn, none) == []
    assert conn.execute("SELECT count(*) FROM pgembed.deferred_indexes").fetchone() == (0,)


def test_bad_index_options_are_refused_at_creation_even_when_deferred(conn):
    populated(conn, ROWS)
    try:
        pipelines.create(conn, "docs", "body", "hash:16", pipelines.PipelineOptions(index_options={"lists": 3}))
    except pipelines.PipelineError as error:
        assert "hnsw index options" in str(error)
    else:
        raise AssertionError("bad options were accepted")
    assert conn.execute("SELECT count(*) FROM pgembed.pipelines").fetchone() == (0,)


def test_an_interrupted_build_is_cleaned_up_and_a_failed_one_is_reported_once(conn, dsn, caplog):
    populated(conn, ROWS)
    name = pipelines.create(conn, "docs", "body", "hash:16", pipelines.PipelineOptions(backfill=True))
    conn.execute("DELETE FROM pgembed.outbox")  # pretend the backfill is over
    # what a cancelled CREATE INDEX CONCURRENTLY leaves behind: an INVALID index
    conn.execute(f"CREATE INDEX leftover ON pgembed.{name} USING hnsw (embedding vector_cosine_ops)")
    conn.execute("UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'pgembed.leftover'::regclass")
    assert asyncio.run(indexes.build_ready(dsn, "64MB", set())) == [name]
    assert vector_indexes(conn, name) == [("hnsw", True)]
    assert conn.execute("SELECT to_regclass('pgembed.leftover')").fetchone() == (None,)

    # a role that does not own the destination cannot build: one warning, then left alone
    conn.execute("INSERT INTO pgembed.deferred_indexes (pipeline, rows_queued) VALUES (%s, 1)", (name,))
    conn.execute("DROP ROLE IF EXISTS pgembed_test_noowner")
    conn.execute("CREATE ROLE pgembed_test_noowner LOGIN")
    conn.execute("GRANT USAGE ON SCHEMA pgembed TO pgembed_test_noowner")
    conn.execute("GRANT SELECT, DELETE ON ALL TABLES IN SCHEMA pgembed TO pgembed_test_noowner")
    try:
        weak = psycopg_dsn(dsn, "pgembed_test_noowner")
        skip: set[str] = set()
        with caplog.at_level(logging.WARNING, logger="pgembed.indexes"):
            assert asyncio.run(indexes.build_ready(weak, "64MB", skip)) == []
            assert asyncio.run(indexes.build_ready(weak, "64MB", skip)) == []
        warnings = [r for r in caplog.records if getattr(r, "action", "") == "index_failed"]
        assert len(warnings) == 1 and "must be owner" in warnings[0].getMessage()
        assert skip == {name}
    finally:
        conn.execute("DROP OWNED BY pgembed_test_noowner")
        conn.execute("DROP ROLE pgembed_test_noowner")


def psycopg_dsn(dsn: str, user: str) -> str:
    from psycopg.conninfo import make_conninfo

    return make_conninfo(dsn, user=user, password=None)


def exact_distances(conn, name: str, query: np.ndarray, k: int) -> list[float]:
    """The k smallest cosine distances of rows to the query, in numpy over the stored vectors."""
    stored = np.array([r[0] for r in conn.execute(f'SELECT embedding::real[] FROM pgembed."{name}"')],
                      dtype=np.float64)
    unit = stored / np.linalg.norm(stored, axis=1, keepdims=True)
    return sorted((1 - unit @ (query / np.linalg.norm(query))).tolist())[:k]


def test_a_pipeline_whose_index_is_deferred_answers_by_exact_search(conn, dsn):
    """What create_pipeline leaves for a large backfill (no index yet, a deferred_indexes
    row), here on a binary-quantized pipeline, whose index search would otherwise read by
    Hamming distance: the search orders by the stored vectors, exactly."""
    populated(conn, 400)
    name = pipelines.create(conn, "docs", "body", "hash:64",
                            pipelines.PipelineOptions(quantization="binary", rerank=2))
    drain(dsn)
    [index] = conn.execute("SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = "
                           "format('pgembed.%%I', %s::text)::regclass AND NOT indisprimary", (name,)).fetchone()
    conn.execute(f"DROP INDEX {index}")
    conn.execute("INSERT INTO pgembed.deferred_indexes (pipeline, rows_queued) VALUES (%s, 400)", (name,))
    for text in ("verse 12 light", "verse 300", "light"):
        query = hash_array(text, 64)
        hits = search.search(conn, name, vector=query, k=10)
        assert np.allclose([h.distance for h in hits], exact_distances(conn, name, query, 10), atol=1e-6)


def test_an_ivfflat_index_waits_for_rows_to_train_on_then_search_probes_it(conn, dsn):
    populated(conn, 600)
    notices: list[str] = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
    name = pipelines.create(conn, "docs", "body", "hash:8", pipelines.PipelineOptions(index="ivfflat"))
    assert any("IVFFlat index of pgembed.docs_h8 is built once it holds 1000 rows" in n for n in notices), notices
    drain(dsn)
    assert vector_indexes(conn, name) == [], "600 rows: too few to train 10 lists on"
    assert conn.execute("SELECT count(*) FROM pgembed.index_builds").fetchone() == (0,)
    query = hash_array("verse 42 light", 8)
    hits = search.search(conn, name, vector=query, k=10)
    assert np.allclose([h.distance for h in hits], exact_distances(conn, name, query, 10), atol=1e-6), \
        "no index yet: exact search"

    conn.execute("INSERT INTO docs SELECT g, 'verse ' || g FROM generate_series(601, 2400) g")
    drain(dsn)
    assert vector_indexes(conn, name) == [("ivfflat", True)]
    assert conn.execute("SELECT lists, rows_at_build FROM pgembed.index_builds").fetchone() == (10, 2400)
    assert conn.execute("SELECT count(*) FROM pgembed.deferred_indexes").fetchone() == (0,)
    conn.execute("SET enable_seqscan = off")
    # what search probes (it puts the caller's setting back before it returns): sqrt(10
    # lists) + the lists 40 chunks fill
    assert conn.execute("SELECT pgembed.ivfflat_probes(10, 2400, 40)").fetchone() == (5,)
    found = total = 0
    for text in ("verse 42 light", "verse 1999", "light", "verse 7"):
        query = hash_array(text, 8)
        with conn.transaction():
            hits = search.search(conn, name, vector=query, k=10)
            assert conn.execute("SELECT current_setting('ivfflat.probes')").fetchone() == ("1",), \
                "the caller's probes again after the search"
        kth = exact_distances(conn, name, query, 10)[-1]
        assert len(hits) == 10
        found += sum(h.distance <= kth + 1e-6 for h in hits)
        total += 10
    assert found / total >= 0.9, found / total


def test_an_untrained_ivfflat_index_of_0005_becomes_a_deferred_one(empty_dsn):
    """Before 0006 create_pipeline made the IVFFlat index on the empty table; the upgrade
    drops such an index (never trained: no index_builds row) and defers it, so that a worker
    builds it once the rows are there and searches are exact until then."""
    from pgembed import migrate
    from pgembed.schema import revision_sql

    migrate.upgrade(empty_dsn, "0005")
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        # 0005's definitions as shipped, frozen for 0006's downgrade
        conn.execute(revision_sql("0006_late_chunking_search_names_and_model_migration.down.definitions.sql"))
        populated(conn, 1200)
        conn.execute("SELECT pgembed.create_pipeline('docs', 'body', 'hash:8', index => 'ivfflat', backfill => false)")
        name = "docs_h8"
        assert vector_indexes(conn, name) == [("ivfflat", True)]
    migrate.upgrade(empty_dsn)
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert vector_indexes(conn, name) == []
        assert conn.execute("SELECT pipeline FROM pgembed.deferred_indexes").fetchall() == [(name,)]
        conn.execute("SELECT pgembed.queue_all(%s, 'backfill')", (name,))
    drain(empty_dsn)
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert vector_indexes(conn, name) == [("ivfflat", True)]
        assert conn.execute("SELECT lists, rows_at_build FROM pgembed.index_builds").fetchone() == (10, 1200)
