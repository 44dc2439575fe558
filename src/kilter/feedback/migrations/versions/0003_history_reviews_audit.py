"""Judgment history (changed answers keep the old ones), reviews, skip reasons, prompt categories, audit log.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("judgments") as batch:
        batch.add_column(sa.Column("version", sa.Integer(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("updated_at", sa.DateTime(), nullable=True))
    with op.batch_alter_table("assignments") as batch:
        batch.add_column(sa.Column("skip_reason", sa.Text(), nullable=True))
    with op.batch_alter_table("prompts") as batch:
        batch.add_column(sa.Column("category", sa.String(64), nullable=True))
    op.create_table(
        "judgment_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("judgment_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("values", sa.JSON(), nullable=False),
        sa.Column("submitted_at", sa.DateTime(), nullable=False),
        sa.Column("replaced_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["judgment_id"], ["judgments.id"], name="fk_judgment_versions_judgment_id_judgments",
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_judgment_versions"),
    )
    op.create_index("ix_judgment_versions_judgment_id", "judgment_versions", ["judgment_id"])
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("judgment_id", sa.Integer(), nullable=False),
        sa.Column("reviewer_id", sa.Integer(), nullable=False),
        sa.Column("verdict", sa.String(8), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["judgment_id"], ["judgments.id"], name="fk_reviews_judgment_id_judgments", ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["reviewer_id"], ["users.id"], name="fk_reviews_reviewer_id_users", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_reviews"),
    )
    op.create_index("ix_reviews_judgment_id", "reviews", ["judgment_id"])
    op.create_index("ix_reviews_reviewer_id", "reviews", ["reviewer_id"])
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(255), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_audit_log_user_id_users", ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )
    op.create_index("ix_audit_log_created", "audit_log", ["created_at"])


def downgrade() -> None:
    op.drop_table("audit_log")
    op.drop_table("reviews")
    op.drop_table("judgment_versions")
    with op.batch_alter_table("prompts") as batch:
        batch.drop_column("category")
    with op.batch_alter_table("assignments") as batch:
        batch.drop_column("skip_reason")
    with op.batch_alter_table("judgments") as batch:
        batch.drop_column("updated_at")
        batch.drop_column("version")
