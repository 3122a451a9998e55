"""Initial registry schema: models, model_versions, stage_events.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("description", sa.Text, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True)),
    )
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id", ondelete="CASCADE"), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("stage", sa.String(20), nullable=False, server_default="none"),
        sa.Column("format", sa.String(20), nullable=False, server_default="pytorch"),
        sa.Column("created_at", sa.DateTime(timezone=True)),
        sa.Column("source_run", sa.Text, nullable=True),
        sa.Column("parent_version", sa.Integer, nullable=True),
        sa.Column("artifacts", sa.JSON),
        sa.Column("labels", sa.JSON),
        sa.Column("preprocessing", sa.JSON),
        sa.Column("config", sa.JSON),
        sa.Column("metrics", sa.JSON),
        sa.Column("data_fingerprint", sa.JSON),
        sa.Column("threshold", sa.Float, nullable=True),
        sa.UniqueConstraint("model_id", "version", name="uq_model_version"),
    )
    op.create_index("ix_model_versions_stage", "model_versions", ["model_id", "stage"])
    op.create_table(
        "stage_events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id", ondelete="CASCADE"), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("from_stage", sa.String(20), nullable=False),
        sa.Column("to_stage", sa.String(20), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True)),
    )


def downgrade() -> None:
    op.drop_table("stage_events")
    op.drop_index("ix_model_versions_stage", "model_versions")
    op.drop_table("model_versions")
    op.drop_table("models")
