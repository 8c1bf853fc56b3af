"""`pgembed …`: the command line. Every command takes --dsn (or PGEMBED_DSN); with neither
it uses the embedded PostgreSQL and says so. Errors are one sentence, never a traceback."""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Annotated, Any, TypeVar

import psycopg
import typer
from rich.console import Console
from rich.table import Table

from pgembed import db, logs, migrate, pipelines
from pgembed.metrics import MetricsUnavailable
from pgembed.pipelines import PipelineError, PipelineOptions
from pgembed.providers import ProviderError, UnknownModelError
from pgembed.scheduler import ScheduleConfig, parse_duration
from pgembed.search import search as run_search
from pgembed.worker import Worker, WorkerConfig

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Keep pgvector embeddings of PostgreSQL rows correct, cheap and fresh.")
pipeline_app = typer.Typer(no_args_is_help=True, help="Create, list and drop pipelines.")
app.add_typer(pipeline_app, name="pipeline")

out = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

DsnOption = Annotated[str | None, typer.Option(
    "--dsn", envvar="PGEMBED_DSN", show_envvar=True,
    help="PostgreSQL URL; without it, the embedded server under your data directory.")]


def friendly(fn: F) -> F:
    """Turns the errors a user can fix into one clear line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (db.DatabaseError, PipelineError, ProviderError, UnknownModelError,
                ValueError) as error:
            err.print(f"[red]error:[/red] {error}", highlight=False)
        except psycopg.errors.UndefinedTable as error:
            err.print(f"[red]error:[/red] the pgembed schema is missing ({error.diag.message_primary});"
                      " run `pgembed init` first", highlight=False)
        except psycopg.Error as error:
            err.print(f"[red]error:[/red] {error.diag.message_primary or error}", highlight=False)
        raise typer.Exit(1)

    return wrapper  # type: ignore[return-value]


def target(dsn: str | None) -> str:
    resolved = db.resolve(dsn)
    if resolved.embedded:
        err.print(f"[dim]using the embedded PostgreSQL in {db.embedded_data_dir()}[/dim]")
    return resolved.dsn


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*("" if v is None else str(v) for v in r))
    return t


@app.command()
@friendly
def init(dsn: DsnOption = None) -> None:
    """Create or upgrade the pgembed schema. Safe to run again.

    Example: pgembed init --dsn postgresql://admin@db/app
    """
    url = target(dsn)
    migrate.upgrade(url)
    out.print(f"pgembed schema at revision {migrate.head_revision()}")


@pipeline_app.command("create")
@friendly
def pipeline_create(
    table_name: Annotated[str, typer.Argument(metavar="TABLE", help="Source table, as in SQL.")],
    content: Annotated[str, typer.Argument(help="SQL expression over the row, e.g. \"title || ' ' || body\".")],
    model: Annotated[str, typer.Option(help="provider:model, e.g. openai:text-embedding-3-small or hash:384.")],
    dimensions: Annotated[int | None, typer.Option(help="Output dimensions (Matryoshka).")] = None,
    index: Annotated[str, typer.Option(help="hnsw, ivfflat or none.")] = "hnsw",
    distance: Annotated[str, typer.Option(help="cosine, l2 or ip.")] = "cosine",
    chunk_tokens: Annotated[int, typer.Option(help="Tokens per chunk; 0 = no chunking.")] = 0,
    chunk_overlap: Annotated[int, typer.Option(help="Tokens shared by neighbouring chunks.")] = 0,
    backfill: Annotated[bool, typer.Option(help="Queue the rows already in the table.")] = True,
    cost_center: Annotated[str | None, typer.Option(help="SQL expression naming who pays, e.g. tenant_id.")] = None,
    name: Annotated[str | None, typer.Option(help="Pipeline name (default: {table}_{model}).")] = None,
    dsn: DsnOption = None,
) -> None:
    """Start embedding a table.

    Example: pgembed pipeline create articles "title || ' ' || body" --model hash:384
    """
    options = PipelineOptions(dimensions=dimensions, index=index, distance=distance,
                              chunk_tokens=chunk_tokens, chunk_overlap=chunk_overlap,
                              backfill=backfill, cost_center=cost_center, name=name)
    with db.connect(target(dsn)) as conn:
        created = pipelines.create(conn, table_name, content, model, options)
    out.print(f"pipeline [bold]{created}[/bold] created; vectors go to pgembed.{created}")


@pipeline_app.command("list")
@friendly
def pipeline_list(dsn: DsnOption = None) -> None:
    """List pipelines.

    Example: pgembed pipeline list
    """
    with db.connect(target(dsn)) as conn:
        rows = pipelines.list_all(conn)
    columns = ["name", "source", "content", "model", "dimensions", "index_type", "queued"]
    out.print(table("pipelines", columns, ([r[c] for c in columns] for r in rows)))


@pipeline_app.command("drop")
@friendly
def pipeline_drop(name: str, dsn: DsnOption = None) -> None:
    """Drop a pipeline: its triggers, queue and destination table.

    Example: pgembed pipeline drop articles_h384
    """
    with db.connect(target(dsn)) as conn:
        pipelines.drop(conn, name)
    out.print(f"pipeline {name} dropped")


def _duration(option: str, value: str, *, allow_off: bool = True) -> float | None:
    try:
        seconds = parse_duration(value)
    except ValueError as error:
        raise ValueError(f"{option}: {error}") from None
    if seconds is None and not allow_off:
        raise ValueError(f"{option} must be a positive duration, not {value!r}")
    return seconds


def _every(help_text: str, env: str) -> Any:
    return typer.Option(envvar=env, show_envvar=True, rich_help_panel="Scheduled jobs",
                        help=f"{help_text} Duration like 30s, 15m, 6h, 1d; 'off' disables.")


@app.command()
@friendly
def worker(
    until_empty: Annotated[bool, typer.Option(help="Drain the queue, then exit.")] = False,
    concurrency: Annotated[int, typer.Option(min=1, help="Embedding requests in flight at once.")
    ] = WorkerConfig.concurrency,
    prefetch: Annotated[int, typer.Option(
        min=0, help="Batches read ahead while requests are out (more throughput when the API is slow).")
    ] = WorkerConfig.prefetch,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per claim.")] = WorkerConfig.batch_size,
    bulk_batch_size: Annotated[int, typer.Option(
        min=1, help="Rows per claim while a backfill, repair or migration backlog lasts.")
    ] = WorkerConfig.bulk_batch_size,
    poll_interval: Annotated[float, typer.Option(help="Seconds between polls when idle.")] = 5.0,
    lease_seconds: Annotated[float, typer.Option(help="How long a claim is held.")] = 300.0,
    max_attempts: Annotated[int, typer.Option(min=1, help="Failures before a row is parked.")] = 5,
    retry_base: Annotated[float, typer.Option(help="First retry delay of a failed row (s).")] = 10.0,
    name: Annotated[str | None, typer.Option(
        envvar="PGEMBED_WORKER_NAME", show_envvar=True, rich_help_panel="Service",
        help="This worker's name in pgembed.workers, leases and job runs (default host:pid).")] = None,
    shutdown_timeout: Annotated[float, typer.Option(
        min=0, envvar="PGEMBED_SHUTDOWN_TIMEOUT", show_envvar=True, rich_help_panel="Service",
        help="On SIGTERM/SIGINT, seconds batches in flight get to finish; then their rows are "
             "given back to the queue. A second signal gives them back at once.")] = 30.0,
    heartbeat_interval: Annotated[float, typer.Option(
        min=0, envvar="PGEMBED_HEARTBEAT_INTERVAL", show_envvar=True, rich_help_panel="Service",
        help="Seconds between updates of this worker's pgembed.workers row; 0 keeps no row.")] = 10.0,
    metrics_port: Annotated[int | None, typer.Option(
        min=0, max=65535, envvar="PGEMBED_METRICS_PORT", show_envvar=True, rich_help_panel="Service",
        help="Serve Prometheus metrics on this port (/metrics); "
             "needs the metrics extra: pip install 'pgembed[metrics]'.")] = None,
    metrics_address: Annotated[str, typer.Option(
        envvar="PGEMBED_METRICS_ADDRESS", show_envvar=True, rich_help_panel="Service",
        help="Address the metrics endpoint listens on (0.0.0.0 for a remote Prometheus).")] = "127.0.0.1",
    log_format: Annotated[str, typer.Option(
        envvar="PGEMBED_LOG_FORMAT", show_envvar=True, rich_help_panel="Service",
        help="human: one line per record; json: one JSON object per line (ts, level, message, "
             "action, ...).")] = "human",
    log_level: Annotated[str, typer.Option(
        envvar="PGEMBED_LOG_LEVEL", show_envvar=True, rich_help_panel="Service",
        help="Least severe level logged: debug, info, warning or error; --verbose means info.")] = "warning",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every batch (level info).")] = False,
    scheduler: Annotated[bool, typer.Option(
        envvar="PGEMBED_SCHEDULER", show_envvar=True, rich_help_panel="Scheduled jobs",
        help="Run the periodic jobs below (each runs once per period across all workers). "
             "Never with --until-empty.")] = True,
    audit_every: Annotated[str, _every("Consistency audit (pgembed.audit()).", "PGEMBED_AUDIT_EVERY")] = "1h",
    audit_repair: Annotated[bool, typer.Option(
        envvar="PGEMBED_AUDIT_REPAIR", show_envvar=True, rich_help_panel="Scheduled jobs",
        help="Let the scheduled audit queue missing/stale rows and delete orphaned vectors.")] = True,
    cleanup_every: Annotated[str, _every("Cache and bookkeeping clean-up.", "PGEMBED_CLEANUP_EVERY")] = "6h",
    cache_max_age: Annotated[str, typer.Option(
        envvar="PGEMBED_CACHE_MAX_AGE", show_envvar=True, rich_help_panel="Scheduled jobs",
        help="Clean-up deletes cache entries not used for this long (e.g. 30d).")] = "30d",
    retry_every: Annotated[str, _every("Re-queue parked failures that are due.", "PGEMBED_RETRY_EVERY")] = "15m",
    retry_parked_after: Annotated[str, typer.Option(
        envvar="PGEMBED_RETRY_PARKED_AFTER", show_envvar=True, rich_help_panel="Scheduled jobs",
        help="A parked failure is first retried after this long; then after as long again as "
             "it has been failing (doubling).")] = "1h",
    retry_parked_max: Annotated[str, typer.Option(
        envvar="PGEMBED_RETRY_PARKED_MAX", show_envvar=True, rich_help_panel="Scheduled jobs",
        help="Longest wait between retries of a parked failure.")] = "7d",
    index_every: Annotated[str, _every("IVFFlat index upkeep.", "PGEMBED_INDEX_EVERY")] = "10m",
    ivfflat_min_rows: Annotated[int, typer.Option(
        min=1, envvar="PGEMBED_IVFFLAT_MIN_ROWS", show_envvar=True, rich_help_panel="Scheduled jobs",
        help="Vectors a pipeline needs before its IVFFlat index is trained (lists = rows/1000, min 10).")] = 1000,
    ivfflat_rebuild_factor: Annotated[float, typer.Option(
        min=1.1, envvar="PGEMBED_IVFFLAT_REBUILD_FACTOR", show_envvar=True, rich_help_panel="Scheduled jobs",
        help="Log that an IVFFlat index needs a rebuild once its table grew this many times.")] = 4.0,
    dsn: DsnOption = None,
) -> None:
    """Embed queued rows; runs until stopped (SIGTERM/SIGINT drain it gracefully), or with
    --until-empty until the queue is drained. Under systemd it reports READY, WATCHDOG and
    STOPPING (see deploy/pgembed-worker.service).

    Example: pgembed worker --concurrency 4 --metrics-port 9464 --log-format json
    """
    logs.setup(log_format, logging.INFO if verbose else log_level, stream=sys.stderr)
    schedule = None
    if scheduler and not until_empty:
        schedule = ScheduleConfig(
            audit_every=_duration("--audit-every", audit_every), audit_repair=audit_repair,
            cleanup_every=_duration("--cleanup-every", cleanup_every),
            cache_max_age=_duration("--cache-max-age", cache_max_age, allow_off=False) or 0,
            retry_every=_duration("--retry-every", retry_every),
            retry_parked_after=_duration("--retry-parked-after", retry_parked_after, allow_off=False) or 0,
            retry_parked_max=_duration("--retry-parked-max", retry_parked_max, allow_off=False) or 0,
            index_every=_duration("--index-every", index_every),
            ivfflat_min_rows=ivfflat_min_rows, ivfflat_rebuild_factor=ivfflat_rebuild_factor)
    config = WorkerConfig(concurrency=concurrency, prefetch=prefetch, batch_size=batch_size,
                          bulk_batch_size=bulk_batch_size,
                          poll_interval=poll_interval, lease_seconds=lease_seconds,
                          until_empty=until_empty, max_attempts=max_attempts,
                          retry_base=retry_base, shutdown_timeout=shutdown_timeout,
                          heartbeat_interval=heartbeat_interval, handle_signals=True,
                          schedule=schedule, metrics_port=metrics_port,
                          metrics_address=metrics_address)
    if name:
        config.name = name
    try:
        stats = asyncio.run(Worker(target(dsn), config).run())
    except MetricsUnavailable as error:
        err.print(f"[red]error:[/red] {error}", highlight=False)
        raise typer.Exit(1) from None
    out.print(f"{stats.written} rows embedded, {stats.removed} removed, {stats.failed} failed "
              f"in {stats.batches} batches")


@app.command()
@friendly
def search(
    pipeline: str,
    text: str,
    k: Annotated[int, typer.Option("-k", min=1, help="How many results.")] = 5,
    cost_center: Annotated[str | None, typer.Option(help="Who pays for the query embedding.")] = None,
    dsn: DsnOption = None,
) -> None:
    """Nearest rows to a text.

    Example: pgembed search articles_h384 "how do vaccines work" -k 5
    """
    with db.connect(target(dsn)) as conn:
        hits = run_search(conn, pipeline, text, k, cost_center)
    out.print(table(f"{pipeline}: {text}", ["key", "distance", "chunk"],
                    ((", ".join(f"{k}={v}" for k, v in h.key.items()), f"{h.distance:.4f}",
                      h.chunk[:100]) for h in hits)))


@app.command()
@friendly
def quickstart(
    model: Annotated[str | None, typer.Option(help="Model to use (default: the best available).")] = None,
    dsn: DsnOption = None,
) -> None:
    """Semantic search in one command: sample data, a pipeline, a drain, two searches.

    Example: pgembed quickstart
    """
    from pgembed import quickstart as qs

    qs.run(target(dsn), out, model)
    status_table = globals().get("status")
    if callable(status_table):
        out.print()
        status_table(dsn=dsn)


from pgembed.costs import Grouping as CostGrouping  # noqa: E402  (kept with its commands)


def _usd(value: Any) -> str:
    if value is None:
        return ""
    return "<0.000001" if 0 < value < 0.0000005 else f"{value:,.6f}"


def _count(value: Any) -> str:
    return "" if value is None else f"{round(value):,}"


def _rate(hits: int, misses: int) -> str:
    return f"{hits / (hits + misses):.1%}" if hits + misses else ""


@app.command()
@friendly
def costs(
    days: Annotated[int, typer.Option(min=1, help="Calendar days to cover, today included.")] = 7,
    by: Annotated[CostGrouping, typer.Option(help="Group by purpose or by cost center.")] = CostGrouping.purpose,
    dsn: DsnOption = None,
) -> None:
    """What embeddings cost (current prices in pgembed.models), anomalies today, cache savings.

    Example: pgembed costs --days 30 --by cost-center
    """
    from pgembed import costs as cost_views

    with db.connect(target(dsn)) as conn:
        rows = cost_views.spend(conn, days, by)
        anomalies = cost_views.anomalies(conn)
        cache = cost_views.cache(conn)
    keys = ["pipeline", "model", "purpose"] if by is CostGrouping.purpose else \
        ["cost_center", "pipeline", "purpose"]
    sums = {c: sum(r[c] or 0 for r in rows) for c in ("requests", "inputs", "tokens", "cache_hits",
                                                     "cache_misses", "usd")}
    body = [[*(r[k] if r[k] is not None or k != "cost_center" else "(none)" for k in keys),
             _count(r["requests"]), _count(r["inputs"]), _count(r["tokens"]),
             _count(r["cache_hits"]), _rate(r["cache_hits"], r["cache_misses"]), _usd(r["usd"])]
            for r in rows]
    body.append(["total", "", "", _count(sums["requests"]), _count(sums["inputs"]),
                 _count(sums["tokens"]), _count(sums["cache_hits"]),
                 _rate(sums["cache_hits"], sums["cache_misses"]), _usd(sums["usd"])])
    out.print(table(f"spend, last {days} day{'s' if days > 1 else ''}, by {by.value}",
                    [k.replace("_", " ") for k in keys]
                    + ["requests", "inputs", "tokens", "cache hits", "hit rate", "usd"], body))
    if anomalies:
        out.print(table("[red]spend far above the 7-day daily average today[/red]",
                        ["pipeline", "purpose", "measure", "today", "daily avg (7d)", "ratio"],
                        ([a["pipeline"], a["purpose"], a["measure"],
                          *(_usd(v) if a["measure"] == "usd" else _count(v)
                            for v in (a["today"], a["daily_avg_7d"])),
                          a["ratio"] or "new"] for a in anomalies)))
    out.print(table("cache", ["model", "entries", "hits", "hit rate", "tokens saved", "usd saved"],
                    ([c["model"], _count(c["entries"]), _count(c["cache_hits"]),
                      _rate(c["cache_hits"], c["cache_misses"]), _count(c["tokens_saved"]),
                      _usd(c["usd_saved"])] for c in cache)))


@app.command()
@friendly
def failures(
    pipeline: Annotated[str | None, typer.Option(help="Only this pipeline's failures.")] = None,
    retry: Annotated[bool, typer.Option("--retry", help="Re-queue the parked rows.")] = False,
    dsn: DsnOption = None,
) -> None:
    """Rows that could not be embedded; --retry puts the parked ones back in the queue.

    Example: pgembed failures --pipeline articles_te3s --retry
    """
    from pgembed import costs as cost_views

    def when(value: Any) -> str:
        return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""

    with db.connect(target(dsn)) as conn:
        rows = cost_views.failures(conn, pipeline)
        requeued = cost_views.retry_failures(conn, pipeline) if retry else None
    out.print(table("failures", ["pipeline", "key", "error", "attempts", "first failed",
                                 "last failed", "parked"],
                    ([r["pipeline"], ", ".join(str(k) for k in r["key"]), r["error"], r["attempts"],
                      when(r["first_failed_at"]), when(r["last_failed_at"]),
                      when(r["parked_at"]) or "no, retrying"] for r in rows)))
    if requeued is not None:
        out.print(f"{requeued} parked row{'' if requeued == 1 else 's'} re-queued")


# --- status and audit: consistency of the destination tables (sql/audit.sql) ---------------

from rich.console import Group  # noqa: E402  (kept with its commands)


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


def _age(value: Any) -> str:
    """An interval as a person reads it: 42s, 3m 05s, 2h 10m, 4d 3h."""
    if value is None:
        return ""
    seconds = int(value.total_seconds())
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


def _num(value: int | None) -> str:
    return "" if value is None else f"{value:,}"


def _gap_count(value: int | None) -> str:
    if value is None:  # no audit of this pipeline yet
        return "–"
    return f"[red]{value:,}[/red]" if value else "0"


def _print_warnings(conn: psycopg.Connection) -> None:
    """The audit SQL warns rather than fails (a dropped source table, a content expression
    that raises for some row): show those warnings to the person at the terminal."""

    def show(diag: psycopg.errors.Diagnostic) -> None:
        if diag.severity_nonlocalized == "WARNING":
            err.print(f"[yellow]warning:[/yellow] {diag.message_primary}", highlight=False)

    conn.add_notice_handler(show)


def _pipeline_status_section(conn: psycopg.Connection) -> Group | str:
    """pgembed.pipeline_status as three narrow tables, so each fits an 80-column terminal."""
    from pgembed import audit as audits

    rows = audits.status(conn)
    if not rows:
        return "no pipelines yet: pgembed pipeline create TABLE CONTENT --model MODEL"
    return Group(
        table("pipelines", ["pipeline", "model", "source rows", "embedded", "last embedded"],
              ([r["pipeline"], r["model"], _num(r["source_rows"]), _num(r["embedded_rows"]),
                _when(r["last_embedded_at"])] for r in rows)),
        table("queue", ["pipeline", "queued", "in flight", "retrying"],
              ([r["pipeline"], _num(r["queued"]), _num(r["in_flight"]),
                _num(r["retrying"])] for r in rows)),
        # missing, orphaned and stale are counted by audits (pgembed audit, the scheduler)
        table("gaps", ["pipeline", "failed", "missing", "orphaned", "stale", "oldest gap", "audited"],
              ([r["pipeline"], _gap_count(r["failed"]), _gap_count(r["missing"]),
                _gap_count(r["orphaned"]), _gap_count(r["stale"]), _age(r["oldest_gap"]),
                r["gaps_checked_at"].strftime("%m-%d %H:%M") if r["gaps_checked_at"] else "never"]
               for r in rows)),
    )


# What `pgembed status` prints, in order; each section gets the open connection and returns
# something rich can print (or None to print nothing). Other parts add theirs here, e.g. the
# scheduler's next runs: STATUS_SECTIONS.append(next_runs_section).
STATUS_SECTIONS: list[Callable[[psycopg.Connection], Any]] = [_pipeline_status_section]


@app.command()
@friendly
def status(dsn: DsnOption = None) -> None:
    """Health of every pipeline: rows, queue, gaps (missing, orphaned, stale, failed), lag.

    Example: pgembed status --dsn postgresql://admin@db/app
    """
    with db.connect(target(dsn)) as conn:
        _print_warnings(conn)
        for section in STATUS_SECTIONS:
            rendered = section(conn)
            if rendered is not None:
                out.print(rendered)


@app.command()
@friendly
def audit(
    repair: Annotated[bool, typer.Option(
        "--repair", help="Queue missing and stale rows, delete orphaned vectors.")] = False,
    pipeline: Annotated[str | None, typer.Option(help="Only this pipeline.")] = None,
    dsn: DsnOption = None,
) -> None:
    """Find rows whose vectors are missing, orphaned, stale or failed; record the run.

    Example: pgembed audit --repair --pipeline articles_te3s
    """
    from pgembed import audit as audits

    with db.connect(target(dsn)) as conn:
        _print_warnings(conn)
        run = audits.run_audit(conn, repair=repair, pipeline=pipeline)
    actions = {"missing": "queued", "stale": "queued", "orphaned": "vectors deleted",
               "failed": "left for pgembed failures --retry"}
    out.print(f"audit #{run['id']} of {pipeline or 'all pipelines'}", highlight=False)
    out.print(table("gaps", ["kind", "rows"] + (["repair"] if repair else []),
                    ([kind, _gap_count(run[kind])] + ([actions[kind]] if repair else [])
                     for kind in audits.GAP_KINDS)))
    if run["oldest_gap"] is not None:
        out.print(f"oldest gap: {_age(run['oldest_gap'])} (since {_when(run['oldest_gap_since'])})")
    if repair:
        out.print(f"{run['requeued']:,} rows queued for the worker, "
                  f"{run['orphans_deleted']:,} orphaned rows' vectors deleted")
    elif any(run[kind] for kind in ("missing", "stale", "orphaned")):
        out.print("repair with: pgembed audit --repair, then a worker")


# --- ratelimit: the per-key budget every worker shares (sql/ratelimit.sql) -----------------

from pgembed import ratelimit  # noqa: E402  (kept with its commands)

ratelimit_app = typer.Typer(no_args_is_help=True,
                            help="Set and show the API rate limit that all workers share.")
app.add_typer(ratelimit_app, name="ratelimit")

BucketOption = Annotated[str | None, typer.Option(
    help="The budget's bucket, as `pgembed ratelimit show` lists it; default: the bucket of "
         "PGEMBED_OPENAI_API_KEY and PGEMBED_OPENAI_BASE_URL in this environment, as a worker "
         "here would use them (the key itself never reaches the database).")]


def _bucket(bucket: str | None) -> tuple[str, str | None, str | None]:
    """(bucket, base URL, key fingerprint): the one named, else the environment's key's."""
    if bucket:
        return bucket, None, None
    try:
        key, url = ratelimit.openai_endpoint()
    except ProviderError as error:
        raise ValueError(f"{error} as the workers have it, or name the budget with --bucket") from None
    return ratelimit.bucket_name(url, key), url, ratelimit.key_fingerprint(key)


def _limit(value: int | None) -> str:
    return "no limit" if value is None else f"{value:,}"


@ratelimit_app.command("set")
@friendly
def ratelimit_set(
    requests_per_minute: Annotated[int | None, typer.Option(
        min=1, help="Requests per minute, summed over every worker and search.")] = None,
    tokens_per_minute: Annotated[int | None, typer.Option(
        min=1, help="Tokens per minute, summed over every worker and search.")] = None,
    burst_seconds: Annotated[float, typer.Option(
        min=0.001, max=60, help="How many seconds' worth of the budget may be sent at once.")] = 1.0,
    bucket: BucketOption = None,
    dsn: DsnOption = None,
) -> None:
    """Limit what one API key is sent per minute, by all workers on all hosts together.

    Example: pgembed ratelimit set --requests-per-minute 3000 --tokens-per-minute 1000000
    """
    if requests_per_minute is None and tokens_per_minute is None:
        raise ValueError("give --requests-per-minute, --tokens-per-minute or both "
                         "(`pgembed ratelimit clear` removes a budget)")
    budget = ratelimit.Budget.per_minute(requests_per_minute, tokens_per_minute, burst_seconds)
    name, base_url, fingerprint = _bucket(bucket)
    with db.connect(target(dsn)) as conn:
        ratelimit.set_budget(conn, name, budget, base_url=base_url, key_fingerprint=fingerprint)
    out.print(f"budget of {name}: {_limit(requests_per_minute)} requests and "
              f"{_limit(tokens_per_minute)} tokens per minute; running workers apply it within "
              f"{ratelimit.UNLIMITED_RECHECK:g} seconds", highlight=False)


@ratelimit_app.command("show")
@friendly
def ratelimit_show(dsn: DsnOption = None) -> None:
    """Every budget and what is being spent of it (pgembed.rate_limit_status).

    Example: pgembed ratelimit show
    """
    with db.connect(target(dsn)) as conn:
        rows = ratelimit.status(conn)
    if not rows:
        out.print("no budgets: no API key is rate limited; set one with "
                  "pgembed ratelimit set --requests-per-minute N --tokens-per-minute N")
        return
    for r in rows:  # one small table per bucket: a bucket's name alone is half a terminal wide
        t = table(r["bucket"], [f"per {r['per_seconds']:g}s", "budget", "in window now", "granted in all"],
                  [["requests", _limit(r["max_requests"]), _num(r["window_requests"]), _num(r["granted_requests"])],
                   ["tokens", _limit(r["max_tokens"]), _num(r["window_tokens"]), _num(r["granted_tokens"])]])
        t.caption = f"waited {_num(r['waits'])} times; last grant {_when(r['last_grant_at']) or 'never'}"
        t.caption_justify = "left"
        out.print(t)


@ratelimit_app.command("clear")
@friendly
def ratelimit_clear(bucket: BucketOption = None, dsn: DsnOption = None) -> None:
    """Remove a budget: that API key is no longer limited (workers see it at once).

    Example: pgembed ratelimit clear --bucket 'key:3f2a9c1b7d4e5f60@https://api.openai.com/v1'
    """
    name, _, _ = _bucket(bucket)
    with db.connect(target(dsn)) as conn:
        removed = ratelimit.clear_budget(conn, name)
    if not removed:
        raise ValueError(f"no budget for {name}; `pgembed ratelimit show` lists them")
    out.print(f"budget of {name} removed: no longer rate limited", highlight=False)
