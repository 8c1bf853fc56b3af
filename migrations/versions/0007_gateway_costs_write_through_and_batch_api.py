"""The query path: cost by source, user and task, the embedding gateway, write-through and
the provider's Batch API for huge backfills; the read path's generated search.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01

Pipelines that exist keep what they did. The downgrade returns the tables to 0006 and
re-applies that revision's definitions, frozen.
"""

from pgembed.schema import execute_revision_files

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

UPGRADE = ("0007_gateway_costs_write_through_and_batch_api.sql",)
DOWNGRADE = ("0007_gateway_costs_write_through_and_batch_api.down.sql",
             "0007_gateway_costs_write_through_and_batch_api.down.definitions.sql")


def upgrade() -> None:
    execute_revision_files(UPGRADE)


def downgrade() -> None:
    execute_revision_files(DOWNGRADE)
