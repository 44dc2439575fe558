"""Settings of the feedback server (``kilter serve``); also what :func:`create_app` takes."""

from __future__ import annotations

import os
from typing import Literal

from kilter.config import BaseConfig, Field


class ServeConfig(BaseConfig):
    """Settings of the feedback server; create_app(settings) takes the same object. Guide: docs/feedback.md."""

    db: str = Field(default_factory=lambda: os.environ.get("KILTER_DB", "kilter.db"))
    """Database: a SQLite file path (created if missing) or a URL such as postgresql://user:pass@host/dbname (default: $KILTER_DB or kilter.db)."""
    host: str = "127.0.0.1"
    """Address to listen on; use 0.0.0.0 to accept connections from other machines (put HTTPS in front)."""
    port: int = Field(8000, ge=1, le=65535)
    """TCP port to listen on."""
    workers: int = Field(1, ge=1, le=64)
    """Server processes; more than 1 only pays off on PostgreSQL (SQLite allows one writer at a time)."""
    secret_key: str | None = None
    """Key that signs session cookies; by default one is generated on first start and kept in the database."""
    secure_cookies: bool = False
    """Send the session cookie only over HTTPS and add a Strict-Transport-Security header (set behind TLS)."""
    session_max_age_s: int = Field(14 * 24 * 3600, gt=0)
    """Seconds a login stays valid, counted from the login (activity does not extend it); logging out ends it at once."""
    invite_hours: float = Field(72.0, gt=0)
    """Hours an invite link made from the admin page stays valid (links are single-use and never replace a password)."""
    login_max_failures: int = Field(5, ge=1)
    """Wrong passwords allowed per username and client address within login_window_s; more get HTTP 429."""
    login_max_attempts_per_address: int = Field(20, ge=1)
    """Login attempts allowed per client address within login_window_s, whatever the usernames; more get HTTP 429."""
    password_check_slots: int = Field(2, ge=1, le=64)
    """Argon2 password checks run at once per server process (each takes 64 MiB); further logins wait their turn."""
    password_check_wait_s: float = Field(10.0, gt=0)
    """Seconds a login waits for a free password-check slot before it gets HTTP 503."""
    login_window_s: float = Field(60.0, gt=0)
    """Length in seconds of the window for login_max_failures."""
    assignment_timeout_s: float = Field(1800.0, gt=0)
    """Seconds an unfinished task stays reserved for its annotator before it may go to someone else."""
    leaderboard_bootstrap: int = Field(200, ge=0)
    """Bootstrap rounds for the Bradley-Terry intervals on the admin page (0 = no intervals)."""
    datasets_dir: str | None = None
    """Folder where POST /api/v1/projects/NAME/export writes training files (DIR/NAME/KIND.jsonl); unset: that call is refused."""
    order_seed: int | None = None
    """Seed of the left/right order of responses and of the gold-item draws: each assignment's draw is a function of
    (seed, project, annotator, how many tasks they had there), so a rerun shows everyone the same pages (null: a system
    random source, unpredictable, for real annotators)."""
    loop_dir: str | None = None
    """A `kilter loop` run directory: the admin page /admin/loop shows its round, quota progress and metrics."""
    migrate: bool = True
    """Create or upgrade the database schema on start."""
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    """Server log level."""
    proxy_headers: bool = False
    """Trust X-Forwarded-For/-Proto from the reverse proxy at forwarded_allow_ips (for client addresses in rate limits)."""
    forwarded_allow_ips: str = "127.0.0.1"
    """Comma-separated addresses of reverse proxies whose forwarded headers are trusted."""
