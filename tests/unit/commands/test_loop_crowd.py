"""Simulated annotators judge through the feedback app's real HTTP pages (a uvicorn server on localhost):
login with the form's CSRF token, the app's own assignment, the task form; a POST without the CSRF
token is refused for them as for anyone. Also: active selection picks the most disputed pairs."""

from __future__ import annotations

import math

import httpx
import pytest

from kilter.commands.crowd import ASSIGNMENT_RE, Annotator, BrowserAnnotator, CrowdSection, crowd_members, work
from kilter.commands.loop import disagreement_pairs, gap_spread, information_gain, serve_in_thread
from kilter.data.task import gold_score
from kilter.errors import KilterError
from kilter.feedback.importer import parse_row
from kilter.feedback.store import Store

GOOD = "The {p} is great. I love the {p}, it works well."
BAD = "It is bad. It is bad. It is bad."
PRODUCTS = ["kayak", "mouse", "router", "grinder"]


@pytest.fixture
def served(tmp_path):
    db = str(tmp_path / "feedback.db")
    store = Store(db)
    store.migrate()
    store.create_project("arena", "pairwise")
    rows = [parse_row({"prompt": f"Review the {p}.", "responses": [BAD, GOOD.format(p=p)]}, f"row {i}")
            for i, p in enumerate(PRODUCTS)]
    store.import_prompts("arena", rows)
    for name in ("honest", "troll"):
        store.create_user(name, password="password123", projects=["arena"])
    with serve_in_thread(db) as url:
        yield store, url
    store.close()


def _person(name, url, troll=False):
    return BrowserAnnotator(Annotator(name, noise=0.0, flip_rate=0.0, troll=troll), url, seed=0)


def test_the_gap_is_clear_on_the_built_in_task():
    for p in PRODUCTS:
        assert gold_score(f"Review the {p}.", GOOD.format(p=p)) > gold_score(f"Review the {p}.", BAD) + 0.5


def test_honest_annotator_and_troll_judge_through_the_pages(served):
    store, url = served
    honest, troll = _person("honest", url), _person("troll", url, troll=True)
    try:
        honest.login("password123")
        troll.login("password123")
        project = store.project("arena")
        judged = lambda: len(store.judgments(project))  # noqa: E731
        assert work([honest, troll], "arena", len(PRODUCTS), judged) == len(PRODUCTS)
    finally:
        honest.close()
        troll.close()
    records = store.judgments(project)
    assert len(records) == len(PRODUCTS) and {r.user for r in records} == {"honest", "troll"}
    for rec in records:
        preferred = next(c.text for c in rec.candidates if c.id == rec.preferred_candidate_id)
        assert (preferred == BAD) == (rec.user == "troll"), (rec.user, preferred)
        assert rec.strength == 1.0  # a large gap: "much better" on the 8-point scale


def test_a_post_without_the_csrf_token_is_refused_for_them_too(served):
    store, url = served
    person = _person("honest", url)
    try:
        person.login("password123")
        page = person.http.get("/p/arena")
        assignment = ASSIGNMENT_RE.search(page.text).group(1)
        r = person.http.post("/p/arena/submit", data={"assignment_id": assignment, "choice": "A4"})
        assert r.status_code == 403
        r = person.http.post("/p/arena/submit", data={"assignment_id": assignment, "choice": "A4",
                                                      "csrf_token": "forged"})
        assert r.status_code == 403
        assert store.judgments(store.project("arena")) == []
        assert person.judge_one("arena")  # the same assignment, now with the page's token
        assert len(store.judgments(store.project("arena"))) == 1
    finally:
        person.close()


def test_a_wrong_password_is_one_error_line(served):
    _, url = served
    person = _person("honest", url)
    try:
        with pytest.raises(KilterError, match="could not log in"):
            person.login("wrong-password")
    finally:
        person.close()


def test_nothing_reaches_the_database_without_http(served):
    """The crowd holds no store handle: its only way in is the server (an unreachable one fails)."""
    person = BrowserAnnotator(Annotator("honest", 0.0, 0.0, False), "http://127.0.0.1:9", seed=0)
    try:
        with pytest.raises(httpx.ConnectError):
            person.login("password123")
    finally:
        person.close()


def test_crowd_members_spread_noise_and_name_the_trolls():
    members = crowd_members(CrowdSection(size=5, noise_min=0.1, noise_max=0.5, trolls=1))
    assert [m.name for m in members] == [f"sim-{i}" for i in range(5)]
    assert [round(m.noise, 3) for m in members] == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert [m.troll for m in members] == [True, False, False, False, False]
    with pytest.raises(KilterError, match="trolls"):
        crowd_members(CrowdSection(size=2, trolls=3))


def test_active_selection_picks_the_highest_disagreement_pairs():
    # (P=3 prompts, K=3 responses, M=2 members)
    scores = [
        [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]],    # the members agree on every pair: spread 0
        [[0.0, 2.0], [0.0, 0.0], [1.0, 1.0]],    # pair (0, 1): diffs 0 and 2 -> spread 1; (0, 2): -1, 1 -> 1
        [[3.0, -3.0], [0.0, 0.0], [0.5, 0.5]],   # pair (0, 1): diffs 3 and -3 -> spread 3 (the most disputed)
    ]
    assert disagreement_pairs(scores, 2) == [(2, 0, 1), (1, 0, 1)]
    assert disagreement_pairs(scores, 5)[-1][0] == 0  # agreed prompts come last
    assert disagreement_pairs(scores, 1) == [(2, 0, 1)]


def test_information_gain_worked_by_hand_and_it_picks_confident_disagreement():
    # gaps (+1, -1): p = sigmoid(+-1) = 0.7311, 0.2689; H(mean 0.5) = ln 2; H(0.7311) = 0.5822
    p = 1 / (1 + math.exp(-1))
    h = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert h == pytest.approx(0.58220, abs=1e-5)
    assert information_gain([1.0, -1.0]) == pytest.approx(math.log(2) - h)
    assert information_gain([1.0, -1.0]) == pytest.approx(0.11095, abs=1e-5)
    assert information_gain([0.0, 0.0]) == 0.0  # both unsure, but a label tells the ensemble nothing new
    assert information_gain([10.0, 14.0]) < 1e-4  # both sure of the same answer
    # gaps (ln 3, -ln 3): p = 0.75, 0.25 -> ln 2 - H(0.75) = 0.6931 - 0.5623
    assert information_gain([math.log(3), -math.log(3)]) == pytest.approx(0.13081, abs=1e-5)
    # the two criteria differ: the spread of gaps prefers (10, 14) (spread 2) to (1, -1) (spread 1); BALD does not
    scores = [
        [[10.0, 14.0], [0.0, 0.0]],   # prompt 0: gaps (10, 14)
        [[1.0, -1.0], [0.0, 0.0]],    # prompt 1: gaps (1, -1)
    ]
    assert disagreement_pairs(scores, 1) == [(0, 0, 1)]
    assert disagreement_pairs(scores, 1, information_gain) == [(1, 0, 1)]
    assert disagreement_pairs(scores, 2, gap_spread) == [(0, 0, 1), (1, 0, 1)]
