"""halfvec and quantization: how a pipeline stores its vectors (vector or halfvec) and
whether its HNSW index holds binary-quantized vectors, re-ranked at full precision.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

Pipelines that exist keep what they did: storage 'vector', no quantization.
"""

from pgembed.schema import execute_revision_files

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

UPGRADE = ("0004_halfvec_and_quantization.sql",)
DOWNGRADE = ("0004_halfvec_and_quantization.down.sql",)


def upgrade() -> None:
    execute_revision_files(UPGRADE)


def downgrade() -> None:
    execute_revision_files(DOWNGRADE)
