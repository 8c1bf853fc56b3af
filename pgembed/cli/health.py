"""`pgembed status` and `pgembed audit`: whether the destination tables match their sources
(sql/audit.sql)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import psycopg
import typer
from rich.console import Group
from rich.markup import escape

from pgembed import audit as audits
from pgembed.cli import tables
from pgembed.cli.common import DsnOption, connect, err, friendly, out


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
def status(dsn: DsnOption = None) -> None:
    """Health of every pipeline: rows, queue, gaps (missing, orphaned, stale, failed), lag.

    Example: pgembed status --dsn postgresql://admin@db/app
    """
    with connect(dsn) as conn:
        _print_warnings(conn)
        for section in STATUS_SECTIONS:
            rendered = section(conn)
            if rendered is not None:
                out.print(rendered)


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
    with connect(dsn) as conn:
        _print_warnings(conn)
        run = audits.run_audit(conn, repair=repair, pipeline=pipeline)
    out.print(f"audit #{run['id']} of {escape(pipeline or 'all pipelines')}", highlight=False)
    out.print(tables.audit_gaps(run, audits.GAP_KINDS, repair))
    if run["oldest_gap"] is not None:
        out.print(f"oldest gap: {tables.age(run['oldest_gap'])} (since {tables.when(run['oldest_gap_since'])})")
    if repair:
        out.print(f"{run['requeued']:,} rows queued for the worker, "
                  f"{run['orphans_deleted']:,} orphaned rows' vectors deleted")
    elif any(run[kind] for kind in ("missing", "stale", "orphaned")):
        out.print("repair with: pgembed audit --repair, then a worker")
