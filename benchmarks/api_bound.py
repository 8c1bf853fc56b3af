"""3. API-bound: the fake OpenAI-compatible API (a subprocess, with `latency` per request)
against the bound `batch size × concurrency / latency`, what a worker would reach if
everything but the API call were free, and against the plain `openai` client sending the
same requests at the same concurrency in the same run: what any client of this server
reaches, since the client's own work per request (building it, reading the answer) and the
fake server's count against the first bound too.

The worker is pgembed's, in-process, with its default concurrency and batch size, the real
`openai` client and provider; each claimed batch is one request (64 short texts is far
below the API's input and token limits). The destination has no vector index, so the
database is not what limits the rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator

import openai

from benchmarks.harness import (
    Bench,
    Result,
    at_least,
    connect,
    copy_docs,
    corpus,
    count,
    cpu_now,
    create_docs,
    create_pipeline,
    drain,
    ratio,
    vacuum,
    worker_config,
)

NAME = "api_bound"
MODEL = "openai:text-embedding-3-small"


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def plain_client(base_url: str, texts: list[str], batch_size: int, concurrency: int, dimensions: int) -> float:
    """Rows/s of the bare openai client: the same requests, `concurrency` at a time."""
    async def send() -> float:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="sk-bench-not-a-real-key", max_retries=0)
        slots = asyncio.Semaphore(concurrency)

        async def one(part: list[str]) -> None:
            async with slots:
                await client.embeddings.create(model=MODEL.split(":", 1)[1], input=part, dimensions=dimensions,
                                               encoding_format="base64")

        started = time.perf_counter()
        await asyncio.gather(*(one(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)))
        elapsed = time.perf_counter() - started
        await client.close()
        return len(texts) / elapsed

    return asyncio.run(send())


def run(bench: Bench) -> list[Result]:
    s = bench.scale
    rows, latency = s.api_rows, s.api_latency
    bench.log(f"  {NAME}: {rows:,} rows, {latency * 1000:.0f} ms per request")
    api = bench.fake_api(latency)
    config = worker_config(s)
    with bench.database() as dsn, connect(dsn) as conn, environment(api.env()):
        create_docs(conn)
        destination = create_pipeline(conn, MODEL, dimensions=s.api_dims, index="none")
        copy_docs(conn, corpus(rows))
        vacuum(conn, "pgembed.outbox")
        api.reset(latency)
        before, api_before = cpu_now(bench), api.cpu()
        drained = drain(dsn, config)
        used, api_used = cpu_now(bench) - before, api.cpu() - api_before
        stats = api.stats()
        stored = count(conn, destination)
        api.reset(latency)
        texts = [f"{title} {body}" for _, title, body in corpus(rows)]
        client = plain_client(api.base_url, texts, config.batch_size, config.concurrency, s.api_dims)
    figure = stored / drained.seconds
    bound = config.batch_size * config.concurrency / latency
    r = ratio(figure, bound)
    notes = []
    if stored != rows:
        notes.append(f"only {stored} of {rows} rows embedded")
    if stats["inputs"] != rows:
        notes.append(f"the API received {stats['inputs']} inputs for {rows} rows")
    vs_client = ratio(figure, client)
    return [Result(
        NAME, f"{latency * 1000:.0f}ms", figure, "rows/s", bound, "rows/s",
        f"{config.batch_size} × {config.concurrency} / {latency:g}s", r, "≥ 0.9 × bound",
        at_least(r, 0.9) and stored == rows, note="; ".join(notes),
        details={"rows": rows, "stored": stored, "latency_s": latency, "batch_size": config.batch_size,
                 "concurrency": config.concurrency, "api": stats, "worker_runs": drained.runs,
                 "inputs_per_request": round(stats["inputs"] / max(stats["requests"], 1), 1),
                 "seconds_per_batch": round(drained.seconds / max(stats["requests"], 1) * config.concurrency, 4),
                 "fake_api_cpu_s": round(api_used, 3),
                 **used.as_dict(drained.seconds)},
    ), Result(
        NAME, f"{latency * 1000:.0f}ms vs client", figure, "rows/s", client, "rows/s",
        "the plain openai client, same requests", vs_client, "≥ 0.9 × client",
        at_least(vs_client, 0.9) and stored == rows,
        details={"client_rows_per_s": round(client, 1)},
    )]
