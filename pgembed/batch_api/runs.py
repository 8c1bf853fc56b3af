"""Submit, poll, collect and cancel provider batches (sql/batch_api.sql holds the states).

Why a lease and not a mark in the outbox: a lease is what every part of pgembed already
respects. Workers do not claim a leased row, an application change to it bumps its version
and leaves the lease alone (pgembed.enqueue), the collection stores through the worker's
own acknowledgement, fenced by the batch's lease and the versions recorded at submission,
and a batch nobody collects gives its rows back when the lease runs out. So a row changed
or deleted while the batch was out is never written with its old text's vector: its
version moved on, and it goes back in line for a worker, which embeds what it now holds.

The collection runs the worker's own batch path over the rows the batch still holds, with
the downloaded output as its provider: read the current content, cut it, look the chunks
up, take the rest from the output, acknowledge (cache entries and store in one statement,
fenced). A chunk the output does not have (a failed or expired line, or a row changed since
submission) is not a failure of the row: the row goes back to the outbox, in its lane, for
the workers. Vectors no row took are cached too (paid for). All the
state is in PostgreSQL, so a process may stop anywhere between submit and collect; a
collection repeated after a crash stores nothing twice and bills once (batch_api_finish).
"""

from __future__ import annotations

import asyncio
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import numpy as np
import openai
from psycopg.types.json import Jsonb

from pgembed import db
from pgembed.batch import InFlight, embed_batch, planned
from pgembed.batch_api.jsonl import MAX_BYTES, MAX_INPUTS, Line, Output, pack, read_output, request
from pgembed.cache import chunk_key
from pgembed.config import WorkerConfig
from pgembed.providers import EmbedResult, ModelSpec, ProviderError
from pgembed.providers.openai import client_from_env
from pgembed.queue import Batch, Claimed, Key, Outcome, PipelineInfo, Queue
from pgembed.sqlfiles import query
from pgembed.tokens import count_tokens

PRICE_FACTOR = Decimal("0.5")  # OpenAI bills the Batch API at half the list price
# the provider's 24 hours and a day to spare: long enough for a poll that was down a while
LEASE_SECONDS = 48 * 3600.0
MIN_ROWS_VARIABLE = "PGEMBED_BATCH_API_MIN_ROWS"
DEFAULT_MIN_ROWS = 10_000
SLICE = 500  # rows read, cut and acknowledged at a time
SLICES = 2  # slices collected at once (each holds a connection)
ABANDONED_AFTER = 3600.0  # a batch still preparing after this was left by a process that died
NOT_IN_BATCH = "not in the provider batch's output"
TERMINAL = ("completed", "expired", "failed", "cancelled")
WORKER = "batch-api"


class BatchAPIError(ValueError):
    """What was asked cannot be done (no such pipeline or batch, not an OpenAI model, a
    batch not finished yet): one line, a usage error for the command line."""


def min_rows() -> int:
    """The bulk backlog at which a pipeline's backfill goes through the Batch API."""
    raw = os.environ.get(MIN_ROWS_VARIABLE, "").strip()
    try:
        value = int(raw) if raw else DEFAULT_MIN_ROWS
    except ValueError:
        raise BatchAPIError(f"{MIN_ROWS_VARIABLE} must be a whole number, not {raw!r}") from None
    if value < 1:
        raise BatchAPIError(f"{MIN_ROWS_VARIABLE} must be at least 1")
    return value


@dataclass
class Submitted:
    pipeline: str
    batch: int | None = None  # None: nothing sent (backlog under the threshold, or all cached)
    provider_id: str | None = None
    rows: int = 0
    lines: int = 0
    inputs: int = 0
    backlog: int = 0
    left: int = 0  # rows claimed but over one batch's limits: back to the outbox
    reason: str = ""


@dataclass
class Collected:
    batch: int
    provider_status: str
    stored: int = 0
    requeued: int = 0
    failed_lines: int = 0
    tokens: int = 0
    finished: bool = False  # False: already collected (a repeated call)


@dataclass
class Polled:
    batch: int
    provider_status: str
    released: int = 0  # rows changed since submission, given back now
    collected: Collected | None = None


@dataclass
class _Open:
    id: int
    pipeline: str
    state: str
    provider_id: str | None
    lease: Any
    age: float = 0.0


class _FromOutput:
    """The provider of a collection: the batch's output, by cache key. A text it does not
    have (its line failed or expired, or its row changed since submission) is NOT_IN_BATCH,
    which sends the row back to the outbox rather than to the failures. Going through the
    worker's batch path this way, each vector reaches the database once, in the
    acknowledgement that caches and stores it."""

    def __init__(self, spec: ModelSpec, output: Output) -> None:
        self.spec = spec
        self.output = output
        self.used: set[bytes] = set()

    async def embed(self, texts: list[str]) -> EmbedResult:
        found = [self.output.vectors.get(chunk_key(self.spec.model, self.spec.dimensions, t)) for t in texts]
        self.used.update(chunk_key(self.spec.model, self.spec.dimensions, t) for t, f in zip(texts, found, strict=True)
                         if f is not None)
        return EmbedResult([f[0] if f else None for f in found], [None if f else NOT_IN_BATCH for f in found],
                           token_counts=[f[1] if f else 0 for f in found])

    async def aclose(self) -> None:
        return None


@dataclass
class BatchAPI:
    """One database pool and one API client for a command or a scheduled poll."""

    dsn: str
    client: openai.AsyncOpenAI | None = None
    config: WorkerConfig = field(default_factory=WorkerConfig)

    async def __aenter__(self) -> BatchAPI:
        self._pool = db.worker_pool(self.dsn, WORKER, max_size=SLICES + 1)
        await self._pool.open(wait=True)
        self.queue = Queue(self._pool, WORKER)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._pool.close()
        if self.client is not None:
            await self.client.close()

    def _client(self) -> openai.AsyncOpenAI:
        if self.client is None:
            self.client = client_from_env()
        return self.client

    # ------------------------------------------------------------------ submit

    async def pipeline(self, name: str) -> PipelineInfo:
        info = (await self.queue.pipelines()).get(name)
        if info is None:
            raise BatchAPIError(f"no pipeline {name!r}")
        if info.spec.provider != "openai":
            raise BatchAPIError(f"pipeline {name!r} embeds with {info.spec.model}: the Batch API is "
                                "OpenAI's (openai: models only)")
        if info.late_chunking:
            raise BatchAPIError(f"pipeline {name!r} uses late chunking, which only local models do")
        return info

    async def submit(self, name: str, *, threshold: int | None = 1, limit: int = MAX_INPUTS,
                     lease_seconds: float = LEASE_SECONDS) -> Submitted:
        """Sends the pipeline's ready bulk rows (up to one batch's worth) as one batch, when
        there are at least `threshold` of them (None: PGEMBED_BATCH_API_MIN_ROWS)."""
        info = await self.pipeline(name)
        threshold = min_rows() if threshold is None else threshold
        self._client()  # no API key: said before any row is taken from the workers
        result = Submitted(name)
        async with self._pool.connection() as conn:
            row = await (await conn.execute(query("batch_api_backlog"), {"pipeline": name})).fetchone()
            result.backlog = int(row[0]) if row else 0
            if result.backlog < threshold:
                result.reason = f"{result.backlog} bulk rows ready, under the threshold of {threshold}"
                return result
            row = await (await conn.execute(query("batch_api_claim"), {
                "pipeline": name, "limit": min(limit, MAX_INPUTS), "lease_seconds": lease_seconds,
            })).fetchone()
        if row is None or row[0] is None:
            result.reason = "no bulk rows ready"
            return result
        result.batch, lease = int(row[0]), row[1]
        await self._analyze()
        batch = Batch(name, lease, await self._claimed(result.batch))
        result.rows = len(batch.rows)
        try:
            wanted, left = await self._wanted(info, batch)
            if left:
                await self.queue.release(batch, left, 0.0)
                result.left = len(left)
            lines = await asyncio.to_thread(pack, wanted, info.spec, count_tokens)
            if not lines:
                await self._finish(result.batch, "collected", None, [], 0)
                result.reason = "every chunk is in the cache already: left to the workers"
                return result
            await self._save_lines(result.batch, lines)
            input_file, result.provider_id = await self._send(result.batch, name, info.spec, lines)
        except (openai.APIError, OSError) as error:
            await self._finish(result.batch, "cancelled", None, [], 0)
            raise ProviderError(f"the provider refused the batch ({_one_line(error)}); its rows are "
                                "back in the outbox") from None
        result.lines, result.inputs = len(lines), sum(len(line.hashes) for line in lines)
        async with self._pool.connection() as conn:
            await conn.execute(query("batch_api_submitted"), {
                "batch": result.batch, "provider_id": result.provider_id, "input_file": input_file,
                "lines": result.lines, "inputs": result.inputs})
        return result

    async def _analyze(self) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(query("batch_api_analyze"))

    async def _claimed(self, batch: int) -> list[Claimed]:
        async with self._pool.connection() as conn:
            rows = await (await conn.execute(query("batch_api_rows"), {"batch": batch})).fetchall()
        return [Claimed(tuple(k), v, p, a) for k, v, p, a in rows]

    async def _wanted(self, info: PipelineInfo, batch: Batch) -> tuple[
            list[tuple[bytes, str, str, str | None]], list[Key]]:
        """The texts to send, first asker's purpose and cost center each, none the cache
        has; and the rows past one batch's limits (inputs, bytes), to give back."""
        wanted: list[tuple[bytes, str, str, str | None]] = []
        seen: set[bytes] = set()
        size = 0
        left: list[Key] = []
        for start in range(0, len(batch.rows), SLICE):
            part = Batch(batch.pipeline, batch.lease, batch.rows[start:start + SLICE])
            outcomes, texts = await planned(info, part, self.queue)
            cached = await self.queue.cached(list({c.hash for chunks in texts.values() for c in chunks}))
            for outcome in outcomes:
                fresh = [c for c in texts.get(outcome.claimed.key, []) if c.hash not in cached and c.hash not in seen]
                grow = sum(len(c.text.encode()) + 8 for c in fresh)
                if left or len(wanted) + len(fresh) > MAX_INPUTS or size + grow > MAX_BYTES:
                    left.append(outcome.claimed.key)
                    continue
                size += grow
                for c in fresh:
                    seen.add(c.hash)
                    wanted.append((c.hash, c.text, outcome.claimed.purpose, outcome.cost_center))
        return wanted, left

    async def _save_lines(self, batch: int, lines: Sequence[Line]) -> None:
        async with self._pool.connection() as conn, conn.cursor() as cur:
            await cur.executemany(query("batch_api_add_line"), [
                {"batch": batch, "line": line.number, "purpose": line.purpose, "cost_center": line.cost_center,
                 "hashes": line.hashes} for line in lines])

    async def _send(self, batch: int, pipeline: str, spec: ModelSpec, lines: Sequence[Line]) -> tuple[str, str]:
        """Uploads the lines and creates the batch: the input file's id and the batch's."""
        content = b"".join(request(line, spec) for line in lines)
        client = self._client()
        file = await client.files.create(file=(f"pgembed-batch-{batch}.jsonl", content), purpose="batch")
        created = await client.batches.create(
            input_file_id=file.id, endpoint="/v1/embeddings", completion_window="24h",
            metadata={"pgembed_batch": str(batch), "pipeline": pipeline[:500]})
        return file.id, created.id

    # -------------------------------------------------------------- poll, collect

    async def open_batches(self, pipeline: str | None = None) -> list[_Open]:
        async with self._pool.connection() as conn:
            rows = await (await conn.execute(query("batch_api_open"), {"pipeline": pipeline})).fetchall()
        return [_Open(*r) for r in rows]

    async def poll(self, pipeline: str | None = None) -> list[Polled]:
        """Asks the provider about every open batch; gives back the rows that changed since
        submission; collects the batches that are done; gives up batches a process left
        half-made (still preparing an hour later)."""
        polled = []
        for b in await self.open_batches(pipeline):
            if b.provider_id is None:
                if b.age > ABANDONED_AFTER:
                    await self._finish(b.id, "cancelled", None, [], 0)
                    polled.append(Polled(b.id, "abandoned"))
                continue
            remote = await self._client().batches.retrieve(b.provider_id)
            async with self._pool.connection() as conn:
                await conn.execute(query("batch_api_checked"), {"batch": b.id, "status": remote.status})
                row = await (await conn.execute(query("batch_api_release_changed"), {"batch": b.id})).fetchone()
            result = Polled(b.id, remote.status, released=int(row[0]) if row else 0)
            if remote.status in TERMINAL:
                result.collected = await self._collect(b, remote)
            polled.append(result)
        return polled

    async def collect(self, batch: int) -> Collected:
        """Stores a finished batch (completed, expired, failed or cancelled at the provider)."""
        found = [b for b in await self.open_batches() if b.id == batch]
        if not found:
            raise BatchAPIError(f"no open provider batch {batch} (see pgembed batch status)")
        b = found[0]
        if b.provider_id is None:
            raise BatchAPIError(f"batch {batch} was never sent; cancel it to give its rows back")
        remote = await self._client().batches.retrieve(b.provider_id)
        if remote.status not in TERMINAL:
            raise BatchAPIError(f"batch {batch} is {remote.status} at the provider; collect it once it "
                                "is completed, expired or cancelled")
        return await self._collect(b, remote)

    async def _collect(self, b: _Open, remote: Any) -> Collected:
        info = await self.pipeline(b.pipeline)
        async with self._pool.connection() as conn:
            rows = await (await conn.execute(query("batch_api_lines"), {"batch": b.id})).fetchall()
        lines = {int(n): [bytes(h) for h in hashes] for n, _, _, hashes in rows}
        payers = {int(n): (purpose, cost_center) for n, purpose, cost_center, _ in rows}
        output = Output()
        for file_id in (remote.output_file_id, remote.error_file_id):
            if file_id:
                content = await self._client().files.content(file_id)
                await asyncio.to_thread(read_output, content.content, lines, info.spec.dimensions, output)
        provider = _FromOutput(info.spec, output)
        await self._analyze()
        stored = await self._store(info, Batch(b.pipeline, b.lease, await self._claimed(b.id)), provider)
        # paid for: the vectors no row took (texts changed since submission) are kept too
        await self._cache(info, {h: v for h, v in output.vectors.items() if h not in provider.used})
        usage: dict[tuple[str, str | None], dict[str, Any]] = defaultdict(
            lambda: {"requests": 0, "inputs": 0, "tokens": 0})
        for n, tokens in output.billed.items():
            u = usage[payers[n]]
            u["requests"] += 1
            u["inputs"] += len(lines[n])
            u["tokens"] += tokens
        bills = [{"purpose": p, "cost_center": c, **u} for (p, c), u in usage.items()]
        state = "cancelled" if remote.status == "cancelled" else "collected"
        finished, requeued = await self._finish(b.id, state, remote.status, bills, stored)
        return Collected(b.id, remote.status, stored=stored, requeued=requeued,
                         failed_lines=len(lines) - len(output.billed),
                         tokens=sum(output.billed.values()), finished=finished)

    async def _cache(self, info: PipelineInfo, vectors: dict[bytes, tuple[np.ndarray, int]]) -> None:
        entries = sorted(vectors.items())
        async with self._pool.connection() as conn:
            for start in range(0, len(entries), 2000):
                part = entries[start:start + 2000]
                await conn.execute(query("batch_api_cache_put"), {
                    "hashes": [h for h, _ in part], "vectors": [v for _, (v, _) in part],
                    "tokens": [t for _, (_, t) in part], "model": info.spec.model,
                    "dimensions": info.spec.dimensions})

    async def _store(self, info: PipelineInfo, batch: Batch, provider: _FromOutput) -> int:
        """The worker's path over the rows still held, answered from the output: stored
        with their cache entries, fenced by lease and version; rows with chunks the batch
        did not bring back are left out, for batch_api_finish to requeue. SLICES slices at
        a time, as a worker's slots overlap their database work."""
        slots = asyncio.Semaphore(SLICES)
        inflight = InFlight()

        async def one(part: Batch) -> int:
            async with slots:
                embedded = await embed_batch(info, part, self.queue, provider, asyncio.Semaphore(1), inflight)
                keep = [o for o in embedded.outcomes if not _missing(o)]
                if not keep:
                    return 0
                result = await self.queue.acknowledge(info, part, keep, embedded.new_cache, [],
                                                      max_attempts=self.config.max_attempts,
                                                      retry_base=self.config.retry_base)
                return result.written + result.removed

        parts = [Batch(batch.pipeline, batch.lease, batch.rows[start:start + SLICE])
                 for start in range(0, len(batch.rows), SLICE)]
        return sum(await asyncio.gather(*(one(part) for part in parts)))

    async def _finish(self, batch: int, state: str, provider_status: str | None,
                      bills: list[dict[str, Any]], stored: int) -> tuple[bool, int]:
        async with self._pool.connection() as conn:
            row = await (await conn.execute(query("batch_api_finish"), {
                "batch": batch, "state": state, "provider_status": provider_status, "usage": Jsonb(bills),
                "price_factor": PRICE_FACTOR, "stored": stored})).fetchone()
        assert row is not None  # OUT parameters: one row
        return bool(row[0]), int(row[1])

    # ------------------------------------------------------------------ cancel

    async def cancel(self, batch: int) -> Polled:
        """Cancels at the provider (what it finished is still collected by the next poll)
        or, for a batch never sent, gives its rows back now."""
        found = [b for b in await self.open_batches() if b.id == batch]
        if not found:
            raise BatchAPIError(f"no open provider batch {batch} (see pgembed batch status)")
        b = found[0]
        if b.provider_id is None:
            await self._finish(b.id, "cancelled", None, [], 0)
            return Polled(b.id, "cancelled")
        remote = await self._client().batches.cancel(b.provider_id)
        result = Polled(b.id, remote.status)
        if remote.status in TERMINAL:
            result.collected = await self._collect(b, remote)
        return result

    async def status(self, pipeline: str | None = None) -> list[dict[str, Any]]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(query("batch_api_status"), {"pipeline": pipeline})
            names = [d.name for d in cur.description or []]
            return [dict(zip(names, r, strict=True)) for r in await cur.fetchall()]


def _missing(outcome: Outcome) -> bool:
    return outcome.error is not None and outcome.error.endswith(NOT_IN_BATCH)


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
