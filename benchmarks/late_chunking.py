"""14. Late chunking (issue 13): plain chunking against `late_chunking => true` on the same
SciFact table (the subset storage uses: `--set late_docs=N`, 0 for all 5,183), both with
`local:all-MiniLM-L6-v2` and the same chunking (`--set late_chunk_tokens=N`; 0, the
default, is what fits the model: recursive chunks of 192 tokens). Driven through the public
interface: `Client.create_pipeline`, a worker until empty (`Client.sync`, timed: the late
pipeline cannot use the plain one's cache), `Client.search` for every train query (the
query vectors embedded once, as queries are in both). For each: nDCG@10, Recall@5, MRR@10
and P@5 on the qrels; the same through exact search in numpy (max-sim over the vectors the
pipeline stored: for the plain pipeline these are the model's vectors of its chunk texts,
the quality scenario's chunked reference); the HNSW index's size and build time (dropped
and built again over the loaded rows) and the destination's size.

Skipped when the data (../shared/data/scifact, or PGEMBED_BENCH_DATA) or the local model is
not there.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from benchmarks.harness import DATA, Bench, Result, ratio
from benchmarks.storage import exact_run, rebuild_index

NAME = "late_chunking"
MODEL = "local:all-MiniLM-L6-v2"
TABLE = "scifact"
CONTENT = "title || ' ' || body"
KINDS = {"plain": False, "late": True}  # pipeline name -> late_chunking
METRICS = ("ndcg@10", "recall@5", "mrr@10", "p@5")


def _skipped(why: str) -> list[Result]:
    return [Result(NAME, "", None, "", status="skipped", note=why)]


def _drain(bench: Bench, dsn: str, corpus: Any) -> dict[str, float]:
    """The table, then each pipeline drained before the next is created."""
    from pgembed.client import Client
    from pgembed.evaluation.beir import load_table

    chunking = {"chunk_tokens": bench.scale.late_chunk_tokens} if bench.scale.late_chunk_tokens else {}
    seconds = {}
    with Client(dsn) as client:
        load_table(client.conn, TABLE, corpus)
        for name, late in KINDS.items():
            client.create_pipeline(TABLE, CONTENT, MODEL, name=name, late_chunking=late, **chunking)
            started = time.perf_counter()
            stats = client.sync()
            seconds[name] = time.perf_counter() - started
            bench.log(f"late_chunking: {name} drained in {seconds[name]:.0f} s ({stats})")
    return seconds


def _searches(dsn: str, queries: dict[str, str], k: int) -> tuple[dict[str, dict[str, list[str]]],
                                                                   dict[str, float], np.ndarray]:
    """Every query through both pipelines with its vector given: runs, ms a search, vectors."""
    from pgembed.client import Client

    with Client(dsn) as client:
        vectors = np.stack([client.search_with_vector("plain", text, k=1)[1] for text in queries.values()])
        runs, ms = {}, {}
        for name in KINDS:
            started = time.perf_counter()
            runs[name] = {q: [str(h.key["id"]) for h in client.search(name, vector=v, k=k)]
                          for q, v in zip(queries, vectors, strict=True)}
            ms[name] = 1000 * (time.perf_counter() - started) / max(1, len(queries))
    return runs, ms, vectors


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

    corpus = beir.load(directory, max_docs=bench.scale.late_docs or None)
    k = 10
    with bench.database() as dsn:
        drains = _drain(bench, dsn, corpus)
        runs, ms, vectors = _searches(dsn, corpus.queries, k)
        with connect(dsn, autocommit=True) as conn:
            measured = {name: rebuild_index(bench, conn, name) for name in KINDS}
            exact = {name: exact_run(conn, name, vectors, list(corpus.queries), k) for name in KINDS}
    scores = {name: evaluate(corpus.qrels, runs[name]) for name in KINDS}
    exact_scores = {name: evaluate(corpus.qrels, exact[name]) for name in KINDS}
    results = []
    for name in KINDS:
        figures = {**measured[name], "drain_seconds": drains[name], "ms_per_query": ms[name],
                   **{m: scores[name][m] for m in METRICS}, **{f"exact_{m}": exact_scores[name][m] for m in METRICS},
                   "documents": len(corpus.docs), "queries": len(corpus.queries),
                   "chunk_tokens": bench.scale.late_chunk_tokens or "default"}
        bench.log(f"late_chunking: {name} {figures}")
        note = (f"Recall@5 {figures['recall@5']:.4f}, MRR@10 {figures['mrr@10']:.4f}, P@5 {figures['p@5']:.4f}; "
                f"drained in {drains[name]:.0f} s; index {figures['index_bytes'] / 2**20:.2f} MiB built in "
                f"{figures['build_seconds']:.2f} s, table {figures['table_bytes'] / 2**20:.2f} MiB; "
                f"{figures['rows']} chunks of {len(corpus.docs)} docs, {len(corpus.queries)} queries")
        reference = exact_scores[name]["ndcg@10"]
        results.append(Result(NAME, f"{name} chunking", scores[name]["ndcg@10"], "nDCG@10", limit=reference,
                              limit_unit="nDCG@10", limit_label="exact, same vectors",
                              ratio=ratio(scores[name]["ndcg@10"], reference), note=note, details=figures))
    return results
