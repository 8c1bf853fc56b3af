"""15. Write-through: the time from an application's commit to its row being searchable,
when the application names the row (`pgembed.writethrough.sync_keys`, its pool kept open as
a server's would be) vs when it leaves the row to a worker waiting on LISTEN (`pgembed
worker` as a subprocess, measured as the freshness scenario does, with its poller). Both
embed through the real `openai` client against the fake API at a realistic latency, so the
floor is the embedding call itself: the same provider's `embed` of one text, timed here.

Then the same under load: a second pipeline's backfill of `wt_backlog` rows (bulk work,
held back by a closed bulk lane until then) keeps the worker's slots busy, and the rows
inserted meanwhile alternate: one written through, the next left to the worker.
A live row jumps the bulk backlog, but waits for a slot to finish its bulk batch; a row
written through does not wait for a slot (it may wait for the worker, if the worker took it
first).

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
from benchmarks.freshness import Poller, measure, summary, wait_for_listener
from benchmarks.harness import (
    Bench,
    Result,
    at_most,
    connect,
    content_of,
    copy_docs,
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


async def _write_through(dsn: str, pipeline: str, rows: list[tuple[int, str, str]], rate: float,
                         poller: Poller | None = None) -> list[float]:
    """Commit → sync_keys returned, per row, in seconds; a row every 1/rate s at most. With
    a poller, every other row is left to the worker and the poller times it instead."""
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
                if poller is not None and n % 2:
                    poller.committed(row[0], committed)
                    continue
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


def _backlog(conn: psycopg.Connection, rows: int) -> str:
    """A second pipeline's backfill of `rows` rows, queued as bulk work behind a closed bulk
    lane (so that the worker leaves it alone until _loaded opens it)."""
    conn.execute("UPDATE pgembed.bulk_lane SET opens = (now() AT TIME ZONE 'UTC')::time + interval '6 hours', "
                 "closes = (now() AT TIME ZONE 'UTC')::time + interval '7 hours', time_zone = 'UTC'")
    create_docs(conn, "backlog")
    copy_docs(conn, corpus(rows, offset=600_000), table="backlog")
    return create_pipeline(conn, MODEL, table="backlog", dimensions=DIMS, index="none")


def _left(conn: psycopg.Connection, pipeline: str) -> int:
    return int(conn.execute("SELECT count(*) + pgembed.statement_keys(%s) FROM pgembed.outbox WHERE pipeline = %s",
                            (pipeline, pipeline)).fetchone()[0])


def _loaded(bench: Bench, conn: psycopg.Connection, dsn: str, pipeline: str, destination: str, backlog: str,
            rows: list[tuple[int, str, str]], env: dict[str, str]) -> tuple[list[float], list[float], int]:
    """Opens the bulk lane, and once the worker is on the backlog inserts `rows`, every
    other one written through and the rest left to the worker. Latencies of each, and the
    backlog rows left at the end."""
    conn.execute("UPDATE pgembed.bulk_lane SET opens = NULL, closes = NULL")
    queued = _left(conn, backlog)
    worker = spawn(bench, "write-through-busy-worker", ["-m", "pgembed", "worker", "--dsn", dsn], env=env)
    try:
        wait_for_listener(conn, "pgembed-listener")
        deadline = time.monotonic() + 30
        while _left(conn, backlog) == queued and time.monotonic() < deadline:
            time.sleep(0.05)
        poller = Poller(dsn, destination, "pgembed")
        try:
            called = asyncio.run(_write_through(dsn, pipeline, rows, bench.scale.wt_rate, poller))
            poller.wait(60)
        finally:
            poller.close()
        left = _left(conn, backlog)
    finally:
        stop(worker)
    waited = [poller.latency[r[0]] for i, r in enumerate(rows) if i % 2 and r[0] in poller.latency]
    if len(waited) != len(rows) // 2:
        raise RuntimeError(f"{len(rows) // 2 - len(waited)} rows left to the worker never became visible")
    return called, waited, left


def run(bench: Bench) -> list[Result]:
    s = bench.scale
    bench.log(f"  {NAME}: {s.wt_rows} rows at {s.wt_rate:g}/s each way, fake API at "
              f"{s.wt_latency * 1000:.0f} ms; then {s.wt_rows} more during a {s.wt_backlog:,}-row backfill")
    api = bench.fake_api(s.wt_latency)
    api.control(reset=True)  # real (not canned) vectors: a search by a row's text must find it
    api.control(latency=s.wt_latency)
    warmup, by_worker = corpus(3, offset=300_000), corpus(s.wt_rows)
    by_call, under_load = corpus(s.wt_rows, offset=s.wt_rows), corpus(s.wt_rows, offset=2 * s.wt_rows)
    with bench.database() as dsn, connect(dsn) as conn, environment(api.env()):
        create_docs(conn)
        pipeline = create_pipeline(conn, MODEL, dimensions=DIMS, index="hnsw")
        (destination,) = conn.execute("SELECT destination FROM pgembed.pipelines WHERE name = %s",
                                      (pipeline,)).fetchone()
        backlog = _backlog(conn, s.wt_backlog)
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
        busy_called, busy_waited, left = _loaded(bench, conn, dsn, pipeline, destination, backlog, under_load,
                                                 api.env())
        checked = by_worker + by_call + under_load
        missing = _unsearchable(conn, pipeline, checked)
        if missing:
            raise RuntimeError(f"{len(missing)} rows are not found by a search for their text: {missing[:5]}")

    wt, lw, fl = summary(called), summary(waited), summary(floor)
    bwt, blw = summary(busy_called), summary(busy_waited)
    details: dict[str, Any] = {"rows": s.wt_rows, "rate_per_s": s.wt_rate, "api_latency_ms": s.wt_latency * 1000,
                               "model": MODEL, "dimensions": DIMS, "index": "hnsw",
                               "write_through": wt, "listening_worker": lw, "embedding_call": fl,
                               "during_backfill": {"backlog_rows": s.wt_backlog, "backlog_left_at_end": left,
                                                   "write_through": bwt, "listening_worker": blw},
                               "searchable_checked": len(checked),
                               "load_average": [round(x, 2) for x in os.getloadavg()]}
    see = {"see": "the first line"}
    return [
        Result(NAME, "commit→searchable p50, write-through", wt["p50_ms"], "ms", fl["p50_ms"], "ms",
               "embedding call p50", wt["p50_ms"] / fl["p50_ms"], "≤ listening worker p50",
               at_most(wt["p50_ms"], lw["p50_ms"]), details=details),
        Result(NAME, "commit→searchable p99, write-through", wt["p99_ms"], "ms", fl["p99_ms"], "ms",
               "embedding call p99", wt["p99_ms"] / fl["p99_ms"], "≤ listening worker p99",
               at_most(wt["p99_ms"], lw["p99_ms"]), details=see),
        Result(NAME, "commit→searchable p50, listening worker", lw["p50_ms"], "ms", wt["p50_ms"], "ms",
               "write-through p50", lw["p50_ms"] / wt["p50_ms"], "", None, details=see),
        Result(NAME, "commit→searchable p99, listening worker", lw["p99_ms"], "ms", wt["p99_ms"], "ms",
               "write-through p99", lw["p99_ms"] / wt["p99_ms"], "", None, details=see),
        Result(NAME, "during a backfill: p50, write-through", bwt["p50_ms"], "ms", blw["p50_ms"], "ms",
               "listening worker p50", bwt["p50_ms"] / blw["p50_ms"], "≤ listening worker p50",
               at_most(bwt["p50_ms"], blw["p50_ms"]), details=see),
        Result(NAME, "during a backfill: p99, write-through", bwt["p99_ms"], "ms", blw["p99_ms"], "ms",
               "listening worker p99", bwt["p99_ms"] / blw["p99_ms"], "≤ listening worker p99",
               at_most(bwt["p99_ms"], blw["p99_ms"]), details=see),
    ]
