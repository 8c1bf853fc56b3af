"""Chunking that fits the model: a pipeline's chunking strategy, a model's tokenizer, and a
truncated flag on every destination row.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

Pipelines that exist keep what they did: chunk_tokens 0 becomes chunking 'none' (a row too
long for the model is a failure) and chunk_tokens N > 0 becomes 'tokens' (the cl100k windows
they had). Only pipelines created from now on get the default that fits the model. The
downgrade returns the tables to 0003 and re-applies that revision's definitions, frozen.
"""

from pgembed.schema import execute_revision_files

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

UPGRADE = ("0004_chunking_that_fits_the_model.sql",)
DOWNGRADE = ("0004_chunking_that_fits_the_model.down.sql",
             "0004_chunking_that_fits_the_model.down.definitions.sql")


def upgrade() -> None:
    execute_revision_files(UPGRADE)


def downgrade() -> None:
    execute_revision_files(DOWNGRADE)
