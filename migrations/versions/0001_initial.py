"""The first pgembed schema: tables, functions, views.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from alembic import op

from pgembed.sqlfiles import read_sql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _execute(sql: str) -> None:
    # Straight to psycopg: SQLAlchemy would read ":name" and "%" in plpgsql as parameters.
    raw = op.get_bind().connection.dbapi_connection
    with raw.cursor() as cur:
        cur.execute(sql)


def upgrade() -> None:
    # privileges.sql last: it grants on what the others made (every later revision ends by
    # executing it again, so that new views and functions get their grants too)
    for name in ("schema.sql", "functions.sql", "audit.sql", "costs.sql", "service.sql", "ratelimit.sql",
                 "privileges.sql"):
        _execute(read_sql(name))


def downgrade() -> None:
    # Dropping the trigger functions drops the triggers on the application's tables too, and
    # the grants go with the objects. The roles pgembed_reader and pgembed_worker stay: roles
    # belong to the cluster, and other databases in it may still use them.
    _execute("DROP SCHEMA pgembed CASCADE")
