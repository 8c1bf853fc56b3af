"""The first pgembed schema, as first shipped (2026-11-30): tables, functions, views.

Revision ID: 0001
Revises:
Create Date: 2026-11-22

Frozen: the files in 0001_initial/ are the ones that release ran, byte for byte
(tests/test_frozen_migrations.py checks their sha256). Later builds changed sql/ without a
new revision; revision 0002 brings a database made by any of them to one schema.
"""

from pgembed.schema import execute, execute_revision_files

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

UPGRADE = tuple(f"0001_initial/{name}.sql" for name in (
    "schema", "functions", "audit", "costs", "service", "ratelimit", "privileges"))


def upgrade() -> None:
    execute_revision_files(UPGRADE)


def downgrade() -> None:
    # Dropping the trigger functions drops the triggers on the application's tables too, and
    # the grants go with the objects. The roles pgembed_reader and pgembed_worker stay: roles
    # belong to the cluster, and other databases in it may still use them.
    execute("DROP SCHEMA pgembed CASCADE")
