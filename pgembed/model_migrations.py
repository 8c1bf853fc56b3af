"""Moving an alias to another model in five phases (sql/model_migrations.sql holds the
rules; this is what `pgembed migrate …` and scripts call).

plan (a dry run, pgembed.estimate) → start (a shadow pipeline, its backfill in the bulk
lane) → evaluate (the alias's evaluation set against both pipelines) → cutover (behind the
gate) → rollback within the window, or cleanup. Searches name the alias throughout, so they
follow the cutover and the rollback at once and never see a half-built pipeline.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from pgembed.estimate import Estimate, estimate, migration_target
from pgembed.sqlfiles import query

DEFAULT_WINDOW = dt.timedelta(hours=48)
DEFAULT_MAX_DROP = 3.0  # points: 0.03 of a metric between 0 and 1


class MigrationError(ValueError):
    """What was asked cannot be done as asked (the message says why and what instead)."""


def plan(conn: psycopg.Connection, alias: str, model: str, dimensions: int | None = None) -> Estimate:
    """The dry run of migrating `alias` to `model`: nothing is created or paid."""
    return estimate(conn, migration_target(conn, alias, model, dimensions))


def start(conn: psycopg.Connection, alias: str, model: str, dimensions: int | None = None, *,
          name: str | None = None, max_drop: float = DEFAULT_MAX_DROP,
          window: dt.timedelta = DEFAULT_WINDOW) -> tuple[int, Estimate]:
    """Plans, then starts: the estimate is kept with the migration, for status to compare
    the spend with. Returns the migration's id and the estimate."""
    planned = plan(conn, alias, model, dimensions)
    row = conn.execute(query("migration_start"), {
        "alias": alias, "model": model, "dimensions": dimensions, "estimate": Jsonb(planned.as_json()),
        "name": name, "max_drop": max_drop, "window": window,
    }).fetchone()
    assert row is not None
    return int(row[0]), planned


def status(conn: psycopg.Connection, alias: str | None = None) -> list[dict[str, Any]]:
    """Every migration (of one alias), newest first, with progress and spend
    (pgembed.model_migration_status)."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query("migration_status"), {"alias": alias}).fetchall()


def events(conn: psycopg.Connection, migration: int) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query("migration_events"), {"migration": migration}).fetchall()


@dataclass(frozen=True)
class Evaluation:
    migration: int
    eval_set: str
    active: dict[str, float]
    shadow: dict[str, float]


def evaluate(conn: psycopg.Connection, alias: str, eval_set: str | None = None) -> Evaluation:
    """Runs the evaluation set (the alias's own unless named) against the active and the
    shadow pipeline, through the search path users get, and records both for the gate."""
    from pgembed.evaluation.runs import run_evaluation

    row = conn.execute(query("migration_open"), {"alias": alias}).fetchone()
    if row is None or row[0] is None:
        raise MigrationError(f"alias {alias!r} has no migration to evaluate")
    migration, active, shadow, phase, _, alias_set = row
    if phase != "started":
        raise MigrationError(f"migration #{migration} of alias {alias!r} is {phase.replace('_', ' ')}: "
                             "only a migration not yet cut over is evaluated")
    chosen = eval_set or alias_set
    if chosen is None:
        raise MigrationError(f"alias {alias!r} has no evaluation set: pass --eval-set NAME")
    active_run = run_evaluation(conn, active, chosen)
    shadow_run = run_evaluation(conn, shadow, chosen)
    conn.execute(query("migration_evaluated"), {"alias": alias, "eval_set": chosen, "active_run": active_run.id,
                                                "shadow_run": shadow_run.id})
    return Evaluation(migration, chosen, dict(active_run.metrics), dict(shadow_run.metrics))


def cutover(conn: psycopg.Connection, alias: str, *, force: bool = False, reason: str | None = None) -> dict[str, Any]:
    """The gate's verdict ({"cut_over": bool, "failed": [...], "missing", "stale", ...});
    a refusal is recorded and returned, not raised."""
    row = conn.execute(query("migration_cutover"), {"alias": alias, "force": force, "reason": reason}).fetchone()
    assert row is not None
    return dict(row[0])


def rollback(conn: psycopg.Connection, alias: str) -> int:
    row = conn.execute(query("migration_rollback"), {"alias": alias}).fetchone()
    assert row is not None
    return int(row[0])


def cleanup(conn: psycopg.Connection, alias: str) -> str:
    """Drops the pipeline the alias no longer uses; its name."""
    row = conn.execute(query("migration_cleanup"), {"alias": alias}).fetchone()
    assert row is not None
    return str(row[0])
