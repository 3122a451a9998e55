"""DICOM node: the studies each node has processed, is retrying or has parked.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dicom_jobs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("node", sa.String(100), nullable=False),
        sa.Column("study", sa.String(64), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("attempts", sa.Integer),
        sa.Column("next_try", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("result", sa.JSON),
        sa.Column("created_at", sa.DateTime(timezone=True)),
        sa.Column("updated_at", sa.DateTime(timezone=True)),
        sa.UniqueConstraint("node", "study"),
    )


def downgrade() -> None:
    op.drop_table("dicom_jobs")
