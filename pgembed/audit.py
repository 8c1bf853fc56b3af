"""Consistency audit and pipeline health: thin calls of the SQL in sql/audit.sql.

The logic lives in SQL (`pgembed.audit()`, `pgembed.gaps()`, the views) so that a DBA in
psql, the scheduler and the command line all see the same answer; this module turns the
rows into dicts and a refused call (unknown pipeline) into a PipelineError.
"""

from __future__ import annotations

from typing import Any

import psycopg

from pgembed.pipelines import PipelineError, refused
from pgembed.sqlfiles import query

GAP_KINDS = ("missing", "orphaned", "stale", "failed")


def _dicts(cur: psycopg.Cursor[Any]) -> list[dict[str, Any]]:
    names = [c.name for c in cur.description or []]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def run_audit(conn: psycopg.Connection, repair: bool = False,
              pipeline: str | None = None) -> dict[str, Any]:
    """Audit one pipeline (or all), record the run in pgembed.audit_runs and return that row.

    With `repair`, missing and stale rows are queued for the worker (purpose 'repair') and
    orphaned vectors are deleted; failed rows are left for `pgembed failures --retry`.
    One transaction: the recorded counts and the repair are one consistent picture.
    """
    try:
        with conn.transaction():
            cur = conn.execute(query("audit_run"), {"repair": repair, "pipeline": pipeline})
            rows = _dicts(cur)
    except psycopg.Error as error:
        raise refused(error) from error
    if not rows:  # pragma: no cover - audit() always returns its run
        raise PipelineError("the audit returned no run")
    return rows[0]


def status(conn: psycopg.Connection, pipeline: str | None = None) -> list[dict[str, Any]]:
    """Rows of pgembed.pipeline_status, one per pipeline, in name order."""
    cur = conn.execute(query("pipeline_status"), {"pipeline": pipeline})
    return _dicts(cur)


def gaps(conn: psycopg.Connection, pipeline: str | None = None,
         limit: int | None = None) -> list[dict[str, Any]]:
    """The gaps themselves (pipeline, key, kind, since), oldest first."""
    try:
        cur = conn.execute(query("gaps"), {"pipeline": pipeline, "limit": limit})
    except psycopg.Error as error:
        raise refused(error) from error
    return _dicts(cur)

