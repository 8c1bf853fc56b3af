"""`pgembed init`: alembic upgrades, run from the migrations installed with the package."""

from __future__ import annotations

from importlib import resources

import psycopg
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

VERSION_TABLE = "pgembed_alembic_version"


def alembic_config(dsn: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(resources.files("pgembed._migrations")))
    config.attributes["dsn"] = dsn
    return config


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config("")).get_current_head() or ""


def upgrade(dsn: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(dsn), revision)


def downgrade(dsn: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(dsn), revision)


def current_revision(conn: psycopg.Connection) -> str | None:
    exists = conn.execute("SELECT to_regclass(%s)", (f"public.{VERSION_TABLE}",)).fetchone()
    if not exists or exists[0] is None:
        return None
    row = conn.execute(f"SELECT version_num FROM public.{VERSION_TABLE}").fetchone()
    return row[0] if row else None
