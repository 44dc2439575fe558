"""/admin/loop shows a `kilter loop` run: the current round and stage, the round project's quota
progress from the database, and the per-round metrics as a table and an SVG chart (admins only)."""

from __future__ import annotations

import json

from feedback_testlib import Client, invited, seed_project

from kilter.feedback.store import Store


def _state(tmp_path, current):
    done = {"baseline": {"reward/gold": -0.5, "kl/sqrt": 0.0},
            "1:evaluate": {"round": 1, "judgments": 3, "reward/gold": -0.3, "reward/rm": 0.4, "kl/sqrt": 1.5,
                           "agreement/heldout": 0.62, "annotators/flagged": 1},
            "2:evaluate": {"round": 2, "judgments": 3, "reward/gold": -0.1, "reward/rm": 0.9, "kl/sqrt": 2.1,
                           "agreement/heldout": 0.58, "annotators/flagged": 1}}
    (tmp_path / "state.json").write_text(json.dumps({"version": 1, "done": done, "current": current}))


def _admin(app, store):
    client = Client(app)
    client.login_invite(invited(store, "boss", role="admin"))
    return client


def test_the_loop_page_shows_round_quota_and_metrics(app_factory, tmp_path):
    db = str(tmp_path / "feedback.db")
    app = app_factory(db, loop_dir=str(tmp_path))
    store: Store = app.state.store
    project = seed_project(store, "loop-r3", "pairwise", n_prompts=3, members=())
    ann = Client(app)
    ann.login_invite(invited(store, "ann"))
    store.add_member("loop-r3", "ann")
    r, assignment = ann.task("loop-r3")
    assert ann.post("/p/loop-r3/submit", {"assignment_id": assignment, "choice": "A2"}).status_code == 303
    _state(tmp_path, {"round": 3, "stage": "collect", "project": "loop-r3", "quota": 3})
    page = _admin(app, store).get("/admin/loop")
    assert page.status_code == 200
    assert "Round <strong>3</strong>, stage <strong>collect</strong>" in page.text
    assert '<span id="loop-quota">1 / 3</span>' in page.text
    assert page.text.count("<polyline") == 3  # gold, proxy, sqrt(KL)
    assert "0.620" in page.text and "-0.100" in page.text
    assert ann.get("/admin/loop").status_code == 403
    assert project.name == "loop-r3"


def test_without_a_loop_the_page_says_how_to_get_one(app_factory, tmp_path):
    app = app_factory(str(tmp_path / "feedback.db"))
    page = _admin(app, app.state.store).get("/admin/loop")
    assert page.status_code == 404 and "--loop_dir" in page.text
    app2 = app_factory(str(tmp_path / "other.db"), loop_dir=str(tmp_path / "nothing-yet"))
    page = _admin(app2, app2.state.store).get("/admin/loop")
    assert page.status_code == 404 and "no state.json" in page.text


def test_the_admin_page_links_to_the_loop_only_when_it_serves_one(app_factory, tmp_path):
    _state(tmp_path, {"round": 1, "stage": "sample"})
    app = app_factory(str(tmp_path / "feedback.db"), loop_dir=str(tmp_path))
    page = _admin(app, app.state.store).get("/admin")
    assert '<a href="/admin/loop">Loop status →</a>' in page.text
    plain = app_factory(str(tmp_path / "plain.db"))
    assert "/admin/loop" not in _admin(plain, plain.state.store).get("/admin").text


def test_the_loop_pages_in_chromium_at_1366_and_400(browser, tmp_path):
    """The admin page's link leads to /admin/loop; both pages at a laptop's and a phone's width (PNGs kept)."""
    import base64

    from selenium.webdriver.common.by import By
    from test_browser import SIZES, viewport, wait_for

    from kilter.commands.loop import serve_in_thread

    db = str(tmp_path / "feedback.db")
    store = Store(db)
    store.migrate()
    seed_project(store, "loop-r3", "pairwise", n_prompts=3, members=())
    token = invited(store, "boss", role="admin")
    store.close()
    _state(tmp_path, {"round": 3, "stage": "collect", "project": "loop-r3", "quota": 3})
    shots = tmp_path / "shots"
    shots.mkdir()
    with serve_in_thread(db, str(tmp_path)) as url:
        viewport(browser, "1366")
        browser.get(f"{url}/invite/{token}")
        browser.find_element(By.CSS_SELECTOR, "button.primary").click()
        wait_for(browser, lambda d: "/invite/" not in d.current_url)
        browser.get(f"{url}/admin")
        browser.find_element(By.CSS_SELECTOR, '#loop-link a[href="/admin/loop"]').click()
        wait_for(browser, lambda d: d.current_url.endswith("/admin/loop"))
        for page in ("admin", "admin/loop"):
            browser.get(f"{url}/{page}")
            for label in SIZES:
                viewport(browser, label)
                png = browser.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
                path = shots / f"{page.replace('/', '-')}-{label}.png"
                path.write_bytes(base64.b64decode(png["data"]))
                assert path.stat().st_size > 10_000
            # nothing sticks out sideways at a phone's width
            viewport(browser, "400")
            assert browser.execute_script("return document.documentElement.scrollWidth") <= 400 + 1, page
        assert browser.find_elements(By.ID, "loop-chart")
