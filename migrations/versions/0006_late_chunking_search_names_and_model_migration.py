"""Late chunking, indexes that wait for their data, stable search names, evaluation sets and
runs, model migrations and the live lane.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01

Pipelines that exist keep what they did. The downgrade returns the tables to 0005 and
re-applies that revision's definitions, frozen.
"""

from pgembed.schema import execute_revision_files

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

UPGRADE = ("0006_late_chunking_search_names_and_model_migration.sql",)
DOWNGRADE = ("0006_late_chunking_search_names_and_model_migration.down.sql",
             "0006_late_chunking_search_names_and_model_migration.down.definitions.sql")


def upgrade() -> None:
    execute_revision_files(UPGRADE)


def downgrade() -> None:
    execute_revision_files(DOWNGRADE)
