"""A real uvicorn server in a subprocess: 50 concurrent annotators, and kill -9 in the middle of work."""

import random
import re
import threading
import time
from collections import Counter

import httpx
import pytest
from feedback_testlib import ASSIGNMENT_RE, http_login_invite
from sqlalchemy import text

from kilter.feedback.importer import parse_row
from kilter.feedback.store import Store


def seed(db: str, items: int, overlap: int, people: int) -> list[str]:
    """A pairwise project with ``items`` items and ``people`` invited members; returns their tokens."""
    store = Store(db)
    store.migrate()
    store.create_project("load", "pairwise", overlap=overlap)
    store.import_prompts("load", [parse_row({"prompt": f"prompt {i}", "responses": [f"left {i}", f"right {i}"]}, f"l{i}")
                                  for i in range(items)])
    tokens = []
    for i in range(people):
        tokens.append(store.create_user(f"a{i:02d}", invite_hours=24)[1])
        store.add_member("load", f"a{i:02d}")
    store.close()
    return tokens


def stored(db: str) -> list[tuple[int, int, int]]:
    store = Store(db)
    with store.engine.connect() as conn:
        rows = [tuple(r) for r in conn.execute(text("SELECT assignment_id, item_id, user_id FROM judgments"))]
    store.close()
    return rows


class Annotator:
    """One person clicking through tasks over HTTP, remembering every acknowledged submission."""

    def __init__(self, url: str, token: str, seed: int):
        self.http = httpx.Client(base_url=url, follow_redirects=False, timeout=120.0)
        self.csrf = http_login_invite(self.http, token)
        self.rng = random.Random(seed)
        self.acknowledged: list[int] = []

    def judge_one(self, double_submit: bool = False) -> bool:
        page = self.http.get("/p/load")
        assert page.status_code == 200, page.text[:300]
        match = ASSIGNMENT_RE.search(page.text)
        if match is None:
            return False
        assignment = int(match.group(1))
        form = {"csrf_token": self.csrf, "assignment_id": assignment,
                "choice": self.rng.choice(["A4", "A2", "B1", "B3", "tie", "both_bad"])}
        for _ in range(2 if double_submit else 1):  # a double click must not store twice
            r = self.http.post("/p/load/submit", data=form)
            assert r.status_code == 303, r.text[:300]
        self.acknowledged.append(assignment)
        return True


@pytest.mark.slow
def test_fifty_concurrent_annotators_lose_and_duplicate_nothing(sqlite_path, live_server):
    """SQLite, the harder case: one writer at a time, shared by two server processes."""
    db_url = sqlite_path
    per_person, people, overlap = 40, 50, 3
    tokens = seed(db_url, items=700, overlap=overlap, people=people)
    server = live_server(db_url, workers=2)
    annotators = [Annotator(server.url, t, i) for i, t in enumerate(tokens)]
    errors: list[BaseException] = []

    def work(a: Annotator):
        try:
            for n in range(per_person):
                assert a.judge_one(double_submit=n % 10 == 0)
        except BaseException as exc:  # re-raised in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(a,)) for a in annotators]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [], errors[:3]
    acknowledged = [x for a in annotators for x in a.acknowledged]
    assert len(acknowledged) == per_person * people == 2000
    rows = stored(db_url)
    assert len(rows) == 2000  # none lost, none duplicated
    assert sorted(r[0] for r in rows) == sorted(acknowledged)
    assert len({(item, user) for _, item, user in rows}) == 2000  # nobody judged an item twice
    assert max(Counter(item for _, item, _ in rows).values()) <= overlap


def test_acknowledged_judgments_survive_kill_9(db_url, live_server):
    tokens = seed(db_url, items=400, overlap=1, people=4)
    server = live_server(db_url)
    annotators = [Annotator(server.url, t, i) for i, t in enumerate(tokens)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def work(a: Annotator):
        while not stop.is_set():
            try:
                a.judge_one()
            except httpx.HTTPError:
                return  # the server is gone mid-request: that submission was never acknowledged
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=work, args=(a,)) for a in annotators]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while sum(len(a.acknowledged) for a in annotators) < 30 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.kill()  # SIGKILL while submissions are in flight
    stop.set()
    for t in threads:
        t.join()
    assert errors == [], errors[:3]
    acknowledged = {x for a in annotators for x in a.acknowledged}
    assert len(acknowledged) >= 30
    saved = {r[0] for r in stored(db_url)}
    assert acknowledged <= saved  # every acknowledged judgment is on disk
    assert len(saved - acknowledged) <= len(annotators)  # at most the ones cut off before the reply

    restarted = live_server(db_url, port=server.port)
    a = annotators[0]
    a.http = httpx.Client(base_url=restarted.url, follow_redirects=False, timeout=60.0, cookies=a.http.cookies)
    assert a.judge_one()  # the old session cookie still works after the restart
    page = a.http.get("/")
    assert re.search(r"you: \d+ done", page.text)
