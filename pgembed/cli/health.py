"""`pgembed status` and `pgembed audit`: whether the destination tables match their sources
(sql/audit.sql)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Annotated, Any

import psycopg
import typer
from rich.console import Group
from rich.markup import escape

from pgembed import audit as audits
from pgembed import health
from pgembed.cli import tables
from pgembed.cli.common import DsnOption, EmbeddedOption, JsonOption, connect, err, friendly, out, print_json
from pgembed.scheduler import parse_duration


def _print_warnings(conn: psycopg.Connection) -> None:
    """The audit SQL warns rather than fails (a dropped source table, a content expression
    that raises for some row): show those warnings to the person at the terminal."""

    def show(diag: psycopg.errors.Diagnostic) -> None:
        if diag.severity_nonlocalized == "WARNING":
            err.print(f"[yellow]warning:[/yellow] {escape(diag.message_primary or '')}", highlight=False)

    conn.add_notice_handler(show)


def pipeline_status_section(conn: psycopg.Connection) -> Group | str:
    rows = audits.status(conn)
    if not rows:
        return "no pipelines yet: pgembed pipeline create TABLE CONTENT --model MODEL"
    return tables.pipeline_status(rows)


# What `pgembed status` prints, in order; each section gets the open connection and returns
# something rich can print (or None to print nothing). Other parts add theirs here, e.g. the
# scheduler's next runs: STATUS_SECTIONS.append(next_runs_section).
STATUS_SECTIONS: list[Callable[[psycopg.Connection], Any]] = [pipeline_status_section]


@friendly
def status(
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print pgembed.pipeline_status as a JSON list (times ISO 8601, intervals in seconds).")
    ] = False,
    check: Annotated[bool, typer.Option(
        "--check", help="A health check: exit 1, saying why, when a pipeline has parked failures, "
                        "gaps in its latest audit, or a queue stuck longer than --stuck-after.")] = False,
    stuck_after: Annotated[str, typer.Option(
        help="With --check: how long the oldest queued row may wait (e.g. 15m, 1h).")] = "15m",
    dsn: DsnOption = None,
    embedded: EmbeddedOption = False,
) -> None:
    """Health of every pipeline: rows, queue, gaps (missing, orphaned, stale, failed), lag.

    Example: pgembed status --check --stuck-after 30m --dsn postgresql://admin@db/app
    """
    if as_json or check:
        _report(dsn, embedded, as_json, check, stuck_after)
        return
    with connect(dsn, embedded) as conn:
        _print_warnings(conn)
        for section in STATUS_SECTIONS:
            rendered = section(conn)
            if rendered is not None:
                out.print(rendered)


def _report(dsn: str | None, embedded: bool, as_json: bool, check: bool, stuck_after: str) -> None:
    """`status --json` and `status --check`, for scripts and monitoring."""
    limit = parse_duration(stuck_after)
    if limit is None:
        raise ValueError(f"--stuck-after must be a duration like 15m, not {stuck_after!r}")
    with connect(dsn, embedded) as conn:
        _print_warnings(conn)
        rows = audits.status(conn)
    if as_json:
        print_json(rows)
    found = health.problems(rows, dt.timedelta(seconds=limit)) if check else []
    for problem in found:
        err.print(escape(problem), highlight=False)
    if found:
        raise typer.Exit(1)
    if check and not as_json:
        out.print(f"ok: {len(rows)} pipelines healthy", highlight=False)


@friendly
def audit(
    repair: Annotated[bool, typer.Option(
        "--repair", help="Queue missing and stale rows, delete orphaned vectors.")] = False,
    pipeline: Annotated[str | None, typer.Option(help="Only this pipeline.")] = None,
    as_json: JsonOption = False,
    dsn: DsnOption = None,
    embedded: EmbeddedOption = False,
) -> None:
    """Find rows whose vectors are missing, orphaned, stale or failed; record the run.

    Example: pgembed audit --repair --pipeline articles_te3s
    """
    with connect(dsn, embedded) as conn:
        _print_warnings(conn)
        run = audits.run_audit(conn, repair=repair, pipeline=pipeline)
    if as_json:  # the pgembed.audit_runs row, as SELECT pgembed.audit() returns it
        print_json(run)
        return
    out.print(f"audit #{run['id']} of {escape(pipeline or 'all pipelines')}", highlight=False)
    out.print(tables.audit_gaps(run, audits.GAP_KINDS, repair))
    if run["oldest_gap"] is not None:
        out.print(f"oldest gap: {tables.age(run['oldest_gap'])} (since {tables.when(run['oldest_gap_since'])})")
    if repair:
        out.print(f"{run['requeued']:,} rows queued for the worker, "
                  f"{run['orphans_deleted']:,} orphaned rows' vectors deleted")
    elif any(run[kind] for kind in ("missing", "stale", "orphaned")):
        out.print("repair with: pgembed audit --repair, then a worker")
