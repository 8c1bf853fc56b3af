"""10. The read path: search latency and throughput over `read_rows` rows (384-d, HNSW).

The destination is filled by binary COPY of hash vectors of the corpus (the worker is not
what this measures) and its HNSW index built afterwards, as pgembed's deferred build does.
The same queries, one client, one at a time (the variants taking turns, query by query, so
that the machine's drifting load falls on all of them alike), go through:

* raw SQL with the precomputed vector: `ORDER BY embedding <=> q LIMIT k` on the
  destination, prepared, at the `hnsw.ef_search` pgembed.search sets: the limit;
* `pgembed.search(pipeline, vector, k)` in SQL;
* `Client.search(pipeline, vector=...)`: the overhead beyond the embedding call, the
  figure the target (≤ 1.2 × raw SQL) is about;
* `Client.search(pipeline, text)`: with the embedding (hash provider: near free) and the
  usage ledger;
* the `pgembed search` command, a few times (a process start each).

Recall@10 of pgembed.search against exact search (numpy, brute force over the same
vectors, in this run) is reported beside the latencies, with the ef_search used. So is
each call's CPU, this process's and its PostgreSQL backend's (when local): on a machine
whose other load comes and goes, the CPU ratio moves far less than the latency's.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from benchmarks.harness import (
    REPO,
    Bench,
    Result,
    at_least,
    at_most,
    connect,
    content_of,
    copy_docs,
    copy_vectors,
    corpus,
    create_docs,
    create_pipeline,
    percentile,
    ratio,
    sha256,
)
from pgembed.cache import chunk_key
from pgembed.client import Client
from pgembed.providers.hashing import hash_array

NAME = "read_path"
DIMS = 384
MODEL = f"hash:{DIMS}"
K = 10


def run(bench: Bench) -> list[Result]:
    results: list[Result] = []
    for rows in bench.scale.read_rows:
        bench.log(f"  {NAME}: {rows:,} rows, {bench.scale.read_queries} queries, k = {K}")
        results += _at(bench, rows)
    return results


def _at(bench: Bench, rows: int) -> list[Result]:
    docs = corpus(rows)
    texts = [content_of(title, body) for _, title, body in docs]
    vectors = np.stack([hash_array(t, DIMS) for t in texts]).astype(np.float32)
    queries = [content_of(title, body) for _, title, body in corpus(bench.scale.read_queries, offset=900_000)]
    query_vectors = [hash_array(q, DIMS).astype(np.float32) for q in queries]
    with bench.database() as dsn, connect(dsn) as conn:
        destination = _load(conn, docs, texts, vectors)
        # the statistics autovacuum keeps (pgembed.search reads chunks per row from them)
        conn.execute(sql.SQL("ANALYZE docs, pgembed.{}").format(sql.Identifier(destination)))
        ef = _ef_search(conn)
        latencies, cpu = _latencies(bench, conn, dsn, destination, queries, query_vectors, ef)
        recall = _recall(conn, vectors, query_vectors)
    return _results(rows, latencies, cpu, recall, ef)


def _load(conn: psycopg.Connection, docs: list[tuple[int, str, str]], texts: list[str],
          vectors: np.ndarray) -> str:
    """Source rows, then the pipeline (no backfill), then its destination by COPY; the HNSW
    index is built once the rows are in, as a deferred build would."""
    create_docs(conn)
    copy_docs(conn, docs)
    destination = create_pipeline(conn, MODEL, index="hnsw", backfill=False)
    index = conn.execute("SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = %s::regclass "
                         "AND NOT indisprimary", (f"pgembed.{destination}",)).fetchone()[0]
    conn.execute(sql.SQL("DROP INDEX {}").format(sql.SQL(index)))
    copy_vectors(conn, destination, ((d[0], 0, t, sha256(t), chunk_key(MODEL, DIMS, t), v)
                                     for d, t, v in zip(docs, texts, vectors, strict=True)), schema="pgembed")
    # the graph in memory (a build that spills slows down many times): 1 GB to 250k rows,
    # 4 GB at 1M (384-d vectors are 1.5 GB there)
    conn.execute(sql.SQL("SET maintenance_work_mem = {}").format(
        sql.Literal(f"{max(1, -(-len(docs) // 250_000))}GB")))
    conn.execute("SELECT pgembed.create_vector_index(p) FROM pgembed.pipelines p")
    return destination


def _ef_search(conn: psycopg.Connection) -> int:
    """The hnsw.ef_search pgembed.search runs with for k rows: it sets it for its own reads
    and puts the caller's back, so it is not to be seen after the call; this is its rule
    (sql/search.sql), for the first read of one-chunk rows."""
    row = conn.execute("SELECT least(1000, greatest(40, %(k)s * 4, %(k)s * coalesce(rerank, 0))) "
                       "FROM pgembed.pipelines", {"k": K}).fetchone()
    return int(row[0])


def _timed(calls: list[Callable[[], object]]) -> list[float]:
    """Seconds of each call, after two untimed ones (plans, caches)."""
    return _interleaved({"": calls})[0][""]


def _backend_cpu(pid: int | None) -> float:
    """CPU seconds a local PostgreSQL backend has run, to the nanosecond (the scheduler's
    count; 0 when it is not on this machine): unlike latency, CPU does not grow with the
    other processes' load on a shared machine."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _interleaved(variants: dict[str, list[Callable[[], object]]],
                 backends: dict[str, int] | None = None) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds of each call of each variant, the variants taking turns query by query (after
    two untimed rounds): on a shared machine the load drifts, and a variant timed in a block
    of its own would carry the drift of its minute into its ratio to the others. Who goes
    first rotates: the first to search near a new query warms the caches for the others.
    Also each variant's CPU seconds a call, this process's and its backend's (`backends`)."""
    names = list(variants)
    rounds = list(zip(*variants.values(), strict=True))
    for calls in rounds[:2]:
        for call in calls:
            call()
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu = dict.fromkeys(names, 0.0)
    for i, calls in enumerate(rounds):
        for j in range(len(names)):
            turn = (i + j) % len(names)
            pid = (backends or {}).get(names[turn])
            cpu_before = time.process_time() + _backend_cpu(pid)
            started = time.perf_counter()
            calls[turn]()
            times[names[turn]].append(time.perf_counter() - started)
            cpu[names[turn]] += time.process_time() + _backend_cpu(pid) - cpu_before
    return times, {name: cpu[name] / max(len(rounds), 1) for name in names}


def _latencies(bench: Bench, conn: psycopg.Connection, dsn: str, destination: str, queries: list[str],
               vectors: list[np.ndarray], ef: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    raw = sql.SQL("SELECT id, chunk_seq, chunk, embedding <=> %(q)s AS distance FROM pgembed.{} "
                  "ORDER BY embedding <=> %(q)s LIMIT %(k)s").format(sql.Identifier(destination))
    pipeline = conn.execute("SELECT name FROM pgembed.pipelines").fetchone()[0]
    conn.execute(sql.SQL("SET hnsw.ef_search = {}").format(sql.Literal(ef)))
    conn.execute("SET hnsw.iterative_scan = relaxed_order")
    client = Client(dsn)
    backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    client_backend = client.conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    try:
        measured, cpu = _interleaved({
            "raw SQL": [lambda v=v: conn.execute(raw, {"q": v, "k": K}, prepare=True).fetchall() for v in vectors],
            "pgembed.search()": [lambda v=v: conn.execute(
                "SELECT * FROM pgembed.search(%s, %s::real[], %s)", (pipeline, v, K),
                prepare=True).fetchall() for v in vectors],
            "Client.search(vector)": [lambda v=v: client.search(pipeline, vector=v, k=K) for v in vectors],
            "Client.search(text)": [lambda q=q: client.search(pipeline, q, k=K) for q in queries],
        }, {"raw SQL": backend, "pgembed.search()": backend, "Client.search(vector)": client_backend,
            "Client.search(text)": client_backend})
    finally:
        client.close()
    command = [sys.executable, "-m", "pgembed", "search", pipeline, queries[0], "-k", str(K), "--dsn", dsn]
    measured["pgembed search (CLI)"] = _timed(
        [lambda: subprocess.run(command, cwd=REPO, check=True, capture_output=True)] * bench.scale.read_cli_runs)
    return measured, cpu


def _recall(conn: psycopg.Connection, vectors: np.ndarray, queries: list[np.ndarray]) -> float:
    """Recall@K of pgembed.search against exact cosine search over the same vectors."""
    pipeline = conn.execute("SELECT name FROM pgembed.pipelines").fetchone()[0]
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    found = 0
    for q in queries:
        exact = {int(i) + 1 for i in np.argsort(-(unit @ (q / np.linalg.norm(q))))[:K]}  # ids start at 1
        got = {int(r[0]["id"]) for r in conn.execute(
            "SELECT key FROM pgembed.search(%s, %s::real[], %s)", (pipeline, q.tolist(), K)).fetchall()}
        found += len(exact & got)
    return found / (K * len(queries))


def _summary(times: list[float]) -> dict[str, Any]:
    ms = [t * 1000 for t in times]
    return {"p50_ms": round(percentile(ms, 50), 3), "p99_ms": round(percentile(ms, 99), 3),
            "qps": round(len(ms) / (sum(ms) / 1000), 1), "n": len(ms)}


def _results(rows: int, latencies: dict[str, list[float]], cpu: dict[str, float], recall: float,
             ef: int) -> list[Result]:
    summaries = {name: _summary(times) for name, times in latencies.items()}
    base = summaries["raw SQL"]["p50_ms"]
    label = f"{rows // 1000}k" if rows < 1_000_000 else f"{rows // 1_000_000}M"
    results = []
    for name, s in summaries.items():
        r = ratio(s["p50_ms"], base)
        target, met = ("≤ 1.2 × raw SQL", at_most(r, 1.2)) if name == "Client.search(vector)" else ("", None)
        cpu_ms = round(cpu[name] * 1000, 3) if name in cpu else None
        results.append(Result(NAME, f"{label} {name} p50", s["p50_ms"], "ms", base, "ms", "raw SQL, same vector",
                              r, target, met, details={**s, "rows": rows, "ef_search": ef, "cpu_ms": cpu_ms}))
    if cpu.get("raw SQL"):
        # the same calls' CPU, client and server: what the load of a shared machine leaves alone
        for name in ("pgembed.search()", "Client.search(vector)"):
            r = ratio(cpu[name], cpu["raw SQL"])
            results.append(Result(NAME, f"{label} {name} CPU", round(cpu[name] * 1000, 3), "ms",
                                  round(cpu["raw SQL"] * 1000, 3), "ms", "raw SQL's CPU, same vector", r,
                                  "reported", at_least(r, 0.0)))
    results.append(Result(NAME, f"{label} recall@{K}", recall, "", 1.0, "", "exact search", recall,
                          "reported", at_least(recall, 0.0), details={"ef_search": ef, "rows": rows}))
    return results
