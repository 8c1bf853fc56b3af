"""The provider's Batch API, end to end against the fake's files and batches endpoints with
the real openai client: submit, poll, collect and cancel, each in a BatchAPI of its own (a
new pool and client, nothing kept in memory: what a restart between them leaves), and the
convergence check of the reliability suite at the end."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from pgembed import pipelines
from pgembed.batch_api import BatchAPI, BatchAPIError
from tests.conftest import drain
from tests.reliability.convergence import Expect, converge

MODEL = "openai:text-embedding-3-small"
SMALL = pipelines.PipelineOptions(dimensions=64)
T = TypeVar("T")


def batch_api(dsn: str, call: Callable[[BatchAPI], Awaitable[T]]) -> T:
    async def run() -> T:
        async with BatchAPI(dsn) as api:
            return await call(api)

    return asyncio.run(run())


def docs(conn, n: int, *, backfill: bool = True) -> str:
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO docs SELECT g, 'document ' || g || ' about topic ' || (g %% 97) "
                 "FROM generate_series(1, %s) g", (n,))
    return pipelines.create(conn, "docs", "body", MODEL, SMALL)


def expect(name: str) -> Expect:
    return Expect(name, "docs", ["id"], ["body"], lambda body: body)


def held(conn) -> int:
    return conn.execute("SELECT count(*) FROM pgembed.outbox WHERE leased_by LIKE 'batch-api:%'").fetchone()[0]


def usage(conn) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT purpose, requests, inputs, tokens, price_factor FROM pgembed.usage "
                        "ORDER BY purpose").fetchall()


def test_a_small_backfill_goes_through_a_batch_and_is_billed_at_half_price(conn, dsn, fake_api):
    name = docs(conn, 300)
    submitted = batch_api(dsn, lambda api: api.submit(name))
    assert (submitted.rows, submitted.inputs) == (300, 300)
    assert held(conn) == 300 and fake_api.requests == 0
    drain(dsn)  # a worker takes nothing the batch holds
    assert fake_api.requests == 0 and held(conn) == 300
    fake_api.batch_api.complete()
    polled = batch_api(dsn, lambda api: api.poll())
    assert [p.provider_status for p in polled] == ["completed"]
    assert polled[0].collected is not None and polled[0].collected.stored == 300
    assert held(conn) == 0
    converge(conn, [expect(name)], api=fake_api, bound=lambda ideal: ideal)
    assert usage(conn) == [("backfill", submitted.lines, 300, fake_api.tokens, pytest.approx(0.5))]
    # a second poll or collect finds nothing to do, and bills nothing twice
    assert batch_api(dsn, lambda api: api.poll()) == []
    with pytest.raises(BatchAPIError, match="no open provider batch"):
        batch_api(dsn, lambda api: api.collect(submitted.batch or 0))
    assert len(usage(conn)) == 1
