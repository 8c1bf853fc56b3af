"""Acceptance of the core sync engine: every change on a source table ends, after a
drain, as exactly the current content's chunks in the destination and nothing else."""

from __future__ import annotations

import numpy as np
import psycopg
from psycopg import sql

from pgembed import pipelines, search
from pgembed.cache import document_hash
from pgembed.chunking import chunk_text
from pgembed.providers.hashing import hash_vector
from tests.conftest import drain


def destination(conn: psycopg.Connection, table: str, keys: list[str]) -> dict[tuple, list[str]]:
    """{key: [chunk text, ...]} of a destination table, checking every stored vector."""
    rows = conn.execute(sql.SQL("SELECT {}, chunk_seq, chunk, embedding FROM pgembed.{} ORDER BY 1, {}").format(
        sql.SQL(", ").join(map(sql.Identifier, keys)), sql.Identifier(table),
        sql.Literal(len(keys) + 1))).fetchall()
    found: dict[tuple, list[str]] = {}
    dims = rows[0][-1].dimensions() if rows else 0
    for *key, seq, chunk, vector in rows:
        assert seq == len(found.get(tuple(key), [])), "chunks are numbered 0, 1, 2... per row"
        assert np.allclose(vector.to_numpy(), hash_vector(chunk, dims), atol=1e-6)
        found.setdefault(tuple(key), []).append(chunk)
    return found


def expected(conn: psycopg.Connection, query: str, chunk_tokens: int = 0, overlap: int = 0) -> dict:
    """What the destination must hold, computed by the test in Python from raw columns."""
    result = {}
    for *key, title, body in conn.execute(query).fetchall():
        text = f"{title} {body}"
        result[tuple(key)] = chunk_text(text, chunk_tokens, overlap) if chunk_tokens else [text]
    return result


def make_docs(conn: psycopg.Connection, n: int = 50) -> None:
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, title text NOT NULL, body text NOT NULL, "
                 "views int NOT NULL DEFAULT 0)")
    conn.execute("INSERT INTO docs SELECT g, 'title ' || g, 'the body of document number ' || g "
                 "|| ' talks about topic ' || (g %% 7) FROM generate_series(1, %s) g", (n,))


def test_every_kind_of_change_converges(conn, dsn):
    make_docs(conn)
    name = pipelines.create(conn, "docs", "title || ' ' || body", "hash:64",
                            pipelines.PipelineOptions(chunk_tokens=6, chunk_overlap=2))
    assert name == "docs_h64"
    drain(dsn, batch_size=16)
    conn.execute("UPDATE docs SET body = 'rewritten ' || body WHERE id <= 5")
    conn.execute("UPDATE docs SET views = views + 1")  # not part of content
    conn.execute("DELETE FROM docs WHERE id BETWEEN 40 AND 45")
    conn.execute("UPDATE docs SET id = id + 1000 WHERE id IN (10, 11)")  # primary key change
    conn.execute("INSERT INTO docs VALUES (2000, 'new', 'a brand new row', 0)")
    drain(dsn, batch_size=16)
    query = "SELECT id, title, body FROM docs"
    assert destination(conn, name, ["id"]) == expected(conn, query, 6, 2)
    hashes = dict(conn.execute("SELECT DISTINCT id, content_hash FROM pgembed.docs_h64").fetchall())
    for (key,), (title, body) in {(r[0],): r[1:] for r in conn.execute(query)}.items():
        assert bytes(hashes[key]) == document_hash(f"{title} {body}")
    conn.execute("TRUNCATE docs")
    assert conn.execute("SELECT count(*) FROM pgembed.docs_h64").fetchone()[0] == 0
    drain(dsn)
    assert destination(conn, name, ["id"]) == {}
    assert conn.execute("SELECT count(*) FROM pgembed.outbox").fetchone()[0] == 0


def test_unrelated_update_queues_nothing(conn, dsn):
    make_docs(conn, 10)
    pipelines.create(conn, "docs", "title || ' ' || body", "hash:16")
    drain(dsn)
    conn.execute("UPDATE docs SET views = views + 1")
    assert conn.execute("SELECT count(*) FROM pgembed.outbox").fetchone()[0] == 0
    conn.execute("UPDATE docs SET title = title WHERE id = 1")  # same value: nothing to do
    assert conn.execute("SELECT count(*) FROM pgembed.outbox").fetchone()[0] == 0


def test_delete_removes_vectors_in_the_same_transaction(conn, dsn):
    make_docs(conn, 10)
    pipelines.create(conn, "docs", "title || ' ' || body", "hash:16")
    drain(dsn)
    with conn.transaction():
        conn.execute("DELETE FROM docs WHERE id = 3")
        left = conn.execute("SELECT count(*) FROM pgembed.docs_h16 WHERE id = 3").fetchone()[0]
    assert left == 0


def test_repeated_changes_coalesce_into_one_outbox_row(conn, dsn):
    make_docs(conn, 3)
    pipelines.create(conn, "docs", "body", "hash:16")
    for i in range(20):
        conn.execute("UPDATE docs SET body = %s WHERE id = 1", (f"version {i}",))
    rows = conn.execute("SELECT key, version FROM pgembed.outbox WHERE key = '[\"1\"]'").fetchall()
    assert rows == [(["1"], 21)]
    drain(dsn)
    assert destination(conn, "docs_h16", ["id"])[(1,)] == ["version 19"]


def test_statement_triggers_fire_once_per_statement(conn, dsn):
    conn.execute("SET track_functions = 'pl'")
    conn.execute("CREATE TABLE big (id int PRIMARY KEY, body text)")
    pipelines.create(conn, "big", "body", "hash:8", pipelines.PipelineOptions(backfill=False))
    function = conn.execute("SELECT oid FROM pg_proc WHERE proname = 'p1_capture'").fetchone()[0]

    def calls() -> int:
        conn.execute("SELECT pg_stat_force_next_flush()")
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute("SELECT calls FROM pg_stat_user_functions WHERE funcid = %s",
                           (function,)).fetchone()
        return row[0] if row else 0

    before = calls()
    conn.execute("INSERT INTO big SELECT g, 'row ' || g FROM generate_series(1, 100000) g")
    assert calls() == before + 1
    conn.execute("UPDATE big SET body = body || '!' WHERE id <= 50000")
    assert calls() == before + 2
    # each statement left one batch of keys (tests/test_bulk_capture.py)
    assert conn.execute("SELECT array_agg(key_count ORDER BY id) FROM pgembed.outbox_statements"
                        ).fetchone()[0] == [100000, 50000]


def test_two_pipelines_on_one_table_both_stay_in_sync(conn, dsn):
    make_docs(conn, 20)
    a = pipelines.create(conn, "docs", "title || ' ' || body", "hash:32")
    b = pipelines.create(conn, "docs", "title || ' ' || body", "hash:16")
    conn.execute("UPDATE docs SET body = 'changed' WHERE id = 1")
    conn.execute("DELETE FROM docs WHERE id = 2")
    drain(dsn)
    want = expected(conn, "SELECT id, title, body FROM docs")
    assert destination(conn, a, ["id"]) == want
    assert destination(conn, b, ["id"]) == want


def test_hostile_names_and_composite_key_work_end_to_end(conn, dsn):
    table = sql.Identifier('Weird "Name"; --')
    conn.execute(sql.SQL('CREATE TABLE {} ("Tenant" text, "select" int, "body text" text, '
                         'PRIMARY KEY ("Tenant", "select"))').format(table))
    conn.execute(sql.SQL("INSERT INTO {} VALUES ('a''b', 1, 'héllo wörld'), ('x;y', 2, 'second row'), "
                         "('日本', 3, 'third')").format(table))
    name = pipelines.create(conn, '"Weird ""Name""; --"', '"body text" || \' #\' || "select"', "hash:16")
    assert name == 'Weird "Name"; --_h16'
    drain(dsn)
    conn.execute(sql.SQL("UPDATE {} SET \"select\" = 30 WHERE \"select\" = 3").format(table))
    conn.execute(sql.SQL("DELETE FROM {} WHERE \"Tenant\" = 'x;y'").format(table))
    drain(dsn)
    assert destination(conn, name, ["Tenant", "select"]) == {
        ("a'b", 1): ["héllo wörld #1"], ("日本", 30): ["third #30"]}
    from pgembed.search import search

    hits = search(conn, name, "héllo wörld #1", k=1)
    assert hits[0].key == {"Tenant": "a'b", "select": 1}
    pipelines.drop(conn, name)
    assert conn.execute("SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal").fetchone()[0] == 0


def test_bulk_backlogs_are_claimed_in_bigger_batches(conn, dsn):
    make_docs(conn, 1500)  # the backfill: 1,500 rows of purpose 'backfill'
    pipelines.create(conn, "docs", "title || ' ' || body", "hash:8")
    stats = drain(dsn, concurrency=1, prefetch=0, batch_size=100, bulk_batch_size=500)
    assert (stats.written, stats.batches) == (1500, 4), "100 first, then 500, 500 and 400"
    conn.execute("UPDATE docs SET body = body || '!' WHERE id <= 300")  # the application's changes
    stats = drain(dsn, concurrency=1, prefetch=0, batch_size=100, bulk_batch_size=500)
    assert (stats.written, stats.batches) == (300, 3)


def test_a_hash_model_with_fewer_dimensions_hashes_into_that_many(conn, dsn):
    """`hash:384` with dimensions 128 stores (and searches with) the vectors of hash:128: the
    words are hashed into 128 buckets, not hash:384's vector truncated and renormalised."""
    make_docs(conn, 5)
    name = pipelines.create(conn, "docs", "title || ' ' || body", "hash:384",
                            pipelines.PipelineOptions(dimensions=128))
    drain(dsn)
    rows = conn.execute(sql.SQL("SELECT id, chunk, embedding FROM pgembed.{}").format(
        sql.Identifier(name))).fetchall()
    assert len(rows) == 5
    for _, chunk, vector in rows:
        assert np.allclose(vector.to_numpy(), hash_vector(chunk, 128), atol=1e-6)
        head = np.array(hash_vector(chunk, 384))[:128]
        assert not np.allclose(vector.to_numpy(), head / np.linalg.norm(head), atol=1e-3)
    key, chunk, _ = rows[2]
    hit = search.search(conn, name, chunk, k=1)[0]
    assert hit.key == {"id": key} and hit.distance < 1e-6


def test_content_with_nothing_to_embed_is_neither_a_failure_nor_a_gap(conn, dsn):
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO docs VALUES (1, 'words'), (2, 'more words'), (3, NULL), (4, '  ')")
    conn.execute("SELECT pgembed.create_pipeline('docs', 'body', 'hash:8', name => 'docs')")
    drain(dsn)
    conn.execute("UPDATE docs SET body = NULL WHERE id = 2")  # its old vectors describe nothing now
    drain(dsn)
    assert conn.execute("SELECT array_agg(id ORDER BY id) FROM pgembed.docs").fetchone() == ([1],)
    assert conn.execute("SELECT count(*) FROM pgembed.failures").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM pgembed.outbox").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM pgembed.consistency_gaps").fetchone() == (0,)
    conn.execute("SELECT pgembed.audit()")
    assert conn.execute("SELECT missing, empty FROM pgembed.pipeline_status").fetchone() == (0, 3)
    conn.execute("UPDATE docs SET body = 'back' WHERE id = 3")  # content again: embedded as usual
    drain(dsn)
    assert conn.execute("SELECT array_agg(id ORDER BY id) FROM pgembed.docs").fetchone() == ([1, 3],)
