"""Write-through: rows an application needs searchable right after its commit.

The application commits as always (its triggers queue the keys), then names the keys; this
process embeds them now instead of leaving them to a worker, and returns once their vectors
are committed. It is a worker for those keys only: `pgembed.claim_keys` leases exactly their
outbox rows (the worker's lease columns), and the worker's own batch path embeds them
(`batch.embed_batch`: read, chunk, cache, provider) and `Queue.acknowledge` stores them,
fenced by that lease and by each row's version. So nothing here can store what a worker
would not: a row changed meanwhile is not overwritten by its old text's vector (it is
claimed again, and the newer content wins), and a key another worker holds is left to it.

Whatever goes wrong leaves the row where a worker finds it: a request that fails (API down,
too slow for the call's timeout) gives the rows back to their place in line at once; a text
the provider refuses is recorded in pgembed.failures as the worker records it; a process
that dies mid-call leaves a lease that expires. A key another worker holds is waited for,
up to the call's timeout (its acknowledgement stores it), then reported `in_flight`.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from pgembed import db
from pgembed.batch import InFlight, embed_batch
from pgembed.config import WorkerConfig
from pgembed.pipelines import refused
from pgembed.providers import Provider, ProviderError, make_provider
from pgembed.queue import Batch, Claimed, Key, PipelineInfo, Queue
from pgembed.ratelimit import RateLimits, openai_bucket
from pgembed.sqlfiles import query

# The most keys one call takes: write-through is for the rows a request just wrote; more
# than this is a backfill, which the worker does in batches.
MAX_KEYS = 1000
# A lease outlives the call by this much: a process that dies mid-call holds its rows no
# longer than that past its timeout.
LEASE_MARGIN = 5.0
# How often a key another worker holds (or a row lock) is looked at again.
POLL = 0.02
_DEFAULTS = WorkerConfig()

DONE = frozenset({"stored", "no_row", "fresh"})  # searchable as the row now is


class WriteThroughError(ValueError):
    """The caller's bad input: an unknown target, a malformed key (its arity, a value the
    source's key type refuses), too many keys."""


@dataclass(frozen=True)
class KeyOutcome:
    """What became of one key. `status`:
      stored     embedded and committed: searchable now
      fresh      not queued: its vectors are already those of its content
      no_row     no row has this key (deleted, its vectors with it; or never written)
      failed     not embedded (`error` says why); queued or parked, as a worker leaves it
      in_flight  another worker (`holder`) still held it at the timeout; it stores it
      queued     still queued at the timeout (a transaction held its row lock, or it kept
                 changing): a worker embeds it
    """

    key: list[str]
    status: str
    error: str | None = None
    holder: str | None = None  # the worker holding an `in_flight` key


@dataclass
class SyncResult:
    target: str
    pipeline: str
    keys: list[KeyOutcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Every key is searchable as its row now is (or has no row)."""
        return all(k.status in DONE for k in self.keys)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def normalize_keys(keys: Sequence[object], columns: int) -> list[Key]:
    """Keys as the outbox stores them (each column's value as text), without repeats. A
    one-column key may be given bare (`42`, `"a"`); a key of several columns is a list."""
    if isinstance(keys, str | bytes) or not isinstance(keys, Sequence):
        raise WriteThroughError("keys must be a list of keys")
    if len(keys) > MAX_KEYS:
        raise WriteThroughError(f"at most {MAX_KEYS} keys a call ({len(keys)} given): queue more for the worker")
    seen: dict[Key, None] = {}
    for given in keys:
        values = list(given) if isinstance(given, list | tuple) else [given]
        if len(values) != columns or not all(_scalar(v) for v in values):
            raise WriteThroughError(
                f"key {given!r}: the pipeline's key has {columns} column(s); give "
                + ("its value" if columns == 1 else f"a list of {columns} values")
                + " as text or a whole number")
        seen[tuple(str(v) for v in values)] = None
    return list(seen)


def _scalar(value: object) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


class WriteThrough:
    """What successive calls share: the pool, one provider per model (an API client takes
    tens of milliseconds to make: more than the rest of a call's own work) and the rate
    limiter's session. A server keeps one for its lifetime; `sync_keys` with a DSN or a
    pool makes one for the call."""

    def __init__(self, database: str | AsyncConnectionPool) -> None:
        self.name = f"writethrough:{socket.gethostname()}:{os.getpid()}"
        if isinstance(database, str):
            db.remember_secrets(database)
            self.pool, self._owns_pool = db.worker_pool(database, self.name, max_size=2), True
        else:
            self.pool, self._owns_pool = database, False
        if not isinstance(self.pool.conninfo, str):  # the rate limiter opens a session of its own
            raise TypeError("write-through needs a pool made with a conninfo string")
        self._limits = RateLimits(self.pool.conninfo, worker=self.name)
        self._providers: dict[tuple[str, int, str], Provider] = {}
        self._opening = asyncio.Lock()

    async def __aenter__(self) -> WriteThrough:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for provider in self._providers.values():
            await provider.aclose()
        self._providers.clear()
        await self._limits.aclose()
        if self._owns_pool:
            await self.pool.close()

    def _provider(self, info: PipelineInfo) -> Provider:
        """One a model and size, and (for an API) its key and base URL as they are now."""
        spec = info.spec
        key = (spec.model, spec.dimensions, openai_bucket() if spec.provider == "openai" else "")
        if key not in self._providers:
            self._providers[key] = make_provider(spec, limiter=self._limits.for_spec(spec))
        return self._providers[key]

    async def sync(self, target: str, keys: Sequence[object], *, timeout: float = 30.0) -> SyncResult:
        """See sync_keys."""
        if timeout <= 0:
            raise WriteThroughError("timeout must be more than 0 seconds")
        started = time.monotonic()
        deadline = started + timeout
        if self._owns_pool:
            async with self._opening:
                if self.pool.closed:
                    await self.pool.open(wait=True)
        try:
            async with self.pool.connection() as conn:
                row = await (await conn.execute(query("writethrough_target"), {"target": target})).fetchone()
        except psycopg.errors.RaiseException as error:  # resolve_pipeline's "no pipeline or alias named"
            raise WriteThroughError(str(refused(error))) from None
        assert row is not None  # resolve_pipeline returned a pipeline's name
        pipeline, columns = str(row[0]), int(row[1])
        wanted = normalize_keys(keys, columns)
        result = SyncResult(target, pipeline)
        if wanted:
            queue = Queue(self.pool, self.name, reconnect_for=max(timeout, 1.0))
            info = (await queue.pipelines())[pipeline]
            outcomes = await _Run(queue, info, self._provider(info), deadline).run(wanted)
            result.keys = [outcomes[k] for k in wanted]
        result.seconds = time.monotonic() - started
        return result


async def sync_keys(database: str | AsyncConnectionPool | WriteThrough, target: str, keys: Sequence[object],
                    *, timeout: float = 30.0) -> SyncResult:
    """Embeds and stores these keys of `target` (a pipeline or an alias) now; returns when
    each is searchable, or what kept it from being so, within about `timeout` seconds.
    `database`: a DSN, an open pool whose connections have pgvector's types registered (as
    `pgembed.db.worker_pool`'s), or a WriteThrough kept across calls (the fastest)."""
    if isinstance(database, WriteThrough):
        return await database.sync(target, keys, timeout=timeout)
    async with WriteThrough(database) as session:
        return await session.sync(target, keys, timeout=timeout)


@dataclass
class _Run:
    """One call: rounds of claim, embed, acknowledge until every key has an outcome."""

    queue: Queue
    info: PipelineInfo
    provider: Provider
    deadline: float
    outcomes: dict[Key, KeyOutcome] = field(default_factory=dict)
    queued: set[Key] = field(default_factory=set)  # seen in the outbox during this call
    holders: dict[Key, str] = field(default_factory=dict)

    async def run(self, keys: list[Key]) -> dict[Key, KeyOutcome]:
        first = True
        while pending := [k for k in keys if k not in self.outcomes]:
            if time.monotonic() >= self.deadline:
                for k in pending:
                    holder = self.holders.get(k)
                    self.outcomes[k] = KeyOutcome(list(k), "in_flight" if holder else "queued", holder=holder)
                break
            batch = await self._claim(pending, first)
            first = False
            if batch is not None:
                await self._embed(batch)
            elif any(k not in self.outcomes for k in pending):
                await asyncio.sleep(min(POLL, max(self.deadline - time.monotonic(), 0)))
        return self.outcomes

    async def _claim(self, keys: list[Key], first: bool) -> Batch | None:
        lease = uuid.uuid4()
        lease_seconds = max(self.deadline - time.monotonic(), 0) + LEASE_MARGIN
        expires = time.monotonic() + lease_seconds
        async with self.queue.pool.connection() as conn:
            rows = await (await conn.execute(query("writethrough_claim"), {
                "pipeline": self.info.name, "worker": self.queue.worker, "lease": lease,
                "keys": Jsonb([list(k) for k in keys]), "lease_seconds": lease_seconds})).fetchall()
        batch = Batch(self.info.name, lease, [Claimed(tuple(r[0]), r[2], r[3], r[4]) for r in rows
                                               if r[1] == "claimed"], expires=expires)
        absent = []
        for key_json, state, _, _, _, holder, error in rows:
            key = tuple(key_json)
            self.holders.pop(key, None)
            if state == "absent":
                absent.append(key)
            elif state == "parked":
                self.outcomes[key] = KeyOutcome(list(key), "failed", error=f"parked: {error}")
            elif state != "statement":
                self.queued.add(key)
                if state == "in_flight":
                    self.holders[key] = holder
        if absent:
            try:
                await self._settle_absent(absent, first)
            except WriteThroughError:
                if batch.rows:
                    await asyncio.shield(self.queue.release(batch, [c.key for c in batch.rows], 0))
                raise
        return batch if batch.rows else None

    async def _settle_absent(self, keys: list[Key], first: bool) -> None:
        """Keys not in the outbox: up to date already, stored by another worker since this
        call saw them queued, or of no row. A delete takes a row's vectors in its own
        transaction (the capture trigger), so a deleted key and one that never was look
        alike and are both `no_row`: an application that deletes a row and then asks for
        it gets no error. A key the source's key type refuses ('abc' for an integer) is the
        caller's mistake."""
        rows, refused_keys = await self.queue.read(self.info, keys)
        if refused_keys and first:
            key, why = next(iter(refused_keys.items()))
            raise WriteThroughError(f"key {list(key)} of pipeline {self.info.name}: "
                                    + why.removeprefix("content expression failed: "))
        found = {r.key for r in rows if r.found}
        for k in keys:
            if k in refused_keys:
                self.outcomes[k] = KeyOutcome(list(k), "failed", error=refused_keys[k])
            else:
                status = "no_row" if k not in found else "stored" if k in self.queued else "fresh"
                self.outcomes[k] = KeyOutcome(list(k), status)

    async def _embed(self, batch: Batch) -> None:
        keys = [c.key for c in batch.rows]
        try:
            embedded = await asyncio.wait_for(
                embed_batch(self.info, batch, self.queue, self.provider, asyncio.Semaphore(1), InFlight()),
                max(self.deadline - time.monotonic(), 0.001))
        except (ProviderError, TimeoutError) as error:
            # back to their place in line: the worker converges them
            await asyncio.shield(self.queue.release(batch, keys, 0))
            why = str(error) if isinstance(error, ProviderError) else "timed out before the provider answered"
            for k in keys:
                self.outcomes[k] = KeyOutcome(list(k), "failed", error=why)
            return
        except asyncio.CancelledError:
            await asyncio.shield(self.queue.release(batch, keys, 0))
            raise
        result = await asyncio.shield(self.queue.acknowledge(
            self.info, batch, embedded.outcomes, embedded.new_cache, embedded.usage,
            max_attempts=_DEFAULTS.max_attempts, retry_base=_DEFAULTS.retry_base))
        again = {*result.changed_keys, *result.skipped}  # queued again: the next round takes them
        for o in embedded.outcomes:
            k = o.claimed.key
            if k in again:
                continue
            if o.error is not None:
                self.outcomes[k] = KeyOutcome(list(k), "failed", error=o.error)
            else:
                self.outcomes[k] = KeyOutcome(list(k), "no_row" if o.gone else "stored")
