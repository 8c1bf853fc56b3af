"""halfvec and binary quantization (issue 13): a pipeline stores its vectors at half precision
and indexes them up to 4,000 dimensions; a binary-quantized HNSW index is searched by Hamming
distance and re-ranked by the stored vectors, still one hit per row; what pgvector cannot
index is refused with what would fit."""

from __future__ import annotations

import numpy as np
import pytest

from pgembed import audit, pipelines, search
from pgembed.pipelines import PipelineError, PipelineOptions
from pgembed.providers.hashing import hash_vector
from tests.conftest import drain

ROWS = 40


@pytest.fixture
def notes(conn):
    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text NOT NULL)")
    conn.execute("INSERT INTO notes SELECT g, 'note ' || g || ' on lighthouses and the shore ' || (g %% 7) "
                 "FROM generate_series(1, %s) g", (ROWS,))
    return "notes"


def _indexes(conn, name: str) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT indexdef FROM pg_indexes WHERE schemaname = 'pgembed' AND tablename = %s "
        "AND indexdef NOT LIKE '%%UNIQUE%%'", (name,)).fetchall()]


def test_a_halfvec_pipeline_at_3072_dimensions_gets_hnsw_syncs_searches_and_audits_clean(conn, dsn, notes):
    name = pipelines.create(conn, notes, "body", "hash:3072", PipelineOptions(storage="halfvec"))
    column = conn.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                          "WHERE attrelid = %s::regclass AND attname = 'embedding'",
                          (f'pgembed."{name}"',)).fetchone()[0]
    assert column == "halfvec(3072)"
    assert [("hnsw" in d, "halfvec_cosine_ops" in d) for d in _indexes(conn, name)] == [(True, True)]
    drain(dsn)
    assert conn.execute(f'SELECT count(*) FROM pgembed."{name}"').fetchone() == (ROWS,)
    conn.execute("SET enable_seqscan = off")
    hits = search.search(conn, name, "note 7 on lighthouses", k=5)
    assert len(hits) == 5 and len({h.key["id"] for h in hits}) == 5
    assert [h.distance for h in hits] == sorted(h.distance for h in hits)
    report = audit.run_audit(conn)
    assert [report[k] for k in ("missing", "orphaned", "stale", "failed")] == [0, 0, 0, 0]
    cached = conn.execute("SELECT DISTINCT format_type(atttypid, atttypmod) FROM pg_attribute "
                          "WHERE attrelid = 'pgembed.embedding_cache'::regclass AND attname = 'embedding'"
                          ).fetchone()[0]
    assert cached.startswith("vector"), "the cache keeps full precision: changing storage never re-embeds"


def test_ivfflat_upkeep_builds_a_halfvec_index_with_its_operator_class(conn, dsn, notes):
    name = pipelines.create(conn, notes, "body", "hash:3000", PipelineOptions(storage="halfvec", index="ivfflat"))
    drain(dsn)
    plan = conn.execute("SELECT create_sql FROM pgembed.ivfflat_plan(1, 2) WHERE pipeline = %s",
                        (name,)).fetchone()[0]
    assert "halfvec_cosine_ops" in plan
    conn.execute(plan)  # autocommit: CONCURRENTLY


@pytest.mark.parametrize("storage", ["vector", "halfvec"])
def test_binary_quantized_search_returns_k_rows_one_each_by_the_stored_distance(conn, dsn, notes, storage):
    conn.execute("UPDATE notes SET body = repeat(body || ' and the rocks ', 30)")  # several chunks a row
    name = pipelines.create(conn, notes, "body", "hash:64",
                            PipelineOptions(storage=storage, quantization="binary", rerank=3, chunk_tokens=40))
    [index] = _indexes(conn, name)
    assert "binary_quantize(embedding)" in index and "bit_hamming_ops" in index
    drain(dsn)
    assert conn.execute(f'SELECT count(*) > %s FROM pgembed."{name}"', (ROWS,)).fetchone() == (True,)
    query = hash_vector("note 12 on lighthouses", 64)
    conn.execute("SET enable_seqscan = off")
    nearest = conn.execute("SELECT pgembed.nearest_chunks_sql(p) FROM pgembed.pipelines p WHERE name = %s",
                           (name,)).fetchone()[0]
    nearest = nearest.replace("$1", "%(q)s::real[]").replace("$2", "8").replace("$3", "2")
    plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + nearest, {"q": list(query)}).fetchall())
    assert "Index Scan" in plan, plan
    hits = search.search(conn, name, vector=query, k=7)
    assert len(hits) == 7 and len({h.key["id"] for h in hits}) == 7
    exact = _exact_distances(conn, name, storage, query)
    for hit in hits:
        assert hit.distance == pytest.approx(exact[(hit.key["id"], hit.chunk_seq)], abs=1e-6)
    assert [h.distance for h in hits] == sorted(h.distance for h in hits)


def _exact_distances(conn, name: str, storage: str, query: np.ndarray) -> dict[tuple[int, int], float]:
    """Cosine distances from the stored vectors, computed here (numpy), not by pgvector."""
    rows = conn.execute(f'SELECT id, chunk_seq, embedding::vector::real[] FROM pgembed."{name}"').fetchall()
    q = np.asarray(query, dtype=np.float64)
    if storage == "halfvec":
        q = q.astype(np.float16).astype(np.float64)
    out = {}
    for key, seq, vector in rows:
        v = np.asarray(vector, dtype=np.float64)
        out[(key, seq)] = 1 - float(v @ q / (np.linalg.norm(v) * np.linalg.norm(q)))
    return out


@pytest.mark.parametrize(("options", "message"), [
    (PipelineOptions(storage="float8"), "storage must be vector or halfvec, not 'float8'"),
    (PipelineOptions(quantization="product"), "quantization must be none or binary, not 'product'"),
    (PipelineOptions(quantization="binary", index="none"), "binary quantization needs index => 'hnsw', not 'none'"),
    (PipelineOptions(quantization="binary", index="ivfflat"), "binary quantization needs index => 'hnsw'"),
    (PipelineOptions(rerank=5), "rerank is for quantization => 'binary' only"),
    (PipelineOptions(quantization="binary", rerank=0), "rerank must be from 1 to 100, not 0"),
])
def test_unknown_or_impossible_storage_is_refused(conn, notes, options, message):
    with pytest.raises(PipelineError, match=message):
        pipelines.create(conn, notes, "body", "hash:16", options)


@pytest.mark.parametrize(("model", "options", "message"), [
    ("hash:3072", PipelineOptions(),
     r"hnsw indexes of vector hold at most 2000 dimensions, not 3072 \(Pass storage => 'halfvec'"),
    ("hash:3072", PipelineOptions(index="ivfflat"), "ivfflat indexes of vector hold at most 2000 dimensions"),
    ("hash:5000", PipelineOptions(storage="halfvec"),
     r"hnsw indexes of halfvec hold at most 4000 dimensions, not 5000 \(Pass dimensions => 4000 or fewer"),
])
def test_more_dimensions_than_the_index_holds_is_refused_with_what_fits(conn, notes, model, options, message):
    with pytest.raises(PipelineError, match=message):
        pipelines.create(conn, notes, "body", model, options)


def test_binary_quantization_indexes_more_than_4000_dimensions_and_vector_without_index_is_fine(conn, notes):
    big = pipelines.create(conn, notes, "body", "hash:5000", PipelineOptions(quantization="binary"))
    assert "bit(5000)" in _indexes(conn, big)[0]
    plain = pipelines.create(conn, notes, "body", "hash:3072", PipelineOptions(index="none", name="plain"))
    assert _indexes(conn, plain) == []


def test_hostile_names_with_halfvec_and_binary_quantization(conn, dsn):
    """Every name the generated index and search SQL write is quoted: the table, its key,
    the pipeline."""
    conn.execute('CREATE TABLE "tab\'le; --" ("id ""k""" int PRIMARY KEY, "bo$body$dy" text)')
    conn.execute("""INSERT INTO "tab'le; --" SELECT g, 'row ' || g FROM generate_series(1, 12) g""")
    name = pipelines.create(conn, '"tab\'le; --"', '"bo$body$dy"', "hash:32",
                            PipelineOptions(storage="halfvec", quantization="binary", name="p'; --"))
    drain(dsn)
    rows = conn.execute("SELECT key, distance FROM pgembed.search(%s, %s::real[], 4)",
                        (name, list(map(float, hash_vector("row 3", 32))))).fetchall()
    assert len(rows) == 4 and rows[0][0] == {'id "k"': 3}


def test_the_command_line_creates_a_halfvec_binary_pipeline(conn, dsn, notes):
    from typer.testing import CliRunner

    from pgembed.cli import app

    result = CliRunner().invoke(app, ["pipeline", "create", notes, "body", "--model", "hash:3072", "--storage",
                                      "halfvec", "--quantization", "binary", "--rerank", "4", "--dsn", dsn])
    assert result.exit_code == 0, result.output
    assert conn.execute("SELECT storage, quantization, rerank FROM pgembed.pipelines").fetchone() == (
        "halfvec", "binary", 4)
    refused = CliRunner().invoke(app, ["pipeline", "create", notes, "body", "--model", "hash:3072", "--name", "x",
                                       "--dsn", dsn])
    assert refused.exit_code != 0 and "storage => 'halfvec'" in refused.output


@pytest.mark.parametrize(("options", "expected"), [
    (PipelineOptions(storage="halfvec", distance="l2"), "halfvec_l2_ops"),
    (PipelineOptions(storage="halfvec", quantization="binary"), "bit_hamming_ops"),
])
def test_a_deferred_build_uses_the_storage_s_operator_class_or_the_quantized_expression(conn, dsn, notes,
                                                                                       options, expected):
    """What a worker builds after a large backfill (pgembed.deferred_index_plan): here its
    index dropped and its deferral recorded by hand, as 10,000 rows would."""
    import asyncio

    from pgembed import indexes

    name = pipelines.create(conn, notes, "body", "hash:3072", options)
    drain(dsn)
    for (index,) in conn.execute("SELECT indexrelid::regclass::text FROM pg_index "
                                 "WHERE indrelid = %s::regclass AND NOT indisprimary", (f'pgembed."{name}"',)):
        conn.execute(f"DROP INDEX {index}")
    conn.execute("INSERT INTO pgembed.deferred_indexes (pipeline, rows_queued) VALUES (%s, %s)", (name, ROWS))
    assert asyncio.run(indexes.build_ready(dsn, "64MB", set())) == [name]
    [index] = _indexes(conn, name)
    assert "USING hnsw" in index and expected in index
