"""2. Backfill: `create_pipeline` on a table that already holds N rows, until every row is
searchable (vectors stored, vector index up to date), against

* the limit: binary COPY of the same vectors into a table of the destination's shape with
  no vector index, then CREATE INDEX (the very index the pipeline made, same options) with
  `maintenance_work_mem` raised so that the HNSW graph is built in memory, with the
  server's parallel maintenance workers;
* a naive row-by-row design: one INSERT (one transaction) per row into a table that has
  the index, timed on a sample and extrapolated. The sample starts from an empty index,
  where HNSW inserts are cheapest, so the naive rate is flattered, not penalised.
"""

from __future__ import annotations

import threading
import time

import numpy as np
from psycopg import sql

from benchmarks.harness import (
    DEST_COLUMNS,
    Bench,
    Result,
    at_least,
    checkpoint,
    connect,
    content_of,
    copy_docs,
    copy_vectors,
    corpus,
    count,
    cpu_now,
    create_docs,
    create_pipeline,
    drain,
    fetch_destination,
    like_destination,
    ratio,
    sha256,
    short,
    vacuum,
    worker_config,
)
from pgembed.cache import chunk_key
from pgembed.providers.hashing import hash_vector

NAME = "backfill"


def vector_index(conn, destination: str) -> str:
    """The `USING …` part of the destination's vector index definition."""
    row = conn.execute(
        "SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i "
        "WHERE i.indrelid = format('pgembed.%%I', %s::text)::regclass AND NOT i.indisprimary",
        (destination,)).fetchone()
    if row is None:
        raise RuntimeError(f"pgembed.{destination} has no vector index")
    return row[0].split(" USING ", 1)[1]


class StoredWatch:
    """Notes when the queue is first empty: every row is stored, the embedding phase is over
    and the deferred index build begins. (An EXISTS on the queue: a count(*) of the growing
    destination five times a second would tax the run it measures.)"""

    def __init__(self, dsn: str, start: float) -> None:
        self.seconds: float | None = None
        self._args = (dsn, start)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        dsn, start = self._args
        with connect(dsn, vector=False) as conn:
            while not self._stop.wait(0.2):
                if not conn.execute("SELECT EXISTS (SELECT FROM pgembed.outbox)").fetchone()[0]:
                    self.seconds = time.perf_counter() - start
                    return

    def close(self) -> float | None:
        self._stop.set()
        self._thread.join()
        return self.seconds


def complete(vectors: list[tuple], rows: int, dims: int) -> list[tuple]:
    """The destination rows the worker did not write, computed in Python the same way."""
    done = {v[0] for v in vectors}
    model = f"hash:{dims}"
    extra = []
    for i, title, body in corpus(rows):
        if i not in done:
            text = content_of(title, body)
            extra.append((i, 0, text, sha256(text), chunk_key(model, dims, text),
                          np.asarray(hash_vector(text, dims), dtype=np.float32)))
    return sorted(vectors + extra, key=lambda v: v[0])


def run(bench: Bench) -> list[Result]:
    s = bench.scale
    rows, dims = s.backfill_rows, s.backfill_dims
    bench.log(f"  {NAME}: {rows:,} rows, hash:{dims}, HNSW")
    with bench.database() as dsn, connect(dsn) as conn:
        create_docs(conn)
        copy_docs(conn, corpus(rows))
        vacuum(conn, "docs")
        checkpoint(conn, bench.scale)

        # the figure: create_pipeline → every row searchable
        before = cpu_now(bench)
        start = time.perf_counter()
        destination = create_pipeline(conn, f"hash:{dims}", index="hnsw")
        created = time.perf_counter() - start
        watch = StoredWatch(dsn, start)
        drained = drain(dsn, worker_config(s), budget=s.backfill_budget_s or None)
        pipeline_seconds = time.perf_counter() - start
        embedded_seconds = watch.close()
        pipeline_cpu = cpu_now(bench) - before
        stored = count(conn, destination)
        using = vector_index(conn, destination)
        vectors = fetch_destination(conn, destination)
        if drained.stopped:  # the rows the worker did not reach, computed as it would have
            vectors = complete(vectors, rows, dims)

        # the limit: COPY with no vector index, then CREATE INDEX
        like_destination(conn, destination, "backfill_limit", indexes=False)
        checkpoint(conn, bench.scale)
        before = cpu_now(bench)
        copy_seconds = copy_vectors(conn, "backfill_limit", vectors)
        conn.execute(sql.SQL("SET maintenance_work_mem = {}").format(sql.Literal(s.maintenance_work_mem)))
        parallel = conn.execute("SHOW max_parallel_maintenance_workers").fetchone()[0]
        start = time.perf_counter()
        conn.execute(sql.SQL("CREATE INDEX ON public.backfill_limit USING ") + sql.SQL(using))
        index_seconds = time.perf_counter() - start
        limit_cpu = cpu_now(bench) - before
        conn.execute("RESET maintenance_work_mem")
        limit_seconds = copy_seconds + index_seconds

        # the naive design: one INSERT per row, index present
        like_destination(conn, destination, "backfill_naive", indexes=True)
        checkpoint(conn, bench.scale)
        sample = vectors[: s.naive_rows]
        insert = sql.SQL("INSERT INTO public.backfill_naive ({}) VALUES ({})").format(
            sql.SQL(", ").join(map(sql.Identifier, DEST_COLUMNS)),
            sql.SQL(", ").join(sql.Placeholder() * len(DEST_COLUMNS)))
        start = time.perf_counter()
        with conn.cursor() as cur:
            for row in sample:
                cur.execute(insert, row, prepare=True)
        naive_rate = len(sample) / (time.perf_counter() - start)

    figure = stored / pipeline_seconds
    limit = rows / limit_seconds
    if drained.stopped:
        note = (f"time budget: stopped after {pipeline_seconds:.0f}s with {stored:,} of {rows:,} rows "
                f"searchable (full backfill ≈ {rows / figure:.0f}s at that rate, and slower still: HNSW "
                f"inserts slow down as the graph grows); --set backfill_budget_s=0 runs it to the end")
        ok = True
    else:
        note = "" if stored == rows else f"only {stored} of {rows} rows embedded"
        ok = stored == rows
    if drained.runs > 1:
        note = "; ".join(filter(None, [note, f"the worker exited with ready rows left; {drained.runs} runs"]))
    details = {
        "rows": rows, "dimensions": dims, "stored": stored, "index": using,
        "stopped_by_budget": drained.stopped, "budget_s": s.backfill_budget_s,
        "pipeline": {"create_pipeline_s": round(created, 3), "drain_s": round(drained.seconds, 3),
                     # create_pipeline → every row stored; the rest is the deferred index build
                     "all_stored_s": None if embedded_seconds is None else round(embedded_seconds, 3),
                     "total_s": round(pipeline_seconds, 3), "worker_runs": drained.runs,
                     **pipeline_cpu.as_dict(pipeline_seconds)},
        "limit": {"copy_s": round(copy_seconds, 3), "create_index_s": round(index_seconds, 3),
                  "total_s": round(limit_seconds, 3), "maintenance_work_mem": s.maintenance_work_mem,
                  "max_parallel_maintenance_workers": parallel,
                  **limit_cpu.as_dict(limit_seconds)},
        "naive": {"sample_rows": len(sample), "rows_per_s": round(naive_rate, 1),
                  "extrapolated_s": round(rows / naive_rate, 1)},
    }
    return [
        Result(NAME, f"{short(rows)}/{dims}d vs limit", figure, "rows/s", limit, "rows/s",
               "COPY + CREATE INDEX", ratio(figure, limit), "≥ 0.8 × (COPY + index)",
               at_least(ratio(figure, limit), 0.8) and ok, note=note, details=details),
        Result(NAME, f"{short(rows)}/{dims}d vs naive", figure, "rows/s", naive_rate, "rows/s",
               "naive row-by-row", ratio(figure, naive_rate), "≥ 5 × naive",
               at_least(ratio(figure, naive_rate), 5.0) and ok, details={"see": "the line above"}),
    ]
