"""Helpers shared by the feedback-app tests (imported as a plain module: tests/ has no packages)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from kilter.feedback.importer import parse_row
from kilter.feedback.store import Store

CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')
ASSIGNMENT_RE = re.compile(r'name="assignment_id" value="(\d+)"')


# --------------------------------------------------------------------------- data


def responses(n: int, models=None, prefix="response"):
    models = models or [f"model-{i}" for i in range(n)]
    return [{"text": f"{prefix} {i}", "model": models[i], "sampling": {"temperature": 0.7}} for i in range(n)]


def seed_project(store: Store, name: str, task: str, *, n_prompts: int = 3, k: int = 2, overlap: int = 1,
                 members=("ann",), gold_fraction: float = 0.0, models=None, golds=None):
    """A project with ``n_prompts`` prompts of ``k`` responses each, and its members."""
    store.create_project(name, task, overlap=overlap, gold_fraction=gold_fraction, instructions="Pick the better one.")
    rows = []
    for i in range(n_prompts):
        row = {"prompt": f"{name} prompt {i}", "id": f"{name}-{i}"}
        if task != "demonstration":
            row["responses"] = responses(k, models, prefix=f"{name} p{i} response")
        if golds and i < len(golds):
            row["gold"] = golds[i]
        rows.append(parse_row(row, f"seed line {i + 1}"))
    store.import_prompts(name, rows)
    for member in members:
        store.add_member(name, member)
    return store.project(name)


def invited(store: Store, username: str, role: str = "annotator") -> str:
    """Create an account and return its invite token."""
    return store.create_user(username, role, invite_hours=24)[1]


# --------------------------------------------------------------------------- in-process client


class Client:
    """TestClient plus the things every test needs: CSRF tokens, login, the task on screen."""

    def __init__(self, app):
        self.http = TestClient(app, follow_redirects=False)
        self.csrf = ""

    def get(self, url, **kw):
        r = self.http.get(url, **kw)
        m = CSRF_RE.search(r.text)
        if m:
            self.csrf = m.group(1)
        return r

    def post(self, url, data=None, csrf=True, **kw):
        data = dict(data or {})
        if csrf:
            data.setdefault("csrf_token", self.csrf)
        return self.http.post(url, data=data, **kw)

    def login(self, username, password="password123"):
        self.get("/login")
        r = self.post("/login", {"username": username, "password": password, "next": "/"})
        assert r.status_code == 303, r.text[:500]
        self.get("/")
        return r

    def login_invite(self, token):
        """Log in through an invite link (no Argon2 work, so tests stay fast)."""
        self.get(f"/invite/{token}")
        r = self.post(f"/invite/{token}", {})
        assert r.status_code == 303, r.text[:500]
        self.get("/")
        return r

    def task(self, project):
        r = self.get(f"/p/{project}")
        m = ASSIGNMENT_RE.search(r.text)
        return r, (int(m.group(1)) if m else None)


# --------------------------------------------------------------------------- a real server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``kilter serve`` in a subprocess; ``kill()`` is kill -9."""

    def __init__(self, db: str, tmp: Path, port: int | None = None, workers: int = 1):
        self.db, self.port, self.workers = db, port or free_port(), workers
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"server-{self.port}-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> LiveServer:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "kilter", "serve", "--db", self.db, "--port", str(self.port),
                                          "--log_level", "warning", "--workers", str(self.workers)], stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"server did not start: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()  # SIGKILL: no shutdown handlers, no flushing
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def http_login_invite(http: httpx.Client, token: str) -> str:
    """Log an httpx client in through its invite link; returns the session's CSRF token."""
    r = http.get(f"/invite/{token}")
    assert r.status_code == 200, r.text[:300]
    csrf = CSRF_RE.search(r.text).group(1)
    r = http.post(f"/invite/{token}", data={"csrf_token": csrf})
    assert r.status_code == 303, r.text[:300]
    r = http.get("/")
    return CSRF_RE.search(r.text).group(1)
