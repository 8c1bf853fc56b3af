"""Aliases: names applications search through that outlive the pipeline behind them.

Thin calls of sql/aliases.sql, where every rule lives (one namespace with pipelines, drop
protection, the view of each alias): `psql` users and Python users get the same checks.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import psycopg
from psycopg.rows import dict_row

from pgembed.pipelines import refused
from pgembed.sqlfiles import query


def _call(conn: psycopg.Connection, name: str, params: dict[str, Any]) -> Any:
    """One named statement in a transaction of its own; a refusal becomes a PipelineError."""
    try:
        with conn.transaction():
            row = conn.execute(query(name), params).fetchone()
    except psycopg.Error as error:
        raise refused(error) from error
    return row[0] if row else None


def resolve(conn: psycopg.Connection, name: str) -> str:
    """The pipeline a name stands for (an alias's, or the pipeline's own name). One read,
    in whatever transaction the caller is in: every search pays for it."""
    try:
        row = conn.execute(query("resolve_pipeline"), {"name": name}).fetchone()
    except psycopg.Error as error:
        raise refused(error) from error
    assert row is not None
    return str(row[0])


def pipeline_of(conn: psycopg.Connection, name: str) -> dict[str, Any]:
    """`resolve` and pipelines.get in one read: what a search needs of the pipeline that
    answers it."""
    try:
        row = conn.cursor(row_factory=dict_row).execute(query("pipeline_resolved"), {"name": name}).fetchone()
    except psycopg.Error as error:
        raise refused(error) from error
    assert row is not None
    return row


def set_alias(conn: psycopg.Connection, alias: str, pipeline: str) -> None:
    """Creates the alias or repoints it, in one transaction."""
    _call(conn, "alias_set", {"alias": alias, "pipeline": pipeline})


def drop(conn: psycopg.Connection, alias: str) -> None:
    _call(conn, "alias_drop", {"alias": alias})


def set_evaluation(conn: psycopg.Connection, alias: str, eval_set: str | None,
                   every: dt.timedelta | None = dt.timedelta(days=7), threshold: float = 0.02) -> None:
    """Attaches an evaluation set that the scheduler re-runs `every` (None: never), a drop
    in nDCG@10 beyond `threshold` being a regression."""
    _call(conn, "alias_evaluation", {"alias": alias, "eval_set": eval_set, "every": every,
                                     "threshold": threshold})


def list_all(conn: psycopg.Connection) -> list[dict[str, Any]]:
    return conn.cursor(row_factory=dict_row).execute(query("alias_list")).fetchall()

