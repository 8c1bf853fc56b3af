"""The worker: claims batches, embeds them outside any transaction, acknowledges them.

NOTIFY only wakes; a poll interval guarantees progress when a notification is missed. Any
number of workers may run against one database: claims use SKIP LOCKED and every write is
fenced by the lease it was claimed under.

Shutdown (stop(), SIGTERM, SIGINT): no new claims; batches in flight get
`shutdown_timeout` seconds to finish and be acknowledged; past that (or on a second
signal) their embedding is cancelled and their rows are given back at once, so another
worker takes them without waiting for the lease to expire. Acknowledgements and releases
run as shielded tasks that the worker awaits before it closes its pool: cancellation
never loses one (only a database that stays unreachable past WRITE_GRACE does, and then
the lease brings the rows back). Side tasks (listener, heartbeat, watchdog) are
supervised: if one dies, the worker stops rather than run half-alive.

This module is the lifecycle (start, signals, stop, drain, settle) and the slots. Around
them, each in a module of its own: the schema check at start (schema_check.py), the LISTEN
session (listener.py), the `pgembed.workers` row (heartbeat.py), deferred vector indexes
(indexes.py), sd_notify and signals (service.py), the fleet's periodic jobs (scheduler.py),
Prometheus metrics (metrics.py); every connection comes from db.py, named after the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg

from pgembed import db
from pgembed.activity import Activity
from pgembed.batch import Embedded, InFlight, embed_batch
from pgembed.config import WorkerConfig
from pgembed.heartbeat import Heartbeat
from pgembed.indexes import DeferredIndexBuilder
from pgembed.listener import CHANNEL, Listener
from pgembed.metrics import Metrics, MetricsServer
from pgembed.providers import EmbedResult, Provider, ProviderError, UnknownModelError, make_provider
from pgembed.providers.base import late_chunker
from pgembed.queue import AckResult, Batch, PipelineInfo, Queue
from pgembed.ratelimit import RateLimits
from pgembed.scheduler import Scheduler
from pgembed.schema_check import check_schema
from pgembed.service import Notifier, install_signal_handlers, watchdog_interval, watchdog_loop

__all__ = ["Unfinished", "Worker", "WorkerConfig", "WorkerStats"]
log = logging.getLogger("pgembed.worker")
# After the shutdown bound, how long releases of cancelled batches get before the slots
# themselves are cancelled (only a database that stopped answering takes that long).
SHUTDOWN_GRACE = 5.0
# How long run() waits, at the very end, for acknowledgements and releases still running.
WRITE_GRACE = 30.0
# queue purposes of work that comes in large backlogs, claimed in bulk_batch_size batches
BULK_PURPOSES = frozenset({"backfill", "repair", "migration"})
# Seconds between looks at pgembed.pipelines while there is work (an idle worker looks on
# every poll): a pipeline created meanwhile is claimed only once its provider is checked.
PIPELINE_REFRESH = 5.0
# A provider that could not work is checked again after this long (a local model installed,
# a server back): its pipeline is served from then on.
RECHECK_UNSERVABLE = 60.0
# What a provider check may raise: configuration a user can fix.
CHECK_ERRORS = (ProviderError, UnknownModelError, ValueError, ImportError, OSError)
T = TypeVar("T")


@dataclass
class WorkerStats:
    batches: int = 0
    written: int = 0
    removed: int = 0
    failed: int = 0
    changed: int = 0
    lost: int = 0
    provider_errors: int = 0
    released: int = 0  # rows given back unfinished at shutdown
    # pipelines whose provider cannot work (no API key, a local model that cannot load):
    # pipeline -> why; their rows were never claimed
    unservable: dict[str, str] = field(default_factory=dict)

    def add(self, result: AckResult) -> None:
        self.batches += 1
        self.written += result.written
        self.removed += result.removed
        self.failed += result.failed
        self.changed += result.changed
        self.lost += result.lost


class Unfinished(Exception):
    """A drain (--until-empty) that ended with rows it could not embed: a pipeline whose
    provider cannot work, or rows other workers still held when the wait ran out. Every
    other row was embedded; `stats` says what was done."""

    def __init__(self, message: str, stats: WorkerStats) -> None:
        super().__init__(message)
        self.stats = stats


class _TimedProvider:
    """Measures each provider.embed call for the API latency histogram."""

    def __init__(self, inner: Provider, metrics: Metrics) -> None:
        self.inner = inner
        self.spec = inner.spec
        self.bounds_requests = getattr(inner, "bounds_requests", False)
        self.metrics = metrics

    async def embed(self, texts: list[str]) -> EmbedResult:
        return await self._timed(self.inner.embed(texts))

    async def embed_late(self, documents: list[tuple[str, list[tuple[int, int]]]]) -> EmbedResult:
        return await self._timed(late_chunker(self.inner).embed_late(documents))

    async def _timed(self, call: Coroutine[Any, Any, EmbedResult]) -> EmbedResult:
        started = time.perf_counter()
        try:
            result = await call
        except ProviderError:
            self.metrics.api_call(self.spec.model, time.perf_counter() - started, ok=False)
            raise
        self.metrics.api_call(self.spec.model, time.perf_counter() - started, ok=True)
        return result

    async def aclose(self) -> None:
        await self.inner.aclose()


class Worker:
    def __init__(self, dsn: str, config: WorkerConfig | None = None,
                 on_batch: Callable[[AckResult], None] | None = None) -> None:
        self.dsn = dsn
        db.remember_secrets(dsn)
        self.config = config or WorkerConfig()
        self.on_batch = on_batch
        self.stats = WorkerStats()
        self._activity = Activity(self.stats)
        self.metrics = Metrics()
        self.metrics_port: int | None = None
        self.notifier = Notifier.from_env()
        self._wake = asyncio.Event()
        self._requests = asyncio.Semaphore(self.config.concurrency)
        self._inflight = InFlight()
        self._stopping = asyncio.Event()
        self._force = asyncio.Event()
        self._listener = Listener(dsn, self.config.name, self._wake.set)
        self._busy = 0
        self._claiming = 0
        self._after = ""
        self._claim_limit = self.config.batch_size
        self._pipelines: dict[str, PipelineInfo] = {}
        self._providers: dict[tuple[str, int], Provider] = {}
        self._bulk_providers: dict[tuple[str, int], Provider] = {}
        # providers that could not be made to work: (model, dimensions) -> (why, when checked)
        self._problems: dict[tuple[str, int], tuple[str, float]] = {}
        self._servable: list[str] = []  # pipelines whose provider passed its check
        self._reported: set[tuple[str, str]] = set()
        self._refreshed = float("-inf")
        self._refreshing = asyncio.Lock()
        self._waiting_since: float | None = None  # --until-empty waiting for others' rows
        self._unfinished: list[str] = []
        # The API key's budget is shared by every worker on every host, so it is kept in
        # PostgreSQL (pgembed.rate_limits); one connection of its own, opened on first use.
        self._limits = RateLimits(dsn, worker=self.config.name)
        self._embedding: dict[asyncio.Task[Embedded], Batch] = {}
        self._protected: set[asyncio.Task[Any]] = set()
        self._heartbeat: Heartbeat | None = None
        self._scheduler: Scheduler | None = None

    def stop(self) -> None:
        """Stop claiming; batches in flight are finished and acknowledged (within the
        shutdown timeout)."""
        self._stopping.set()
        self._wake.set()

    def abort(self) -> None:
        """Stop now: batches in flight are given back instead of finished."""
        self._force.set()
        self.stop()

    def _on_signal(self, name: str) -> None:
        if self._stopping.is_set():
            log.warning("%s again: giving back the batches in flight now", name,
                        extra={"action": "shutdown_now", "signal": name})
            self.abort()
            return
        log.info("%s: stopping; batches in flight get up to %gs to finish", name,
                 self.config.shutdown_timeout, extra={"action": "shutdown", "signal": name})
        self.stop()

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> WorkerStats:
        undo_signals = (install_signal_handlers(asyncio.get_running_loop(), self._on_signal)
                        if self.config.handle_signals else None)
        pool = db.worker_pool(self.dsn, self.config.name, max_size=self.config.concurrency + 2)
        server: MetricsServer | None = None
        scheduler: Scheduler | None = None
        side: dict[str, asyncio.Task[Any]] = {}
        ready: asyncio.Task[None] | None = None
        slots: list[asyncio.Task[None]] = []
        crash: BaseException | None = None
        try:
            if self.config.metrics_port is not None:
                server = MetricsServer(self.config.metrics_address, self.config.metrics_port)
                self.metrics, self.metrics_port = server.metrics, server.port
            await check_schema(self.dsn, self.config.name)
            await pool.open(wait=True)
            queue = Queue(pool, self.config.name)
            indexes = DeferredIndexBuilder(self.dsn, self.config.name, self.config.index_memory, pool)
            # rows of workers that died are given back before anything is claimed (a row
            # under this worker's own name is a previous process's: it is not beating)
            await queue.release_dead_workers(self.config.dead_after_seconds, None)
            # every provider is checked before the first claim (none is claimed for a
            # pipeline whose provider cannot work)
            await self._refresh(queue)
            if self.config.heartbeat_interval > 0:
                self._heartbeat = Heartbeat(pool, self.config.name, self.config.concurrency, self.stats,
                                            self.metrics, self.notifier)
                await self._heartbeat.beat(starting=True)
                side["heartbeat"] = asyncio.create_task(self._heartbeat.run(self.config.heartbeat_interval),
                                                        name="pgembed-heartbeat")
            side["listener"] = asyncio.create_task(self._listener.run(), name="pgembed-listener")
            side["reaper"] = asyncio.create_task(self._reap_loop(queue), name="pgembed-reaper")
            interval = watchdog_interval() if self.notifier.enabled else None
            if interval:
                side["watchdog"] = asyncio.create_task(watchdog_loop(self.notifier, interval),
                                                       name="pgembed-watchdog")
            if self.config.schedule is not None:
                scheduler = self._scheduler = Scheduler(self.dsn, self.config.name, self.config.schedule,
                                                        on_run=self.metrics.job)
                await scheduler.start()
            side["activity"] = asyncio.create_task(self._activity.run(lambda: self._queued(queue)),
                                                   name="pgembed-activity")
            self._activity.started(self.config.name, db.describe(self.dsn), self._servable,
                                   self.config.concurrency, self.config.batch_size)
            ready = asyncio.create_task(self._announce_ready(), name="pgembed-ready")
            slots = [asyncio.create_task(self._slot(queue, indexes), name=f"pgembed-slot-{i}")
                     for i in range(self.config.concurrency + self.config.prefetch)]
            crash = await self._supervise(slots, side)
        finally:
            for task in [*slots, ready]:
                if task is not None and not task.done():
                    task.cancel()  # only when run() itself was cancelled; releases are protected
            if slots:
                await asyncio.gather(*slots, return_exceptions=True)
            if scheduler is not None:
                await scheduler.stop(0)  # a no-op after _drain; cancels runs if run() was cancelled
            for task in side.values():
                task.cancel()
            await asyncio.gather(*side.values(), return_exceptions=True)
            await self._settle()
            if self._heartbeat is not None and not pool.closed:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._heartbeat.goodbye(), 5)
            for provider in self._providers.values():  # the bulk providers share their clients
                await provider.aclose()
            await self._limits.aclose()
            await pool.close()
            if server is not None:
                server.close()
            if undo_signals:
                undo_signals()
        st = self.stats
        log.info("worker %s stopped: %d batches, %d rows written, %d removed, %d failed, %d given back",
                 self.config.name, st.batches, st.written, st.removed, st.failed, st.released,
                 extra={"action": "stop", "worker": self.config.name, "batches": self.stats.batches,
                        "written": self.stats.written, "released": self.stats.released})
        if crash is not None:
            raise crash
        if self.config.until_empty and self._unfinished:
            raise Unfinished("; ".join(self._unfinished), self.stats)
        return self.stats

    async def _supervise(self, slots: list[asyncio.Task[None]],
                         side: dict[str, asyncio.Task[Any]]) -> BaseException | None:
        """Waits for the slots to end, a stop, or a side task to die; then drains within
        the shutdown bound. Returns the error that stopped the worker, if one did."""
        crash: BaseException | None = None
        stop_wait = asyncio.create_task(self._stopping.wait())
        watched = {*slots, *side.values(), stop_wait}
        while not self._stopping.is_set() and not all(s.done() for s in slots):
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            watched -= done
            for task in done:
                if task is stop_wait or task.cancelled():
                    continue
                error = task.exception()
                if task in side.values() or error is not None:
                    name = next((k for k, v in side.items() if v is task), task.get_name())
                    crash = error or RuntimeError(f"the worker's {name} ended unexpectedly")
                    log.error("%s failed (%s); stopping the worker", name, crash,
                              exc_info=error, extra={"action": "crash", "task": name})
                    self.stop()
        stop_wait.cancel()
        await self._drain(slots)
        return crash

    async def _drain(self, slots: list[asyncio.Task[None]]) -> None:
        """Lets batches in flight finish within the shutdown bound, then cancels their
        embedding (the rows are given back) and, a little later, whatever still hangs."""
        pending = {s for s in slots if not s.done()}
        self.notifier.stopping(f"stopping: {len(self._embedding)} batches in flight")
        if self._embedding:
            log.info("finishing %d batches in flight", len(self._embedding), extra={"action": "draining"})
        # scheduled jobs under way share the same bound
        jobs = (asyncio.create_task(self._scheduler.stop(self.config.shutdown_timeout))
                if self._scheduler is not None else None)
        if self._heartbeat is not None:
            self._heartbeat.state = "stopping"
            if pending:
                self._track(asyncio.create_task(self._heartbeat.beat_quietly()))
        pending = await self._wait(pending, self.config.shutdown_timeout, until_forced=True)
        if pending:
            log.warning("giving back %d batches in flight", len(self._embedding),
                        extra={"action": "shutdown_timeout"})
            for task in list(self._embedding):
                task.cancel()
            # releases are quick; a slot stuck on an unreachable database is not waited for
            for slot in await self._wait(pending, SHUTDOWN_GRACE):
                slot.cancel()
        await asyncio.gather(*slots, return_exceptions=True)  # errors were reported by _supervise
        if jobs is not None:
            await jobs

    async def _wait(self, tasks: set[asyncio.Task[None]], timeout: float,
                    until_forced: bool = False) -> set[asyncio.Task[None]]:
        """Waits for the tasks up to `timeout` (or until abort()); returns those still running."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        force_wait = asyncio.create_task(self._force.wait())
        try:
            while tasks and not (until_forced and self._force.is_set()):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                watched = {*tasks, force_wait} if until_forced else tasks
                await asyncio.wait(watched, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                tasks = {t for t in tasks if not t.done()}
        finally:
            force_wait.cancel()
        return tasks

    async def _settle(self) -> None:
        """Acknowledgements and releases started before the stop must land before the pool
        closes. They take milliseconds; only an unreachable database (the queue retries
        for a while) makes one wait, and then not past WRITE_GRACE: its lease guards it."""
        if not self._protected:
            return
        _, late = await asyncio.wait(set(self._protected), timeout=WRITE_GRACE)
        if late:
            log.warning("%d acknowledgements or releases could not be written; their rows come "
                        "back when the lease expires", len(late), extra={"action": "write_lost"})
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    async def _announce_ready(self) -> None:
        await self._listener.listening.wait()
        self.notifier.ready(f"embedding, {self.config.concurrency} slots")
        log.info("connected and listening on channel %s", CHANNEL, extra={"action": "ready"})

    # ---------------------------------------------------------------- the work

    async def _protect(self, coro: Coroutine[Any, Any, T]) -> T:
        """Runs a write that must not be lost to cancellation; run() awaits it before
        closing the pool even if the caller was cancelled."""
        return await asyncio.shield(self._track(asyncio.create_task(coro)))

    def _track(self, task: asyncio.Task[T]) -> asyncio.Task[T]:
        self._protected.add(task)
        task.add_done_callback(self._protected.discard)
        return task

    async def _slot(self, queue: Queue, indexes: DeferredIndexBuilder) -> None:
        delay = 0.5
        while not self._stopping.is_set():
            try:
                await self._step(queue, indexes)
                delay = 0.5
            except psycopg.OperationalError as error:
                if self.config.until_empty:
                    raise
                # a PostgreSQL restart or network blip: leases protect what was claimed
                log.warning("database unavailable (%s); retrying in %.1fs", error, delay,
                            extra={"action": "db_retry"})
                await self._sleep(delay)
                delay = min(delay * 2, 30.0)

    async def _step(self, queue: Queue, indexes: DeferredIndexBuilder) -> None:
        # a claim under way counts: it may be about to take the rows this slot's claim
        # skipped, so --until-empty must not call the queue empty before it returns
        self._claiming += 1
        try:
            if time.monotonic() - self._refreshed > PIPELINE_REFRESH:
                await self._refresh(queue)
            limit = self._claim_limit
            batch = await queue.claim(limit, self.config.lease_seconds, self._after, self._servable)
        finally:
            self._claiming -= 1
        self._claim_limit = self._next_limit(batch, limit)
        if batch is None:
            if self._busy == 0:
                self._activity.idle()
            if await self._refresh(queue):
                return  # a pipeline to serve appeared (or its provider works now): claim again
            await indexes.check(force=self.config.until_empty)
            # an index check under way counts too: the worker does not stop in a build
            if (self.config.until_empty and self._busy == 0 and self._claiming == 0
                    and indexes.active == 0 and await queue.batched(self._servable) == 0):
                if await self._others_hold_rows(queue):
                    await self._sleep(0.25)
                    return
                await self._finish_drain(queue)
                self.stop()
                return
            await self._idle()
            return
        self._waiting_since = None
        if self._stopping.is_set():  # claimed while the stop came: give it straight back
            await self._protect(queue.release(batch, [c.key for c in batch.rows], 0))
            return
        self._after = batch.pipeline
        self._busy += 1
        self.metrics.batches_in_flight(self._busy)
        try:
            await self._process(queue, batch)
            if len(batch.rows) < limit:  # the queue ran short: a backfill may be over
                await indexes.check(force=False)
        finally:
            self._busy -= 1
            self.metrics.batches_in_flight(self._busy)
            self._wake.set()

    async def _others_hold_rows(self, queue: Queue) -> bool:
        """--until-empty found nothing to claim: rows other workers hold are not done. Wait
        for them (they are acknowledged, given back, or their worker is found dead and they
        come back) up to until_empty_wait; past it, the drain ends unfinished, saying why."""
        held, holders = await queue.leased_elsewhere(self._servable)
        if not held:
            self._waiting_since = None
            return False
        if await queue.release_dead_workers(self.config.dead_after_seconds, self.config.name):
            return True
        now = time.monotonic()
        if self._waiting_since is None:
            self._waiting_since = now
            log.info("waiting for %d rows that %s holds", held, holders,
                     extra={"action": "wait_for_others", "rows": held})
            return True
        if now - self._waiting_since < self.config.until_empty_wait:
            return True
        message = (f"{held} rows are still leased by {holders} after waiting "
                   f"{self.config.until_empty_wait:g}s; they are not embedded")
        if message not in self._unfinished:
            self._unfinished.append(message)
        return False

    async def _finish_drain(self, queue: Queue) -> None:
        """The end of a drain: the pipelines it could not serve and still have rows."""
        unservable = {name: why for name, why in self.stats.unservable.items() if name in self._pipelines}
        if not unservable:
            return
        backlog = await queue.backlog_of(sorted(unservable))
        for name, why in sorted(unservable.items()):
            message = f"pipeline {name} could not be served ({backlog.get(name, 0)} rows left queued): {why}"
            if message not in self._unfinished:
                self._unfinished.append(message)

    async def _reap_loop(self, queue: Queue) -> None:
        """Side task: gives back the leases of workers whose heartbeat stopped."""
        dead_after = self.config.dead_after_seconds
        while True:
            await asyncio.sleep(max(min(self.config.heartbeat_interval or dead_after, dead_after) / 2, 0.2))
            try:
                await queue.release_dead_workers(dead_after, self.config.name)
            except psycopg.Error as error:
                log.debug("looking for dead workers failed: %s", error, extra={"action": "reap_failed"})

    async def _refresh(self, queue: Queue) -> bool:
        """Reads pgembed.pipelines and checks the provider of every pipeline not checked yet;
        returns whether a pipeline became servable. A pipeline whose provider cannot work is
        reported once, in one sentence, and its rows are never claimed."""
        async with self._refreshing:
            self._pipelines = await queue.pipelines()
            self._refreshed = time.monotonic()
            servable, unservable = [], {}
            for name, info in sorted(self._pipelines.items()):
                problem = await self._check(info)
                if problem is None:
                    servable.append(name)
                    continue
                unservable[name] = problem
                if (name, problem) not in self._reported:
                    self._reported.add((name, problem))
                    log.error("pipeline %s cannot be served, its rows stay queued: %s", name, problem,
                              extra={"action": "pipeline_unservable", "pipeline": name})
            gained = bool(set(servable) - set(self._servable))
            self._servable = servable
            self.stats.unservable = unservable
            return gained

    async def _check(self, info: PipelineInfo) -> str | None:
        """Why this pipeline's provider cannot work (no API key, an unknown provider, a local
        model that cannot be loaded), or None. Checked once per model and size; a failed check
        is tried again after RECHECK_UNSERVABLE seconds."""
        key = (info.spec.model, info.spec.dimensions)
        if key in self._providers:
            return None
        if key in self._problems:
            problem, checked = self._problems[key]
            if time.monotonic() - checked < RECHECK_UNSERVABLE:
                return problem
        try:
            provider = self._make_provider(info)
            check = getattr(provider, "check", None)
            if check is not None:
                await check()
        except CHECK_ERRORS as error:
            self._problems[key] = (str(error) or type(error).__name__, time.monotonic())
            return self._problems[key][0]
        self._problems.pop(key, None)
        self._providers[key] = provider
        return None

    def _make_provider(self, info: PipelineInfo) -> Provider:
        """The worker's --concurrency is the provider's bound on requests in flight too."""
        provider = make_provider(info.spec, limiter=self._limits.for_spec(info.spec),
                                 concurrency=self.config.concurrency)
        return _TimedProvider(provider, self.metrics) if self.metrics.enabled else provider

    def _next_limit(self, batch: Batch | None, limit: int) -> int:
        """A full claim of bulk work only: claim bulk_batch_size rows next time."""
        if (batch is not None and len(batch.rows) == limit
                and all(row.purpose in BULK_PURPOSES for row in batch.rows)):
            return self.config.bulk_claim
        return self.config.batch_size

    async def _idle(self) -> None:
        self._wake.clear()
        interval = 0.05 if self.config.until_empty else self.config.poll_interval
        await self._sleep(interval)

    async def _sleep(self, seconds: float) -> None:
        """Sleeps, but wakes on a notification or a stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _process(self, queue: Queue, batch: Batch) -> None:
        info = await self._pipeline(queue, batch.pipeline)
        if info is None:  # dropped since the claim: its outbox rows went with it
            return
        keys = [c.key for c in batch.rows]
        embedding = asyncio.create_task(embed_batch(info, batch, queue, self._provider(info, batch),
                                                    self._requests, self._inflight))
        self._embedding[embedding] = batch
        try:
            embedded = await embedding
        except asyncio.CancelledError:
            # cut short by the shutdown bound (or the worker is cancelled): the rows go
            # back now rather than when the lease expires
            await self._protect(queue.release(batch, keys, 0))
            self.stats.released += len(keys)
            log.warning("pipeline %s: %d rows given back unfinished", info.name, len(keys),
                        extra={"action": "release", "pipeline": info.name, "rows": len(keys)})
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            return
        except ProviderError as error:
            self.stats.provider_errors += 1
            log.warning("pipeline %s: provider failed, %d rows back in %.0fs: %s",
                        info.name, len(keys), self.config.outage_backoff, error,
                        extra={"action": "provider_error", "pipeline": info.name})
            await self._protect(queue.release(batch, keys, self.config.outage_backoff))
            return
        finally:
            self._embedding.pop(embedding, None)
        try:
            result = await self._protect(queue.acknowledge(
                info, batch, embedded.outcomes, embedded.new_cache, embedded.usage,
                max_attempts=self.config.max_attempts, retry_base=self.config.retry_base))
        finally:
            self._inflight.forget(embedded.sent)
        self.stats.add(result)
        self.metrics.batch(info.name, {"written": result.written, "removed": result.removed,
                                       "failed": result.failed, "changed": result.changed,
                                       "lost": result.lost})
        for u in embedded.usage:
            self.metrics.usage(info.spec.model, u.requests, u.tokens, u.cache_hits, u.cache_misses)
        log.debug("pipeline %s: %d written, %d removed, %d failed, %d changed, %d lost",
                 info.name, result.written, result.removed, result.failed, result.changed,
                 result.lost, extra={"action": "batch", "pipeline": info.name, "written": result.written,
                                     "removed": result.removed, "failed": result.failed})
        if self.on_batch:
            self.on_batch(result)

    async def _queued(self, queue: Queue) -> int:
        """Rows the pipelines this worker serves still have to embed (for progress lines)."""
        return sum((await queue.backlog_of(self._servable)).values())

    async def _pipeline(self, queue: Queue, name: str) -> PipelineInfo | None:
        if name not in self._pipelines:
            await self._refresh(queue)
        return self._pipelines.get(name)

    def _provider(self, info: PipelineInfo, batch: Batch) -> Provider:
        key = (info.spec.model, info.spec.dimensions)
        if key not in self._providers:
            self._providers[key] = self._make_provider(info)
        if info.spec.provider != "openai" or not all(row.purpose in BULK_PURPOSES for row in batch.rows):
            return self._providers[key]
        if key not in self._bulk_providers:  # only an API's budget has a share to keep to
            self._bulk_providers[key] = self._bulk_provider(info, self._providers[key])
        return self._bulk_providers[key]

    def _bulk_provider(self, info: PipelineInfo, live: Provider) -> Provider:
        """The live provider with the bulk lane's budget: one client, one --concurrency."""
        inner = live.inner if isinstance(live, _TimedProvider) else live
        bulk = inner.with_limiter(self._limits.for_spec(info.spec, True))  # type: ignore[attr-defined]
        return _TimedProvider(bulk, self.metrics) if self.metrics.enabled else bulk
