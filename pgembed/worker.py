"""The worker: claims batches, embeds them outside any transaction, acknowledges them.

NOTIFY only wakes; a poll interval guarantees progress when a notification is missed. Any
number of workers may run against one database: claims use SKIP LOCKED and every write is
fenced by the lease it was claimed under.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg
from pgvector.psycopg import register_vector_async
from psycopg_pool import AsyncConnectionPool

from pgembed.batch import embed_batch
from pgembed.db import SESSION_OPTIONS
from pgembed.providers import Provider, ProviderError, make_provider
from pgembed.queue import AckResult, Batch, PipelineInfo, Queue

log = logging.getLogger("pgembed.worker")
CHANNEL = "pgembed"


@dataclass
class WorkerConfig:
    concurrency: int = 2
    batch_size: int = 64
    lease_seconds: float = 300.0
    poll_interval: float = 5.0
    until_empty: bool = False
    max_attempts: int = 5
    retry_base: float = 10.0
    outage_backoff: float = 30.0
    name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")


@dataclass
class WorkerStats:
    batches: int = 0
    written: int = 0
    removed: int = 0
    failed: int = 0
    changed: int = 0
    lost: int = 0
    provider_errors: int = 0

    def add(self, result: AckResult) -> None:
        self.batches += 1
        self.written += result.written
        self.removed += result.removed
        self.failed += result.failed
        self.changed += result.changed
        self.lost += result.lost


class Worker:
    def __init__(self, dsn: str, config: WorkerConfig | None = None,
                 on_batch: Callable[[AckResult], None] | None = None) -> None:
        self.dsn = dsn
        self.config = config or WorkerConfig()
        self.on_batch = on_batch
        self.stats = WorkerStats()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._busy = 0
        self._after = ""
        self._pipelines: dict[str, PipelineInfo] = {}
        self._providers: dict[tuple[str, int], Provider] = {}

    def stop(self) -> None:
        """Stop claiming; batches in flight are finished and acknowledged."""
        self._stopping.set()
        self._wake.set()

    async def run(self) -> WorkerStats:
        pool = AsyncConnectionPool(
            self.dsn, min_size=1, max_size=self.config.concurrency + 1, open=False,
            kwargs={"autocommit": True, "application_name": "pgembed-worker",
                    "options": SESSION_OPTIONS},
            configure=register_vector_async,
        )
        await pool.open(wait=True)
        queue = Queue(pool, self.config.name)
        listener = asyncio.create_task(self._listen())
        log.info("worker %s started", self.config.name, extra={"action": "start"})
        try:
            slots = [asyncio.create_task(self._slot(queue)) for _ in range(self.config.concurrency)]
            await asyncio.gather(*slots)
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
            for provider in self._providers.values():
                await provider.aclose()
            await pool.close()
        log.info("worker %s stopped: %s", self.config.name, self.stats, extra={"action": "stop"})
        return self.stats

    async def _slot(self, queue: Queue) -> None:
        while not self._stopping.is_set():
            batch = await queue.claim(self.config.batch_size, self.config.lease_seconds,
                                      self._after)
            if batch is None:
                if self.config.until_empty and self._busy == 0:
                    self.stop()
                    return
                await self._idle()
                continue
            self._after = batch.pipeline
            self._busy += 1
            try:
                await asyncio.shield(self._process(queue, batch))
            finally:
                self._busy -= 1
                self._wake.set()

    async def _idle(self) -> None:
        self._wake.clear()
        interval = 0.05 if self.config.until_empty else self.config.poll_interval
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), interval)

    async def _process(self, queue: Queue, batch: Batch) -> None:
        info = await self._pipeline(queue, batch.pipeline)
        if info is None:  # dropped since the claim: its outbox rows went with it
            return
        provider = self._provider(info)
        try:
            embedded = await embed_batch(info, batch, queue, provider)
        except ProviderError as error:
            self.stats.provider_errors += 1
            log.warning("pipeline %s: provider failed, %d rows back in %.0fs: %s",
                        info.name, len(batch.rows), self.config.outage_backoff, error,
                        extra={"action": "provider_error"})
            await queue.release(batch, [c.key for c in batch.rows], self.config.outage_backoff)
            return
        result = await queue.acknowledge(
            info, batch, embedded.outcomes, embedded.new_cache, embedded.usage,
            max_attempts=self.config.max_attempts, retry_base=self.config.retry_base)
        self.stats.add(result)
        log.info("pipeline %s: %d written, %d removed, %d failed, %d changed, %d lost",
                 info.name, result.written, result.removed, result.failed, result.changed,
                 result.lost, extra={"action": "batch"})
        if self.on_batch:
            self.on_batch(result)

    async def _pipeline(self, queue: Queue, name: str) -> PipelineInfo | None:
        if name not in self._pipelines:
            self._pipelines = await queue.pipelines()
        return self._pipelines.get(name)

    def _provider(self, info: PipelineInfo) -> Provider:
        key = (info.spec.model, info.spec.dimensions)
        if key not in self._providers:
            self._providers[key] = make_provider(info.spec)
        return self._providers[key]

    async def _listen(self) -> None:
        """LISTEN on a connection of its own; reconnects with backoff if it drops."""
        delay = 0.5
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                        self.dsn, autocommit=True, application_name="pgembed-listener") as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    delay = 0.5
                    self._wake.set()  # anything sent while we were away
                    async for _ in conn.notifies():
                        self._wake.set()
            except psycopg.OperationalError as error:
                log.warning("listener lost its connection (%s); retrying in %.1fs", error, delay,
                            extra={"action": "listen_retry"})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30)
