"""Server-side sessions (revocable, absolute lifetime) and API tokens for scripts.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _table(name: str) -> list:
    return [
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=f"fk_{name}_user_id_users", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=f"pk_{name}"),
        sa.UniqueConstraint("token_hash", name=f"uq_{name}_token_hash"),
    ]


def upgrade() -> None:
    op.create_table("web_sessions", *_table("web_sessions"), sa.Column("expires_at", sa.DateTime(), nullable=False))
    op.create_index("ix_web_sessions_user_id", "web_sessions", ["user_id"])
    op.create_table("api_tokens", *_table("api_tokens"), sa.Column("name", sa.String(64), nullable=False),
                    sa.Column("last_used_at", sa.DateTime(), nullable=True))
    op.create_index("ix_api_tokens_user_id", "api_tokens", ["user_id"])
    # invite links are single-use and never replace a password now: void the ones held by people
    # who already have a password, since those links would log in as them
    op.execute(sa.text("UPDATE users SET invite_hash = NULL, invite_expires_at = NULL WHERE password_hash IS NOT NULL"))


def downgrade() -> None:
    op.drop_table("api_tokens")
    op.drop_table("web_sessions")
