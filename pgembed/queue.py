"""The worker's database layer: claim, read, cache look-ups, acknowledge.

The only part of the worker that runs queries. Every call is a short transaction; none is
held across an embedding request (DESIGN rule 1).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from pgembed.providers import ModelSpec
from pgembed.sqlfiles import query

Key = tuple[str, ...]


@dataclass(frozen=True)
class PipelineInfo:
    name: str
    id: int
    spec: ModelSpec
    chunk_tokens: int
    chunk_overlap: int

    @property
    def read_function(self) -> sql.Composable:
        return sql.SQL("pgembed.{}").format(sql.Identifier(f"p{self.id}_read"))

    @property
    def store_function(self) -> sql.Composable:
        return sql.SQL("pgembed.{}").format(sql.Identifier(f"p{self.id}_store"))


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


def _keys(keys: Sequence[Key]) -> list[Jsonb]:
    return [Jsonb(list(k)) for k in keys]


class Queue:
    def __init__(self, pool: AsyncConnectionPool, worker: str) -> None:
        self.pool = pool
        self.worker = worker

    async def pipelines(self) -> dict[str, PipelineInfo]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(query("pipelines"))
            rows = await cur.fetchall()
        return {
            r[0]: PipelineInfo(
                name=r[0], id=r[1], chunk_tokens=r[4], chunk_overlap=r[5],
                spec=ModelSpec(model=r[2], dimensions=r[3], native_dimensions=r[6],
                               max_input_tokens=r[7], max_batch_inputs=r[8],
                               max_batch_tokens=r[9]),
            )
            for r in rows
        }

    async def claim(self, limit: int, lease_seconds: float, after: str) -> Batch | None:
        lease = uuid.uuid4()
        async with self.pool.connection() as conn:
            cur = await conn.execute(query("claim"), {
                "worker": self.worker, "lease": lease, "limit": limit,
                "lease_seconds": lease_seconds, "after": after,
            })
            rows = await cur.fetchall()
        if not rows:
            return None
        return Batch(rows[0][0], lease, [Claimed(tuple(r[1]), r[2], r[3], r[4]) for r in rows])

    async def read(self, info: PipelineInfo, keys: list[Key]) -> tuple[list[SourceRow], dict[Key, str]]:
        """Current content of the rows. A content expression that raises for some rows
        (division by zero, a bad cast) is bisected so that only those rows fail."""
        try:
            async with self.pool.connection() as conn:
                cur = await conn.execute(
                    sql.SQL("SELECT key, found, content, cost_center FROM {}(%s)").format(
                        info.read_function), (Jsonb([list(k) for k in keys]),))
                rows = await cur.fetchall()
            return [SourceRow(tuple(r[0]), r[1], r[2], r[3]) for r in rows], {}
        except (psycopg.DataError, psycopg.errors.ProgrammingError,
                psycopg.errors.InternalError_) as error:
            if len(keys) == 1:
                message = error.diag.message_primary or str(error)
                return [], {keys[0]: f"content expression failed: {message}"}
            half = len(keys) // 2
            left, left_errors = await self.read(info, keys[:half])
            right, right_errors = await self.read(info, keys[half:])
            return left + right, {**left_errors, **right_errors}

    async def cached(self, hashes: list[bytes]) -> dict[bytes, np.ndarray]:
        if not hashes:
            return {}
        async with self.pool.connection() as conn:
            cur = await conn.execute(query("cache_get"), {"hashes": hashes})
            found = {bytes(h): v for h, v in await cur.fetchall()}
            if found:
                await conn.execute(query("cache_touch"), {"hashes": list(found)})
        return found

    async def release(self, batch: Batch, keys: list[Key], delay: float) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(query("release"), {
                "pipeline": batch.pipeline, "lease": batch.lease, "keys": _keys(keys),
                "delay": delay,
            })

    async def acknowledge(
        self, info: PipelineInfo, batch: Batch, outcomes: list[Outcome],
        new_cache: dict[bytes, tuple[np.ndarray, int]], usage: list[Usage],
        *, max_attempts: int, retry_base: float,
    ) -> AckResult:
        """One short transaction: keep the new cache entries whatever happens, then write
        only the rows this worker still holds at the version it read."""
        result = AckResult()
        async with self.pool.connection() as conn, conn.transaction():
            await self._cache_put(conn, info, new_cache)
            cur = await conn.execute(query("held"), {
                "pipeline": batch.pipeline, "lease": batch.lease,
                "keys": _keys([o.claimed.key for o in outcomes]),
            })
            held = {tuple(k): v for k, v in await cur.fetchall()}
            current = [o for o in outcomes if held.get(o.claimed.key) == o.claimed.version]
            changed = [o.claimed.key for o in outcomes
                       if o.claimed.key in held and held[o.claimed.key] != o.claimed.version]
            good = [o for o in current if o.error is None]
            bad = [o for o in current if o.error is not None]
            await self._store(conn, info, good)
            await self._finish(conn, batch.pipeline, [o.claimed.key for o in good])
            await self._fail(conn, batch, bad, max_attempts, retry_base)
            if changed:
                await conn.execute(query("release"), {
                    "pipeline": batch.pipeline, "lease": batch.lease, "keys": _keys(changed),
                    "delay": 0,
                })
            await self._usage(conn, info, usage)
        result.written = sum(1 for o in good if not o.gone)
        result.removed = sum(1 for o in good if o.gone)
        result.failed = len(bad)
        result.changed = len(changed)
        result.lost = len(outcomes) - len(current) - len(changed)
        return result

    async def _cache_put(self, conn: psycopg.AsyncConnection, info: PipelineInfo,
                         entries: dict[bytes, tuple[np.ndarray, int]]) -> None:
        if not entries:
            return
        hashes = sorted(entries)
        await conn.execute(query("cache_put"), {
            "model": info.spec.model, "dimensions": info.spec.dimensions, "hashes": hashes,
            "embeddings": [entries[h][0] for h in hashes],
            "tokens": [entries[h][1] for h in hashes],
        })

    async def _store(self, conn: psycopg.AsyncConnection, info: PipelineInfo,
                     outcomes: list[Outcome]) -> None:
        if not outcomes:
            return
        keys, seqs, texts, doc_hashes, hashes, vectors = [], [], [], [], [], []
        for o in outcomes:
            # a row that is gone (or has no chunks) passes one NULL chunk: "forget me"
            for c in o.chunks or [None]:
                keys.append(Jsonb(list(o.claimed.key)))
                seqs.append(c.seq if c else None)
                texts.append(c.text if c else None)
                doc_hashes.append(o.content_hash if c else None)
                hashes.append(c.hash if c else None)
                vectors.append(c.vector if c else None)
        await conn.execute(
            sql.SQL("SELECT {}(%s::jsonb[], %s::int[], %s::text[], %s::bytea[], %s::bytea[], "
                    "%s::vector[])").format(info.store_function),
            (keys, seqs, texts, doc_hashes, hashes, vectors))

    async def _finish(self, conn: psycopg.AsyncConnection, pipeline: str, keys: list[Key]) -> None:
        if keys:
            params = {"pipeline": pipeline, "keys": _keys(keys)}
            await conn.execute(query("done"), params)
            await conn.execute(query("clear_failures"), params)

    async def _fail(self, conn: psycopg.AsyncConnection, batch: Batch, outcomes: list[Outcome],
                    max_attempts: int, retry_base: float) -> None:
        if outcomes:
            await conn.execute(query("fail"), {
                "pipeline": batch.pipeline, "lease": batch.lease,
                "keys": _keys([o.claimed.key for o in outcomes]),
                "errors": [o.error for o in outcomes],
                "max_attempts": max_attempts, "retry_base": retry_base,
            })

    async def _usage(self, conn: psycopg.AsyncConnection, info: PipelineInfo,
                     usage: list[Usage]) -> None:
        for u in usage:
            await conn.execute(query("usage"), {
                "pipeline": info.name, "model": info.spec.model, "purpose": u.purpose,
                "cost_center": u.cost_center, "requests": u.requests, "inputs": u.inputs,
                "tokens": u.tokens, "cache_hits": u.cache_hits,
                "cache_misses": u.cache_misses, "worker": self.worker,
            })

    async def ready_count(self) -> int:
        async with self.pool.connection() as conn:
            cur = await conn.execute(query("ready_count"))
            row = await cur.fetchone()
        return int(row[0]) if row else 0
