"""`pgembed init`: alembic upgrades, run from the migrations installed with the package."""

from __future__ import annotations

from importlib import resources

import psycopg
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy.exc import DBAPIError, OperationalError

from pgembed.db import DatabaseError

VERSION_TABLE = "pgembed_alembic_version"


def alembic_config(dsn: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(resources.files("pgembed._migrations")))
    config.attributes["dsn"] = dsn
    return config


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config("")).get_current_head() or ""


def _explained(error: DBAPIError) -> DatabaseError:
    """Alembic wraps psycopg's error in SQLAlchemy's; the user needs PostgreSQL's sentence."""
    original = error.orig
    diag = getattr(original, "diag", None)
    message = (diag.message_primary if diag else None) or str(original).strip().splitlines()[0]
    if "vector" in message and ("extension" in message or "control file" in message):
        message += " (install pgvector on the server, e.g. apt install postgresql-18-pgvector)"
    elif isinstance(error, OperationalError):
        message = f"cannot connect to PostgreSQL: {message}"
    return DatabaseError(message)


def upgrade(dsn: str, revision: str = "head") -> None:
    try:
        command.upgrade(alembic_config(dsn), revision)
    except DBAPIError as error:
        raise _explained(error) from error


def downgrade(dsn: str, revision: str = "base") -> None:
    try:
        command.downgrade(alembic_config(dsn), revision)
    except DBAPIError as error:
        raise _explained(error) from error


def current_revision(conn: psycopg.Connection) -> str | None:
    exists = conn.execute("SELECT to_regclass(%s)", (f"public.{VERSION_TABLE}",)).fetchone()
    if not exists or exists[0] is None:
        return None
    row = conn.execute(f"SELECT version_num FROM public.{VERSION_TABLE}").fetchone()
    return row[0] if row else None
