"""The worker's database layer: claim, read, cache look-ups, acknowledge.

The only part of the worker that runs queries. Every call is a short transaction; none is
held across an embedding request (DESIGN rule 1).

A call that fails because the database went away (restart, failover, a terminated
session, a deadlock or lock timeout: psycopg's OperationalError) is run again on a fresh
connection, with backoff, for a while: `reconnect_for` seconds, and an acknowledgement
only while its lease lasts, since after that it would write nothing. Every call is safe to
repeat: a claim whose answer was lost leaves rows leased to nobody, which come back when
the lease expires; reads change nothing; an acknowledgement re-checks its lease and the
versions, so one that did commit before the connection broke finds nothing left to do.
Without this, a batch embedded during a restart would be thrown away and paid for again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from pgembed.providers import ModelSpec
from pgembed.splitting import Plan
from pgembed.sqlfiles import query

Key = tuple[str, ...]
T = TypeVar("T")
log = logging.getLogger("pgembed.queue")


@dataclass(frozen=True)
class PipelineInfo:
    name: str
    id: int
    spec: ModelSpec
    chunk_tokens: int
    chunk_overlap: int
    chunking: str = "none"
    tokenizer: str | None = None  # pgembed.models.tokenizer: how the model counts
    prefixed: bool = False  # content is "prefix U+001E content" (pgembed.prefixed_content)
    late_chunking: bool = False  # chunks pooled from one run of the model over the document

    @property
    def plan(self) -> Plan:
        return Plan(self.chunking, self.chunk_tokens, self.chunk_overlap)

    @property
    def read_function(self) -> sql.Composable:
        return sql.SQL("pgembed.{}").format(sql.Identifier(f"p{self.id}_read"))


@dataclass(frozen=True)
class Claimed:
    key: Key
    version: int
    purpose: str
    attempts: int


@dataclass(frozen=True)
class Batch:
    pipeline: str
    lease: uuid.UUID
    rows: list[Claimed]
    # time.monotonic() at which the lease runs out (a little before the database's clock says)
    expires: float = float("inf")


@dataclass(frozen=True)
class SourceRow:
    key: Key
    found: bool
    content: str | None
    cost_center: str | None


@dataclass(frozen=True)
class Chunk:
    seq: int
    text: str
    hash: bytes
    vector: np.ndarray
    truncated: bool = False  # the start of a text that chunking 'truncate' cut off


@dataclass
class Outcome:
    """What became of one claimed row: its chunks, or why it has none."""

    claimed: Claimed
    chunks: list[Chunk] = field(default_factory=list)
    content_hash: bytes = b""
    gone: bool = False
    error: str | None = None
    cost_center: str | None = None


@dataclass
class Usage:
    purpose: str
    cost_center: str | None
    requests: int = 0
    inputs: int = 0
    tokens: int = 0
    cache_hits: int = 0
    cache_misses: int = 0


@dataclass
class AckResult:
    written: int = 0
    removed: int = 0
    failed: int = 0
    changed: int = 0
    lost: int = 0
    # rows `held` did not return: deleted, taken by another lease, or locked at that instant
    skipped: list[Key] = field(default_factory=list)
    changed_keys: list[Key] = field(default_factory=list)  # changed since read: queued again


def _keys(keys: Sequence[Key]) -> Jsonb:
    """Keys as one jsonb array (pgembed.key_array): one document to encode, not one a key."""
    return Jsonb([list(k) for k in keys])


class Queue:
    def __init__(self, pool: AsyncConnectionPool, worker: str, *, reconnect_for: float = 30.0) -> None:
        self.pool = pool
        self.worker = worker
        self.reconnect_for = reconnect_for
        self._unavailable_since: float | None = None

    async def _retrying(self, what: str, call: Callable[[float], Awaitable[T]],
                        deadline: float | None = None) -> T:
        """Runs `call(timeout)` until it gets through, the database having gone away in
        between, or until `deadline` (monotonic) or `reconnect_for` seconds have passed;
        then raises the last error. One warning when the database goes away, one info line
        when it is back."""
        give_up = min(deadline if deadline is not None else float("inf"),
                      time.monotonic() + self.reconnect_for)
        delay = 0.2
        while True:
            timeout = max(give_up - time.monotonic(), 0.5)
            try:
                result = await call(timeout)
            except psycopg.OperationalError as error:
                now = time.monotonic()
                if now + delay >= give_up:
                    raise
                if self._unavailable_since is None:
                    self._unavailable_since = now
                    log.warning("database unavailable during %s (%s); retrying on a new connection",
                                what, _one_line(error), extra={"action": "db_unavailable", "during": what})
                else:
                    log.debug("%s failed again: %s", what, _one_line(error), extra={"action": "db_retry"})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if self._unavailable_since is not None:
                log.info("database reachable again after %.1fs", time.monotonic() - self._unavailable_since,
                         extra={"action": "db_available"})
                self._unavailable_since = None
            return result

    async def pipelines(self) -> dict[str, PipelineInfo]:
        async def call(timeout: float) -> list[tuple]:
            async with self.pool.connection(timeout) as conn:
                cur = await conn.execute(query("pipelines"))
                return await cur.fetchall()

        rows = await self._retrying("pipelines", call)
        return {
            r[0]: PipelineInfo(
                name=r[0], id=r[1], chunk_tokens=r[4], chunk_overlap=r[5], chunking=r[10], tokenizer=r[11],
                prefixed=r[12], late_chunking=r[13],
                spec=ModelSpec(model=r[2], dimensions=r[3], native_dimensions=r[6],
                               max_input_tokens=r[7], max_batch_inputs=r[8],
                               max_batch_tokens=r[9]),
            )
            for r in rows
        }

    async def claim(self, limit: int, lease_seconds: float, after: str,
                    only: list[str] | None = None) -> Batch | None:
        """Leases a batch of one pipeline; `only` limits the pipelines (None: any)."""
        lease = uuid.uuid4()

        async def call(timeout: float) -> tuple[float, list[tuple]]:
            async with self.pool.connection(timeout) as conn:
                started = time.monotonic()
                cur = await conn.execute(query("claim"), {
                    "worker": self.worker, "lease": lease, "limit": limit,
                    "lease_seconds": lease_seconds, "after": after, "only": only,
                })
                return started, await cur.fetchall()

        started, rows = await self._retrying("claim", call)
        if not rows:
            return None
        return Batch(rows[0][0], lease, [Claimed(tuple(r[1]), r[2], r[3], r[4]) for r in rows],
                     expires=started + lease_seconds)

    async def read(self, info: PipelineInfo, keys: list[Key]) -> tuple[list[SourceRow], dict[Key, str]]:
        """Current content of the rows. A content expression that raises for some rows
        (division by zero, a bad cast) is bisected so that only those rows fail."""
        async def call(timeout: float) -> list[tuple]:
            async with self.pool.connection(timeout) as conn:
                cur = await conn.execute(
                    sql.SQL(query("read_rows")).format(function=info.read_function),
                    {"keys": Jsonb([list(k) for k in keys])})
                return await cur.fetchall()

        try:
            rows = await self._retrying("read", call)
            return [SourceRow(tuple(r[0]), r[1], r[2], r[3]) for r in rows], {}
        except (psycopg.DataError, psycopg.errors.ProgrammingError,
                psycopg.errors.InternalError_) as error:
            if isinstance(error, psycopg.errors.UndefinedFunction) and not await self._exists(info):
                # dropped since the claim: its reader and its outbox rows went with it, so
                # there is nothing to read and nothing to bisect (a function missing *inside*
                # the content expression, on the other hand, is the rows' failure, below)
                return [], {}
            if len(keys) == 1:
                message = error.diag.message_primary or str(error)
                return [], {keys[0]: f"content expression failed: {message}"}
            half = len(keys) // 2
            left, left_errors = await self.read(info, keys[:half])
            right, right_errors = await self.read(info, keys[half:])
            return left + right, {**left_errors, **right_errors}

    async def _exists(self, info: PipelineInfo) -> bool:
        async def call(timeout: float) -> bool:
            async with self.pool.connection(timeout) as conn:
                cur = await conn.execute(query("pipeline_exists"), {"name": info.name, "id": info.id})
                return await cur.fetchone() is not None

        return await self._retrying("pipeline check", call)

    async def cached(self, hashes: list[bytes]) -> dict[bytes, np.ndarray]:
        if not hashes:
            return {}

        async def call(timeout: float) -> dict[bytes, np.ndarray]:
            async with self.pool.connection(timeout) as conn:
                # binary results: parsing vectors from text is the slow part of a hit
                cur = conn.cursor(binary=True)
                await cur.execute(query("cache_get"), {"hashes": hashes})
                found = {bytes(h): v for h, v in await cur.fetchall()}
                if found:
                    await conn.execute(query("cache_touch"), {"hashes": list(found)})
            return found

        return await self._retrying("cache look-up", call)

    async def release(self, batch: Batch, keys: list[Key], delay: float) -> None:
        async def call(timeout: float) -> None:
            async with self.pool.connection(timeout) as conn:
                await conn.execute(query("release"), {
                    "pipeline": batch.pipeline, "lease": batch.lease, "keys": _keys(keys),
                    "delay": delay,
                })

        await self._retrying("release", call, deadline=batch.expires)

    async def acknowledge(
        self, info: PipelineInfo, batch: Batch, outcomes: list[Outcome],
        new_cache: dict[bytes, tuple[np.ndarray, int]], usage: list[Usage],
        *, max_attempts: int, retry_base: float,
    ) -> AckResult:
        """One short transaction: keep the new cache entries whatever happens, then write
        only the rows this worker still holds at the version it read. Retried across a
        reconnect while the lease lasts."""

        async def call(timeout: float) -> AckResult:
            return await self._acknowledge(info, batch, outcomes, new_cache, usage, timeout,
                                           max_attempts=max_attempts, retry_base=retry_base)

        result = await self._retrying("acknowledge", call, deadline=batch.expires)
        if result.skipped:
            await self._release_unlocked(batch, result.skipped)
        return result

    async def _release_unlocked(self, batch: Batch, keys: list[Key]) -> None:
        """Rows skipped by the acknowledgement because they were locked (an application
        write at that very moment) are still ours: give them back as soon as the lock is
        gone, trying for about a second, so that they do not wait for the lease to expire.
        A row locked longer (an open application transaction) waits for the lease."""
        params = {"pipeline": batch.pipeline, "lease": batch.lease, "keys": _keys(keys)}
        delay = 0.05
        while True:
            try:
                async with self.pool.connection() as conn:
                    await conn.execute(query("release_unlocked"), params)
                    cur = await conn.execute(query("still_leased"), params)
                    left = [tuple(k) for (k,) in await cur.fetchall()]
            except psycopg.OperationalError as error:  # the acknowledgement itself is done
                log.debug("giving back skipped rows failed (%s); they return when the lease ends",
                          _one_line(error), extra={"action": "release_skipped_failed"})
                return
            if not left or delay > 1.0 or time.monotonic() + delay >= batch.expires:
                return
            params["keys"] = _keys(left)
            await asyncio.sleep(delay)
            delay *= 2

    async def _acknowledge(
        self, info: PipelineInfo, batch: Batch, outcomes: list[Outcome],
        new_cache: dict[bytes, tuple[np.ndarray, int]], usage: list[Usage], timeout: float,
        *, max_attempts: int, retry_base: float,
    ) -> AckResult:
        """One statement, pgembed.acknowledge (sql/outbox.sql): cache, lease and version
        checks, store, outbox, failures and usage in one round trip and one transaction."""
        params = _ack_params(info, batch, outcomes, new_cache, usage)
        params.update(worker=self.worker, max_attempts=max_attempts, retry_base=retry_base)
        async with self.pool.connection(timeout) as conn:
            cur = await conn.execute(query("acknowledge"), params)
            row = await cur.fetchone()
        assert row is not None  # a function with OUT parameters returns one row
        return _ack_result(outcomes, set(row[0]), set(row[1]))

    async def batched(self, only: list[str] | None = None) -> int:
        """Keys of unexpanded statements (of the pipelines in `only`, when given)."""
        async with self.pool.connection() as conn:
            if only is None:
                cur = await conn.execute(query("statement_keys"))
            else:
                cur = await conn.execute(query("statement_keys_of"), {"only": only})
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def backlog_of(self, pipelines: list[str]) -> dict[str, int]:
        """Rows each pipeline still has to embed (queued, in flight, retrying, in statements)."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(query("backlog_of"), {"pipelines": pipelines})
            return {name: int(n) for name, n in await cur.fetchall()}

    async def leased_elsewhere(self, only: list[str]) -> tuple[int, str]:
        """Rows of these pipelines that other workers hold now, and who holds them."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(query("leased_elsewhere"), {"only": only, "worker": self.worker})
            row = await cur.fetchone()
        return (int(row[0]), str(row[1])) if row else (0, "")

    async def release_dead_workers(self, dead_after: float, me: str | None) -> list[tuple[str, int]]:
        """Gives back the leases of workers whose heartbeat stopped over `dead_after` seconds
        ago and marks them dead in pgembed.workers (sql/fleet.sql)."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(query("release_dead_workers"), {"dead_after": dead_after, "worker": me})
            found = [(str(w), int(n)) for w, n in await cur.fetchall()]
        for worker, rows in found:
            log.warning("worker %s stopped sending heartbeats over %.0fs ago: %d rows it held are "
                        "queued again", worker, dead_after, rows,
                        extra={"action": "dead_worker", "dead_worker": worker, "rows": rows})
        return found


def _ack_params(info: PipelineInfo, batch: Batch, outcomes: list[Outcome],
                new_cache: dict[bytes, tuple[np.ndarray, int]], usage: list[Usage]) -> dict[str, object]:
    """pgembed.acknowledge's arguments. Each vector travels once: a new cache entry points
    at the chunk that carries it (a vector no stored chunk carries, of a row another chunk
    of which failed, rides along as a chunk of no row)."""
    entries: list[tuple] = []  # (row, seq, text, content hash, chunk hash, vector, truncated)
    at: dict[bytes, int] = {}
    for i, o in enumerate(outcomes, 1):
        # a row that is gone (or has no chunks) passes one NULL chunk: "forget me"
        row_chunks: list[Chunk | None] = [*o.chunks] if o.chunks else [None]
        for c in row_chunks:
            entries.append((i, c.seq, c.text, o.content_hash, c.hash, c.vector, c.truncated) if c
                           else (i, None, None, None, None, None, None))
            if c is not None and c.hash in new_cache:
                at.setdefault(c.hash, len(entries))
    for h, (vector, _) in new_cache.items():
        if h not in at:
            entries.append((None, None, None, None, h, vector, None))
            at[h] = len(entries)
    rows, seqs, texts, doc_hashes, hashes, vectors, truncated = (
        list(column) for column in zip(*entries, strict=True))
    cached = sorted(at)
    return {
        "pipeline": batch.pipeline, "lease": batch.lease,
        "keys": _keys([o.claimed.key for o in outcomes]),
        "versions": [o.claimed.version for o in outcomes], "errors": [o.error for o in outcomes],
        "rows": rows, "seqs": seqs, "texts": texts, "doc_hashes": doc_hashes, "hashes": hashes,
        "vectors": vectors, "truncated": truncated, "cache_at": [at[h] for h in cached],
        "cache_tokens": [new_cache[h][1] for h in cached],
        "model": info.spec.model, "dimensions": info.spec.dimensions,
        "usage": Jsonb([dataclasses.asdict(u) for u in usage]),
    }


def _ack_result(outcomes: list[Outcome], changed: set[int], skipped: set[int]) -> AckResult:
    """What became of the batch, from the positions pgembed.acknowledge did not write."""
    result = AckResult(changed=len(changed), lost=len(skipped),
                       skipped=[outcomes[i - 1].claimed.key for i in sorted(skipped)],
                       changed_keys=[outcomes[i - 1].claimed.key for i in sorted(changed)])
    for i, o in enumerate(outcomes, 1):
        if i in changed or i in skipped:
            continue
        if o.error is not None:
            result.failed += 1
        elif o.gone:
            result.removed += 1
        else:
            result.written += 1
    return result


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
