"""The web app through an in-process client, on a temp SQLite file and on PostgreSQL."""

import json
import re
import time

import pytest
from feedback_testlib import Client, invited, seed_project

from kilter.data.records import validate_record
from kilter.errors import KilterError
from kilter.feedback.settings import ServeConfig


def shown_order(html: str, texts: list[str]) -> list[str]:
    """The given response texts sorted by where they appear on the page."""
    return sorted(texts, key=html.index)


@pytest.fixture
def ann(app):
    """An annotator client logged in through an invite link."""
    token = invited(app.state.store, "ann")
    client = Client(app)
    client.login_invite(token)
    return client


@pytest.fixture
def admin(app):
    token = invited(app.state.store, "boss", role="admin")
    client = Client(app)
    client.login_invite(token)
    return client


@pytest.mark.parametrize("path", ["/", "/p/anything", "/admin", "/admin/p/anything"])
def test_every_page_but_login_needs_a_session(app, path):
    r = Client(app).get(path)
    assert r.status_code == 303
    assert r.headers["location"].startswith("/login?next=")


def test_password_login_and_logout(app):
    app.state.store.create_user("pat", "annotator", "password123")
    client = Client(app)
    r = client.get("/login?next=/admin")
    assert r.status_code == 200 and 'name="password"' in r.text
    r = client.post("/login", {"username": "pat", "password": "password123", "next": "/p/x"})
    assert (r.status_code, r.headers["location"]) == (303, "/p/x")
    home = client.get("/")
    assert home.status_code == 200 and "pat" in home.text
    r = client.post("/logout")
    assert (r.status_code, r.headers["location"]) == (303, "/login")
    assert client.get("/").status_code == 303


def test_invite_link_works_once_and_never_replaces_a_password(app):
    store = app.state.store
    token = invited(store, "newbie")
    client = Client(app)
    client.get(f"/invite/{token}")
    assert client.post(f"/invite/{token}", {"password": "first-pass", "password2": "first-pass"}).status_code == 303
    thief = Client(app)  # someone else holding the same link, before or after the password was set
    assert thief.get(f"/invite/{token}").status_code == 404
    thief.get("/login")
    assert thief.post(f"/invite/{token}", {"password": "stolen-pass", "password2": "stolen-pass"}).status_code == 404
    assert store.check_password("newbie", "first-pass") is not None
    assert store.check_password("newbie", "stolen-pass") is None
    with pytest.raises(KilterError, match="already has a password"):
        store.new_invite("newbie")
    # an admin's link too: it logs in once, and a second use is refused
    boss = invited(store, "boss", role="admin")
    Client(app).login_invite(boss)
    again = Client(app)
    again.get("/login")
    assert again.post(f"/invite/{boss}", {}).status_code == 404


def test_invite_links_expire(app_factory, sqlite_path):
    app = app_factory(sqlite_path, invite_hours=0.0003)  # about one second
    admin = Client(app)
    admin.login_invite(invited(app.state.store, "boss", role="admin"))
    assert admin.post("/admin/users", {"username": "late"}).status_code == 303
    link = admin.get("/admin").text.split('id="invite-link">')[1].split("<")[0]
    token = link.rsplit("/", 1)[1]
    assert Client(app).get(f"/invite/{token}").status_code == 200
    time.sleep(1.3)
    assert Client(app).get(f"/invite/{token}").status_code == 404
    assert ServeConfig().invite_hours == 72


def test_logout_revokes_the_session_and_lifetime_is_absolute(app_factory, sqlite_path):
    max_age = 4
    app = app_factory(sqlite_path, session_max_age_s=max_age)
    client = Client(app)
    client.login_invite(invited(app.state.store, "pat"))
    copied = Client(app)
    copied.http.cookies.set("kilter_session", client.http.cookies.get("kilter_session"))
    assert copied.get("/").status_code == 200
    client.post("/logout")
    assert copied.get("/").status_code == 303  # the copied cookie died with the logout
    other = Client(app)
    other.login_invite(invited(app.state.store, "sam"))
    started = time.monotonic()  # the session was created just before this
    assert other.get("/").status_code == 200
    for _ in range(3):  # activity does not extend the lifetime
        time.sleep(0.5)
        if time.monotonic() - started < max_age - 1.5:  # clearly inside the lifetime, however slow the machine
            assert other.get("/").status_code == 200
    time.sleep(max(0.0, started + max_age + 0.5 - time.monotonic()))
    assert other.get("/").status_code == 303  # expired at its absolute age despite the activity


def test_invite_link_logs_in_and_can_set_a_password(app):
    store = app.state.store
    token = invited(store, "newbie")
    client = Client(app)
    page = client.get(f"/invite/{token}")
    assert page.status_code == 200 and "Welcome, newbie" in page.text
    bad = client.post(f"/invite/{token}", {"password": "abcdefgh", "password2": "different"})
    assert bad.status_code == 422 and "differ" in bad.text
    r = client.post(f"/invite/{token}", {"password": "abcdefgh1", "password2": "abcdefgh1"})
    assert r.status_code == 303
    assert client.get("/").status_code == 200
    assert store.check_password("newbie", "abcdefgh1") is not None
    assert Client(app).get("/invite/not-a-real-token").status_code == 404


def test_pairwise_judgment_round_trip(app, ann):
    store = app.state.store
    project = seed_project(store, "pw", "pairwise", n_prompts=2)
    page, assignment = ann.task("pw")
    assert page.status_code == 200
    assert "pw prompt" in page.text and "A much better" in page.text and "Both bad" in page.text
    texts = [t for t in ("pw p0 response 0", "pw p0 response 1", "pw p1 response 0", "pw p1 response 1") if t in page.text]
    left, right = shown_order(page.text, texts)
    r = ann.post("/p/pw/submit", {"assignment_id": assignment, "choice": "A3", "flags_1": ["hallucination"],
                                  "comment": "left is clearer"})
    assert (r.status_code, r.headers["location"]) == (303, "/p/pw?saved=1")
    (rec,) = store.judgments(project)
    by_id = {c.id: c.text for c in rec.candidates}
    assert by_id[rec.preferred_candidate_id] == left  # "A better" = the response shown on the left
    assert rec.strength == 0.75 and rec.choice == "A3" and rec.comment == "left is clearer"
    assert [by_id[c] for c in rec.display_order] == [left, right]
    assert rec.responses[1]["flags"] == ["hallucination"]
    after, next_assignment = ann.task("pw")
    assert "Saved" in ann.get("/p/pw?saved=1").text
    assert next_assignment != assignment and "<strong>1</strong> done, 1 to go" in after.text


def test_ranking_judgment_round_trip(app, ann):
    store = app.state.store
    project = seed_project(store, "rk", "ranking", n_prompts=1, k=3)
    page, assignment = ann.task("rk")
    shown = shown_order(page.text, [f"rk p0 response {i}" for i in range(3)])
    r = ann.post("/p/rk/submit", {"assignment_id": assignment, "rank_0": "2", "rank_1": "1", "rank_2": "3",
                                  "score_0": "5", "score_1": "7", "score_2": "1", "flags_2": ["harmful", "instruction"]})
    assert r.status_code == 303
    (rec,) = store.judgments(project)
    text_of = {c.id: c.text for c in rec.candidates}
    got = {text_of[e["candidate"]]: (e["rank"], e["score"], e["flags"]) for e in rec.responses}
    assert got == {shown[0]: (2, 5, []), shown[1]: (1, 7, []), shown[2]: (3, 1, ["instruction", "harmful"])}


@pytest.mark.parametrize("task, fields, column, expected", [
    ("rating", {"label": "down"}, "label", False),
    ("edit", {"text": "A better answer."}, "text", "A better answer."),
    ("demonstration", {"text": "What I would say."}, "text", "What I would say."),
])
def test_other_tasks_round_trip(app, ann, task, fields, column, expected):
    store = app.state.store
    project = seed_project(store, task, task, n_prompts=1, k=1)
    page, assignment = ann.task(task)
    assert page.status_code == 200 and f"{task} prompt 0" in page.text
    if task == "edit":
        assert page.text.count(f"{task} p0 response 0") == 3  # rendered, as plain text, and pre-filled in the editor
    r = ann.post(f"/p/{task}/submit", {"assignment_id": assignment, **fields})
    assert r.status_code == 303
    (rec,) = store.judgments(project)
    assert getattr(rec, column) == expected


def test_incomplete_form_is_refused_and_keeps_the_text(app, ann):
    store = app.state.store
    project = seed_project(store, "ed", "edit", n_prompts=1, k=1)
    _, assignment = ann.task("ed")
    r = ann.post("/p/ed/submit", {"assignment_id": assignment, "text": "   ", "comment": "my note"})
    assert r.status_code == 422 and "Please fill in the edited response" in r.text
    assert "my note" in r.text
    assert store.judgments(project) == []
    rk = seed_project(store, "rk", "ranking", n_prompts=1, k=2)
    _, assignment = ann.task("rk")
    r = ann.post("/p/rk/submit", {"assignment_id": assignment, "rank_0": "1"})
    assert r.status_code == 422 and "Please choose the 1-7 score of response A" in r.text
    assert store.judgments(rk) == []


def test_refused_form_keeps_the_choice_ranks_scores_and_flags(app, ann):
    store = app.state.store
    seed_project(store, "rk", "ranking", n_prompts=1, k=3)
    _, assignment = ann.task("rk")
    r = ann.post("/p/rk/submit", {"assignment_id": assignment, "rank_0": "2", "rank_1": "1", "score_0": "6",
                                  "flags_2": ["harmful", "opinion"], "comment": "half done"})
    assert r.status_code == 422
    assert '<option value="2" selected>' in r.text and '<option value="1" selected>' in r.text
    assert re.search(r'name="score_0" value="6"[^>]*checked', r.text)
    assert re.search(r'name="flags_2" value="harmful"[^>]*checked', r.text)
    assert re.search(r'name="flags_2" value="opinion"[^>]*checked', r.text)
    assert len(re.findall(r"\schecked", r.text)) == 3 and "half done" in r.text
    pw = seed_project(store, "pw", "pairwise", n_prompts=1)
    _, assignment = ann.task("pw")
    r = ann.post("/p/pw/submit", {"assignment_id": assignment, "choice": "A9", "flags_1": "sexual"})
    assert r.status_code == 422 and re.search(r'name="flags_1" value="sexual"[^>]*checked', r.text)
    r = ann.post("/p/pw/submit", {"assignment_id": assignment, "choice": "B2", "flags_0": "nonsense"})
    assert r.status_code == 422 and re.search(r'name="choice" value="B2"[^>]*checked', r.text)
    assert store.judgments(pw) == []


def test_double_submit_stores_one_judgment(app, ann):
    store = app.state.store
    project = seed_project(store, "pw", "pairwise", n_prompts=2)
    _, assignment = ann.task("pw")
    for _ in range(3):
        assert ann.post("/p/pw/submit", {"assignment_id": assignment, "choice": "B4"}).status_code == 303
    assert len(store.judgments(project)) == 1


def test_skip_then_done_page(app, ann):
    store = app.state.store
    project = seed_project(store, "pw", "pairwise", n_prompts=1)
    _, assignment = ann.task("pw")
    asked = ann.post("/p/pw/skip", {"assignment_id": assignment})  # no reason yet: the app asks for one
    assert asked.status_code == 200 and "Why skip this item?" in asked.text and 'value="expertise"' in asked.text
    assert ann.task("pw")[1] == assignment  # not skipped yet
    assert ann.post("/p/pw/skip", {"assignment_id": assignment, "reason": "expertise"}).status_code == 303
    page, none = ann.task("pw")
    assert none is None and "All done here" in page.text
    assert store.judgments(project) == []


def test_home_lists_only_my_projects(app, ann):
    store = app.state.store
    seed_project(store, "mine", "rating", n_prompts=1, k=1)
    seed_project(store, "other", "rating", n_prompts=1, k=1, members=())
    page = ann.get("/")
    assert "/p/mine" in page.text and "/p/other" not in page.text


def battle_project(store, annotators=("ann",)):
    """Three models, 2 prompts each; everyone prefers strong > medium > weak ("B/A much better")."""
    project = seed_project(store, "arena", "pairwise", n_prompts=4, k=3, models=["weak", "strong", "medium"],
                           members=annotators, overlap=len(annotators))
    rank = {"strong": 0, "medium": 1, "weak": 2}
    from kilter.feedback.tasks import parse_submission

    for name in annotators:
        user = next(u for u in store.users() if u.username == name)
        while (view := store.next_task(project, user)) is not None:
            left, right = view.responses
            choice = "A4" if rank[left.model] < rank[right.model] else "B4"
            store.submit(project, user, view.assignment_id,
                         lambda shown, c=choice: parse_submission("pairwise", lambda n: {"choice": [c]}.get(n, []), shown))
    return project


def test_admin_project_page_shows_progress_agreement_and_leaderboard(app, admin):
    store = app.state.store
    for name in ("ann", "bob"):
        invited(store, name)
    battle_project(store, annotators=("ann", "bob"))
    page = admin.get("/admin/p/arena")
    assert page.status_code == 200
    # 4 prompts x 3 cross-model pairs = 12 items, each judged by both annotators
    assert "12<span class=\"muted\">/12</span>" in page.text
    assert "Krippendorff" in page.text and "1.00" in page.text  # they always agree
    board = page.text[page.text.index('id="leaderboard"'):]
    assert board.index("strong") < board.index("medium") < board.index("weak")
    overview = admin.get("/admin")
    assert "/admin/p/arena" in overview.text and "ann" in overview.text


def test_admin_leaderboard_says_when_flagged_annotators_took_every_battle(app, admin, monkeypatch):
    store = app.state.store
    invited(store, "ann")
    battle_project(store, annotators=("ann",))
    from kilter.feedback import analysis

    real = analysis.quality

    def everyone_flagged(records, task, **kw):
        report = real(records, task, **kw)
        for a in report.annotators:
            a.reasons = ["test: flagged"]
        return report

    monkeypatch.setattr(analysis, "quality", everyone_flagged)
    board = admin.get("/admin/p/arena").text.split('id="leaderboard"')[1]
    assert "No battles yet" not in board
    assert "12 battles judged by flagged annotators (ann) are left out" in board and "No battles are left" in board


def test_admin_can_add_people_and_members(app, admin):
    store = app.state.store
    seed_project(store, "pw", "pairwise", n_prompts=1, members=())
    r = admin.post("/admin/users", {"username": "carol", "role": "annotator", "projects": ["pw"]})
    assert (r.status_code, r.headers["location"]) == (303, "/admin")  # a reload does not create carol twice
    page = admin.get("/admin")
    assert "/invite/" in page.text
    link = page.text.split('id="invite-link">')[1].split("<")[0]
    assert 'id="invite-link"' not in admin.get("/admin").text  # shown once
    r = admin.post("/admin/users", {"username": "erin", "projects": ["pw", "nosuch"]})
    assert r.status_code == 422 and "No project named" in r.text
    assert "erin" not in [u.username for u in store.users()]  # nothing created
    carol = Client(app)
    carol.login_invite(link.rsplit("/", 1)[1])
    assert carol.task("pw")[1] is not None
    assert admin.post("/admin/users", {"username": "carol"}).status_code == 422  # exists already
    invited(store, "dave")
    assert admin.post("/admin/p/pw/members", {"username": "dave"}).status_code == 303
    assert "dave" in store.members(store.project("pw").id)
    assert admin.post("/admin/users/carol/active", {"active": "0"}).status_code == 303
    assert carol.get("/").status_code == 303  # deactivation ends the session


def test_admin_export_download_is_training_ready(app, admin):
    store = app.state.store
    invited(store, "ann")
    battle_project(store)
    r = admin.get("/admin/p/arena/export?kind=comparisons")
    assert r.status_code == 200 and "attachment" in r.headers["content-disposition"]
    rows = [json.loads(line) for line in r.text.splitlines()]
    assert len(rows) == 12
    for row in rows:
        validate_record(row, "comparison")
        assert row["strength"] == 1.0
    raw = [json.loads(line) for line in admin.get("/admin/p/arena/export?kind=raw").text.splitlines()]
    assert {row["annotator"] for row in raw} == {"ann"} and len(raw) == 12
    assert admin.get("/admin/p/arena/export?kind=ratings").status_code == 404


def test_skipped_items_keep_their_reason_and_can_be_done_later(app, ann):
    store = app.state.store
    project = seed_project(store, "pw", "pairwise", n_prompts=2)
    _, first = ann.task("pw")
    assert ann.post("/p/pw/skip", {"assignment_id": first, "reason": "unclear"}).status_code == 303
    _, second = ann.task("pw")
    assert second != first
    page = ann.get("/p/pw/history")
    assert "The prompt or the responses are unclear" in page.text
    assert ann.post(f"/p/pw/skipped/{first}/reopen").status_code == 303
    assert ann.task("pw")[1] == first  # the skipped item is back, before anything else
    assert ann.post("/p/pw/submit", {"assignment_id": first, "choice": "B2"}).status_code == 303
    assert [r.choice for r in store.judgments(project)] == ["B2"]
    assert ann.post(f"/p/pw/skipped/{first}/reopen").status_code == 409  # done now, not skipped
    assert ann.post(f"/p/pw/skipped/{10**30}/reopen").status_code == 409


def test_an_answer_can_be_changed_and_every_version_is_kept(app, ann):
    store = app.state.store
    project = seed_project(store, "rk", "ranking", n_prompts=1, k=2)
    _, assignment = ann.task("rk")
    first = {"assignment_id": assignment, "rank_0": "1", "rank_1": "2", "score_0": "6", "score_1": "2",
             "flags_1": "harmful", "comment": "first try"}
    assert ann.post("/p/rk/submit", first).status_code == 303
    (rec,) = store.judgments(project)
    history = ann.get("/p/rk/history")
    assert f'/p/rk/j/{rec.id}' in history.text and "A &gt; B" in history.text
    form = ann.get(f"/p/rk/j/{rec.id}")  # the earlier answer, filled in
    assert form.status_code == 200 and "Changing your earlier answer" in form.text
    assert re.search(r'name="flags_1" value="harmful"[^>]*checked', form.text) and "first try" in form.text
    assert f'action="/p/rk/j/{rec.id}"' in form.text and "data-skip" not in form.text
    bad = ann.post(f"/p/rk/j/{rec.id}", {"rank_0": "2"})
    assert bad.status_code == 422
    r = ann.post(f"/p/rk/j/{rec.id}", {"rank_0": "2", "rank_1": "1", "score_0": "3", "score_1": "5", "comment": "on reflection"})
    assert (r.status_code, r.headers["location"]) == (303, "/p/rk/history?changed=1")
    (now,) = store.judgments(project)
    assert now.id == rec.id and now.version == 2 and now.comment == "on reflection"
    assert [(e["rank"], e["score"], e["flags"]) for e in now.responses] == [(2, 3, []), (1, 5, [])]
    (old,) = store.versions(rec.id)
    assert old["version"] == 1 and old["comment"] == "first try" and old["responses"][1]["flags"] == ["harmful"]
    other = Client(app)
    other.login_invite(invited(store, "eve"))
    store.add_member("rk", "eve")
    assert other.get(f"/p/rk/j/{rec.id}").status_code == 404  # only your own
    assert other.post(f"/p/rk/j/{rec.id}", {"rank_0": "1", "rank_1": "2", "score_0": "1", "score_1": "1"}).status_code == 404
    (raw,) = export_raw(store, project)
    assert raw["version"] == 2


def export_raw(store, project):
    from kilter.feedback import export

    return export.build(store.judgments(project), project.task, "raw", project=project.name)


def test_tournament_votes_reveal_the_models_afterwards(app, ann):
    store = app.state.store
    seed_project(store, "arena", "pairwise", n_prompts=2, models=["sft", "ppo"])
    page, assignment = ann.task("arena")
    assert "sft" not in page.text.split('id="task-form"')[1] and "data-revealed" not in page.text
    shown = shown_order(page.text, [t for t in ("arena p0 response 0", "arena p0 response 1") if t in page.text])
    ann.post("/p/arena/submit", {"assignment_id": assignment, "choice": "A1"})
    after, _ = ann.task("arena")
    models = {"arena p0 response 0": "sft", "arena p0 response 1": "ppo"}
    assert f"<strong>A</strong> was <strong>{models[shown[0]]}</strong>, <strong>B</strong> was <strong>{models[shown[1]]}</strong>" in after.text
    assert "data-revealed" not in ann.task("arena")[0].text  # said once


def test_reviewers_accept_or_reject_with_a_reason_and_rejected_judgments_leave_the_export(app, ann):
    from kilter.feedback import export

    store = app.state.store
    project = seed_project(store, "ed", "edit", n_prompts=2, k=1, members=("ann",))
    for text in ("A much better answer.", "Another fix."):
        _, assignment = ann.task("ed")
        ann.post("/p/ed/submit", {"assignment_id": assignment, "text": text})
    reviewer = Client(app)
    reviewer.login_invite(invited(store, "rita", role="reviewer"))
    store.add_member("ed", "rita")
    page = reviewer.get("/review/p/ed")
    assert page.status_code == 200 and page.text.count('class="card review-item"') == 2
    assert "<ins>" in page.text and "<del>" in page.text  # the edit as a diff
    first, second = store.judgments(project)
    assert reviewer.post(f"/review/p/ed/j/{first.id}", {"verdict": "reject"}).status_code == 422  # needs a reason
    r = reviewer.post(f"/review/p/ed/j/{first.id}", {"verdict": "reject", "reason": "made things up", "back": "/review/p/ed"})
    assert r.status_code == 303
    assert reviewer.post(f"/review/p/ed/j/{second.id}", {"verdict": "accept"}).status_code == 303
    records = store.judgments(project)
    assert [(r.review, r.review_reason, r.reviewer) for r in records] == [
        ("reject", "made things up", "rita"), ("accept", "", "rita")]
    assert [row["chosen"] for row in export.build(records, "edit", "comparisons")] == ["Another fix."]
    assert len(export.build(records, "edit", "comparisons", include_rejected=True)) == 2
    assert "made things up" in reviewer.get("/review/p/ed?show=reject").text
    assert ann.get("/review/p/ed").status_code == 403  # annotators do not review
    author = next(u for u in store.users() if u.username == "ann")
    with pytest.raises(KilterError, match="your own"):
        store.review(project, author, first.id, "accept")


def test_admin_runs_a_project_from_the_browser_and_every_action_is_audited(app, admin):
    store = app.state.store
    invited(store, "ann")
    r = admin.post("/admin/projects", {"name": "web1", "task": "pairwise", "overlap": "2", "title": "From the web",
                                       "instructions": "Be **kind**."})
    assert (r.status_code, r.headers["location"]) == (303, "/admin/p/web1")
    assert admin.post("/admin/projects", {"name": "web1", "task": "pairwise"}).status_code == 422
    assert admin.post("/admin/projects", {"name": "web2", "task": "pairwise", "overlap": "two"}).status_code == 422
    lines = [json.dumps({"prompt": f"q{i}", "category": "coding" if i % 2 else "chat",
                         "responses": [f"answer {i} a", f"answer {i} b"]}) for i in range(4)]
    upload = {"file": ("items.jsonl", ("\n".join(lines) + "\n").encode(), "application/x-ndjson")}
    r = admin.http.post("/admin/p/web1/import", data={"csrf_token": admin.csrf}, files=upload)
    assert r.status_code == 303
    assert "Imported 4 prompts, 8 responses -&gt; 4 items" in admin.get("/admin/p/web1").text
    bad = {"file": ("bad.jsonl", b'{"prompt": "x", "responses": ["same", "same"]}\n', "application/x-ndjson")}
    r = admin.http.post("/admin/p/web1/import", data={"csrf_token": admin.csrf}, files=bad)
    assert r.status_code == 422 and "bad.jsonl line 1" in r.text.lower()
    r = admin.post("/admin/p/web1/settings", {"title": "Renamed", "overlap": "1", "gold_fraction": "0",
                                               "instructions": "New rules."})
    assert r.status_code == 303 and store.project("web1").overlap == 1 and store.project("web1").title == "Renamed"
    assert admin.post("/admin/p/web1/settings", {"overlap": "0"}).status_code == 422
    assert admin.post("/admin/p/web1/members", {"username": "ann"}).status_code == 303
    assert admin.post("/admin/p/web1/members/remove", {"username": "ann"}).status_code == 303
    assert store.members(store.project("web1").id) == []
    assert admin.get("/admin/p/web1/export").status_code == 200
    log = admin.get("/admin/audit").text
    for action in ("project.create", "project.import", "project.settings", "project.member.add",
                   "project.member.remove", "project.export"):
        assert action in log, action
    assert "overlap: [2, 1]" in log


def test_admin_browses_and_searches_judgments(app, admin):
    store = app.state.store
    invited(store, "ann")
    invited(store, "bob")
    project = battle_project(store, annotators=("ann", "bob"))
    page = admin.get("/admin/p/arena/judgments")
    assert page.status_code == 200 and "24 found" in page.text
    assert "12 found" in admin.get("/admin/p/arena/judgments?annotator=bob").text
    some = store.judgments(project)[0]
    needle = some.candidates[0].text
    hits = admin.get("/admin/p/arena/judgments", params={"q": needle}).text
    assert f"{sum(needle in [c.text for c in r.candidates] for r in store.judgments(project))} found" in hits
    assert "0 found" in admin.get("/admin/p/arena/judgments?review=reject").text
    assert admin.get("/admin/p/arena/judgments?review=maybe").status_code == 400


def test_edit_diff_preview(app, ann):
    store = app.state.store
    seed_project(store, "ed", "edit", n_prompts=1, k=1)
    _, assignment = ann.task("ed")
    r = ann.post("/p/ed/diff", {"assignment_id": assignment, "text": "ed p0 response 0, <b>improved</b>"})
    assert r.status_code == 200 and "<ins>" in r.text and "&lt;b&gt;improved" in r.text and "<b>" not in r.text
    same = ann.post("/p/ed/diff", {"assignment_id": assignment, "text": "ed p0 response 0\r\n"})
    assert "unchanged" in same.text
    seed_project(store, "pw", "pairwise", n_prompts=1)
    assert ann.post("/p/pw/diff", {"assignment_id": assignment, "text": "x"}).status_code == 400
    other = Client(app)
    other.login_invite(invited(store, "eve"))
    store.add_member("ed", "eve")
    assert other.post("/p/ed/diff", {"assignment_id": assignment, "text": "x"}).status_code == 409
