"""Alembic environment: revisions run raw SQL from sql/, over psycopg, under a lock.

The DSN comes from the alembic config attribute "dsn" (set by `pgembed init`) or from
PGEMBED_DSN. The version table lives outside the pgembed schema (public) so that
`alembic downgrade base` can drop the whole schema and still record that it did.
"""

from __future__ import annotations

import os

import psycopg
from alembic import context
from sqlalchemy import create_engine, pool, text

VERSION_TABLE = "pgembed_alembic_version"
MIGRATION_LOCK = 7_418_532_001  # pg_advisory_xact_lock key: one init at a time


def _dsn() -> str:
    dsn = context.config.attributes.get("dsn") or os.environ.get("PGEMBED_DSN")
    if not dsn:
        raise SystemExit("pgembed: set PGEMBED_DSN (or use `pgembed init --dsn ...`)")
    return dsn


def run_migrations_online() -> None:
    dsn = _dsn()
    engine = create_engine(
        "postgresql+psycopg://",
        creator=lambda: psycopg.connect(dsn, application_name="pgembed-migrate"),
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


if context.is_offline_mode():
    raise SystemExit("pgembed migrations run online only (they execute the files in sql/)")
run_migrations_online()
