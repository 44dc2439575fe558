"""All database access of the feedback app: the only module that opens sessions or runs queries.

Durability. On SQLite the database runs in WAL mode. A judgment is committed with
``synchronous=FULL``: the commit returns only after the WAL is fsynced, and the web app answers
a submission only after its commit, so an acknowledged judgment survives ``kill -9`` of the
server and a power cut. Writes whose loss in a power cut would be harmless (task reservations,
skips) commit with ``synchronous=NORMAL``, which skips the fsync but still survives a killed
process (the data is in the OS page cache, and the next FULL commit persists it): on a disk
with slow fsync this halves the fsyncs per judgment. Write transactions start with
``BEGIN IMMEDIATE``, which takes SQLite's write lock up front: the read-then-insert of
assignment ("is this item still short of N judgments?") cannot interleave with another
writer, and a waiting writer sleeps in SQLite's busy handler instead of failing with a
deadlock. On PostgreSQL (committed transactions are always fsynced) the same guarantee comes
from locking the project row (``SELECT ... FOR UPDATE``) before assigning, plus the unique
constraints on (item, user).

Every method returns plain dataclasses, never ORM objects, so callers cannot trigger lazy loads
on a closed session.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, delete, event, func, or_, select, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from kilter.errors import KilterError
from kilter.feedback import security
from kilter.feedback.importer import PromptIn, check_for_task
from kilter.feedback.models import (
    ROLES,
    TASKS,
    ApiToken,
    AppSecret,
    Assignment,
    AuditEntry,
    Candidate,
    Item,
    ItemCandidate,
    Judgment,
    JudgmentVersion,
    LoginFailure,
    Membership,
    Project,
    Prompt,
    Review,
    User,
    WebSession,
    utcnow,
)
from kilter.feedback.tasks import Shown, gold_for_item, plan_items

# \Z, not $: "$" also matches before a trailing newline, which would let "henry\n" in
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}\Z")


def database_url(spec: str) -> str:
    """A SQLAlchemy URL from ``--db``: a file path means SQLite; ``postgresql://`` means psycopg 3."""
    if "://" not in spec:
        return f"sqlite:///{Path(spec).expanduser().resolve()}"
    if spec.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + spec.split("://", 1)[1]
    return spec


def _sqlite_events(engine: Engine) -> None:
    """WAL + synchronous=FULL on every connection; BEGIN IMMEDIATE for write transactions."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        # let SQLAlchemy's "begin" event below decide how transactions start
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:
        options = connection.get_execution_options()
        if options.get("kilter_write", False):
            # FULL: the commit fsyncs the WAL before returning. NORMAL (for writes whose loss in a
            # power cut is harmless, e.g. task reservations) skips that fsync; a later FULL commit
            # or checkpoint persists them. Either way a killed *process* loses nothing committed.
            level = "FULL" if options.get("kilter_durable", True) else "NORMAL"
            connection.exec_driver_sql(f"PRAGMA synchronous={level}")
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            connection.exec_driver_sql("BEGIN")


# --------------------------------------------------------------------------- plain rows


@dataclass(frozen=True)
class UserRow:
    id: int
    username: str
    role: str
    active: bool
    session_epoch: int
    has_password: bool
    invite_expires_at: datetime | None
    created_at: datetime

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class ProjectRow:
    id: int
    name: str
    title: str
    task: str
    overlap: int
    gold_fraction: float
    instructions: str
    created_at: datetime


@dataclass(frozen=True)
class CandidateRow:
    id: int
    slot: int
    model: str
    text: str
    sampling: dict[str, Any] | None


@dataclass(frozen=True)
class TaskView:
    """An open assignment as the task page shows it: ``responses`` in display order."""

    assignment_id: int
    item_id: int
    prompt: str
    responses: list[CandidateRow]
    created_at: datetime


@dataclass(frozen=True)
class JudgmentRecord:
    """One judgment with everything needed to export it, score annotators or rate models."""

    id: int
    task: str
    user: str
    item_id: int
    is_gold: bool
    gold: dict[str, Any] | None
    prompt: str
    prompt_id: str | None
    candidates: list[CandidateRow]  # in slot order
    created_at: datetime
    shown_at: datetime | None
    display_order: list[int]
    choice: str | None
    preferred_candidate_id: int | None
    strength: float | None
    tie: bool
    both_bad: bool
    label: bool | None
    responses: list[dict[str, Any]]
    text: str | None
    comment: str
    category: str | None = None
    version: int = 1  # above 1: the annotator changed their answer (older ones in judgment_versions)
    review: str | None = None  # the newest review's verdict: "accept", "reject" or None
    review_reason: str = ""
    reviewer: str | None = None


ANSWER_COLUMNS = ("choice", "preferred_candidate_id", "strength", "tie", "both_bad", "label", "responses", "text",
                  "comment", "display_order")
SKIP_REASONS = {
    "unclear": "The prompt or the responses are unclear",
    "expertise": "I can't judge this (needs expertise I don't have)",
    "offensive": "The content is offensive or disturbing",
    "broken": "Broken: garbled, truncated or empty",
    "other": "Another reason (see comment)",
}
REVIEW_VERDICTS = ("accept", "reject")


@dataclass(frozen=True)
class AuditRow:
    created_at: datetime
    username: str
    action: str
    target: str
    detail: dict[str, Any] | None


@dataclass(frozen=True)
class SkippedRow:
    assignment_id: int
    item_id: int
    prompt: str
    reason: str | None
    created_at: datetime


@dataclass
class Progress:
    items: int = 0
    gold_items: int = 0
    judgments: int = 0
    complete_items: int = 0
    open_assignments: int = 0
    skipped: int = 0
    per_user: dict[str, int] = field(default_factory=dict)

    @property
    def target(self) -> int:
        return self.items


def _user_row(u: User) -> UserRow:
    return UserRow(u.id, u.username, u.role, u.active, u.session_epoch, u.password_hash is not None,
                   u.invite_expires_at, u.created_at)


def _project_row(p: Project) -> ProjectRow:
    return ProjectRow(p.id, p.name, p.title, p.task, p.overlap, p.gold_fraction, p.instructions, p.created_at)


def _candidates(item: Item) -> list[CandidateRow]:
    return [CandidateRow(s.candidate.id, s.slot, s.candidate.model, s.candidate.text, s.candidate.sampling)
            for s in item.slots]


# --------------------------------------------------------------------------- the store


class Store:
    """The feedback database. ``Store(url)`` opens an engine; call :meth:`migrate` once before use."""

    def __init__(self, spec: str, *, pool_size: int = 10):
        self.url = database_url(spec)
        url = make_url(self.url)
        self.is_sqlite = url.get_backend_name() == "sqlite"
        if self.is_sqlite:
            if url.database and url.database != ":memory:":
                Path(url.database).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(self.url, pool_size=pool_size, max_overflow=20, pool_timeout=60,
                                   connect_args={"check_same_thread": False, "timeout": 60})
            _sqlite_events(engine)
        else:
            try:
                engine = create_engine(self.url, pool_size=pool_size, max_overflow=20, pool_pre_ping=True)
            except (ImportError, ModuleNotFoundError) as exc:
                raise KilterError(f"cannot open {url.render_as_string(hide_password=True)}: {exc}") from None
        self.engine: Engine = engine
        self._write_engine = engine.execution_options(kilter_write=True)
        self._fast_write_engine = engine.execution_options(kilter_write=True, kilter_durable=False)

    def close(self) -> None:
        self.engine.dispose()

    def migrate(self) -> None:
        """Create or upgrade the schema to the newest Alembic revision."""
        from kilter.feedback.migrate import upgrade

        upgrade(self.engine)

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    @contextmanager
    def _write(self, durable: bool = True) -> Iterator[Session]:
        """A write transaction; ``durable=False`` lets SQLite skip the fsync at commit (see module doc)."""
        engine = self._write_engine if durable else self._fast_write_engine
        with Session(engine, expire_on_commit=False) as session:
            with session.begin():
                yield session

    # ----------------------------------------------------------------------- secrets

    def secret(self, name: str, make: Callable[[], str]) -> str:
        """The stored secret ``name``, created with ``make()`` the first time (race-safe)."""
        with self._read() as s:
            row = s.get(AppSecret, name)
            if row is not None:
                return row.value
        try:
            with self._write() as s:
                if s.get(AppSecret, name) is None:
                    s.add(AppSecret(name=name, value=make()))
        except IntegrityError:
            pass  # another process created it first; use theirs
        with self._read() as s:
            return s.get(AppSecret, name).value

    # ----------------------------------------------------------------------- users

    def create_user(self, username: str, role: str = "annotator", password: str | None = None,
                    invite_hours: float | None = None, projects: list[str] | tuple[str, ...] = ()
                    ) -> tuple[UserRow, str | None]:
        """Create an account (and its memberships) in one transaction: a bad project name creates nothing.

        Returns the account and, when ``invite_hours`` is set and no password is given, an invite token.
        """
        if not NAME_RE.match(username):
            raise KilterError(f"username {username!r}: use 1-64 letters, digits, '_', '.', '@' or '-'")
        if role not in ROLES:
            raise KilterError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        if password is not None and (problem := security.password_problem(password)):
            raise KilterError(problem)
        token = security.new_token() if invite_hours and password is None else None
        digest = security.hash_password(password) if password else None
        try:
            with self._write() as s:
                if s.scalar(select(User.id).where(func.lower(User.username) == username.lower())):
                    raise KilterError(f"user {username!r} already exists")
                project_ids = []
                for name in dict.fromkeys(projects):
                    pid = s.scalar(select(Project.id).where(Project.name == name))
                    if pid is None:
                        raise KilterError(f"no project named {name!r}")
                    project_ids.append(pid)
                user = User(username=username, role=role, password_hash=digest,
                            invite_hash=security.token_digest(token) if token else None,
                            invite_expires_at=utcnow() + timedelta(hours=invite_hours) if token else None)
                s.add(user)
                s.flush()
                s.add_all([Membership(project_id=pid, user_id=user.id) for pid in project_ids])
                return _user_row(user), token
        except IntegrityError:
            raise KilterError(f"user {username!r} already exists") from None

    def _user(self, s: Session, username: str) -> User:
        user = s.scalar(select(User).where(func.lower(User.username) == username.lower()))
        if user is None:
            raise KilterError(f"no user named {username!r}")
        return user

    def new_invite(self, username: str, hours: float = 72.0) -> str:
        """A new single-use invite link (the previous one stops working); only for accounts without a password."""
        token = security.new_token()
        with self._write() as s:
            user = self._user(s, username)
            if user.password_hash is not None:
                raise KilterError(f"{user.username} already has a password, and an invite link never replaces one; "
                                  f"use `kilter users set-password {user.username}`")
            user.invite_hash = security.token_digest(token)
            user.invite_expires_at = utcnow() + timedelta(hours=hours)
        return token

    @staticmethod
    def _invite_ok(user: User | None) -> bool:
        return (user is not None and user.active and user.password_hash is None
                and user.invite_expires_at is not None and user.invite_expires_at >= utcnow())

    def user_by_invite(self, token: str) -> UserRow | None:
        """The account an unused, unexpired invite token belongs to (None once it has a password)."""
        with self._read() as s:
            user = s.scalar(select(User).where(User.invite_hash == security.token_digest(token)))
            return _user_row(user) if self._invite_ok(user) else None

    def redeem_invite(self, token: str, password: str | None = None) -> UserRow | None:
        """Use up an invite token (single use), setting ``password`` if given; None if the token is not valid."""
        if password is not None and (problem := security.password_problem(password)):
            raise KilterError(problem)
        digest = security.hash_password(password) if password else None
        with self._write() as s:
            user = s.scalar(select(User).where(User.invite_hash == security.token_digest(token)))
            if not self._invite_ok(user):
                return None
            user.invite_hash = None
            user.invite_expires_at = None
            if digest is not None:
                user.password_hash = digest
            s.flush()
            return _user_row(user)

    def set_password(self, username: str, password: str) -> None:
        if problem := security.password_problem(password):
            raise KilterError(problem)
        digest = security.hash_password(password)
        with self._write() as s:
            user = self._user(s, username)
            user.password_hash = digest
            user.invite_hash = None  # an old invite link must not outlive the password
            user.invite_expires_at = None
            user.session_epoch += 1
            s.execute(delete(WebSession).where(WebSession.user_id == user.id))  # logged out everywhere

    def set_active(self, username: str, active: bool) -> None:
        with self._write() as s:
            user = self._user(s, username)
            user.active = active
            user.session_epoch += 1
            s.execute(delete(WebSession).where(WebSession.user_id == user.id))

    def users(self) -> list[UserRow]:
        with self._read() as s:
            return [_user_row(u) for u in s.scalars(select(User).order_by(User.username))]

    def get_user(self, user_id: int) -> UserRow | None:
        """The account behind a session; Core query rather than the ORM, it runs on every request."""
        with self._read() as s:
            row = s.execute(select(User.id, User.username, User.role, User.active, User.session_epoch,
                                   User.password_hash.is_not(None), User.invite_expires_at, User.created_at)
                            .where(User.id == user_id)).first()
            return UserRow(*row) if row else None

    def check_password(self, username: str, password: str) -> UserRow | None:
        """The active user if the password matches, else None (constant work either way)."""
        with self._read() as s:
            user = s.scalar(select(User).where(func.lower(User.username) == username.lower()))
            stored = user.password_hash if user is not None and user.active else None
        if not security.verify_password(stored, password):
            return None
        if security.needs_rehash(stored):
            with self._write() as s:
                s.execute(update(User).where(User.id == user.id).values(password_hash=security.hash_password(password)))
        return _user_row(user)

    def take_login_attempt(self, limits: dict[str, int], window_s: float) -> list[int] | None:
        """Count a login attempt against every key in ``limits`` (key -> attempts allowed per window).

        Counting and recording happen in one write transaction, *before* the password is checked,
        so concurrent attempts cannot all slip under a limit. Returns the ids of the recorded
        attempts (pass them to :meth:`login_succeeded`), or None when a key is over its limit.
        """
        since = utcnow() - timedelta(seconds=window_s)
        with self._write(durable=False) as s:
            s.execute(delete(LoginFailure).where(LoginFailure.created_at < since))
            for key, limit in limits.items():
                used = s.scalar(select(func.count()).select_from(LoginFailure)
                                .where(LoginFailure.key == key, LoginFailure.created_at >= since)) or 0
                if used >= limit:
                    return None
            rows = [LoginFailure(key=key) for key in limits]
            s.add_all(rows)
            s.flush()
            return [r.id for r in rows]

    def login_succeeded(self, attempt_ids: list[int], user_key: str) -> None:
        """A right password: that attempt does not count, and nor do the user's earlier failures."""
        with self._write(durable=False) as s:
            s.execute(delete(LoginFailure).where(or_(LoginFailure.id.in_(attempt_ids), LoginFailure.key == user_key)))

    # ----------------------------------------------------------------------- sessions and API tokens

    def start_session(self, user_id: int, lifetime_s: float) -> str:
        """A new login for ``user_id``; returns the token for the cookie (only its hash is stored)."""
        token = security.new_token()
        now = utcnow()
        with self._write(durable=False) as s:
            s.execute(delete(WebSession).where(WebSession.user_id == user_id, WebSession.expires_at < now))
            s.add(WebSession(token_hash=security.token_digest(token), user_id=user_id, created_at=now,
                             expires_at=now + timedelta(seconds=lifetime_s)))
        return token

    def session_user(self, token: str) -> UserRow | None:
        """The active user of an unexpired, not revoked session; one query, it runs on every request."""
        with self._read() as s:
            row = s.execute(select(User.id, User.username, User.role, User.active, User.session_epoch,
                                   User.password_hash.is_not(None), User.invite_expires_at, User.created_at)
                            .join(WebSession, WebSession.user_id == User.id)
                            .where(WebSession.token_hash == security.token_digest(token),
                                   WebSession.expires_at > utcnow(), User.active.is_(True))).first()
            return UserRow(*row) if row else None

    def end_session(self, token: str) -> None:
        with self._write(durable=False) as s:
            s.execute(delete(WebSession).where(WebSession.token_hash == security.token_digest(token)))

    def create_api_token(self, username: str, name: str = "") -> str:
        """A token for ``Authorization: Bearer ...``, acting as ``username``; shown once, stored hashed."""
        token = "klt_" + security.new_token()
        with self._write() as s:
            user = self._user(s, username)
            s.add(ApiToken(token_hash=security.token_digest(token), user_id=user.id, name=name[:64]))
        return token

    def api_token_user(self, token: str) -> UserRow | None:
        with self._read() as s:
            row = s.execute(select(User.id, User.username, User.role, User.active, User.session_epoch,
                                   User.password_hash.is_not(None), User.invite_expires_at, User.created_at)
                            .join(ApiToken, ApiToken.user_id == User.id)
                            .where(ApiToken.token_hash == security.token_digest(token), User.active.is_(True))).first()
            return UserRow(*row) if row else None

    def revoke_api_tokens(self, username: str) -> int:
        with self._write() as s:
            user = self._user(s, username)
            return s.execute(delete(ApiToken).where(ApiToken.user_id == user.id)).rowcount or 0

    # ----------------------------------------------------------------------- projects

    def create_project(self, name: str, task: str, overlap: int = 1, title: str = "", instructions: str = "",
                       gold_fraction: float = 0.0) -> ProjectRow:
        if not NAME_RE.match(name) or "@" in name:
            raise KilterError(f"project name {name!r}: use 1-64 letters, digits, '_', '.' or '-'")
        if task not in TASKS:
            raise KilterError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        if overlap < 1:
            raise KilterError(f"overlap must be at least 1, got {overlap}")
        if not 0.0 <= gold_fraction <= 1.0:
            raise KilterError(f"gold fraction must be between 0 and 1, got {gold_fraction}")
        try:
            with self._write() as s:
                if s.scalar(select(Project.id).where(Project.name == name)):
                    raise KilterError(f"project {name!r} already exists")
                project = Project(name=name, task=task, overlap=overlap, title=title or name,
                                  instructions=instructions, gold_fraction=gold_fraction)
                s.add(project)
                s.flush()
                return _project_row(project)
        except IntegrityError:
            raise KilterError(f"project {name!r} already exists") from None

    def update_project(self, name: str, *, title: str | None = None, instructions: str | None = None,
                       overlap: int | None = None, gold_fraction: float | None = None) -> ProjectRow:
        """Change a project's settings; returns the project as it now is."""
        if overlap is not None and overlap < 1:
            raise KilterError(f"overlap must be at least 1, got {overlap}")
        if gold_fraction is not None and not 0.0 <= gold_fraction <= 1.0:
            raise KilterError(f"gold fraction must be between 0 and 1, got {gold_fraction}")
        with self._write() as s:
            project = s.scalar(select(Project).where(Project.name == name))
            if project is None:
                raise KilterError(f"no project named {name!r}")
            for key, value in (("title", title), ("instructions", instructions), ("overlap", overlap),
                               ("gold_fraction", gold_fraction)):
                if value is not None:
                    setattr(project, key, value)
            if not project.title:
                project.title = project.name
            s.flush()
            return _project_row(project)

    def project(self, name: str) -> ProjectRow:
        with self._read() as s:
            project = s.scalar(select(Project).where(Project.name == name))
            if project is None:
                raise KilterError(f"no project named {name!r}")
            return _project_row(project)

    def projects(self, user: UserRow | None = None) -> list[ProjectRow]:
        """All projects, or for an annotator only the ones they are a member of."""
        query = select(Project).order_by(Project.created_at, Project.id)
        if user is not None and not user.is_admin:
            query = query.join(Membership, Membership.project_id == Project.id).where(Membership.user_id == user.id)
        with self._read() as s:
            return [_project_row(p) for p in s.scalars(query)]

    def add_member(self, project: str, username: str) -> bool:
        """Add a user to a project; False if they already were a member."""
        with self._write() as s:
            pid = s.scalar(select(Project.id).where(Project.name == project))
            if pid is None:
                raise KilterError(f"no project named {project!r}")
            user = self._user(s, username)
            if s.get(Membership, (pid, user.id)) is not None:
                return False
            s.add(Membership(project_id=pid, user_id=user.id))
            return True

    def remove_member(self, project: str, username: str) -> None:
        with self._write() as s:
            pid = s.scalar(select(Project.id).where(Project.name == project))
            user = self._user(s, username)
            s.execute(delete(Membership).where(Membership.project_id == pid, Membership.user_id == user.id))

    def members(self, project_id: int) -> list[str]:
        with self._read() as s:
            return list(s.scalars(select(User.username).join(Membership, Membership.user_id == User.id)
                                  .where(Membership.project_id == project_id).order_by(User.username)))

    def project_access(self, name: str, user: UserRow) -> tuple[ProjectRow | None, bool]:
        """The project called ``name`` (None if there is none) and whether ``user`` may work on it."""
        with self._read() as s:
            row = s.execute(select(Project.id, Project.name, Project.title, Project.task, Project.overlap,
                                   Project.gold_fraction, Project.instructions, Project.created_at,
                                   Membership.user_id)
                            .outerjoin(Membership, (Membership.project_id == Project.id) & (Membership.user_id == user.id))
                            .where(Project.name == name)).first()
        if row is None:
            return None, False
        return ProjectRow(*row[:8]), user.is_admin or row[8] is not None

    def can_access(self, user: UserRow, project_id: int) -> bool:
        if user.is_admin:
            return True
        with self._read() as s:
            return s.get(Membership, (project_id, user.id)) is not None

    def prompt_external_ids(self, project_id: int) -> list[str]:
        """The ids given to the project's prompts at import (``kilter clips-sync`` skips queries already there)."""
        with self._read() as s:
            return list(s.scalars(select(Prompt.external_id).where(Prompt.project_id == project_id,
                                                                    Prompt.external_id.is_not(None))))

    def import_prompts(self, project: str, rows: list[PromptIn]) -> dict[str, int]:
        """Add prompts, candidates and the items planned from them, in one transaction."""
        proj = self.project(project)
        check_for_task(rows, proj.task)
        counts = {"prompts": 0, "candidates": 0, "items": 0, "gold_items": 0}
        with self._write() as s:
            ids = [r.external_id for r in rows if r.external_id is not None]
            if ids:
                taken = set(s.scalars(select(Prompt.external_id).where(Prompt.project_id == proj.id,
                                                                        Prompt.external_id.in_(ids))))
                if taken:
                    first = next(r for r in rows if r.external_id in taken)
                    raise KilterError(f"{first.where}: prompt id {first.external_id!r} is already in project {project!r}")
            for row in rows:
                prompt = Prompt(project_id=proj.id, external_id=row.external_id, text=row.prompt, category=row.category)
                s.add(prompt)
                s.flush()
                cands = [Candidate(prompt_id=prompt.id, model=c.model, text=c.text, sampling=c.sampling)
                         for c in row.responses]
                s.add_all(cands)
                s.flush()
                for members in plan_items(proj.task, [c.model for c in row.responses]):
                    gold = None if row.gold is None else gold_for_item(proj.task, row.gold, members, len(row.responses))
                    item = Item(project_id=proj.id, prompt_id=prompt.id, is_gold=gold is not None, gold=gold)
                    s.add(item)
                    s.flush()
                    s.add_all([ItemCandidate(item_id=item.id, slot=slot, candidate_id=cands[i].id)
                               for slot, i in enumerate(members)])
                    counts["items"] += 1
                    counts["gold_items"] += gold is not None
                counts["prompts"] += 1
                counts["candidates"] += len(cands)
        return counts

    # ----------------------------------------------------------------------- assignment

    def _slots(self, s: Session, item_id: int) -> tuple[str, list[CandidateRow]]:
        """The prompt text and the candidates of an item in slot order, in one query."""
        rows = s.execute(
            select(Prompt.text, ItemCandidate.slot, Candidate.id, Candidate.model, Candidate.text, Candidate.sampling)
            .select_from(Item).join(Prompt, Prompt.id == Item.prompt_id)
            .outerjoin(ItemCandidate, ItemCandidate.item_id == Item.id)
            .outerjoin(Candidate, Candidate.id == ItemCandidate.candidate_id)
            .where(Item.id == item_id).order_by(ItemCandidate.slot)).all()
        candidates = [CandidateRow(cid, slot, model, text, sampling)
                      for _, slot, cid, model, text, sampling in rows if cid is not None]
        return rows[0][0], candidates

    def _task_view(self, s: Session, assignment_id: int, item_id: int, order: list[int], created_at: datetime) -> TaskView:
        prompt, candidates = self._slots(s, item_id)
        return TaskView(assignment_id, item_id, prompt, [candidates[i] for i in order], created_at)

    def next_task(self, project: ProjectRow, user: UserRow, timeout_s: float = 1800.0,
                  rng: random.Random | None = None, seed: int | None = None) -> TaskView | None:
        """The user's open task in this project, or a newly assigned one; None when nothing is left.

        An item is offered while fewer than ``overlap`` people hold it (judged, or assigned less
        than ``timeout_s`` ago), lowest id first, so items complete their overlap in order
        instead of all being half done. Gold items do not count against overlap: each annotator
        meets each of them at most once, on about ``gold_fraction`` of their tasks.

        The display order and the gold draw come from ``rng``, else from ``seed`` (a generator
        seeded by the seed, project, user and how many tasks the user had in the project, so the
        draws repeat in a rerun whatever order annotators work in), else from the system.
        """
        with self._write(durable=False) as s:  # losing a reservation in a power cut is harmless
            if not self.is_sqlite:  # serialize assignment per project (SQLite: BEGIN IMMEDIATE does)
                s.execute(select(Project.id).where(Project.id == project.id).with_for_update())
            mine = s.execute(select(Assignment.id, Assignment.item_id, Assignment.display_order, Assignment.created_at)
                             .where(Assignment.project_id == project.id, Assignment.user_id == user.id,
                                    Assignment.status == "open").order_by(Assignment.id).limit(1)).first()
            if mine is not None:
                return self._task_view(s, mine.id, mine.item_id, list(mine.display_order), mine.created_at)
            if rng is None and seed is not None:
                had = s.scalar(select(func.count()).select_from(Assignment).where(
                    Assignment.project_id == project.id, Assignment.user_id == user.id)) or 0
                rng = random.Random(f"kilter-order-{seed}-{project.id}-{user.id}-{had}")
            rng = rng or random.SystemRandom()
            seen = select(Assignment.item_id).where(Assignment.user_id == user.id, Assignment.project_id == project.id)
            regular = s.scalar(self._open_items(project, seen, timeout_s).order_by(Item.id).limit(1))
            item_id = None
            # Gold items are mixed in only while there is real work: handing out gold once the rest is
            # done would turn "all done" back into a task on the next reload.
            if regular is not None and project.gold_fraction > 0 and rng.random() < project.gold_fraction:
                golds = list(s.scalars(select(Item.id).where(Item.project_id == project.id, Item.is_gold,
                                                             Item.id.not_in(seen))))
                item_id = rng.choice(golds) if golds else None
            item_id = item_id or regular
            if item_id is None:
                return None
            prompt, candidates = self._slots(s, item_id)
            order = list(range(len(candidates)))
            rng.shuffle(order)  # left/right and list order are randomized, and recorded
            a = Assignment(project_id=project.id, item_id=item_id, user_id=user.id, display_order=order,
                           created_at=utcnow())
            s.add(a)
            s.flush()
            return TaskView(a.id, item_id, prompt, [candidates[i] for i in order], a.created_at)

    @staticmethod
    def _open_items(project: ProjectRow, seen, timeout_s: float):
        """Non-gold items of the project not in ``seen`` that fewer than ``overlap`` people hold
        (judged, or reserved less than ``timeout_s`` ago)."""
        cutoff = utcnow() - timedelta(seconds=timeout_s)
        # correlated count over the (item_id) index: cheap, and SQL stops at the first fit
        holders = (select(func.count()).select_from(Assignment)
                   .where(Assignment.item_id == Item.id,
                          or_(Assignment.status == "done",
                              (Assignment.status == "open") & (Assignment.created_at >= cutoff)))
                   .scalar_subquery())
        return select(Item.id).where(Item.project_id == project.id, Item.is_gold.is_(False),
                                     Item.id.not_in(seen), holders < project.overlap)

    def user_progress(self, project: ProjectRow, user: UserRow, timeout_s: float = 1800.0) -> dict[str, int]:
        """What one person has done in a project and what is still there for them.

        ``done``: their judgments; ``skipped``: items they skipped; ``remaining``: items they can
        still get (their open task included), so ``done + remaining`` is their share of the work.
        """
        with self._read() as s:
            seen = select(Assignment.item_id).where(Assignment.user_id == user.id, Assignment.project_id == project.id)
            available = s.scalar(select(func.count()).select_from(self._open_items(project, seen, timeout_s).subquery())) or 0
            counts = dict(s.execute(select(Assignment.status, func.count()).where(
                Assignment.project_id == project.id, Assignment.user_id == user.id).group_by(Assignment.status)).all())
        return {"done": counts.get("done", 0), "skipped": counts.get("skipped", 0),
                "remaining": available + counts.get("open", 0)}

    def open_task(self, assignment_id: int, user: UserRow) -> TaskView | None:
        with self._read() as s:
            a = s.get(Assignment, assignment_id)
            if a is None or a.user_id != user.id:
                return None
            return self._task_view(s, a.id, a.item_id, list(a.display_order), a.created_at)

    def submit(self, project: ProjectRow, user: UserRow, assignment_id: int,
               parse: Callable[[Shown], dict[str, Any]]) -> tuple[int, bool]:
        """Store a judgment for an assignment; returns (judgment id, created).

        Idempotent: a second submission of the same assignment (a double click, a retried
        request) returns the first judgment and stores nothing. ``parse`` turns the form into
        column values given what was shown; it may raise :class:`~kilter.feedback.tasks.FormError`.
        The transaction is durable (fsynced) before this returns.
        """
        try:
            with self._write(durable=True) as s:
                a = s.get(Assignment, assignment_id)
                if a is None or a.user_id != user.id or a.project_id != project.id:
                    raise KilterError("this task is not assigned to you")
                if a.status == "done":
                    return s.scalar(select(Judgment.id).where(Judgment.assignment_id == a.id)), False
                if a.status == "skipped":
                    raise KilterError("this task was skipped")
                view = self._task_view(s, a.id, a.item_id, list(a.display_order), a.created_at)
                original = view.responses[0].text if view.responses else ""
                values = parse(Shown([c.id for c in view.responses], original))
                j = Judgment(assignment_id=a.id, project_id=project.id, item_id=a.item_id, user_id=user.id,
                             task=project.task, shown_at=a.created_at, **values)
                s.add(j)
                a.status = "done"
                s.flush()
                return j.id, True
        except IntegrityError:
            # PostgreSQL: a concurrent duplicate of this submission won the race
            with self._read() as s:
                jid = s.scalar(select(Judgment.id).where(Judgment.assignment_id == assignment_id,
                                                          Judgment.user_id == user.id))
            if jid is None:
                raise
            return jid, False

    def skip(self, project: ProjectRow, user: UserRow, assignment_id: int, reason: str | None = None) -> None:
        if reason is not None and reason not in SKIP_REASONS:
            raise KilterError(f"unknown skip reason {reason!r}; one of {', '.join(SKIP_REASONS)}")
        with self._write(durable=False) as s:
            s.execute(update(Assignment).where(Assignment.id == assignment_id, Assignment.user_id == user.id,
                                               Assignment.project_id == project.id, Assignment.status == "open")
                      .values(status="skipped", skip_reason=reason))

    def skipped(self, project: ProjectRow, user: UserRow) -> list[SkippedRow]:
        """The items ``user`` skipped in ``project``, newest first, with the reason they gave."""
        with self._read() as s:
            rows = s.execute(select(Assignment.id, Assignment.item_id, Prompt.text, Assignment.skip_reason,
                                    Assignment.created_at)
                             .join(Item, Item.id == Assignment.item_id).join(Prompt, Prompt.id == Item.prompt_id)
                             .where(Assignment.project_id == project.id, Assignment.user_id == user.id,
                                    Assignment.status == "skipped").order_by(Assignment.id.desc())).all()
        return [SkippedRow(*r) for r in rows]

    def reopen_skipped(self, project: ProjectRow, user: UserRow, assignment_id: int) -> bool:
        """Put a skipped item back as the person's open task (shown next); False if it was not theirs or not skipped.

        Any other open task of theirs goes back to the pool, so the reopened one is what they see.
        """
        with self._write(durable=False) as s:
            a = s.get(Assignment, assignment_id)
            if a is None or a.user_id != user.id or a.project_id != project.id or a.status != "skipped":
                return False
            s.execute(delete(Assignment).where(Assignment.project_id == project.id, Assignment.user_id == user.id,
                                               Assignment.status == "open"))
            a.status, a.skip_reason, a.created_at = "open", None, utcnow()
            return True

    # ----------------------------------------------------------------------- changing and reviewing answers

    def my_judgments(self, project: ProjectRow, user: UserRow, limit: int = 20) -> list[JudgmentRecord]:
        """The person's newest judgments in the project (for going back and changing them)."""
        return [r for r in self.judgments(project, user_id=user.id)][::-1][:limit]

    def revise(self, project: ProjectRow, user: UserRow, judgment_id: int,
               parse: Callable[[Shown], dict[str, Any]]) -> int:
        """Replace the answer of one of ``user``'s judgments; the old answer is kept as a version.

        ``parse`` reads the form given the responses in the order first shown (it may raise
        FormError). Returns the new version number.
        """
        with self._write(durable=True) as s:
            j = s.get(Judgment, judgment_id)
            if j is None or j.user_id != user.id or j.project_id != project.id:
                raise KilterError("this judgment is not yours")
            a = s.get(Assignment, j.assignment_id)
            view = self._task_view(s, a.id, a.item_id, list(a.display_order), a.created_at)
            original = view.responses[0].text if view.responses else ""
            values = parse(Shown([c.id for c in view.responses], original))
            s.add(JudgmentVersion(judgment_id=j.id, version=j.version, submitted_at=j.updated_at or j.created_at,
                                  values={c: getattr(j, c) for c in ANSWER_COLUMNS}))
            blank = {"tie": False, "both_bad": False, "comment": ""}  # what a fresh judgment holds
            for column in ANSWER_COLUMNS:
                setattr(j, column, values.get(column, blank.get(column)))
            j.version += 1
            j.updated_at = utcnow()
            return j.version

    def versions(self, judgment_id: int) -> list[dict[str, Any]]:
        """Earlier answers of a judgment, oldest first: ``{"version", "submitted_at", "replaced_at", **values}``."""
        with self._read() as s:
            return [{"version": v.version, "submitted_at": v.submitted_at, "replaced_at": v.replaced_at, **v.values}
                    for v in s.scalars(select(JudgmentVersion).where(JudgmentVersion.judgment_id == judgment_id)
                                       .order_by(JudgmentVersion.version))]

    def review(self, project: ProjectRow, reviewer: UserRow, judgment_id: int, verdict: str, reason: str = "") -> None:
        """Accept or reject a judgment (a rejection needs a reason); the newest review counts."""
        if verdict not in REVIEW_VERDICTS:
            raise KilterError(f"verdict must be accept or reject, got {verdict!r}")
        reason = reason.strip()
        if verdict == "reject" and not reason:
            raise KilterError("say why the judgment is rejected")
        with self._write() as s:
            j = s.get(Judgment, judgment_id)
            if j is None or j.project_id != project.id:
                raise KilterError(f"no judgment {judgment_id} in project {project.name!r}")
            if j.user_id == reviewer.id:
                raise KilterError("you cannot review your own judgment")
            s.add(Review(judgment_id=j.id, reviewer_id=reviewer.id, verdict=verdict, reason=reason[:2000]))

    # ----------------------------------------------------------------------- audit log

    def audit(self, user: UserRow | None, action: str, target: str = "", detail: dict[str, Any] | None = None) -> None:
        with self._write(durable=False) as s:
            s.add(AuditEntry(user_id=user.id if user else None, username=user.username if user else "",
                             action=action, target=target[:255], detail=detail))

    def audit_log(self, limit: int = 200) -> list[AuditRow]:
        with self._read() as s:
            return [AuditRow(e.created_at, e.username, e.action, e.target, e.detail)
                    for e in s.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit))]

    # ----------------------------------------------------------------------- reading results

    def progress(self, project: ProjectRow) -> Progress:
        p = Progress()
        with self._read() as s:
            p.items = s.scalar(select(func.count()).select_from(Item).where(Item.project_id == project.id, Item.is_gold.is_(False))) or 0
            p.gold_items = s.scalar(select(func.count()).select_from(Item).where(Item.project_id == project.id, Item.is_gold)) or 0
            p.judgments = s.scalar(select(func.count()).select_from(Judgment).where(Judgment.project_id == project.id)) or 0
            counts = (select(Judgment.item_id, func.count().label("n")).join(Item, Item.id == Judgment.item_id)
                      .where(Judgment.project_id == project.id, Item.is_gold.is_(False))
                      .group_by(Judgment.item_id).subquery())
            p.complete_items = s.scalar(select(func.count()).select_from(counts).where(counts.c.n >= project.overlap)) or 0
            p.open_assignments = s.scalar(select(func.count()).select_from(Assignment).where(
                Assignment.project_id == project.id, Assignment.status == "open")) or 0
            p.skipped = s.scalar(select(func.count()).select_from(Assignment).where(
                Assignment.project_id == project.id, Assignment.status == "skipped")) or 0
            rows = s.execute(select(User.username, func.count(Judgment.id)).join(Judgment, Judgment.user_id == User.id)
                             .where(Judgment.project_id == project.id).group_by(User.username).order_by(User.username))
            p.per_user = {name: n for name, n in rows}
        return p

    def item_candidates(self, project: ProjectRow) -> list[tuple[int, str, str]]:
        """(item id, candidate text, model) of every item of the project, in item and slot order."""
        with self._read() as s:
            return [tuple(r) for r in s.execute(
                select(Item.id, Candidate.text, Candidate.model).join(ItemCandidate, ItemCandidate.item_id == Item.id)
                .join(Candidate, Candidate.id == ItemCandidate.candidate_id)
                .where(Item.project_id == project.id).order_by(Item.id, ItemCandidate.slot))]

    def judgments(self, project: ProjectRow, user_id: int | None = None) -> list[JudgmentRecord]:
        """Every judgment of the project (or of one annotator), oldest first, with its item, prompt,
        candidates and newest review."""
        with self._read() as s:
            query = (select(Judgment, User.username).join(User, User.id == Judgment.user_id)
                     .where(Judgment.project_id == project.id).order_by(Judgment.created_at, Judgment.id))
            if user_id is not None:
                query = query.where(Judgment.user_id == user_id)
            rows = s.execute(query).all()
            reviews: dict[int, tuple[str, str, str]] = {}
            if rows:
                for jid, verdict, reason, who in s.execute(
                        select(Review.judgment_id, Review.verdict, Review.reason, User.username)
                        .join(User, User.id == Review.reviewer_id).join(Judgment, Judgment.id == Review.judgment_id)
                        .where(Judgment.project_id == project.id).order_by(Review.id)):
                    reviews[jid] = (verdict, reason, who)  # later rows win: the newest review counts
            item_ids = {j.item_id for j, _ in rows}
            items = {i.id: i for i in s.scalars(select(Item).where(Item.id.in_(item_ids)).options(
                selectinload(Item.slots).selectinload(ItemCandidate.candidate)))} if item_ids else {}
            prompts = {p.id: p for p in s.scalars(select(Prompt).where(Prompt.id.in_({i.prompt_id for i in items.values()})))} if items else {}
            out = []
            for j, username in rows:
                item = items[j.item_id]
                prompt = prompts[item.prompt_id]
                verdict, reason, reviewer = reviews.get(j.id, (None, "", None))
                out.append(JudgmentRecord(
                    j.id, j.task, username, item.id, item.is_gold, item.gold, prompt.text, prompt.external_id,
                    _candidates(item), j.created_at, j.shown_at, list(j.display_order), j.choice,
                    j.preferred_candidate_id, j.strength, j.tie, j.both_bad, j.label, list(j.responses or []),
                    j.text, j.comment, prompt.category, j.version, verdict, reason, reviewer))
            return out
