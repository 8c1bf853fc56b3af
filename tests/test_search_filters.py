"""Filtered search (issue 13): equality on the source's columns, k rows through the HNSW
index even when the filter keeps 2 % of the rows, the source read with the caller's rights,
the same filter from SQL, Python and the command line, and on SciFact with the local model
as near as exact filtered search."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo
from typer.testing import CliRunner

from pgembed import pipelines, search
from pgembed.cli import app
from pgembed.client import Client
from pgembed.evaluation import beir
from pgembed.providers.hashing import hash_array
from tests.conftest import drain

ROWS = 2000
DIMS = 32
ODD = 'Odd "col"'  # a column name that must be quoted
SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"
TOLERANCE = 1e-4  # float4 vectors and their float8 distances in numpy


def body(i: int) -> str:
    return f"note {i} about the harbour and its lights"


@pytest.fixture
def notes(conn, dsn) -> str:
    """ROWS rows, lang 'xx' on every 50th (2 %), HNSW-indexed (a small backfill: at once)."""
    conn.execute(sql.SQL('CREATE TABLE "My Notes" (id int PRIMARY KEY, lang text, year int, {} text, '
                         "body text NOT NULL)").format(sql.Identifier(ODD)))
    conn.execute("INSERT INTO \"My Notes\" SELECT g, CASE WHEN g %% 50 = 0 THEN 'xx' ELSE 'en' END, "
                 "2000 + g %% 3, CASE WHEN g %% 2 = 0 THEN 'O''Brien' END, "
                 "'note ' || g || ' about the harbour and its lights' FROM generate_series(1, %s) g", (ROWS,))
    name = pipelines.create(conn, '"My Notes"', "body", f"hash:{DIMS}")
    drain(dsn, batch_size=500)
    return name


def exact_kth(keep, query: np.ndarray, k: int) -> float:
    """The cosine distance of the k-th nearest kept row, in numpy over the same vectors:
    a hit at most this far is one exact search would give (the hash texts tie often)."""
    ids = [i for i in range(1, ROWS + 1) if keep(i)]
    vectors = np.stack([hash_array(body(i), DIMS) for i in ids]).astype(np.float64)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return float(np.sort(1 - unit @ (query / np.linalg.norm(query)))[k - 1])


def test_a_two_percent_filter_still_gives_k_rows_through_the_index(conn, notes):
    query = hash_array("note 17 about the harbour", DIMS)
    conn.execute("SET enable_seqscan = off")  # the HNSW index, as on a large table
    plan = "\n".join(r[0] for r in conn.execute(
        "EXPLAIN " + conn.execute(
            "SELECT pgembed.nearest_chunks_sql(p, false, pgembed.search_filter_sql(p, '{\"lang\": \"xx\"}')) "
            "FROM pgembed.pipelines p").fetchone()[0]
        .replace("$1", "%(q)s::real[]").replace("$2", "40").replace("$4", "'{\"lang\": \"xx\"}'::jsonb"),
        {"q": query.tolist()}).fetchall())
    assert "hnsw" in plan.lower() or "Index Scan using" in plan, plan
    hits = search.search(conn, notes, vector=query, k=10, filter={"lang": "xx"})
    assert len(hits) == 10
    assert all(h.key["id"] % 50 == 0 for h in hits)
    kth = exact_kth(lambda i: i % 50 == 0, query, 10)
    assert sum(h.distance <= kth + 1e-6 for h in hits) >= 8, (hits, kth)


def test_in_lists_several_columns_null_and_quoted_names(conn, notes):
    query = hash_array("harbour lights", DIMS)
    filter = {"year": [2001, 2002], ODD: "O'Brien", "lang": "en"}
    hits = search.search(conn, notes, vector=query, k=ROWS, filter=filter)
    kept = [i for i in range(1, ROWS + 1) if i % 3 in (1, 2) and i % 2 == 0 and i % 50 != 0]
    assert sorted(h.key["id"] for h in hits) == kept
    sql = conn.execute("SELECT key->>'id' FROM pgembed.search(%s, %s::real[], 5, %s::jsonb)",
                       (notes, query.tolist(), json.dumps({ODD: None, "year": 2000}))).fetchall()
    assert len(sql) == 5 and all(int(r[0]) % 2 == 1 and int(r[0]) % 3 == 0 for r in sql)
    assert search.search(conn, notes, vector=query, k=3, filter={"year": []}) == []
    assert search.search(conn, notes, vector=query, k=3, filter={}) == search.search(conn, notes, vector=query, k=3)


@pytest.mark.parametrize(("filter", "message"), [
    ({"colour": "red"}, 'cannot filter on colour: public."My Notes" has no such column'),
    ({"Lang": "en"}, 'cannot filter on "Lang"'),
    ({"lang": {"in": ["en"]}}, "is a value or an array of values, not an object"),
    ({"year": [[2001]]}, "lists values, not"),
    ({"year": "last year"}, 'invalid input syntax for type integer: "last year"'),
])
def test_a_bad_filter_is_refused_with_a_reason(conn, notes, filter, message):
    with pytest.raises(search.FilterError, match=message):
        search.search(conn, notes, vector=hash_array("x", DIMS), k=3, filter=filter)
    assert conn.execute(f'SELECT count(*) FROM pgembed."{notes}"').fetchone() == (ROWS,)


def test_a_filter_that_is_no_object_is_refused_in_sql(conn, notes):
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="a search filter is a JSON object"):
        conn.execute("SELECT * FROM pgembed.search(%s, array_fill(0.5::real, ARRAY[%s]), 3, '[1]')",
                     (notes, DIMS))


def test_the_source_is_read_with_the_caller_s_rights(conn, dsn, notes):
    """Row-level security on the source decides what a role's search returns, with or
    without a filter: a search is no way round the application's policies."""
    conn.execute("DROP ROLE IF EXISTS pgembed_test_reader")
    conn.execute("CREATE ROLE pgembed_test_reader LOGIN")
    try:
        conn.execute('GRANT SELECT ON "My Notes" TO pgembed_test_reader')
        conn.execute("GRANT USAGE ON SCHEMA pgembed TO pgembed_test_reader")
        # what a role needs to search: the pipelines and aliases, the destination and the source
        conn.execute(f'GRANT SELECT ON pgembed.pipelines, pgembed.aliases, pgembed."{notes}" TO pgembed_test_reader')
        conn.execute('ALTER TABLE "My Notes" ENABLE ROW LEVEL SECURITY')
        conn.execute("""CREATE POLICY only_xx ON "My Notes" FOR SELECT TO pgembed_test_reader USING (lang = 'xx')""")
        query = hash_array("note 17 about the harbour", DIMS)
        with psycopg.connect(make_conninfo(dsn, user="pgembed_test_reader")) as reader:
            hits = search.search(reader, notes, vector=query, k=10)
            assert len(hits) == 10 and all(h.key["id"] % 50 == 0 for h in hits)
            assert search.search(reader, notes, vector=query, k=10, filter={"lang": "en"}) == []
            assert len(search.search(reader, notes, vector=query, k=ROWS)) == ROWS // 50
        assert len(search.search(conn, notes, vector=query, k=10, filter={"lang": "en"})) == 10, "the owner sees all"
    finally:
        conn.execute("DROP OWNED BY pgembed_test_reader")
        conn.execute("DROP ROLE pgembed_test_reader")


def test_client_and_command_line_filter_alike(conn, dsn, notes):
    with Client(dsn) as client:
        hits = client.search(notes, "note 17 about the harbour", k=5, filter={"lang": "xx", "year": [2000, 2002]})
        found, vector = client.search_with_vector(notes, "note 17 about the harbour", k=5,
                                                  filter={"lang": "xx", "year": [2000, 2002]})
    assert found == hits and len(hits) == 5 and vector.shape == (DIMS,)
    assert all(h.key["id"] % 50 == 0 and h.key["id"] % 3 in (0, 2) for h in hits)
    runner = CliRunner()
    done = runner.invoke(app, ["search", notes, "note 17 about the harbour", "-k", "5", "--where", "lang=xx",
                               "--where", "year=2000", "--where", "year=2002", "--json", "--dsn", dsn],
                         catch_exceptions=False)
    assert done.exit_code == 0, done.output
    printed = json.loads(done.stdout)
    assert printed["filter"] == {"lang": "xx", "year": ["2000", "2002"]}
    assert [h["key"] for h in printed["hits"]] == [h.key for h in hits]
    for args, message in [(["--where", "lang"], "--where takes COLUMN=VALUE, not 'lang'"),
                          (["--where", "colour=red"], "cannot filter on colour")]:
        bad = runner.invoke(app, ["search", notes, "harbour", *args, "--dsn", dsn], catch_exceptions=False)
        assert bad.exit_code == 2, bad.output
        assert message in bad.output and "Traceback" not in bad.output


@pytest.mark.local_model
@pytest.mark.skipif(not SCIFACT.exists(), reason="needs the SciFact data in ../shared/data")
def test_filtered_search_on_scifact_matches_exact_filtered_search(conn, dsn):
    """A default local:all-MiniLM-L6-v2 pipeline on 100 SciFact abstracts (chunked), half of
    them kept by a filter: each query's hits are rows of that half, as near as the exact
    filtered search over the very chunks stored (numpy, best chunk per row, same run)."""
    corpus = beir.load(SCIFACT, max_docs=100)
    conn.execute("CREATE TABLE papers (id text PRIMARY KEY, title text, body text, half int NOT NULL)")
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO papers VALUES (%s, %s, %s, %s)",
                        [(doc, title, body, i % 2) for i, (doc, (title, body)) in enumerate(corpus.docs.items())])
    name = pipelines.create(conn, "papers", "title || ' ' || body", "local:all-MiniLM-L6-v2")
    drain(dsn)
    stored = conn.execute(sql.SQL("SELECT d.id, d.embedding::real[] FROM pgembed.{} d JOIN papers p USING (id) "
                                  "WHERE p.half = 0").format(sql.Identifier(name))).fetchall()
    assert len(stored) > len(corpus.docs) // 2, "long abstracts were not chunked"
    ids = [r[0] for r in stored]
    unit = np.array([r[1] for r in stored], dtype=np.float64)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    found = total = 0
    for text in list(corpus.queries.values())[:25]:
        hits, vector = search.search_with_vector(conn, name, text, k=10, filter={"half": 0})
        distances = 1 - unit @ (vector / np.linalg.norm(vector))
        best: dict[str, float] = {}
        for doc, distance in zip(ids, distances, strict=True):
            best[doc] = min(distance, best.get(doc, 2.0))
        kth = sorted(best.values())[9]
        assert len(hits) == 10 and {h.key["id"] for h in hits} <= set(best)
        found += sum(h.distance <= kth + TOLERANCE for h in hits)
        total += 10
    assert found / total >= 0.95, found / total
