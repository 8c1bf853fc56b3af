"""15. Write-through: the time from an application's commit to its row being searchable,
when the application names the row (`pgembed.writethrough.sync_keys`, its pool kept open as
a server's would be) vs when it leaves the row to a worker waiting on LISTEN (`pgembed
worker` as a subprocess, measured as the freshness scenario does, with its poller). Both
embed through the real `openai` client against the fake API at a realistic latency, so the
floor is the embedding call itself: the same provider's `embed` of one text, timed here.

Each row is inserted and committed on its own; write-through's latency runs from the
INSERT's commit returning to sync_keys returning (its acknowledgement is committed by
then). Afterwards every row is searched by its text (pgembed.search.search, the query's
vector from the cache) and must come first: "searchable" is checked, not assumed.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import psycopg
from psycopg import sql

from benchmarks.api_bound import environment
from benchmarks.freshness import measure, summary, wait_for_listener
from benchmarks.harness import (
    Bench,
    Result,
    at_most,
    connect,
    content_of,
    corpus,
    create_docs,
    create_pipeline,
    spawn,
    stop,
)
from pgembed import db
from pgembed.providers import ModelSpec, make_provider
from pgembed.search import search
from pgembed.writethrough import WriteThrough, sync_keys

NAME = "write_through"
MODEL = "openai:text-embedding-3-small"
DIMS = 256


async def _write_through(dsn: str, pipeline: str, rows: list[tuple[int, str, str]], rate: float) -> list[float]:
    """Commit → sync_keys returned, per row, in seconds; a row every 1/rate s at most."""
    insert = sql.SQL("INSERT INTO docs (id, title, body) VALUES (%s, %s, %s)")
    pool = db.worker_pool(dsn, "bench-write-through", max_size=2)
    await pool.open(wait=True)
    session = WriteThrough(pool)  # kept across calls, as a server keeps it
    latencies = []
    try:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as app:
            start = time.perf_counter()
            for n, row in enumerate(rows):
                delay = start + n / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                await app.execute(insert, row, prepare=True)
                committed = time.perf_counter()
                result = await sync_keys(session, pipeline, [row[0]])
                latencies.append(time.perf_counter() - committed)
                if not result.ok:
                    raise RuntimeError(f"write-through of row {row[0]} failed: {result.as_dict()}")
    finally:
        await session.aclose()
        await pool.close()
    return latencies


async def _embedding_calls(texts: list[str]) -> list[float]:
    """The floor: one provider.embed of one text, as write-through makes it (after three
    to warm up: the tokenizer's load, the connection)."""
    provider = make_provider(ModelSpec(MODEL, DIMS, native_dimensions=1536))
    latencies = []
    try:
        for text in texts[:3]:
            await provider.embed([text])
        for text in texts[3:]:
            started = time.perf_counter()
            await provider.embed([text])
            latencies.append(time.perf_counter() - started)
    finally:
        await provider.aclose()
    return latencies


def _unsearchable(conn: psycopg.Connection, pipeline: str, rows: list[tuple[int, str, str]]) -> list[int]:
    """Rows a search by their own text does not find first."""
    return [i for i, title, body in rows
            if [h.key for h in search(conn, pipeline, content_of(title, body), k=1)] != [{"id": i}]]


def run(bench: Bench) -> list[Result]:
    s = bench.scale
    bench.log(f"  {NAME}: {s.wt_rows} rows at {s.wt_rate:g}/s each way, fake API at "
              f"{s.wt_latency * 1000:.0f} ms")
    api = bench.fake_api(s.wt_latency)
    api.control(reset=True)  # real (not canned) vectors: a search by a row's text must find it
    api.control(latency=s.wt_latency)
    warmup, by_worker = corpus(3, offset=300_000), corpus(s.wt_rows)
    by_call = corpus(s.wt_rows, offset=s.wt_rows)
    with bench.database() as dsn, connect(dsn) as conn, environment(api.env()):
        create_docs(conn)
        pipeline = create_pipeline(conn, MODEL, dimensions=DIMS, index="hnsw")
        (destination,) = conn.execute("SELECT destination FROM pgembed.pipelines WHERE name = %s",
                                      (pipeline,)).fetchone()
        floor = asyncio.run(_embedding_calls([content_of(t, b) for _, t, b in corpus(s.wt_rows + 3, 500_000)]))

        worker = spawn(bench, "write-through-worker", ["-m", "pgembed", "worker", "--dsn", dsn], env=api.env())
        try:
            wait_for_listener(conn, "pgembed-listener")
            measure(conn, dsn, "docs", destination, "pgembed", warmup, s.wt_rate)
            waited = measure(conn, dsn, "docs", destination, "pgembed", by_worker, s.wt_rate)
        finally:
            stop(worker)

        asyncio.run(_write_through(dsn, pipeline, corpus(3, offset=400_000), s.wt_rate))  # warm up
        called = asyncio.run(_write_through(dsn, pipeline, by_call, s.wt_rate))
        missing = _unsearchable(conn, pipeline, by_worker + by_call)
        if missing:
            raise RuntimeError(f"{len(missing)} rows are not found by a search for their text: {missing[:5]}")

    wt, lw, fl = summary(called), summary(waited), summary(floor)
    details: dict[str, Any] = {"rows": s.wt_rows, "rate_per_s": s.wt_rate, "api_latency_ms": s.wt_latency * 1000,
                               "model": MODEL, "dimensions": DIMS, "index": "hnsw",
                               "write_through": wt, "listening_worker": lw, "embedding_call": fl,
                               "searchable_checked": len(by_worker) + len(by_call),
                               "load_average": [round(x, 2) for x in os.getloadavg()]}
    return [
        Result(NAME, "commit→searchable p50, write-through", wt["p50_ms"], "ms", fl["p50_ms"], "ms",
               "embedding call p50", wt["p50_ms"] / fl["p50_ms"], "≤ listening worker p50",
               at_most(wt["p50_ms"], lw["p50_ms"]), details=details),
        Result(NAME, "commit→searchable p99, write-through", wt["p99_ms"], "ms", fl["p99_ms"], "ms",
               "embedding call p99", wt["p99_ms"] / fl["p99_ms"], "≤ listening worker p99",
               at_most(wt["p99_ms"], lw["p99_ms"]), details={"see": "the first line"}),
        Result(NAME, "commit→searchable p50, listening worker", lw["p50_ms"], "ms", wt["p50_ms"], "ms",
               "write-through p50", lw["p50_ms"] / wt["p50_ms"], "", None, details={"see": "the first line"}),
        Result(NAME, "commit→searchable p99, listening worker", lw["p99_ms"], "ms", wt["p99_ms"], "ms",
               "write-through p99", lw["p99_ms"] / wt["p99_ms"], "", None, details={"see": "the first line"}),
    ]
