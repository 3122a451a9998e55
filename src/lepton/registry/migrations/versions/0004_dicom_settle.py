"""DICOM node: each study's arrival signature (series and instance counts, hashed) and when it last changed, so the
settle rule survives restarts and applies to ``--once``.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("dicom_jobs") as batch:
        batch.add_column(sa.Column("signature", sa.String(64), nullable=True))
        batch.add_column(sa.Column("changed_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("dicom_jobs") as batch:
        batch.drop_column("changed_at")
        batch.drop_column("signature")
