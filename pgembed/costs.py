"""Reads of the cost views (sql/costs.sql) and of the dead-letter table, for the CLI.

The SQL views are the interface DBAs use; these functions only pick a period and an
order, so `pgembed costs` shows exactly what `SELECT … FROM pgembed.cost_daily` would.
Failures live here too: after "what did it cost" the next question an operator asks is
"what did not get embedded", and both are small reads of pgembed's bookkeeping.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import psycopg
from psycopg.rows import dict_row

from pgembed import pipelines
from pgembed.sqlfiles import query


class Grouping(StrEnum):
    """How `pgembed costs` groups spend: what it was for, who pays, or the caller's labels
    (the application's user, the task, the source)."""

    purpose = "purpose"
    cost_center = "cost-center"
    user = "user"
    task = "task"
    source = "source"

    @property
    def keys(self) -> list[str]:
        """The columns that name a group in `spend`'s rows."""
        if self is Grouping.purpose:
            return ["pipeline", "model", "purpose"]
        if self is Grouping.cost_center:
            return ["cost_center", "pipeline", "purpose"]
        return ["label"]


# Named queries (sql/queries.sql), chosen by an Enum member: nothing the user typed
# reaches the SQL. The caller's labels share one query, which picks its column by name.
_GROUPS: dict[Grouping, str] = {
    Grouping.purpose: "cost_spend_by_purpose",
    Grouping.cost_center: "cost_spend_by_cost_center",
    Grouping.user: "cost_spend_by_label",
    Grouping.task: "cost_spend_by_label",
    Grouping.source: "cost_spend_by_label",
}


def _rows(conn: psycopg.Connection, name: str, params: Any = None) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query(name), params)
        return cur.fetchall()


def _check_days(days: int) -> None:
    if days < 1:
        raise ValueError("days must be at least 1")


def spend(conn: psycopg.Connection, days: int = 7, by: Grouping | str = Grouping.purpose,
          top: int | None = None) -> list[dict[str, Any]]:
    """Usage and spend over the last `days` calendar days (today included), most expensive
    first; `by` picks the view: per pipeline × model × purpose, per cost center, or per
    user, task or source (their first `top` only, when given: the top spenders)."""
    _check_days(days)
    if top is not None and top < 1:
        raise ValueError("top must be at least 1")
    grouping = Grouping(by)
    return _rows(conn, _GROUPS[grouping], {"days": days, "by": grouping.value, "top": top})


def share(conn: psycopg.Connection, days: int = 7) -> list[dict[str, Any]]:
    """Per day of the last `days`: indexing's and queries' spend, tokens and share of each."""
    _check_days(days)
    return _rows(conn, "cost_share", {"days": days})


def anomalies(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Today's runaway spenders by pipeline and purpose, with the view's default thresholds."""
    return _rows(conn, "cost_anomalies")


def source_anomalies(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """The same by source and task: a `reindex` far above its usual."""
    return _rows(conn, "cost_source_anomalies")


def cache(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Per model: cache size, hit rate and what the cache saved."""
    return _rows(conn, "cache_stats")


def failure_classes(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """The kinds of failure and the retry policy of each (pgembed.failure_classes)."""
    return _rows(conn, "failure_classes")


def _check_filters(conn: psycopg.Connection, pipeline: str | None, failure_class: str | None) -> None:
    """Naming an unknown pipeline or class is an error, not an empty list that looks like
    good news."""
    if pipeline is not None:
        pipelines.get(conn, pipeline)
    if failure_class is not None:
        known = [c["class"] for c in failure_classes(conn)]
        if failure_class not in known:
            raise ValueError(f"no failure class {failure_class!r}; the classes are {', '.join(known)}")


def failures(conn: psycopg.Connection, pipeline: str | None = None,
             failure_class: str | None = None) -> list[dict[str, Any]]:
    """Rows that could not be embedded (all pipelines and classes, or one of each), parked
    ones first, newest failure first."""
    _check_filters(conn, pipeline, failure_class)
    return _rows(conn, "failures_list", {"pipeline": pipeline, "class": failure_class})


def retry_failures(conn: psycopg.Connection, pipeline: str | None = None,
                   failure_class: str | None = None) -> int:
    """Re-queues parked failures (all pipelines and classes, or one of each) and returns how
    many went back."""
    _check_filters(conn, pipeline, failure_class)
    row = conn.execute(query("failures_retry"), {"pipeline": pipeline, "class": failure_class}).fetchone()
    return int(row[0]) if row else 0
