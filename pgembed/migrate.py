"""`pgembed init`: alembic upgrades, run from the migrations installed with the package.

alembic (and SQLAlchemy under it) is imported by the functions that migrate, not by this
module: it is a third of a second, and every command and worker start imports this module
only to compare a revision with HEAD.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Any

import psycopg

from pgembed import db
from pgembed.db import DatabaseError, redact
from pgembed.schema import definitions_sql, revision_sql
from pgembed.sqlfiles import query

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory
    from sqlalchemy.exc import DBAPIError

#: The schema revision this package's SQL and code are written for: alembic's head, named
#: here so that a worker's start-up check loads neither alembic nor the revision modules
#: (tests/test_migrations.py proves that it is the head).
HEAD = "0007"

VERSION_TABLE = "pgembed_alembic_version"  # also named in queries has_versions and revision
MIGRATION_LOCK = 7_418_532_001  # pg_advisory_xact_lock key: one init at a time (migrations/env.py)


def alembic_config(dsn: str) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(resources.files("pgembed._migrations")))
    config.attributes["dsn"] = dsn
    return config


def _script() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(""))


def head_revision() -> str:
    """alembic's own idea of the head, from the revision modules (HEAD names it for speed)."""
    return _script().get_current_head() or ""


def _explained(error: DBAPIError) -> DatabaseError:
    """Alembic wraps psycopg's error in SQLAlchemy's; the user needs PostgreSQL's sentence."""
    from sqlalchemy.exc import OperationalError

    original = error.orig
    diag = getattr(original, "diag", None)
    message = (diag.message_primary if diag else None) or str(original).strip().splitlines()[0]
    if "vector" in message and ("extension" in message or "control file" in message):
        message += " (install pgvector on the server, e.g. apt install postgresql-18-pgvector)"
    elif isinstance(error, OperationalError):
        message = f"cannot connect to PostgreSQL: {message}"
    return DatabaseError(redact(message))


def upgrade(dsn: str, revision: str = "head") -> None:
    from alembic import command
    from sqlalchemy.exc import DBAPIError

    try:
        command.upgrade(alembic_config(dsn), revision)
    except DBAPIError as error:
        raise _explained(error) from error


def downgrade(dsn: str, revision: str = "base") -> None:
    """Back to `revision`, one revision a transaction. Each revision's downgrade was written
    for the database as that revision shipped it: its tables and its definitions. In one
    transaction, the definitions a later step re-applies count as made by that transaction,
    and the sweep of refresh.sql (which drops what the transaction did not make) would keep
    a function that the earlier revision's downgrade left to it. A step that fails leaves
    the database at the last revision reached, whole."""
    from alembic import command
    from sqlalchemy.exc import DBAPIError

    config = alembic_config(dsn)
    try:
        for step in _steps_down(dsn, revision):
            command.downgrade(config, step)
    except DBAPIError as error:
        raise _explained(error) from error


def _steps_down(dsn: str, target: str) -> list[str]:
    """The revisions a downgrade passes through, the target last ("base": none at all)."""
    with db.connect(dsn) as conn:
        found = current_revision(conn)
    script = _script()
    steps: list[str] = []
    at = found
    while at is not None and at != target:
        below = script.get_revision(at).down_revision
        at = below if isinstance(below, str) else None
        steps.append(at or "base")
    if at != target and target != "base":
        raise DatabaseError(f"cannot downgrade to {target}: it is not below the database's revision {found}")
    return steps


class SchemaMismatch(DatabaseError):
    """The database's pgembed schema is not the one this package was made for."""


def current_revision(conn: psycopg.Connection) -> str | None:
    exists = conn.execute(query("has_versions")).fetchone()
    if not exists or not exists[0]:
        return None
    row = conn.execute(query("revision")).fetchone()
    return row[0] if row else None


async def current_revision_async(conn: psycopg.AsyncConnection[Any]) -> str | None:
    """current_revision on an async connection: what a worker checks before it starts."""
    exists = await (await conn.execute(query("has_versions"))).fetchone()
    if not exists or not exists[0]:
        return None
    row = await (await conn.execute(query("revision"))).fetchone()
    return row[0] if row else None


def check_revision(found: str | None) -> None:
    """Raises SchemaMismatch, in one sentence that says what to do, unless `found` is the
    revision this package's migrations end at.

    A worker calls it at start only: its SQL and its idea of the tables are this package's,
    so against an older schema it would fail on missing objects mid-batch, and against one
    newer than any revision it knows it could write rows the new schema no longer means.
    A worker already running when a compatible migration lands keeps going: refusing then
    would turn every routine `pgembed init` into an outage."""
    if found == HEAD:
        return
    if found is None:
        raise SchemaMismatch("this database has no pgembed schema: run `pgembed init` first")
    head, script = HEAD, _script()
    if found in {rev.revision for rev in script.walk_revisions()}:
        raise SchemaMismatch(f"the pgembed schema is at revision {found}, older than this pgembed "
                             f"({head}): run `pgembed init` to upgrade it, then start the worker")
    raise SchemaMismatch(f"the pgembed schema is at revision {found}, newer than this pgembed knows "
                         f"(it ends at {head}): upgrade pgembed on this host to the version that "
                         f"ran `pgembed init` before starting workers")


def upgrade_sql(found: str | None) -> str:
    """The script `pgembed init` would run on a database at revision `found` (None: no
    pgembed schema), for DBAs who apply changes by hand through their own process: the
    pending revisions' frozen SQL, the version row, then the definitions, in one transaction."""
    script = _script()
    pending = []
    for rev in script.walk_revisions():  # head first
        if rev.revision == found:
            break
        pending.append(rev)
    head = head_revision()
    parts = [f"-- pgembed: upgrade from revision {found or '(none)'} to {head}, as `pgembed init` runs it",
             "BEGIN;", f"SELECT pg_catalog.pg_advisory_xact_lock({MIGRATION_LOCK});"]
    for rev in reversed(pending):
        parts.append(f"\n-- revision {rev.revision}: {rev.doc.splitlines()[0]}")
        parts += [revision_sql(path) for path in rev.module.UPGRADE]
    if found is None:
        parts.append(f"CREATE TABLE public.{VERSION_TABLE} (version_num varchar(32) NOT NULL, "
                     f"CONSTRAINT {VERSION_TABLE}_pkc PRIMARY KEY (version_num));")
        parts.append(f"INSERT INTO public.{VERSION_TABLE} VALUES ('{head}');")
    else:
        parts.append(f"UPDATE public.{VERSION_TABLE} SET version_num = '{head}';")
    parts += ["\n-- definitions: functions, views, comments, grants, every pipeline's code",
              definitions_sql(), "COMMIT;"]
    return "\n".join(parts) + "\n"
