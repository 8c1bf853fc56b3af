"""1. Write path: end-to-end sync throughput with the `hash` provider, against binary COPY of
the very same vectors into a table of the destination's shape with the same index.

Rows are queued by one COPY into the source table (the triggers fill the outbox), then an
in-process worker (pgembed's default concurrency and batch size) drains the queue: that
time covers claiming, reading the content, hashing, cache look-ups, embedding, writing
and acknowledging. The limit is what PostgreSQL ingests through the fastest client path
there is: the vectors the worker produced, read back, then written with psycopg's binary
COPY and pgvector's binary dumper into `LIKE destination INCLUDING ALL` (primary key and,
for HNSW, the same vector index). CPU seconds of the client and of the server are kept
in the details, so the report shows which side a gap is on.
"""

from __future__ import annotations

import time

from benchmarks.harness import (
    Bench,
    Result,
    at_least,
    checkpoint,
    connect,
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
    vacuum,
    worker_config,
)

NAME = "write_path"


def _targets(dims: int, index: str, rows_per_s: float, r: float | None) -> tuple[str, bool | None]:
    if index == "hnsw":
        return "≥ 0.8 × COPY", at_least(r, 0.8)
    if dims == 768:
        met = at_least(r, 0.5)
        return "≥ 0.5 × COPY and ≥ 6,000 rows/s", None if met is None else met and rows_per_s >= 6000
    return "", None


def case(bench: Bench, dims: int, index: str, rows: int) -> Result:
    with bench.database() as dsn, connect(dsn) as conn:
        create_docs(conn)
        destination = create_pipeline(conn, f"hash:{dims}", index=index)
        copy_docs(conn, corpus(rows))
        vacuum(conn, "pgembed.outbox")
        checkpoint(conn, bench.scale)

        before = cpu_now(bench)
        drained = drain(dsn, worker_config(bench.scale))
        sync_cpu = cpu_now(bench) - before
        stored = count(conn, destination)

        vectors = fetch_destination(conn, destination)
        like_destination(conn, destination, "copy_limit", indexes=True)
        checkpoint(conn, bench.scale)
        before = cpu_now(bench)
        start = time.perf_counter()
        copy_seconds = copy_vectors(conn, "copy_limit", vectors)
        copy_cpu = cpu_now(bench) - before
        copy_wall = time.perf_counter() - start

    figure = rows / drained.seconds
    limit = len(vectors) / copy_seconds
    r = ratio(figure, limit)
    target, met = _targets(dims, index, figure, r)
    notes = []
    if stored != rows:
        notes.append(f"only {stored} of {rows} rows embedded")
        met = False
    if drained.runs > 1:
        notes.append(f"the worker exited with ready rows left; drained in {drained.runs} runs")
    return Result(
        NAME, f"{dims}d/{index}", figure, "rows/s", limit, "rows/s", "binary COPY", r, target, met,
        note="; ".join(notes),
        details={"rows": rows, "stored": stored, "worker_runs": drained.runs,
                 "sync": sync_cpu.as_dict(drained.seconds), "copy": copy_cpu.as_dict(copy_wall),
                 "sync_cpu_per_row_ms": {
                     "client": round(sync_cpu.client / rows * 1000, 4),
                     "server": None if sync_cpu.server is None else round(sync_cpu.server / rows * 1000, 4)},
                 "copy_cpu_per_row_ms": {
                     "client": round(copy_cpu.client / rows * 1000, 4),
                     "server": None if copy_cpu.server is None else round(copy_cpu.server / rows * 1000, 4)},
                 "worker": {"concurrency": bench.scale.worker_concurrency,
                            "batch_size": bench.scale.worker_batch_size}},
    )


def run(bench: Bench) -> list[Result]:
    results = []
    for index, rows in (("none", bench.scale.write_rows), ("hnsw", bench.scale.write_hnsw_rows)):
        for dims in bench.scale.write_dims:
            bench.log(f"  {NAME}: {dims}d, index {index}, {rows:,} rows")
            results.append(case(bench, dims, index, rows))
    return results
