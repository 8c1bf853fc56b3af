"""Search returns rows, not chunks (issue 13): one hit per source row, its best chunk, k rows
even when every row has many chunks and the destination has an HNSW index; callable from
SQL with a vector, from Python with a text or a vector."""

from __future__ import annotations

import psycopg
import pytest

from pgembed import pipelines, search
from pgembed.pipelines import PipelineError
from pgembed.providers.hashing import hash_vector
from tests.conftest import drain

ROWS = 60


@pytest.fixture
def many_chunks(conn, dsn):
    """ROWS rows of some 9 chunks each (cl100k windows of 4 tokens), HNSW-indexed."""
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text NOT NULL)")
    conn.execute("INSERT INTO docs SELECT g, repeat('word' || g || ' lighthouse shore rock ', 6) "
                 "FROM generate_series(1, %s) g", (ROWS,))
    name = pipelines.create(conn, "docs", "body", "hash:16", pipelines.PipelineOptions(chunk_tokens=4))
    drain(dsn)
    assert conn.execute(f'SELECT count(*) FROM pgembed."{name}"').fetchone()[0] > ROWS * 5
    return name


def test_k_rows_one_hit_each_with_its_best_chunk(conn, many_chunks):
    conn.execute("SET enable_seqscan = off")  # the HNSW index, as on a large table
    hits = search.search(conn, many_chunks, "word7 lighthouse", k=10)
    assert len(hits) == 10
    assert len({h.key["id"] for h in hits}) == 10
    assert [h.distance for h in hits] == sorted(h.distance for h in hits)
    best = conn.execute(f'SELECT chunk FROM pgembed."{many_chunks}" WHERE id = %s AND chunk_seq = %s',
                        (hits[0].key["id"], hits[0].chunk_seq)).fetchone()
    assert best == (hits[0].chunk,)


def test_more_rows_asked_than_exist_gives_every_row_once(conn, many_chunks):
    hits = search.search(conn, many_chunks, "lighthouse", k=ROWS + 5)
    assert sorted(h.key["id"] for h in hits) == list(range(1, ROWS + 1))


def test_sql_callers_pass_a_vector(conn, many_chunks):
    vector = str(hash_vector("word3 lighthouse", 16))
    rows = conn.execute("SELECT key, chunk_seq, chunk, distance FROM pgembed.search(%s, %s::vector, 5)",
                        (many_chunks, vector)).fetchall()
    assert len(rows) == 5 and len({r[0]["id"] for r in rows}) == 5


def test_the_callers_index_settings_are_his_again_after_a_search(conn, many_chunks):
    """pgembed.search raises ef_search and turns iterative scans on for its own reads; the
    caller's transaction gets back what it had set (and a session's default stays)."""
    vector = str(hash_vector("word3 lighthouse", 16))
    settings = "SELECT current_setting('hnsw.ef_search'), current_setting('hnsw.iterative_scan')"
    with conn.transaction():
        conn.execute("SET LOCAL hnsw.ef_search = 77")
        conn.execute("SELECT count(*) FROM pgembed.search(%s, %s::vector, 50)", (many_chunks, vector))
        assert conn.execute(settings).fetchone() == ("77", "off")
    before = conn.execute(settings).fetchone()
    assert len(search.search(conn, many_chunks, "word3 lighthouse", k=50)) == 50
    assert conn.execute(settings).fetchone() == before


def test_a_session_that_had_no_index_settings_has_the_defaults_after_a_search(dsn, many_chunks):
    """A session whose pgvector library was not loaded before the search had no hnsw.*
    settings to put back: the rest of its transaction runs at pgvector's defaults."""
    with psycopg.connect(dsn) as fresh:  # one transaction, the search inside it
        assert fresh.execute("SELECT current_setting('hnsw.ef_search', true)").fetchone() == (None,)
        fresh.execute("SELECT count(*) FROM pgembed.search(%s, array_fill(0.5::real, ARRAY[16]), 50)", (many_chunks,))
        assert fresh.execute("SELECT current_setting('hnsw.ef_search'), current_setting('hnsw.iterative_scan')"
                             ).fetchone() == ("40", "off")


def test_python_callers_pass_a_vector_or_get_the_query_s(conn, many_chunks):
    hits, vector = search.search_with_vector(conn, many_chunks, "word3 lighthouse", k=3)
    assert search.search(conn, many_chunks, vector=vector, k=3) == hits
    with pytest.raises(ValueError, match="a text or a vector, exactly one"):
        search.search(conn, many_chunks, "text", vector=vector)
    with pytest.raises(ValueError, match="a text or a vector, exactly one"):
        search.search(conn, many_chunks)


@pytest.mark.parametrize(("call", "message"), [
    ("SELECT * FROM pgembed.search('nope', array_fill(0.5::real, ARRAY[16]))", "no pipeline or alias named 'nope'"),
    ("SELECT * FROM pgembed.search(%(p)s, array_fill(0.5::real, ARRAY[16]), 0)", "k must be 1 or more, not 0"),
    ("SELECT * FROM pgembed.search(%(p)s, array_fill(0.5::real, ARRAY[8]))",
     "holds vectors of 16 dimensions, the query has 8"),
    ("SELECT * FROM pgembed.search(%(p)s, NULL)", "the query has 0"),
])
def test_bad_searches_are_refused_with_a_reason(conn, many_chunks, call, message):
    with pytest.raises(Exception, match=message):
        conn.execute(call, {"p": many_chunks})


def test_a_wrong_sized_vector_from_python_is_a_pipeline_error(conn, many_chunks):
    with pytest.raises(PipelineError, match="holds vectors of 16 dimensions, the query has 3"):
        search.search(conn, many_chunks, vector=[1.0, 0.0, 0.0])


def test_a_connection_without_pgvector_s_types_searches_alike(conn, dsn, many_chunks):
    """pgembed's connections send the query as pgvector's type; an application's own
    psycopg connection, without register_vector, sends a list, with the same hits."""
    vector = hash_vector("word3 lighthouse", 16)
    with psycopg.connect(dsn) as plain:
        assert search.search(plain, many_chunks, vector=vector, k=5) == search.search(conn, many_chunks,
                                                                                     vector=vector, k=5)
