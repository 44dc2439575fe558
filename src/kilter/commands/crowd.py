"""A crowd of simulated annotators that judge through the feedback app's pages, as a browser does.

Each annotator is an HTTP client with its own cookie jar: it logs in on ``/login`` with the
form's CSRF token, opens ``/p/<project>`` (the app assigns it an item and shows the prompt and
the two responses in a shuffled order), decides with the built-in task's simulated labeler,
and posts the task form (``choice``, ``assignment_id`` and the page's ``csrf_token``) to
``/p/<project>/submit``. Nothing is written to the database behind the app's back, so the
simulated path exercises the same assignment, CSRF and idempotency code that people use.

Who is in the crowd (:class:`CrowdSection`): ``size`` annotators whose labeler noise is spread
between ``noise_min`` and ``noise_max``; each also flips a judgment with ``flip_rate``
probability (carelessness); the first ``trolls`` of them answer against their own judgment on
purpose (prefer the worse response), which the app's gold items and agreement statistics
should catch.
"""

from __future__ import annotations

import html
import re
import threading
from dataclasses import dataclass
from urllib.parse import quote

import httpx
from pydantic import Field

from kilter.config import BaseConfig
from kilter.data.labeler import SimulatedLabeler
from kilter.data.task import gold_score
from kilter.errors import KilterError

CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')
ASSIGNMENT_RE = re.compile(r'name="assignment_id" value="(\d+)"')
RAW_RE = re.compile(r'<pre class="response-raw" hidden>(.*?)</pre>', re.DOTALL)
# strength of a comparison -> the page's 8-point scale for the preferred side
_LEVEL = {0.25: "1", 0.5: "2", 0.75: "3", 1.0: "4"}


class CrowdSection(BaseConfig):
    """The simulated annotators of `simulated` and `both` modes."""

    size: int = Field(5, ge=1, le=64)
    """Annotators in the crowd."""
    noise_min: float = Field(0.1, ge=0)
    """Labeler noise of the most careful annotator (P(a beats b) = sigmoid(gold gap / noise))."""
    noise_max: float = Field(0.5, ge=0)
    """Labeler noise of the least careful annotator; the others are spread evenly in between."""
    flip_rate: float = Field(0.05, ge=0, le=1)
    """Probability that an annotator reverses a judgment by accident."""
    trolls: int = Field(1, ge=0)
    """How many annotators prefer the worse response on purpose (they should end up flagged)."""
    prefix: str = "sim"
    """Usernames are PREFIX-0, PREFIX-1, ..."""


@dataclass(frozen=True)
class Annotator:
    name: str
    noise: float
    flip_rate: float
    troll: bool


def crowd_members(cfg: CrowdSection) -> list[Annotator]:
    if cfg.noise_max < cfg.noise_min:
        raise KilterError(f"crowd.noise_max ({cfg.noise_max}) is below crowd.noise_min ({cfg.noise_min})")
    if cfg.trolls > cfg.size:
        raise KilterError(f"crowd.trolls ({cfg.trolls}) is more than crowd.size ({cfg.size})")
    step = (cfg.noise_max - cfg.noise_min) / max(1, cfg.size - 1)
    return [Annotator(f"{cfg.prefix}-{i}", cfg.noise_min + i * step, cfg.flip_rate, i < cfg.trolls)
            for i in range(cfg.size)]


class BrowserAnnotator:
    """One simulated person with a browser: a cookie jar, the last page's CSRF token, a labeler."""

    def __init__(self, who: Annotator, base_url: str, seed: int, transport: httpx.BaseTransport | None = None):
        self.who = who
        self.http = httpx.Client(base_url=base_url, follow_redirects=False, timeout=60.0, transport=transport)
        self.labeler = SimulatedLabeler(who.noise, who.flip_rate, seed)
        self.csrf = ""

    def close(self) -> None:
        self.http.close()

    def _get(self, url: str) -> httpx.Response:
        r = self.http.get(url)
        if m := CSRF_RE.search(r.text):
            self.csrf = m.group(1)
        return r

    def login(self, password: str) -> None:
        self._get("/login")
        r = self.http.post("/login", data={"username": self.who.name, "password": password, "next": "/",
                                           "csrf_token": self.csrf})
        if r.status_code != 303:
            raise KilterError(f"simulated annotator {self.who.name} could not log in (HTTP {r.status_code})")
        self._get("/")

    def judge_one(self, project: str) -> bool:
        """Open the project's next task and answer it; False when the app has nothing left for this person."""
        page = self._get(f"/p/{quote(project)}")
        if page.status_code != 200:
            raise KilterError(f"simulated annotator {self.who.name}: GET /p/{project} answered HTTP {page.status_code}")
        m = ASSIGNMENT_RE.search(page.text)
        if m is None:
            return False
        raw = [html.unescape(t) for t in RAW_RE.findall(page.text)]
        if len(raw) != 3:
            raise KilterError(f"simulated annotator {self.who.name}: expected a prompt and two responses on the "
                              f"task page of {project!r}, found {len(raw)} texts (is it a pairwise project?)")
        prompt, a, b = raw
        r = self.http.post(f"/p/{quote(project)}/submit", data={
            "csrf_token": self.csrf, "assignment_id": m.group(1), "choice": self.choose(prompt, a, b)})
        if r.status_code != 303:
            raise KilterError(f"simulated annotator {self.who.name}: the submission was refused (HTTP {r.status_code})")
        return True

    def choose(self, prompt: str, a: str, b: str) -> str:
        """The page's choice code (A4 ... B4, tie) for responses a (shown left) and b."""
        if a == b:
            return "tie"
        verdict = self.labeler.compare(prompt, a, b)
        a_wins = verdict["chosen"] == a
        if self.who.troll:
            a_wins = gold_score(prompt, a) < gold_score(prompt, b)
        return ("A" if a_wins else "B") + _LEVEL[verdict["strength"]]


def work(annotators: list[BrowserAnnotator], project: str, wanted: int, judged: callable, stop: threading.Event | None = None,
         on_judgment: callable | None = None) -> int:
    """Annotators take turns until ``judged()`` reaches ``wanted`` or nobody gets a task; returns judgments made.

    ``judged`` reads the count from the database, so a resumed round continues from what is
    really stored. ``on_judgment`` runs after each submission (tests interrupt through it).
    """
    made = 0
    active = list(annotators)
    while active and judged() < wanted:
        if stop is not None and stop.is_set():
            break
        for person in list(active):
            if judged() >= wanted:
                break
            if person.judge_one(project):
                made += 1
                if on_judgment is not None:
                    on_judgment(made)
            else:
                active.remove(person)
    return made
