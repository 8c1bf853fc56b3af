"""halfvec and quantization: how a pipeline stores its vectors (vector or halfvec) and
whether its HNSW index holds binary-quantized vectors, re-ranked at full precision.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01

Pipelines that exist keep what they did: storage 'vector', no quantization. The downgrade
returns the tables to 0004 and re-applies that revision's definitions, frozen.
"""

from pgembed.schema import execute_revision_files

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

UPGRADE = ("0005_halfvec_and_quantization.sql",)
DOWNGRADE = ("0005_halfvec_and_quantization.down.sql",
             "0005_halfvec_and_quantization.down.definitions.sql")


def upgrade() -> None:
    execute_revision_files(UPGRADE)


def downgrade() -> None:
    execute_revision_files(DOWNGRADE)
