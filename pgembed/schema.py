"""What makes up pgembed's schema, and how a migration applies it.

Two kinds of SQL, kept apart so that an upgrade never depends on today's files meaning what
they meant when a revision shipped:

- One-shot DDL (tables, indexes, constraints) lives in the migration revisions, frozen once
  shipped (tests/test_frozen_migrations.py holds their sha256). sql/schema.sql shows the
  tables as they are at the head revision, for people to read; a test proves it matches.
- Re-runnable definitions (functions, views, comments, grants) live in sql/, one file per
  stage of the flow. Every upgrade that reaches the head revision applies all of them, drops
  the functions and views they no longer define, and regenerates every pipeline's code, so
  a database upgraded from any earlier build ends up with exactly what a fresh one has.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from pgembed.sqlfiles import read_sql

# In dependency order: a LANGUAGE sql function or a view is checked when it is created, so
# what it calls must exist by then.
DEFINITIONS = (
    "expressions.sql", "pipelines.sql", "capture.sql", "schema_changes.sql", "outbox.sql", "failures.sql",
    "indexes.sql",
    "aliases.sql", "evaluation.sql",  # stable search names and evaluation
    "search.sql", "audit.sql", "fleet.sql", "costs.sql", "ratelimit.sql",
    "model_migrations.sql",
    "batch_api.sql",  # the provider's Batch API
    "comments.sql",
    "refresh.sql", "privileges.sql",
)


def definitions_sql() -> str:
    """Every re-runnable definition of the head revision, as one script."""
    return "\n".join(read_sql(name) for name in DEFINITIONS)


def head_schema_sql() -> str:
    """The head schema straight from sql/: the tables, then the definitions. What
    `alembic upgrade head` must be identical to (tests/test_schema_catalog.py)."""
    return read_sql("schema.sql") + "\n" + definitions_sql()


def revision_sql(path: str) -> str:
    """A file that belongs to a migration revision (migrations/versions/...)."""
    return resources.files("pgembed._migrations.versions").joinpath(path).read_text(encoding="utf-8")


def execute(sql: str) -> None:
    """Runs a script inside the migration's transaction, straight through psycopg:
    SQLAlchemy would read ":name" and "%" in plpgsql bodies as parameters. (alembic is
    imported here, inside a migration, not by everyone who imports this module.)"""
    from alembic import op

    raw: Any = op.get_bind().connection.dbapi_connection
    with raw.cursor() as cur:
        cur.execute(sql)


def execute_revision_files(paths: tuple[str, ...]) -> None:
    for path in paths:
        execute(revision_sql(path))
