"""The worker's row in `pgembed.workers`, so that a DBA sees the fleet.

Upserted when the worker starts and every heartbeat interval (over a row of the same name
that was marked dead, too), deleted on a clean exit; the live workers mark a worker whose
beats stopped `dead` (pgembed.release_dead_workers) and forget its row a day later. A beat also refreshes what systemd's
status line and the queue depth gauge say, which is why it runs only on the interval: a
failed beat is logged and the next one tries again, it never stops the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from importlib import metadata
from typing import Protocol

import psycopg
from psycopg_pool import AsyncConnectionPool

from pgembed.metrics import Metrics
from pgembed.service import Notifier
from pgembed.sqlfiles import query

log = logging.getLogger("pgembed.heartbeat")


class Counts(Protocol):
    batches: int
    written: int
    removed: int
    failed: int


def version() -> str:
    """This pgembed's version, as its heartbeat row and its start line give it."""
    try:
        return metadata.version("pgembed")
    except metadata.PackageNotFoundError:
        return "unknown"


class Heartbeat:
    """Beats on the worker's pool; `state` is what the row says the worker is doing."""

    def __init__(self, pool: AsyncConnectionPool, name: str, concurrency: int, counts: Counts,
                 metrics: Metrics, notifier: Notifier) -> None:
        self.pool = pool
        self.name = name
        self.concurrency = concurrency
        self.counts = counts
        self.metrics = metrics
        self.notifier = notifier
        self.state = "running"
        self.version = version()

    async def run(self, interval: float) -> None:
        """The side task: a beat every `interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.beat_now()
            except psycopg.Error as error:
                log.warning("heartbeat failed: %s", error, extra={"action": "heartbeat_failed"})

    async def beat_quietly(self) -> None:
        """Says the state in pgembed.workers without holding up the shutdown on it."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.beat_now(), 5)

    async def beat_now(self) -> None:
        await self.beat()
        if self.metrics.enabled or self.notifier.enabled:
            ready, leased, waiting = await self.queue_depth()
            self.metrics.queue_depth(ready, leased, waiting)
            self.notifier.status(f"{self.state}: {self.counts.written} rows embedded in "
                                 f"{self.counts.batches} batches; queue: {ready} ready, {leased} leased")

    async def beat(self, *, starting: bool = False) -> None:
        counts = self.counts
        async with self.pool.connection() as conn:
            await conn.execute(query("heartbeat"), {
                "name": self.name, "host": socket.gethostname(), "pid": os.getpid(), "version": self.version,
                "state": self.state, "concurrency": self.concurrency, "batches": counts.batches,
                "written": counts.written, "removed": counts.removed, "failed": counts.failed,
                "starting": starting})

    async def goodbye(self) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(query("worker_exit"), {"name": self.name})

    async def queue_depth(self) -> tuple[int, int, int]:
        """(ready, leased, waiting) rows in the outbox."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(query("queue_depth"))
            row = await cur.fetchone()
        return (int(row[0]), int(row[1]), int(row[2])) if row else (0, 0, 0)
