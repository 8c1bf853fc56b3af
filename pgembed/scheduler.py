"""Periodic jobs inside every worker (APScheduler), each run once per period fleet-wide.

Jobs: `audit` (pgembed.audit()), `cleanup` (cache entries unused for a
while, old job runs, dead workers' rows), `retry` (parked failures, on a slow doubling
backoff, of the failure classes whose policy retries by itself), `index` (IVFFlat upkeep:
train the index once a pipeline has enough rows; say when it needs a rebuild),
`evaluation` (re-run the evaluation set attached to each alias once its own period, a week
by default, has passed since its last run: pgembed.aliases.eval_every).

Every worker schedules every job on the same epoch-aligned grid. When a job fires, the
worker opens a connection of its own and takes the job's advisory lock (so two runs never
overlap, even one that outlasts its period), then claims the period in `pgembed.job_runs`
(unique per job and period, so a period never runs twice). Whoever loses either race
does nothing. Runs and next run times are rows a DBA can read (pgembed.job_runs,
pgembed.schedules).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from pgembed import db
from pgembed.sqlfiles import query

log = logging.getLogger("pgembed.scheduler")

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$", re.IGNORECASE)


def parse_duration(text: str | float | None) -> float | None:
    """'90', '90s', '15m', '6h', '30d' -> seconds; 'off' / '0' / '' -> None (disabled)."""
    if text is None:
        return None
    if isinstance(text, int | float):
        return float(text) if text > 0 else None
    if text.strip().lower() in ("", "off", "never", "none", "0"):
        return None
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (examples: 30s, 15m, 6h, 30d, off)")
    seconds = float(match.group(1)) * _UNITS[(match.group(2) or "s").lower()]
    return seconds if seconds > 0 else None


def format_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


@dataclass(frozen=True)
class ScheduleConfig:
    """How often each job runs (None: never) and what it does. Defaults suit a fleet that
    embeds continuously: cheap checks often, heavy clean-ups rarely."""

    audit_every: float | None = 3600.0
    audit_repair: bool = True  # queue missing/stale rows, delete orphaned vectors
    cleanup_every: float | None = 6 * 3600.0
    cache_max_age: float = 30 * 86400.0
    retry_every: float | None = 900.0
    retry_parked_after: float = 3600.0
    retry_parked_max: float = 7 * 86400.0
    index_every: float | None = 600.0
    ivfflat_min_rows: int = 1000
    ivfflat_rebuild_factor: float = 4.0
    eval_every: float | None = 3600.0  # how often to look for aliases whose evaluation is due
    batch_api_every: float | None = 300.0  # polls provider batches (pgembed/batch_api/job.py)
    extra_jobs: tuple[Job, ...] = ()  # more jobs (tests, extensions), same rules

    def __post_init__(self) -> None:
        if self.cache_max_age <= 0 or self.retry_parked_after <= 0:
            raise ValueError("cache max age and retry delay must be positive")
        if self.retry_parked_max < self.retry_parked_after:
            raise ValueError("the longest retry delay must not be shorter than the first")
        if self.ivfflat_min_rows < 1 or self.ivfflat_rebuild_factor <= 1:
            raise ValueError("ivfflat min rows must be >= 1 and the rebuild factor > 1")


@dataclass
class JobContext:
    worker: str
    config: ScheduleConfig
    dsn: str = ""  # for a job whose work needs a connection of its own (evaluation)


JobFunction = Callable[[psycopg.AsyncConnection, JobContext], Awaitable[str]]


@dataclass(frozen=True)
class Job:
    name: str
    every: float
    run: JobFunction
    settings: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def next_run(self, now: float | None = None) -> dt.datetime:
        """Next point of the job's epoch-aligned grid (what every worker's trigger uses)."""
        now = time.time() if now is None else now
        return dt.datetime.fromtimestamp(math.floor(now / self.every + 1) * self.every, dt.UTC)


# --------------------------------------------------------------------------- the jobs

async def _scalar(conn: psycopg.AsyncConnection, name: str, params: dict[str, Any]) -> Any:
    """The first column of the first row of named query `name` (None: no row)."""
    cur = await conn.execute(query(name), params)
    row = await cur.fetchone()
    return row[0] if row else None


async def audit_job(conn: psycopg.AsyncConnection, ctx: JobContext) -> str:
    return str(await _scalar(conn, "job_audit", {"repair": ctx.config.audit_repair}))


async def cleanup_job(conn: psycopg.AsyncConnection, ctx: JobContext) -> str:
    """Deletes in slices of 10,000 rows, each its own short statement, so a cache of
    millions of stale entries never holds one long transaction."""
    removed = 0
    while True:
        n = await _scalar(conn, "job_clean_cache",
                          {"max_age": dt.timedelta(seconds=ctx.config.cache_max_age), "slice": 10000})
        removed += int(n or 0)
        if not n or n < 10000:
            break
    cur = await conn.execute(query("job_prune"))
    runs, workers = await cur.fetchone() or (0, 0)
    # model migrations whose rollback window is over: the pipeline their alias left goes
    migrations = await _scalar(conn, "job_clean_migrations", {})
    return (f"{removed} cache entries unused for {format_duration(ctx.config.cache_max_age)} removed; "
            f"{runs} old job runs and {workers} dead workers forgotten; "
            f"{migrations or 0} finished model migrations cleaned up")


async def retry_job(conn: psycopg.AsyncConnection, ctx: JobContext) -> str:
    n = await _scalar(conn, "job_retry_parked",
                      {"parked_after": dt.timedelta(seconds=ctx.config.retry_parked_after),
                       "parked_max": dt.timedelta(seconds=ctx.config.retry_parked_max)})
    return f"{n or 0} parked failures re-queued"


async def _build_ivfflat(conn: psycopg.AsyncConnection, ctx: JobContext, plan: dict[str, Any]) -> None:
    # CONCURRENTLY: the application's DELETEs remove vectors from this table in their own
    # transactions (DESIGN rule 3) and must not wait for a build.
    try:
        await conn.execute(plan["create_sql"])
    except psycopg.Error:
        # a failed concurrent build leaves an invalid index behind
        with contextlib.suppress(psycopg.Error):
            await conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS pgembed.{}").format(
                sql.Identifier(plan["index_name"])))
        raise
    await conn.execute(query("ivfflat_record_build"),
                       {"pipeline": plan["pipeline"], "index_name": plan["index_name"], "lists": plan["lists"],
                        "row_count": plan["row_count"], "worker": ctx.worker})
    for statement in plan["drop_sql"]:
        await conn.execute(statement)


async def index_job(conn: psycopg.AsyncConnection, ctx: JobContext) -> str:
    cur = await conn.execute(
        query("ivfflat_plan"),
        {"min_rows": ctx.config.ivfflat_min_rows, "rebuild_factor": ctx.config.ivfflat_rebuild_factor})
    columns = [c.name for c in cur.description or ()]
    notes = []
    for row in await cur.fetchall():
        plan = dict(zip(columns, row, strict=True))
        name, rows = plan["pipeline"], plan["row_count"]
        if plan["action"] == "build":
            await _build_ivfflat(conn, ctx, plan)
            notes.append(f"{name}: IVFFlat index {plan['index_name']} trained on {rows} rows, "
                         f"{plan['lists']} lists")
            log.info("pipeline %s: IVFFlat index trained on %d rows with %d lists", name, rows,
                     plan["lists"], extra={"action": "index_built", "pipeline": name})
        elif plan["action"] == "rebuild_advised":
            notes.append(f"{name}: rebuild advised ({rows} rows, index trained on {plan['built_rows']})")
            log.warning(
                "pipeline %s: %d vectors, %.1f times the %d its IVFFlat index (%d lists) was trained on; "
                "rebuild it for recall: DELETE FROM pgembed.index_builds WHERE pipeline = '%s' and the "
                "next index upkeep rebuilds it concurrently", name, rows, rows / max(plan["built_rows"], 1),
                plan["built_rows"], plan["built_lists"], name.replace("'", "''"),
                extra={"action": "index_rebuild_advised", "pipeline": name})
        elif plan["action"] == "deferred":
            notes.append(f"{name}: {rows} rows, its first index is built by a worker once enough are in")
        elif plan["action"] == "wait":
            notes.append(f"{name}: {rows} of {ctx.config.ivfflat_min_rows} rows needed to train")
        else:
            notes.append(f"{name}: ok")
    return "; ".join(notes) or "no IVFFlat pipelines"


async def evaluation_job(conn: psycopg.AsyncConnection, ctx: JobContext) -> str:
    """Runs in a thread on a connection of its own: a run searches through the same
    (synchronous) path as users, which embeds queries with asyncio.run of its own. `conn`
    holds the job's lock meanwhile."""
    from pgembed.evaluation.runs import evaluate_due

    def work() -> str:
        with db.connect(ctx.dsn, "scheduler") as own:
            return evaluate_due(own)

    return await asyncio.to_thread(work)


async def batch_api_job(conn: psycopg.AsyncConnection, ctx: JobContext) -> str:
    from pgembed.batch_api.job import batch_api_job as poll_batches

    return await poll_batches(conn, ctx)


def jobs_for(config: ScheduleConfig) -> list[Job]:
    """The enabled jobs of a configuration, with the settings `pgembed status` may show."""
    table: list[tuple[str, float | None, JobFunction, dict[str, Any]]] = [
        ("audit", config.audit_every, audit_job, {"repair": config.audit_repair}),
        ("cleanup", config.cleanup_every, cleanup_job, {"cache_max_age": format_duration(config.cache_max_age)}),
        ("retry", config.retry_every, retry_job,
         {"parked_after": format_duration(config.retry_parked_after),
          "parked_max": format_duration(config.retry_parked_max)}),
        ("index", config.index_every, index_job,
         {"ivfflat_min_rows": config.ivfflat_min_rows, "rebuild_factor": config.ivfflat_rebuild_factor}),
        ("evaluation", config.eval_every, evaluation_job, {}),
        ("batch_api", config.batch_api_every, batch_api_job, {}),
    ]
    jobs = [Job(name, every, fn, settings) for name, every, fn, settings in table if every]
    return jobs + list(config.extra_jobs)


def disabled_jobs(config: ScheduleConfig) -> list[str]:
    return [name for name, every in (("audit", config.audit_every), ("cleanup", config.cleanup_every),
                                     ("retry", config.retry_every), ("index", config.index_every),
                                     ("evaluation", config.eval_every),
                                     ("batch_api", config.batch_api_every))
            if not every]


# ----------------------------------------------------------------------- the runner

class Scheduler:
    """One worker's share of the fleet's schedule."""

    def __init__(self, dsn: str, worker: str, config: ScheduleConfig,
                 on_run: Callable[[str, bool], None] | None = None) -> None:
        self.dsn = dsn
        self.worker = worker
        self.config = config
        self.jobs = {job.name: job for job in jobs_for(config)}
        self.context = JobContext(worker, config, dsn)
        self.on_run = on_run
        self._running: dict[str, asyncio.Task[bool | None]] = {}
        self._aps: Any = None
        self._closed = False

    async def _connect(self) -> psycopg.AsyncConnection:
        """A session for jobs, which may run for long (pgembed.db's "scheduler" role)."""
        return await db.connect_async(self.dsn, "scheduler", self.worker)

    async def start(self) -> None:
        """Publishes the schedule, then starts the timers (APScheduler, UTC, epoch grid)."""
        from apscheduler.schedulers.asyncio import AsyncIOScheduler
        from apscheduler.triggers.interval import IntervalTrigger

        async with await self._connect() as conn:
            for job in self.jobs.values():
                await self._publish(conn, job)
            for name in disabled_jobs(self.config):
                await conn.execute(query("schedule_delete"), {"job": name})
        self._aps = AsyncIOScheduler(timezone=dt.UTC)
        for job in self.jobs.values():
            self._aps.add_job(self._fire, IntervalTrigger(seconds=job.every, start_date=EPOCH, timezone=dt.UTC),
                              args=(job.name,), id=job.name, name=job.name, coalesce=True,
                              max_instances=1, misfire_grace_time=max(1, int(job.every / 2)))
        self._aps.start()
        log.info("scheduler started: %s", ", ".join(f"{j.name} every {format_duration(j.every)}"
                                                    for j in self.jobs.values()) or "no jobs",
                 extra={"action": "scheduler_start", "jobs": sorted(self.jobs)})

    async def stop(self, timeout: float) -> None:
        """No new runs; runs under way get `timeout` seconds, then are cancelled (their
        job_runs row then says so, and the next period runs again)."""
        if not self._closed:
            self._closed = True
            if self._aps is not None and self._aps.running:
                self._aps.shutdown(wait=False)
        running = [t for t in self._running.values() if not t.done()]
        if running:
            _, pending = await asyncio.wait(running, timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _fire(self, name: str) -> None:
        """APScheduler's callback: starts the run as a task of ours and returns, so that
        stop() can give runs under way a bounded time to finish."""
        if self._closed:
            return
        if name in self._running and not self._running[name].done():
            log.debug("job %s still running here; this period is skipped", name, extra={"action": "job_busy"})
            return
        task = asyncio.create_task(self.run_job(name), name=f"pgembed-job-{name}")
        self._running[name] = task

    async def run_job(self, name: str) -> bool | None:
        """Runs a job now if no worker holds it and its period has not run yet; returns
        whether it succeeded, or None when this worker had nothing to do."""
        job = self.jobs[name]
        try:
            async with await self._connect() as conn:
                if not await _scalar(conn, "job_lock", {"job": name}):
                    log.debug("job %s is running on another worker", name, extra={"action": "job_busy"})
                    return None
                try:
                    return await self._run_locked(conn, job)
                finally:
                    with contextlib.suppress(psycopg.Error):
                        await conn.execute(query("job_unlock"), {"job": name})
        except psycopg.Error as error:
            log.warning("job %s could not run: %s", name, error, extra={"action": "job_error", "job": name})
            return False

    async def _run_locked(self, conn: psycopg.AsyncConnection, job: Job) -> bool | None:
        run_id = await _scalar(conn, "job_run_start",
                               {"job": job.name, "worker": self.worker, "every": job.every})
        if run_id is None:
            log.debug("job %s already ran this period", job.name, extra={"action": "job_skipped", "job": job.name})
            return None
        started = time.monotonic()
        ok, detail = False, ""
        try:
            detail = await job.run(conn, self.context)
            ok = True
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._finish(run_id, False, "cancelled: worker stopping")), 5)
            raise
        except Exception as error:  # a failed job is recorded and retried next period
            detail = f"{type(error).__name__}: {error}"
            log.warning("job %s failed: %s", job.name, detail, exc_info=not isinstance(error, psycopg.Error),
                        extra={"action": "job_failed", "job": job.name})
        await conn.execute(query("job_run_finish"), {"run_id": run_id, "ok": ok, "detail": detail[:10000]})
        await self._publish(conn, job)
        if ok:
            log.info("job %s done in %.1fs: %s", job.name, time.monotonic() - started, detail,
                     extra={"action": "job", "job": job.name})
        if self.on_run:
            self.on_run(job.name, ok)
        return ok

    async def _finish(self, run_id: int, ok: bool, detail: str) -> None:
        async with await self._connect() as conn:
            await conn.execute(query("job_run_finish"), {"run_id": run_id, "ok": ok, "detail": detail})

    async def _publish(self, conn: psycopg.AsyncConnection, job: Job) -> None:
        await conn.execute(query("schedule_upsert"),
                           {"job": job.name, "every": job.every, "next_run": job.next_run(),
                            "settings": Jsonb(job.settings), "worker": self.worker})

