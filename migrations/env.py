"""Alembic environment: revisions run their frozen SQL over psycopg, under a lock, and an
upgrade that ends at the head revision then applies the definitions from sql/ (functions,
views, comments, grants, every pipeline's generated code; see pgembed/schema.py).

The DSN comes from the alembic config attribute "dsn" (set by `pgembed init`) or from
PGEMBED_DSN. The version table lives outside the pgembed schema (public) so that
`alembic downgrade base` can drop the whole schema and still record that it did.
"""

from __future__ import annotations

import os

import psycopg
from alembic import context
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, pool, text

from pgembed import db
from pgembed.migrate import MIGRATION_LOCK, VERSION_TABLE
from pgembed.schema import definitions_sql


def _dsn() -> str:
    dsn = context.config.attributes.get("dsn") or os.environ.get("PGEMBED_DSN")
    if not dsn:
        raise SystemExit("pgembed: set PGEMBED_DSN (or use `pgembed init --dsn ...`)")
    return dsn


def run_migrations_online() -> None:
    dsn = _dsn()
    engine = create_engine(
        "postgresql+psycopg://",
        # the one connection factory's settings for role "migrate": named pgembed-migrate, no
        # timeouts; not autocommit: the transaction holds the advisory lock
        creator=lambda: psycopg.connect(dsn, **db.session_settings("migrate", autocommit=False)),
        poolclass=pool.NullPool,
    )
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            version_table=VERSION_TABLE,
            transaction_per_migration=False,
        )
        with context.begin_transaction():
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
            context.run_migrations()
            if _at_head(connection):
                with connection.connection.dbapi_connection.cursor() as cur:
                    cur.execute(definitions_sql())


def _at_head(connection) -> bool:  # type: ignore[no-untyped-def]
    head = ScriptDirectory.from_config(context.config).get_current_head()
    found = connection.execute(text(f"SELECT version_num FROM public.{VERSION_TABLE}")).scalar()
    return found == head


if context.is_offline_mode():
    raise SystemExit("pgembed migrations run online only (they execute the files in sql/)")
run_migrations_online()
