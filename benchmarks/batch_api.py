"""15. The provider's Batch API: a backfill sent as one batch, then collected and stored
once the (fake) provider has run it, against the same rows drained by a worker from the
same fake API, in the same run. The fake answers pre-serialised vectors on both paths and
runs the batch between the two timed steps (the provider's hours are not pgembed's time).

Figures: rows/s of submit (read, cut, look up, write the JSONL, upload) and of collect
and store (download, cache, the worker's fenced acknowledgement), each as a ratio of the
worker drain's rows/s.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from benchmarks.api_bound import environment
from benchmarks.harness import (
    Bench,
    Result,
    connect,
    copy_docs,
    corpus,
    count,
    create_docs,
    create_pipeline,
    drain,
    ratio,
    vacuum,
    worker_config,
)
from pgembed.batch_api import BatchAPI

NAME = "batch_api"
MODEL = "openai:text-embedding-3-small"


def run(bench: Bench) -> list[Result]:
    s = bench.scale
    api = bench.fake_api(0.0)
    with environment(api.env()):
        baseline = _drain(bench)
        api.reset(0.0)
        batch = _batch(bench, api)
    results = []
    for case in ("submit", "collect and store"):
        figure = batch[case]
        results.append(Result(NAME, f"{case} {s.batch_api_rows} rows", figure, "rows/s", baseline, "rows/s",
                              "worker drain", ratio(figure, baseline), "",
                              batch["stored"] == s.batch_api_rows, details=batch))
    return results


def _loaded(bench: Bench, dsn: str) -> str:
    with connect(dsn) as conn:
        create_docs(conn)
        copy_docs(conn, corpus(bench.scale.batch_api_rows))
        # created on a loaded table: its rows are a backfill (bulk), what a batch takes
        destination = create_pipeline(conn, MODEL, dimensions=bench.scale.batch_api_dims, index="none")
        vacuum(conn, "pgembed.outbox")
    return destination


def _drain(bench: Bench) -> float:
    with bench.database() as dsn:
        destination = _loaded(bench, dsn)
        drained = drain(dsn, worker_config(bench.scale))
        with connect(dsn) as conn:
            return count(conn, destination) / drained.seconds


def _batch(bench: Bench, api: Any) -> dict[str, Any]:
    rows = bench.scale.batch_api_rows
    with bench.database() as dsn:
        destination = _loaded(bench, dsn)

        async def step(call: Any) -> tuple[float, Any]:
            async with BatchAPI(dsn) as batches:
                started = time.perf_counter()
                result = await call(batches)
                return time.perf_counter() - started, result

        submit_s, submitted = asyncio.run(step(lambda b: b.submit(destination)))
        api.control(batches={"complete": True})
        collect_s, polled = asyncio.run(step(lambda b: b.poll()))
        with connect(dsn) as conn:
            stored = count(conn, destination)
    return {"rows": rows, "stored": stored, "lines": submitted.lines, "submit_s": round(submit_s, 2),
            "collect_s": round(collect_s, 2), "submit": rows / submit_s, "collect and store": rows / collect_s,
            "provider_status": polled[0].provider_status if polled else None}
