"""Fixtures for the feedback app: a temp SQLite file (or a fresh PostgreSQL database when
KILTER_TEST_PG_URL is set), an in-process client, a real uvicorn server in a subprocess, and
headless Chromium."""

from __future__ import annotations

import os
import shutil
import uuid

import pytest
from feedback_testlib import Client, LiveServer

from kilter.feedback.app import create_app
from kilter.feedback.settings import ServeConfig
from kilter.feedback.store import Store

PG_URL = os.environ.get("KILTER_TEST_PG_URL")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


# --------------------------------------------------------------------------- databases


@pytest.fixture(scope="session")
def pg_session_database():
    """One fresh database on the server at KILTER_TEST_PG_URL for the whole run, migrated once."""
    if not PG_URL:
        pytest.skip("PostgreSQL tests need KILTER_TEST_PG_URL (see scripts/start-test-postgres.sh)")
    import psycopg

    base = PG_URL.replace("postgresql+psycopg://", "postgresql://")
    name = f"kilter_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"{base.rpartition('/')[0]}/{name}"
    store = Store(url)
    store.migrate()
    store.close()
    yield url
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_database(pg_session_database):
    """The session's PostgreSQL database, emptied (schema kept) before each test."""
    import psycopg

    with psycopg.connect(pg_session_database, autocommit=True) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version'")]
        conn.execute("TRUNCATE " + ", ".join(f'"{t}"' for t in tables) + " RESTART IDENTITY CASCADE")
    return pg_session_database


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    """The same test on a temp SQLite file and on a real PostgreSQL server."""
    if request.param == "sqlite":
        return str(tmp_path / "feedback.db")
    return request.getfixturevalue("pg_database")


@pytest.fixture
def sqlite_path(tmp_path) -> str:
    return str(tmp_path / "feedback.db")


@pytest.fixture
def store(db_url):
    s = Store(db_url)
    s.migrate()
    yield s
    s.close()


# --------------------------------------------------------------------------- apps


@pytest.fixture
def app_factory():
    made = []

    def make(db: str, **settings):
        settings.setdefault("db", db)
        app = create_app(ServeConfig(**settings))
        made.append(app)
        return app

    yield make
    for app in made:
        app.state.store.close()


@pytest.fixture
def app(app_factory, db_url):
    return app_factory(db_url)


@pytest.fixture
def client_for(app):
    def make():
        return Client(app)

    return make


@pytest.fixture
def live_server(tmp_path):
    servers: list[LiveServer] = []

    def start(db: str, port: int | None = None, workers: int = 1) -> LiveServer:
        server = LiveServer(db, tmp_path, port, workers).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


# --------------------------------------------------------------------------- browser


@pytest.fixture
def browser(tmp_path):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("browser tests need Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1440,900", f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
