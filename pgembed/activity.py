"""What a long-running worker tells its log at INFO, so that `journalctl -u pgembed-worker`
answers "is it working, on what, how fast" without metrics: one line at start (version,
database, pipelines, concurrency), a progress line every PROGRESS_EVERY seconds while rows
are being embedded (rows since the last line, rate, queue depth), and one line when the
queue runs dry. Per-batch lines are at DEBUG (`--verbose`).

It costs nothing per batch: it reads the worker's counters. The queue depth is one query per
progress line, and none while the worker is idle.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import psycopg

from pgembed.heartbeat import Counts, version

log = logging.getLogger("pgembed.worker")
PROGRESS_EVERY = 60.0  # seconds between progress lines while there is work


class Activity:
    """The worker's INFO narration, read off its counters (see the module's docstring)."""

    def __init__(self, stats: Counts, every: float | None = None) -> None:
        self.stats = stats
        self.every = PROGRESS_EVERY if every is None else every
        self._line = self._since_idle = self._snapshot()
        self._line_at = time.monotonic()

    def _snapshot(self) -> tuple[int, int, int]:
        return self.stats.written, self.stats.removed, self.stats.failed

    def started(self, worker: str, database: str, pipelines: list[str], concurrency: int, batch_size: int) -> None:
        log.info("pgembed %s, worker %s started on %s: %s; concurrency %d, batch size %d", version(), worker,
                 database, f"pipelines {', '.join(pipelines)}" if pipelines else "no pipeline yet",
                 concurrency, batch_size,
                 extra={"action": "start", "worker": worker, "version": version(), "database": database,
                        "pipelines": pipelines, "concurrency": concurrency})

    def progress(self, queued: int | None) -> None:
        """A progress line, if rows were done since the last one."""
        now, current = time.monotonic(), self._snapshot()
        written, removed, failed = (c - p for c, p in zip(current, self._line, strict=True))
        if not (written or removed or failed):
            return
        seconds = max(now - self._line_at, 1e-6)
        depth = "unknown" if queued is None else f"{queued:,}"
        log.info("%d rows embedded, %d removed, %d failed in the last %.0fs (%.1f rows/s); %s queued",
                 written, removed, failed, seconds, written / seconds, depth,
                 extra={"action": "progress", "written": written, "removed": removed, "failed": failed,
                        "seconds": round(seconds, 3), "queued": queued})
        self._line, self._line_at = current, now

    def idle(self) -> None:
        """The queue has nothing to claim and no batch is in flight: said once per lull."""
        current = self._snapshot()
        if current == self._since_idle:
            return
        written, removed, failed = (c - p for c, p in zip(current, self._since_idle, strict=True))
        log.info("queue empty, waiting for changes (%d rows embedded, %d removed, %d failed since work began)",
                 written, removed, failed,
                 extra={"action": "idle", "written": written, "removed": removed, "failed": failed})
        self._since_idle = current

    async def run(self, queued: Callable[[], Awaitable[int]]) -> None:
        """Side task: a progress line every `every` seconds while rows are being done."""
        while True:
            await asyncio.sleep(self.every)
            if self._snapshot() == self._line:
                continue  # nothing done: no query, no line
            try:
                depth: int | None = await queued()
            except psycopg.Error:  # the line still says what was done
                depth = None
            self.progress(depth)
