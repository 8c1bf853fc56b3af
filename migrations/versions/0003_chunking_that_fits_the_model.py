"""Chunking that fits the model: a pipeline's chunking strategy, a model's tokenizer, and a
truncated flag on every destination row.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

Pipelines that exist keep what they did: chunk_tokens 0 becomes chunking 'none' (a row too
long for the model is a failure) and chunk_tokens N > 0 becomes 'tokens' (the cl100k windows
they had). Only pipelines created from now on get the default that fits the model.
"""

from pgembed.schema import execute_revision_files

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

UPGRADE = ("0003_chunking_that_fits_the_model.sql",)
DOWNGRADE = ("0003_chunking_that_fits_the_model.down.sql",)


def upgrade() -> None:
    execute_revision_files(UPGRADE)


def downgrade() -> None:
    execute_revision_files(DOWNGRADE)
