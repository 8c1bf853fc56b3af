"""`pgembed worker`: the long-running service (or, with --until-empty, a one-off drain).

Every option has a PGEMBED_* variable, so a unit file or container needs only an
environment file; defaults come from WorkerConfig and ScheduleConfig."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Annotated, Any

import typer

from pgembed import logs
from pgembed.cli.common import DsnOption, configured_target, fail, friendly, out
from pgembed.cli.defaults import default_of, duration_default
from pgembed.scheduler import ScheduleConfig, parse_duration
from pgembed.worker import Unfinished, Worker, WorkerConfig, WorkerStats

SERVICE = "Service"
SCHEDULED = "Scheduled jobs"


def _option(envvar: str, help_text: str, *names: str, panel: str | None = None, **limits: Any) -> Any:
    return typer.Option(*names, envvar=envvar, show_envvar=True, rich_help_panel=panel, help=help_text, **limits)


def _period(envvar: str, help_text: str) -> Any:
    return _option(envvar, f"{help_text} Duration like 30s, 15m, 6h, 1d; 'off' disables.", panel=SCHEDULED)


def _every(option: str, value: str) -> float | None:
    try:
        return parse_duration(value)
    except ValueError as error:
        raise ValueError(f"{option}: {error}") from None


def _positive(option: str, value: str) -> float:
    seconds = _every(option, value)
    if seconds is None:
        raise ValueError(f"{option} must be a positive duration, not {value!r}")
    return seconds


@friendly
def worker(
    until_empty: Annotated[bool, _option("PGEMBED_UNTIL_EMPTY", "Drain the queue, then exit.")] = False,
    concurrency: Annotated[int, _option(
        "PGEMBED_CONCURRENCY", "Embedding requests in flight at once, over all pipelines (the bound of the "
        "API client too).", min=1)
    ] = default_of(WorkerConfig, "concurrency"),
    prefetch: Annotated[int, _option(
        "PGEMBED_PREFETCH", "Batches read ahead while requests are out (more throughput when the API is slow).",
        min=0)] = default_of(WorkerConfig, "prefetch"),
    batch_size: Annotated[int, _option(
        "PGEMBED_BATCH_SIZE", "Rows per claim of changes made by the application. Requests still respect the "
        "provider's input and token limits.", min=1)
    ] = default_of(WorkerConfig, "batch_size"),
    bulk_batch_size: Annotated[int | None, _option(
        "PGEMBED_BULK_BATCH_SIZE", "Rows per claim while a backfill, repair or migration backlog lasts "
        "[default: 4 × --batch-size].", min=1, show_default=False)
    ] = default_of(WorkerConfig, "bulk_batch_size"),
    poll_interval: Annotated[float, _option("PGEMBED_POLL_INTERVAL", "Seconds between polls when idle.")
    ] = default_of(WorkerConfig, "poll_interval"),
    lease_seconds: Annotated[float, _option("PGEMBED_LEASE_SECONDS", "How long a claim is held.")
    ] = default_of(WorkerConfig, "lease_seconds"),
    max_attempts: Annotated[int, _option(
        "PGEMBED_MAX_ATTEMPTS", "Failures before a row is parked, in the classes whose policy does not say "
        "(pgembed.failure_classes).", min=1)
    ] = default_of(WorkerConfig, "max_attempts"),
    retry_base: Annotated[float, _option("PGEMBED_RETRY_BASE", "First retry delay of a failed row (s).")
    ] = default_of(WorkerConfig, "retry_base"),
    name: Annotated[str | None, _option(
        "PGEMBED_WORKER_NAME", "This worker's name in pgembed.workers, leases and job runs (default host:pid).",
        panel=SERVICE)] = None,
    shutdown_timeout: Annotated[float, _option(
        "PGEMBED_SHUTDOWN_TIMEOUT", "On SIGTERM/SIGINT, seconds batches in flight get to finish; then their "
        "rows are given back to the queue. A second signal gives them back at once.", panel=SERVICE, min=0)
    ] = default_of(WorkerConfig, "shutdown_timeout"),
    heartbeat_interval: Annotated[float, _option(
        "PGEMBED_HEARTBEAT_INTERVAL", "Seconds between updates of this worker's pgembed.workers row; 0 keeps "
        "no row.", panel=SERVICE, min=0)] = default_of(WorkerConfig, "heartbeat_interval"),
    metrics_port: Annotated[int | None, _option(
        "PGEMBED_METRICS_PORT", "Serve Prometheus metrics on this port (/metrics); needs the metrics extra: "
        "pip install 'pgembed\\[metrics]'.", panel=SERVICE, min=0, max=65535)
    ] = default_of(WorkerConfig, "metrics_port"),
    metrics_address: Annotated[str, _option(
        "PGEMBED_METRICS_ADDRESS", "Address the metrics endpoint listens on (0.0.0.0 for a remote Prometheus).",
        panel=SERVICE)] = default_of(WorkerConfig, "metrics_address"),
    log_format: Annotated[str, _option(
        "PGEMBED_LOG_FORMAT", "human: one line per record; json: one JSON object per line (ts, level, "
        "message, action, ...).", panel=SERVICE)] = "human",
    log_level: Annotated[str | None, _option(
        "PGEMBED_LOG_LEVEL", "Least severe level logged: debug, info, warning or error. Default: info (a line "
        "at start, progress every minute while there is work, one when the queue is empty); warning with "
        "--until-empty, whose summary is printed.", panel=SERVICE)] = None,
    verbose: Annotated[bool, _option(
        "PGEMBED_VERBOSE", "Log every batch too (pgembed's records at level debug).", "--verbose", "-v")] = False,
    scheduler: Annotated[bool, _option(
        "PGEMBED_SCHEDULER", "Run the periodic jobs below (each runs once per period across all workers). "
        "Never with --until-empty.", panel=SCHEDULED)] = True,
    audit_every: Annotated[str, _period("PGEMBED_AUDIT_EVERY", "Consistency audit (pgembed.audit()).")
    ] = duration_default(ScheduleConfig, "audit_every"),
    audit_repair: Annotated[bool, _option(
        "PGEMBED_AUDIT_REPAIR", "Let the scheduled audit queue missing/stale rows and delete orphaned vectors.",
        panel=SCHEDULED)] = default_of(ScheduleConfig, "audit_repair"),
    cleanup_every: Annotated[str, _period("PGEMBED_CLEANUP_EVERY", "Cache and bookkeeping clean-up.")
    ] = duration_default(ScheduleConfig, "cleanup_every"),
    cache_max_age: Annotated[str, _option(
        "PGEMBED_CACHE_MAX_AGE", "Clean-up deletes cache entries not used for this long (e.g. 30d).",
        panel=SCHEDULED)] = duration_default(ScheduleConfig, "cache_max_age"),
    retry_every: Annotated[str, _period("PGEMBED_RETRY_EVERY", "Re-queue parked failures that are due.")
    ] = duration_default(ScheduleConfig, "retry_every"),
    retry_parked_after: Annotated[str, _option(
        "PGEMBED_RETRY_PARKED_AFTER", "A parked failure is first retried after this long; then after as long "
        "again as it has been failing (doubling).", panel=SCHEDULED)
    ] = duration_default(ScheduleConfig, "retry_parked_after"),
    retry_parked_max: Annotated[str, _option(
        "PGEMBED_RETRY_PARKED_MAX", "Longest wait between retries of a parked failure.", panel=SCHEDULED)
    ] = duration_default(ScheduleConfig, "retry_parked_max"),
    index_every: Annotated[str, _period("PGEMBED_INDEX_EVERY", "IVFFlat index upkeep.")
    ] = duration_default(ScheduleConfig, "index_every"),
    ivfflat_min_rows: Annotated[int, _option(
        "PGEMBED_IVFFLAT_MIN_ROWS", "Vectors a pipeline needs before its IVFFlat index is trained "
        "(lists = rows/1000, min 10).", panel=SCHEDULED, min=1)] = default_of(ScheduleConfig, "ivfflat_min_rows"),
    ivfflat_rebuild_factor: Annotated[float, _option(
        "PGEMBED_IVFFLAT_REBUILD_FACTOR", "Log that an IVFFlat index needs a rebuild once its table grew this "
        "many times.", panel=SCHEDULED, min=1.1)] = default_of(ScheduleConfig, "ivfflat_rebuild_factor"),
    eval_every: Annotated[str, _period(
        "PGEMBED_EVAL_EVERY", "Look for aliases whose evaluation set is due (each alias's own period, "
        "a week by default: pgembed alias set --every).")] = duration_default(ScheduleConfig, "eval_every"),
    dsn: DsnOption = None,
    embedded: Annotated[bool, _option(
        "PGEMBED_EMBEDDED", "Embed into the embedded PostgreSQL under your data directory (without it, a "
        "worker with no database configured refuses to start).", "--embedded", panel=SERVICE)] = False,
) -> None:
    """Embed queued rows; runs until stopped (SIGTERM/SIGINT drain it gracefully), or with
    --until-empty until the queue is drained. Under systemd it reports READY, WATCHDOG and
    STOPPING (see deploy/pgembed-worker.service).

    Example: pgembed worker --concurrency 4 --metrics-port 9464 --log-format json
    """
    logs.setup(log_format, log_level or ("warning" if until_empty else "info"), stream=sys.stderr)
    if verbose:
        logging.getLogger("pgembed").setLevel(logging.DEBUG)
    schedule = None
    if scheduler and not until_empty:
        schedule = ScheduleConfig(
            audit_every=_every("--audit-every", audit_every), audit_repair=audit_repair,
            cleanup_every=_every("--cleanup-every", cleanup_every),
            cache_max_age=_positive("--cache-max-age", cache_max_age),
            retry_every=_every("--retry-every", retry_every),
            retry_parked_after=_positive("--retry-parked-after", retry_parked_after),
            retry_parked_max=_positive("--retry-parked-max", retry_parked_max),
            index_every=_every("--index-every", index_every),
            ivfflat_min_rows=ivfflat_min_rows, ivfflat_rebuild_factor=ivfflat_rebuild_factor,
            eval_every=_every("--eval-every", eval_every))
    config = WorkerConfig(concurrency=concurrency, prefetch=prefetch, batch_size=batch_size,
                          bulk_batch_size=bulk_batch_size, poll_interval=poll_interval,
                          lease_seconds=lease_seconds, until_empty=until_empty, max_attempts=max_attempts,
                          retry_base=retry_base, shutdown_timeout=shutdown_timeout,
                          heartbeat_interval=heartbeat_interval, handle_signals=True, schedule=schedule,
                          metrics_port=metrics_port, metrics_address=metrics_address)
    if name:
        config.name = name
    try:
        stats = asyncio.run(Worker(configured_target(dsn, embedded, "worker"), config).run())
    except Unfinished as unfinished:
        _summary(unfinished.stats)
        fail(f"the queue is not empty: {unfinished}")
    _summary(stats)


def _summary(stats: WorkerStats) -> None:
    out.print(f"{stats.written} rows embedded, {stats.removed} removed, {stats.failed} failed "
              f"in {stats.batches} batches", highlight=False)
