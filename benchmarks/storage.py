"""10. Storage (issue 13): what `storage => 'halfvec'` and `quantization => 'binary'` cost and
save over the default `vector`, on the same vectors. SciFact in a table (a subset that keeps
every train query's relevant documents, `--set storage_docs=N`, 0 for all 5,183), three
pipelines on it with `local:all-MiniLM-L6-v2`: the first embeds, the other two find every
chunk in the embedding cache (keyed by model and text), so all three hold the same chunks
and the same full-precision vectors before their storage. For each: the destination's size,
its index's size (`pg_relation_size`) and build time (dropped and built again over the
loaded rows, as a deferred build does), and search quality: nDCG@10 on the qrels, and
recall@10 against exact search (numpy, max-sim over the stored full-precision vectors).

Skipped when the data (../shared/data/scifact, or PGEMBED_BENCH_DATA) or the local model is
not there.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from benchmarks.harness import DATA, Bench, Result, ratio

NAME = "storage"
MODEL = "local:all-MiniLM-L6-v2"
TABLE = "scifact"
CONTENT = "title || ' ' || body"
# pipeline name -> create_pipeline options
STORAGES: dict[str, dict[str, Any]] = {
    "vector": {},
    "halfvec": {"storage": "halfvec"},
    "vector+binary": {"quantization": "binary"},
}


def _skipped(why: str) -> list[Result]:
    return [Result(NAME, "", None, "", status="skipped", note=why)]


def _pipeline(storage: str) -> str:
    return f"{TABLE}_{storage.replace('+', '_')}"


def rebuild_index(bench: Bench, conn: psycopg.Connection, name: str) -> dict[str, float]:
    """Drops the pipeline's vector index and times building it again over the loaded rows;
    the sizes of the index and the destination (heap and TOAST)."""
    destination = sql.Identifier("pgembed", name)
    for (index,) in conn.execute("SELECT indexrelid::regclass::text FROM pg_index "
                                 "WHERE indrelid = %s::regclass AND NOT indisprimary", (f'pgembed."{name}"',)):
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.SQL(index)))
    found = conn.execute("SELECT pgembed.vector_index_sql(p) FROM pgembed.pipelines p WHERE name = %s",
                         (name,)).fetchone()
    assert found is not None
    ddl = found[0]
    conn.execute(sql.SQL("SET maintenance_work_mem = {}").format(sql.Literal(bench.scale.maintenance_work_mem)))
    if bench.scale.checkpoints:
        conn.execute("CHECKPOINT")
    started = time.perf_counter()
    conn.execute(ddl)
    build = time.perf_counter() - started
    conn.execute(sql.SQL("VACUUM ANALYZE {}").format(destination))
    sizes = conn.execute(sql.SQL(
        "SELECT (SELECT sum(pg_relation_size(indexrelid)) FROM pg_index WHERE indrelid = {t}::regclass "
        "AND NOT indisprimary), pg_table_size({t}::regclass), (SELECT count(*) FROM {d})").format(
            t=sql.Literal(f'pgembed."{name}"'), d=destination)).fetchone()
    assert sizes is not None
    index_bytes, table_bytes, rows = sizes
    return {"build_seconds": build, "index_bytes": int(index_bytes), "table_bytes": int(table_bytes),
            "rows": int(rows)}


def exact_run(conn: psycopg.Connection, pipeline: str, query_vectors: np.ndarray, qids: list[str],
              k: int) -> dict[str, list[str]]:
    """Exact max-sim over the full-precision vectors a `vector` pipeline stored."""
    from pgembed.evaluation.beir import max_sim_run

    rows = conn.execute(sql.SQL("SELECT id, embedding FROM {} ORDER BY id, chunk_seq").format(
        sql.Identifier("pgembed", pipeline))).fetchall()
    vectors = np.stack([np.asarray(v.to_numpy(), dtype=np.float32) for _, v in rows])
    return {q: list(ranked) for q, ranked in
            max_sim_run(query_vectors, qids, vectors, [(str(i), "") for i, _ in rows], k).items()}


def _searches(conn: psycopg.Connection, queries: dict[str, str], k: int) -> tuple[dict[str, Any], np.ndarray]:
    """Every query through every pipeline: runs, and ms a search with the query's vector
    given (each query is embedded once, untimed, through the first pipeline)."""
    from pgembed.search import search, search_with_vector

    first = _pipeline(next(iter(STORAGES)))
    vectors = np.stack([search_with_vector(conn, first, text, k=1)[1] for text in queries.values()])
    runs: dict[str, dict[str, list[str]]] = {}
    ms = {}
    for storage in STORAGES:
        started = time.perf_counter()
        runs[storage] = {q: [str(h.key["id"]) for h in search(conn, _pipeline(storage), vector=v, k=k)]
                         for q, v in zip(queries, vectors, strict=True)}
        ms[storage] = 1000 * (time.perf_counter() - started) / max(1, len(queries))
    return {"runs": runs, "ms_per_query": ms}, vectors


def _recall(run: dict[str, list[str]], exact: dict[str, list[str]], k: int) -> float:
    return float(np.mean([len(set(run[q][:k]) & set(exact[q][:k])) / k for q in exact]))


def _embed_through_pipelines(bench: Bench, dsn: str, corpus: Any) -> dict[str, float]:
    """The table, then one pipeline after the other, each drained before the next: the first
    embeds every chunk, the others find them all in the cache."""
    from pgembed.client import Client
    from pgembed.evaluation.beir import load_table

    drains = {}
    with Client(dsn) as client:
        load_table(client.conn, TABLE, corpus)
        for storage, options in STORAGES.items():
            client.create_pipeline(TABLE, CONTENT, MODEL, name=_pipeline(storage), **options)
            started = time.perf_counter()
            stats = client.sync()
            drains[storage] = time.perf_counter() - started
            bench.log(f"storage: {storage} drained in {drains[storage]:.0f} s ({stats})")
    return drains


def run(bench: Bench) -> list[Result]:
    directory = DATA / "scifact"
    if not (directory / "corpus.jsonl").exists():
        return _skipped(f"no SciFact corpus in {directory}")
    try:
        from pgembed.providers.local import load_model, resolve_model

        load_model(resolve_model("all-MiniLM-L6-v2"))
    except Exception as error:  # no local extra: nothing to measure
        return _skipped(f"local model unavailable: {error}")
    from pgembed.db import connect
    from pgembed.evaluation import beir
    from pgembed.evaluation.metrics import evaluate

    corpus = beir.load(directory, max_docs=bench.scale.storage_docs or None)
    k = 10
    with bench.database() as dsn:
        drains = _embed_through_pipelines(bench, dsn, corpus)
        with connect(dsn, autocommit=True) as conn:
            measured = {s: rebuild_index(bench, conn, _pipeline(s)) for s in STORAGES}
            searched, query_vectors = _searches(conn, corpus.queries, k)
            exact = exact_run(conn, _pipeline("vector"), query_vectors, list(corpus.queries), k)
    reference = evaluate(corpus.qrels, exact)["ndcg@10"]
    results = []
    for storage in STORAGES:
        run_ = searched["runs"][storage]
        figures = {**measured[storage], "drain_seconds": drains[storage],
                   "ndcg@10": evaluate(corpus.qrels, run_)["ndcg@10"], "exact_ndcg@10": reference,
                   "recall@10_vs_exact": _recall(run_, exact, k), "ms_per_query": searched["ms_per_query"][storage],
                   "documents": len(corpus.docs), "queries": len(corpus.queries)}
        bench.log(f"storage: {storage} {figures}")
        note = (f"index {figures['index_bytes'] / 2**20:.2f} MiB built in {figures['build_seconds']:.2f} s, "
                f"table {figures['table_bytes'] / 2**20:.2f} MiB, recall@10 vs exact "
                f"{figures['recall@10_vs_exact']:.3f}, {figures['ms_per_query']:.1f} ms a query; "
                f"{figures['rows']} chunks of {len(corpus.docs)} docs, {len(corpus.queries)} queries")
        results.append(Result(NAME, storage, figures["ndcg@10"], "nDCG@10", limit=reference, limit_unit="nDCG@10",
                              limit_label="exact, same vectors", ratio=ratio(figures["ndcg@10"], reference),
                              note=note, details=figures))
    return results
