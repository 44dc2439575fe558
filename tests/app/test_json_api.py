"""The JSON API (/api/v1) the online loop uses: token auth, import, progress, judgments, export."""

import pytest
from feedback_testlib import Client, invited, seed_project

from kilter.data.records import validate_record


@pytest.fixture
def tokens(app):
    store = app.state.store
    store.create_user("boss", "admin")
    store.create_user("ann")
    return {"admin": store.create_api_token("boss", "loop"), "ann": store.create_api_token("ann")}


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def test_the_online_loop_publishes_items_follows_progress_and_exports(app, tokens):
    http = Client(app).http
    admin = bearer(tokens["admin"])
    r = http.post("/api/v1/projects", json={"name": "loop1", "task": "pairwise", "overlap": 1}, headers=admin)
    assert r.status_code == 201 and r.json()["task"] == "pairwise"
    rows = [{"prompt": f"question {i}", "id": f"q{i}",
             "responses": [{"text": f"policy answer {i}", "model": "policy"}, {"text": f"ref answer {i}", "model": "ref"}]}
            for i in range(3)]
    r = http.post("/api/v1/projects/loop1/items", json={"rows": rows}, headers=admin)
    assert r.json() == {"project": "loop1", "prompts": 3, "candidates": 6, "items": 3, "gold_items": 0}
    app.state.store.add_member("loop1", "ann")

    ann = Client(app)
    ann.login_invite(app.state.store.new_invite("ann"))
    for choice in ("A4", "B1", "tie"):
        _, assignment = ann.task("loop1")
        assert ann.post("/p/loop1/submit", {"assignment_id": assignment, "choice": choice}).status_code == 303

    progress = http.get("/api/v1/projects/loop1", headers=admin).json()
    assert (progress["items"], progress["complete_items"], progress["judgments"]) == (3, 3, 3)
    assert progress["per_annotator"] == {"ann": 3}
    first = http.get("/api/v1/projects/loop1/judgments?limit=2", headers=admin).json()
    assert len(first["judgments"]) == 2
    rest = http.get(f"/api/v1/projects/loop1/judgments?after={first['next_after']}", headers=admin).json()
    assert [j["choice"] for j in first["judgments"] + rest["judgments"]] == ["A4", "B1", "tie"]
    exported = http.get("/api/v1/projects/loop1/export", headers=admin).json()
    assert exported["kind"] == "comparisons" and len(exported["records"]) == 2  # the tie is no comparison
    for row in exported["records"]:
        validate_record(row, "comparison")


def test_same_authorisation_as_the_pages(app, tokens):
    http = Client(app).http
    seed_project(app.state.store, "mine", "pairwise", n_prompts=1, members=("ann",))
    seed_project(app.state.store, "other", "pairwise", n_prompts=1, members=())
    ann = bearer(tokens["ann"])
    assert [p["name"] for p in http.get("/api/v1/projects", headers=ann).json()["projects"]] == ["mine"]
    assert http.get("/api/v1/projects/mine", headers=ann).json()["you"] == {"done": 0, "skipped": 0, "remaining": 1}
    assert http.get("/api/v1/projects/other", headers=ann).status_code == 403
    assert http.get("/api/v1/projects/mine/export", headers=ann).status_code == 403
    assert http.post("/api/v1/projects/mine/items", json={"rows": []}, headers=ann).status_code == 403
    r = http.get("/api/v1/projects")
    assert r.status_code == 401 and "Bearer" in r.json()["error"]
    assert http.get("/api/v1/projects", headers=bearer("klt_forged")).status_code == 401
    app.state.store.set_active("ann", False)
    assert http.get("/api/v1/projects", headers=ann).status_code == 401  # a deactivated account's tokens die


def test_a_browser_session_works_but_must_send_the_csrf_header_to_change_data(app):
    admin = Client(app)
    admin.login_invite(invited(app.state.store, "boss", "admin"))
    assert admin.http.get("/api/v1/projects").status_code == 200
    body = {"name": "viacookie", "task": "rating"}
    assert admin.http.post("/api/v1/projects", json=body).status_code == 403
    assert admin.http.post("/api/v1/projects", json=body, headers={"X-CSRF-Token": admin.csrf}).status_code == 201


def test_bad_input_gets_a_clear_json_error(app, tokens):
    http = Client(app).http
    admin = bearer(tokens["admin"])
    seed_project(app.state.store, "pw", "pairwise", n_prompts=1, members=())
    cases = [
        (http.post("/api/v1/projects/pw/items", content=b"{not json", headers=admin), 400, "not valid JSON"),
        (http.post("/api/v1/projects/pw/items", content=b'{"rows": [{"prompt": "p", "responses": ["a", NaN]}]}',
                   headers=admin), 400, "NaN is not a JSON number"),
        (http.post("/api/v1/projects/pw/items", json={"rows": [{"prompt": "p", "responses": ["same", "same"]}]},
                   headers=admin), 422, "row 1: field 'responses'"),
        (http.post("/api/v1/projects", json={"name": "x", "task": "vote"}, headers=admin), 400, "task must be one of"),
        (http.post("/api/v1/projects", json={"name": "pw", "task": "rating"}, headers=admin), 409, "already exists"),
        (http.get("/api/v1/projects/pw/export?kind=ratings", headers=admin), 400, "exports comparisons, raw"),
        (http.get("/api/v1/projects/pw/judgments?after=x", headers=admin), 422, "after"),
        (http.get("/api/v1/projects/nosuch", headers=admin), 404, "no project named"),
        (http.get("/api/v1/nothing/here", headers=admin), 404, "Not Found"),
    ]
    for r, status, text in cases:
        assert r.status_code == status and r.headers["content-type"] == "application/json", (r.status_code, r.text)
        assert text in r.json()["error"], r.json()
    assert app.state.store.progress(app.state.store.project("pw")).items == 1  # the refused import added nothing


def test_export_straight_into_the_datasets_folder(app_factory, sqlite_path, tmp_path):
    from kilter.data.readers import read_records

    app = app_factory(sqlite_path, datasets_dir=str(tmp_path / "datasets"))
    store = app.state.store
    store.create_user("boss", "admin")
    token = store.create_api_token("boss")
    project = seed_project(store, "rk", "ranking", n_prompts=1, k=3, members=("boss",))
    from kilter.feedback.tasks import parse_submission

    view = store.next_task(project, store.users()[0])
    form = {"rank_0": ["1"], "rank_1": ["2"], "rank_2": ["3"], "score_0": ["6"], "score_1": ["4"], "score_2": ["2"]}
    store.submit(project, store.users()[0], view.assignment_id,
                 lambda shown: parse_submission("ranking", lambda n: form.get(n, []), shown))
    r = Client(app).http.post("/api/v1/projects/rk/export", headers=bearer(token))
    files = r.json()["files"]
    assert set(files) == {"rankings", "comparisons", "raw"} and files["comparisons"]["records"] == 3
    assert len(read_records(tmp_path / "datasets" / "rk" / "rankings.jsonl", "ranking")) == 1
    assert len(read_records(files["comparisons"]["path"], "comparison")) == 3
