"""Database tables of the feedback store (SQLAlchemy 2 declarative models).

The schema keeps every raw judgment: who gave it, when, in which order the responses were
shown, and every field of the form -- aggregation happens only at export time, so a different
aggregation rule can always be applied later. Schema changes go through Alembic migrations
(``kilter/feedback/migrations``); a test checks that the migrations and these models agree.

Layout::

    users ─┬─ memberships ── projects ── prompts ── candidates (model, sampling settings)
           │                    │           │
           │                    └── items ──┴── item_candidates (slot -> candidate)
           └── assignments (item shown to a user, display order) ── judgments
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

ROLES = ("admin", "reviewer", "annotator")  # a reviewer labels and also accepts or rejects judgments
TASKS = ("pairwise", "ranking", "rating", "edit", "demonstration", "clips")
ASSIGNMENT_STATES = ("open", "done", "skipped")

# Fixed constraint names keep migrations portable between SQLite (batch mode) and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Naive UTC timestamp: SQLite has no time zones, so every stored time is UTC by convention."""
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class AppSecret(Base):
    """Server-side secrets, e.g. the session signing key generated on first start."""

    __tablename__ = "app_secrets"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16), default="annotator")
    password_hash: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # sha256 of the invite token: a leaked database does not leak working login links
    invite_hash: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)
    invite_expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    # bumped on password change or deactivation; sessions carrying an older epoch are void
    session_epoch: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    title: Mapped[str] = mapped_column(String(200), default="")
    task: Mapped[str] = mapped_column(String(16))
    overlap: Mapped[int] = mapped_column(Integer, default=1)
    gold_fraction: Mapped[float] = mapped_column(Float, default=0.0)
    instructions: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Membership(Base):
    __tablename__ = "memberships"
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)


class Prompt(Base):
    __tablename__ = "prompts"
    __table_args__ = (UniqueConstraint("project_id", "external_id", name="uq_prompts_project_external"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    external_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    text: Mapped[str] = mapped_column(Text)
    # optional grouping for per-category leaderboards and filters ("coding", "safety", ...)
    category: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    candidates: Mapped[list[Candidate]] = relationship(back_populates="prompt", order_by="Candidate.id")


class Candidate(Base):
    """One model response to a prompt, with the model that wrote it and how it was sampled."""

    __tablename__ = "candidates"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(String(255), default="")
    text: Mapped[str] = mapped_column(Text)
    sampling: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    prompt: Mapped[Prompt] = relationship(back_populates="candidates")


class Item(Base):
    """A unit of work: a prompt plus the candidates shown together (2 for pairwise, K for ranking)."""

    __tablename__ = "items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), index=True)
    is_gold: Mapped[bool] = mapped_column(Boolean, default=False)
    # known answer in slot terms: pairwise {"preferred": slot | None}, ranking {"ranks": [...]},
    # rating {"label": bool}
    gold: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    slots: Mapped[list[ItemCandidate]] = relationship(order_by="ItemCandidate.slot")


class ItemCandidate(Base):
    __tablename__ = "item_candidates"
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), primary_key=True)
    slot: Mapped[int] = mapped_column(Integer, primary_key=True)
    candidate_id: Mapped[int] = mapped_column(ForeignKey("candidates.id", ondelete="CASCADE"), index=True)
    candidate: Mapped[Candidate] = relationship()


class Assignment(Base):
    """An item handed to one annotator, with the randomized order it is shown in.

    The unique (item, user) pair is what guarantees nobody judges the same item twice.
    """

    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("item_id", "user_id", name="uq_assignments_item_user"),
        Index("ix_assignments_project_status", "project_id", "status"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    # slots in the order shown: [1, 0] means slot 1 was shown as "A" (left / first)
    display_order: Mapped[list[int]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(8), default="open")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    skip_reason: Mapped[str | None] = mapped_column(Text, nullable=True)


class Judgment(Base):
    """One submitted form, stored as given; nothing is aggregated here."""

    __tablename__ = "judgments"
    __table_args__ = (
        UniqueConstraint("item_id", "user_id", name="uq_judgments_item_user"),
        Index("ix_judgments_project_created", "project_id", "created_at"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id", ondelete="CASCADE"), unique=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    task: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    shown_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    # candidate ids in the order shown (index 0 = "A" / left / top of the list)
    display_order: Mapped[list[int]] = mapped_column(JSON)
    # pairwise: the button pressed as shown ("A4" .. "A1", "B1" .. "B4", "tie", "both_bad")
    choice: Mapped[str | None] = mapped_column(String(16), nullable=True)
    preferred_candidate_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    strength: Mapped[float | None] = mapped_column(Float, nullable=True)
    tie: Mapped[bool] = mapped_column(Boolean, default=False)
    both_bad: Mapped[bool] = mapped_column(Boolean, default=False)
    # rating (thumbs up / down)
    label: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    # per response: [{"candidate", "position", "rank", "score", "flags"}]
    responses: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    # edit: the edited response; demonstration: the written response
    text: Mapped[str | None] = mapped_column(Text, nullable=True)
    comment: Mapped[str] = mapped_column(Text, default="")
    # 1 for the first answer; each change by the annotator keeps the old one in judgment_versions
    version: Mapped[int] = mapped_column(Integer, default=1)
    updated_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class LoginFailure(Base):
    """Wrong-password attempts, kept in the database so every server process sees the same count."""

    __tablename__ = "login_failures"
    __table_args__ = (Index("ix_login_failures_key_at", "key", "created_at"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(320))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class WebSession(Base):
    """A login. The cookie carries a random id whose SHA-256 is the row's key, so logging out (deleting
    the row) ends the session even for a copied cookie, and ``expires_at`` is fixed when the row is made:
    an absolute lifetime that activity does not extend."""

    __tablename__ = "web_sessions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime)


class ApiToken(Base):
    """A token for scripts using the JSON API (``Authorization: Bearer ...``); only its SHA-256 is kept."""

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class JudgmentVersion(Base):
    """An earlier answer of a judgment the annotator later changed: raw history is never lost."""

    __tablename__ = "judgment_versions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    judgment_id: Mapped[int] = mapped_column(ForeignKey("judgments.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    values: Mapped[dict[str, Any]] = mapped_column(JSON)  # the answer columns as they were
    submitted_at: Mapped[datetime] = mapped_column(DateTime)  # when that version was given
    replaced_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Review(Base):
    """A reviewer's verdict on a judgment (the newest one counts); rejected judgments are left out of exports."""

    __tablename__ = "reviews"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    judgment_id: Mapped[int] = mapped_column(ForeignKey("judgments.id", ondelete="CASCADE"), index=True)
    reviewer_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    verdict: Mapped[str] = mapped_column(String(8))  # "accept" or "reject"
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class AuditEntry(Base):
    """One admin action (project created, import, settings changed, members, accounts, export)."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_created", "created_at"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), nullable=True)
    username: Mapped[str] = mapped_column(String(64), default="")  # kept if the account goes
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(255), default="")
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
