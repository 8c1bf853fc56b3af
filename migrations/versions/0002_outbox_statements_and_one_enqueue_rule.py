"""Statement keys, one enqueue rule, a lease-holder check; definitions apart from tables.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

From this revision on, a revision holds only one-shot DDL (its .sql files, frozen once
shipped); functions, views, comments and grants are re-applied from sql/ by every upgrade
(pgembed/schema.py). The downgrade returns the tables to 0001 as first shipped and re-applies
that release's definitions.
"""

from pgembed.schema import execute_revision_files

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

UPGRADE = ("0002_outbox_statements_and_one_enqueue_rule.sql",)
DOWNGRADE = ("0002_outbox_statements_and_one_enqueue_rule.down.sql", "0001_initial/definitions.sql")


def upgrade() -> None:
    execute_revision_files(UPGRADE)


def downgrade() -> None:
    execute_revision_files(DOWNGRADE)
