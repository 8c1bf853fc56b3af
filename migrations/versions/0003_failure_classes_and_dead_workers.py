"""Failure classes with a retry policy each; dead workers shown as dead.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

pgembed.failure_classes holds the kinds of failure and their retry policy, each row of
pgembed.failures has a class (failures recorded before are classified from their message),
and pgembed.workers.state may be 'dead'. The downgrade returns the tables to 0002 and
re-applies that revision's definitions, frozen.
"""

from pgembed.schema import execute_revision_files

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

UPGRADE = ("0003_failure_classes_and_dead_workers.sql",)
DOWNGRADE = ("0003_failure_classes_and_dead_workers.down.sql",
             "0003_failure_classes_and_dead_workers.down.definitions.sql")


def upgrade() -> None:
    execute_revision_files(UPGRADE)


def downgrade() -> None:
    execute_revision_files(DOWNGRADE)
