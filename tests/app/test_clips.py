"""The "compare two clips" task: a waiting control run's queries, judged in the web app, go back as answers."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from kilter.control.envs import EnvConfig, make_env
from kilter.control.human import ClipConfig, HumanLabeler
from kilter.control.labelers import LabelerConfig
from kilter.control.segments import Segment
from kilter.feedback.clips import ClipSyncConfig, run, sync
from kilter.feedback.store import Store
from kilter.feedback.tasks import CLIP_CHOICES, FormError, Shown, parse_submission

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
TEMPLATE = Path(__file__).resolve().parents[2] / "src" / "kilter" / "feedback" / "templates" / "task_clips.html"


def _cartpole_segment(uid: int, push: int) -> Segment:
    """A short rendered CartPole clip; ``push`` 0 or 1 is the action held (the pole falls either way)."""
    env = make_env(EnvConfig(id="cartpole"), render_mode="rgb_array")
    env.reset(seed=uid)
    frames, obs = [], []
    for _ in range(6):
        frames.append(env.render()[::4, ::4])
        o, *_ = env.step(push)
        obs.append(o)
    env.close()
    return Segment(obs=np.stack(obs), acts=np.full(6, push), true_rewards=np.ones(6), frames=np.stack(frames), uid=uid)


def _post_queries(tmp_path: Path, n: int = 2, fmt: str = "gif") -> tuple[HumanLabeler, list[tuple[Segment, Segment]]]:
    lab = HumanLabeler(
        tmp_path / "run" / "queries",
        LabelerConfig(kind="human", poll_s=0.01, wait_timeout_s=1),
        ClipConfig(format=fmt),
        fps=25,
    )
    pairs = [(_cartpole_segment(2 * i, 0), _cartpole_segment(2 * i + 1, 1)) for i in range(n)]
    lab.post(pairs)
    return lab, pairs


def test_clip_form_reads_left_right_equal_cant_tell():
    shown = Shown(candidate_ids=[11, 10])  # slot 1 (candidate 11) shown on the left

    def form(choice):
        return lambda name: {"choice": [choice]}.get(name, [])

    out = parse_submission("clips", form("A"), shown)
    assert out["choice"] == "A" and out["preferred_candidate_id"] == 11 and not out["tie"]
    assert parse_submission("clips", form("B"), shown)["preferred_candidate_id"] == 10
    eq = parse_submission("clips", form("equal"), shown)
    assert eq["tie"] and eq["preferred_candidate_id"] is None
    assert parse_submission("clips", form("cant_tell"), shown)["preferred_candidate_id"] is None
    with pytest.raises(FormError, match="which clip is better"):
        parse_submission("clips", form("A3"), shown)


def test_template_buttons_match_the_clip_choices():
    html = TEMPLATE.read_text()
    found = re.findall(r'value="([^"]+)" data-key="([^"]+)"', html)
    assert found == [(code, key) for code, _, key in CLIP_CHOICES]


def test_sync_imports_queries_and_returns_judgments_as_answers(tmp_path):
    lab, pairs = _post_queries(tmp_path)
    db = str(tmp_path / "app.db")
    store = Store(db)
    store.migrate()
    store.create_user("ann", "annotator", "ann-password")
    assert run(ClipSyncConfig(queries=str(lab.root), project="clips", db=db, members=["ann"])) == 0
    assert sync(store, "clips", lab.root) == (0, 0)  # nothing new, nothing judged yet
    project = store.project("clips")
    ann = next(u for u in store.users() if u.username == "ann")
    # ann answers "right" to the first item shown and "equal" to the second, whatever the shown order
    for press in ("B", "equal"):
        view = store.next_task(project, ann)
        assert view is not None and all(r.text.startswith("data:image/gif;base64,") for r in view.responses)
        store.submit(
            project,
            ann,
            view.assignment_id,
            lambda shown, c=press: parse_submission("clips", lambda n: {"choice": [c]}.get(n, []), shown),
        )
        if press == "B":
            first_query = view.responses[1].sampling["query"]
            first_side = view.responses[1].sampling["side"]
    assert store.next_task(project, ann) is None
    assert sync(store, "clips", lab.root) == (0, 2)
    answers = {json.loads(line)["id"]: json.loads(line)["answer"] for line in lab.answers_path.read_text().splitlines()}
    assert answers[first_query] == first_side  # the clip shown on the right, in the run's own left/right terms
    assert sorted(answers.values()) == sorted([first_side, "equal"])
    # the waiting run now gets its answers, in its own order
    got = lab.label(pairs, np.random.default_rng(0))
    ids = [f"s{a.uid}-s{b.uid}" for a, b in pairs]
    assert got == [answers[i] for i in ids]
    # stored raw like every other task
    (raw,) = [r for r in store.judgments(project) if r.choice == "B"]
    assert raw.task == "clips" and raw.display_order
    store.close()
    from kilter.cli import main

    assert main(["export", "--project", "clips", "--out", str(tmp_path / "export"), "--db", db]) == 0
    exported = [json.loads(line) for line in (tmp_path / "export" / "raw.jsonl").read_text().splitlines()]
    assert sorted(r["choice"] for r in exported) == ["B", "equal"] and {r["task"] for r in exported} == {"clips"}


@pytest.mark.browser
def test_clip_task_in_headless_chromium_by_keyboard(browser, tmp_path, live_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    lab, _ = _post_queries(tmp_path, n=1)
    db = str(tmp_path / "app.db")
    store = Store(db)
    store.migrate()
    store.create_user("ann", "annotator", "ann-password")
    store.close()
    assert run(ClipSyncConfig(queries=str(lab.root), project="clips", db=db, members=["ann"])) == 0
    server = live_server(db)

    browser.get(server.url + "/login")
    browser.find_element(By.NAME, "username").send_keys("ann")
    browser.find_element(By.NAME, "password").send_keys("ann-password" + Keys.ENTER)
    WebDriverWait(browser, 15).until(lambda d: d.current_url.rstrip("/") == server.url)
    browser.get(server.url + "/p/clips")
    clips = browser.find_elements(By.CSS_SELECTOR, "img.clip")
    assert len(clips) == 2
    # both animations decoded (a CSP or encoding problem would leave naturalWidth at 0)
    assert all(
        browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", c) > 0 for c in clips
    )
    shots = Path(os.environ.get("KILTER_SHOTS_DIR") or tmp_path)
    browser.save_screenshot(str(shots / "clips-task.png"))
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(browser).send_keys("?").perform()
    assert "left clip better" in browser.find_element(By.ID, "shortcuts").text
    ActionChains(browser).send_keys(Keys.ESCAPE).perform()
    _judge_and_sync(browser, db, lab, "r")


@pytest.mark.browser
def test_video_clips_play_and_loop_in_headless_chromium(browser, tmp_path, live_server):
    """WebM clips (the default) are <video autoplay loop muted>: both play, allowed by the CSP, judged by keyboard."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    pytest.importorskip("imageio_ffmpeg", reason="video clips need imageio-ffmpeg (the control extra)")
    lab, _ = _post_queries(tmp_path, n=1, fmt="webm")
    db = str(tmp_path / "app.db")
    store = Store(db)
    store.migrate()
    store.create_user("ann", "annotator", "ann-password")
    store.close()
    assert run(ClipSyncConfig(queries=str(lab.root), project="clips", db=db, members=["ann"])) == 0
    server = live_server(db)
    browser.set_window_size(1366, 768)
    browser.get(server.url + "/login")
    browser.find_element(By.NAME, "username").send_keys("ann")
    browser.find_element(By.NAME, "password").send_keys("ann-password" + Keys.ENTER)
    WebDriverWait(browser, 15).until(lambda d: d.current_url.rstrip("/") == server.url)
    browser.get(server.url + "/p/clips")
    videos = browser.find_elements(By.CSS_SELECTOR, "video.clip")
    assert len(videos) == 2 and not browser.find_elements(By.CSS_SELECTOR, "img.clip")
    state = "return [arguments[0].readyState, arguments[0].currentTime, arguments[0].paused, arguments[0].loop]"
    # decoded (readyState >= 2: HAVE_CURRENT_DATA), autoplaying, looping; a CSP block leaves readyState at 0
    WebDriverWait(browser, 15).until(lambda d: all(d.execute_script(state, v)[0] >= 2 for v in videos))
    first = [browser.execute_script(state, v) for v in videos]
    assert all(not paused and loop for _, _, paused, loop in first)
    # the clips are 6 frames at 25 fps (0.24 s): time moves on, and it has wrapped past the end (looped)
    WebDriverWait(browser, 15).until(
        lambda d: all(
            d.execute_script("return arguments[0].played.length && arguments[0].currentTime", v) for v in videos
        )
    )
    duration = browser.execute_script("return arguments[0].duration", videos[0])
    assert duration == pytest.approx(6 / 25, abs=0.03)
    browser.execute_script(
        "window.__wraps = 0; const v = arguments[0]; let last = v.currentTime;"
        "v.addEventListener('timeupdate', () => { if (v.currentTime < last) window.__wraps++; last = v.currentTime; });",
        videos[0],
    )
    WebDriverWait(browser, 15).until(lambda d: d.execute_script("return window.__wraps") >= 1)
    shots = Path(os.environ.get("KILTER_SHOTS_DIR") or tmp_path)
    browser.save_screenshot(str(shots / "clips-video-1366.png"))
    browser.set_window_size(400, 800)
    browser.save_screenshot(str(shots / "clips-video-400.png"))
    # both clips fit side by side or stacked inside a phone-width window: no horizontal scrolling
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    left = _judge_and_sync(browser, db, lab, "l")
    assert left.text.startswith("data:video/webm;base64,")


def test_control_run_waits_for_people_and_trains_on_their_answers(tmp_path):
    """`kilter control labeler.kind=human` blocks on its queries; a person answers them through the clips project."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from kilter.config import load_config
    from kilter.control.train import ControlConfig, train
    from kilter.runs import read_metrics

    out = tmp_path / "run"
    cfg = load_config(
        ControlConfig,
        Path(__file__).resolve().parents[2] / "configs" / "control" / "cartpole.yaml",
        [
            f"output_dir={out}",
            "labeler.kind=human",
            "labeler.poll_s=0.05",
            "labeler.wait_timeout_s=60",
            "env.n_envs=2",
            "agent.n_steps=64",
            "agent.batch_size=64",
            "agent.n_epochs=1",
            "total_timesteps=256",
            "rounds=2",
            "queries.total_labels=4",
            "queries.segment_length=10",
            "queries.pool_size=12",
            "eval_episodes=1",
            "clips.downscale=8",
        ],
    )
    pool = ThreadPoolExecutor(1)
    worker = pool.submit(train, cfg)  # result() re-raises whatever the run raised
    db = str(tmp_path / "app.db")
    store = Store(db)
    store.migrate()
    store.create_user("ann", "annotator", "ann-password")
    store.create_project("cp", "clips")
    store.add_member("cp", "ann")
    ann = next(u for u in store.users() if u.username == "ann")
    project = store.project("cp")
    judged = 0
    deadline = time.monotonic() + 90
    while not worker.done() and time.monotonic() < deadline:
        if (out / "queries").is_dir():
            sync(store, "cp", out / "queries")
        while (view := store.next_task(project, ann)) is not None:
            store.submit(
                project,
                ann,
                view.assignment_id,
                lambda shown: parse_submission("clips", lambda n: {"choice": ["A"]}.get(n, []), shown),
            )
            judged += 1
        if (out / "queries").is_dir():
            sync(store, "cp", out / "queries")
        time.sleep(0.1)
    store.close()
    worker.result(timeout=1)
    pool.shutdown()
    rows = read_metrics(out)
    assert judged == 4 and rows[-1]["labels/total"] == 4
    assert rows[-1]["labels/left"] + rows[-1]["labels/right"] == 4  # "A" (the left as shown) is left or right
    assert (out / "final" / "reward_model.pt").is_file()


def _judge_and_sync(browser, db, lab, key: str):
    """Press ``key`` (l: left clip better, r: right) and Enter; sync the judgment back to the run and
    check the run's answer names the side the chosen clip came from. Returns the chosen clip."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    ActionChains(browser).send_keys(key).perform()
    assert browser.find_element(By.CSS_SELECTOR, f'input[value="{"A" if key == "l" else "B"}"]').is_selected()
    ActionChains(browser).send_keys(Keys.ENTER).perform()
    WebDriverWait(browser, 15).until(lambda d: "saved=1" in d.current_url)
    store = Store(db)
    assert sync(store, "clips", lab.root) == (0, 1)
    (rec,) = store.judgments(store.project("clips"))
    store.close()
    chosen = next(c for c in rec.candidates if c.id == rec.display_order[0 if key == "l" else 1])
    (line,) = lab.answers_path.read_text().splitlines()
    assert json.loads(line)["answer"] == chosen.sampling["side"]
    return chosen

