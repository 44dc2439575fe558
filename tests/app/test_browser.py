"""Headless Chromium against a real server: log in, judge with the keyboard, find it in the export.

Also saves a screenshot of every page (to $KILTER_SHOTS_DIR when set, else a temp folder).
"""

import base64
import json
import os
import random
from pathlib import Path

import pytest
from feedback_testlib import LiveServer, seed_project

from kilter.cli import main
from kilter.feedback.importer import parse_row
from kilter.feedback.store import Store
from kilter.feedback.tasks import parse_submission

pytestmark = pytest.mark.browser

EVIL = "<script>document.title='pwned'</script>Plain words after the tag."
LONG_MARKDOWN = ("A **list comprehension** builds a list in one expression:\n\n```python\nsquares = [x * x for x in range(10)]\n```\n\n"
                 + "\n".join(f"{i}. Point number {i}, with `inline code` and some words to make the line long enough to wrap."
                              for i in range(1, 40)))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A seeded database and a running server shared by this module's tests."""
    tmp = tmp_path_factory.mktemp("site")
    db = str(tmp / "site.db")
    store = Store(db)
    store.migrate()
    store.create_user("ann", "annotator", "ann-password")
    tokens = {name: store.create_user(name, role, invite_hours=24)[1]
              for name, role in (("boss", "admin"), ("bea", "annotator"), ("cy", "annotator"), ("troll", "annotator"))}
    seed_project(store, "compare", "pairwise", n_prompts=3, models=["sft", "ppo"], members=("ann",))
    seed_project(store, "rank", "ranking", n_prompts=2, k=3, models=["sft", "ppo", "dpo"], members=("ann",))
    for task in ("rating", "edit", "demonstration"):
        seed_project(store, task, task, n_prompts=2, k=1, members=("ann",))
    store.create_project("xss", "pairwise")
    store.import_prompts("xss", [parse_row({"prompt": "Say something.", "responses": [EVIL, "A harmless answer."]}, "x")])
    store.add_member("xss", "ann")
    seed_project(store, "keys", "pairwise", n_prompts=6, models=["sft", "ppo"], members=("ann",))
    store.create_project("longmd", "pairwise", instructions="Prefer the **correct** answer; see `code` too.")
    store.import_prompts("longmd", [parse_row({"prompt": "Explain *list comprehensions* in Python.", "responses": [
        LONG_MARKDOWN, "Use a loop:\n\n```python\nout = []\nfor x in xs:\n    out.append(x * 2)\n```\n\nSame\u200bresult."]},
        "long line 1")])
    store.add_member("longmd", "ann")
    seed_project(store, "keyrank", "ranking", n_prompts=2, k=3, models=["sft", "ppo", "dpo"], members=("ann",))
    seed_arena(store)
    store.close()
    server = LiveServer(db, tmp).start()
    yield {"db": db, "url": server.url, "tokens": tokens, "tmp": tmp}
    server.stop()


def seed_arena(store):
    """A tournament judged by three people, one of them a troll, with gold items, for the admin page."""
    arena = seed_project(store, "arena", "pairwise", n_prompts=8, k=3, overlap=3, gold_fraction=0.3,
                         models=["sft-v1", "ppo-v2", "base"], members=("bea", "cy", "troll"))
    store.import_prompts("arena", [parse_row({"prompt": f"Known answer {i}", "responses": [
        {"text": "A correct, helpful reply.", "model": "gold"}, {"text": "Wrong.", "model": "gold"}], "gold": 0},
        f"gold line {i}") for i in range(6)])
    quality = {"ppo-v2": 0, "sft-v1": 1, "base": 2, "gold": 0}
    for name in ("bea", "cy", "troll"):
        rng = random.Random(name)  # honest people still disagree now and then
        user = next(u for u in store.users() if u.username == name)
        while (view := store.next_task(arena, user)) is not None:
            a, b = view.responses
            if a.model == "gold":
                better_left = a.text.startswith("A correct")
            else:
                better_left = quality[a.model] < quality[b.model]
            if name == "troll" or (a.model != "gold" and rng.random() < 0.2):
                better_left = not better_left
            choice = "A2" if better_left else "B2"
            store.submit(arena, user, view.assignment_id,
                         lambda shown, c=choice: parse_submission("pairwise", lambda n: {"choice": [c]}.get(n, []), shown))


def shots_dir(site) -> Path:
    folder = Path(os.environ.get("KILTER_SHOTS_DIR") or site["tmp"] / "shots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def login(browser, site, username="ann", password="ann-password"):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.delete_all_cookies()
    browser.get(site["url"] + "/login")
    browser.find_element(By.NAME, "username").send_keys(username)
    browser.find_element(By.NAME, "password").send_keys(password + Keys.ENTER)
    wait_for(browser, lambda d: d.current_url.rstrip("/") == site["url"])


def wait_for(browser, condition, timeout=15):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # a condition that reads an element may race the next page replacing it: just look again
    return WebDriverWait(browser, timeout, ignored_exceptions=(StaleElementReferenceException,)).until(condition)


def keys(browser, *sequence):
    from selenium.webdriver.common.action_chains import ActionChains

    chain = ActionChains(browser)
    for key in sequence:
        chain.send_keys(key)
    chain.perform()


def body(browser):
    from selenium.webdriver.common.by import By

    return browser.find_element(By.TAG_NAME, "body")


def submit_and_wait(browser, key):
    from selenium.webdriver.common.by import By

    old = browser.find_element(By.NAME, "assignment_id").get_attribute("value")
    keys(browser, key)
    wait_for(browser, lambda d: "saved=1" in d.current_url and
             (not d.find_elements(By.NAME, "assignment_id") or d.find_element(By.NAME, "assignment_id").get_attribute("value") != old))


def test_pairwise_and_ranking_with_the_keyboard_reach_the_export(browser, site, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    login(browser, site)
    browser.get(site["url"] + "/p/compare")
    shown = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".response .response-text")]
    keys(browser, "?")
    assert browser.find_element(By.ID, "shortcuts").is_displayed()
    keys(browser, Keys.ESCAPE, "/", "1", "/")  # flag A: "fails to follow the instruction"
    keys(browser, "7")  # B better
    assert browser.find_element(By.CSS_SELECTOR, 'input[value="B3"]').is_selected()
    submit_and_wait(browser, Keys.ENTER)
    assert "Saved" in body(browser).text

    browser.get(site["url"] + "/p/rank")
    ranked = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".response .response-text")]
    # B first (score 5), then A (score 3), C ties with A (score 1) and gets the "makes things up" flag
    keys(browser, "b", "5", "a", "3", "=", "c", "1", "/", "2", "/")
    selects = browser.find_elements(By.CSS_SELECTOR, "select[data-rank]")
    assert [s.get_attribute("value") for s in selects] == ["2", "1", "2"]
    submit_and_wait(browser, Keys.ENTER)

    pair_dir, rank_dir = tmp_path / "pair", tmp_path / "rank"
    assert main(["export", "--project", "compare", "--out", str(pair_dir), "--db", site["db"]]) == 0
    assert main(["export", "--project", "rank", "--out", str(rank_dir), "--db", site["db"]]) == 0

    def read(path):
        return [json.loads(line) for line in path.read_text().splitlines()]

    # pairwise: "B better" with a flag on A
    (comparison,) = read(pair_dir / "comparisons.jsonl")
    assert comparison == {"prompt": comparison["prompt"], "chosen": shown[1], "rejected": shown[0], "strength": 0.75}
    (pair,) = read(pair_dir / "raw.jsonl")
    assert pair["annotator"] == "ann" and pair["choice"] == "B3"
    assert pair["responses"][0]["flags"] == ["instruction"] and pair["responses"][1]["flags"] == []
    # ranking: B best, A and C tied second
    (ranking,) = read(rank_dir / "rankings.jsonl")
    assert dict(zip(ranking["responses"], ranking["ranks"])) == {ranked[0]: 2, ranked[1]: 1, ranked[2]: 2}
    assert {(c["chosen"], c["rejected"]) for c in read(rank_dir / "comparisons.jsonl")} == {
        (ranked[1], ranked[0]), (ranked[1], ranked[2])}
    (judgment,) = read(rank_dir / "raw.jsonl")
    text_of = {c["id"]: c["text"] for c in judgment["candidates"]}
    assert [text_of[c] for c in judgment["display_order"]] == ranked
    assert [(r["rank"], r["score"], r["flags"]) for r in judgment["responses"]] == [
        (2, 3, []), (1, 5, []), (2, 1, ["hallucination"])]


def test_script_in_a_model_output_stays_inert(browser, site):
    from selenium.webdriver.common.by import By

    login(browser, site)
    browser.get(site["url"] + "/p/xss")
    texts = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".response .response-text")]
    assert EVIL in texts  # shown as text, tags and all
    assert "pwned" not in browser.title
    assert browser.execute_script("return document.querySelectorAll('.response-text script').length") == 0


SIZES = {"1366": (1366, 768), "400": (400, 860)}  # a laptop, a phone


def viewport(browser, label):
    """The page's viewport exactly this size (a window size would include the browser's own frame)."""
    width, height = SIZES[label]
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": label == "400"})
    browser.execute_script("window.dispatchEvent(new Event('resize'))")


def test_screenshots_of_every_page(browser, site):
    """Every page at 1366x768 and at 400 px wide, saved for review ($KILTER_SHOTS_DIR)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    folder = shots_dir(site)
    pages = []

    def shot(name, full=False):
        for label in SIZES:
            viewport(browser, label)
            path = folder / f"{name}-{label}.png"
            if full or label == "400":  # the whole page, not just the viewport
                png = browser.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
                path.write_bytes(base64.b64decode(png["data"]))
            else:
                browser.save_screenshot(str(path))
            pages.append(path)
        viewport(browser, "1366")

    viewport(browser, "1366")
    browser.delete_all_cookies()
    browser.get(site["url"] + "/login")
    shot("01-login")
    browser.get(site["url"] + "/invite/" + site["tokens"]["boss"])
    shot("02-invite")
    login(browser, site)
    shot("03-home")
    for i, task in enumerate(("compare", "rank", "rating", "edit", "demonstration"), start=4):
        browser.get(site["url"] + f"/p/{task}")
        assert browser.find_elements(By.ID, "task-form"), task
        shot(f"0{i}-task-{task}")
    browser.get(site["url"] + "/p/rank")
    keys(browser, "b", "6", "/")
    shot("09-task-rank-keyboard")
    browser.get(site["url"] + "/p/longmd")
    shot("09b-task-long-markdown")
    keys(browser, "r")
    shot("09c-task-plain-text")
    browser.get(site["url"] + "/p/rank")
    keys(browser, Keys.ENTER)
    shot("09d-task-missing")
    browser.get(site["url"] + "/p/keyrank")
    keys(browser, "/")
    shot("09e-task-flag-mode")
    browser.get(site["url"] + "/p/compare/history")
    shot("09f-history")
    browser.get(site["url"] + "/p/rating")
    keys(browser, "s")
    wait_for(browser, lambda d: "Why skip" in body(d).text)
    shot("09g-skip-reason")
    browser.get(site["url"] + "/admin")
    shot("10-forbidden")
    browser.get(site["url"] + "/no/such/page")
    shot("10b-not-found")
    browser.get(site["url"] + "/p/compare")
    for _ in range(5):  # finish the project to reach the "all done" page
        if not browser.find_elements(By.ID, "task-form"):
            break
        keys(browser, "3")
        submit_and_wait(browser, Keys.ENTER)
    assert "All done" in body(browser).text
    shot("11-done")
    browser.delete_all_cookies()
    browser.get(site["url"] + "/invite/" + site["tokens"]["boss"])
    browser.find_element(By.CSS_SELECTOR, "button.primary").click()
    wait_for(browser, lambda d: "/invite/" not in d.current_url)
    browser.get(site["url"] + "/admin")
    shot("12-admin", full=True)
    browser.get(site["url"] + "/admin/p/arena")
    text = body(browser).text
    assert "flagged" in text and "troll" in text and "Model leaderboard" in text
    shot("13-admin-project", full=True)
    browser.get(site["url"] + "/admin/p/arena/judgments")
    shot("14-admin-judgments", full=True)
    browser.get(site["url"] + "/review/p/arena")
    shot("15-review", full=True)
    browser.get(site["url"] + "/admin/audit")
    shot("16-audit")
    browser.get(site["url"] + "/admin/p/arena")
    rows = browser.find_elements(By.CSS_SELECTOR, "#leaderboard tbody tr")
    assert [r.find_elements(By.TAG_NAME, "td")[1].text.split()[0] for r in rows] == ["ppo-v2", "sft-v1", "base"]
    assert all(p.stat().st_size > 10_000 for p in pages)


def test_long_markdown_responses_at_1366x768(browser, site):
    """Rendered Markdown, a visible zero-width space, a long response that says it scrolls, and the
    choice bar on screen without scrolling the page (issue 18, item 12)."""
    from selenium.webdriver.common.by import By

    viewport(browser, "1366")
    login(browser, site)
    browser.get(site["url"] + "/p/longmd")
    assert browser.find_elements(By.CSS_SELECTOR, ".response-text pre code.language-python")
    assert browser.find_elements(By.CSS_SELECTOR, '.response-text .invisible[title^="U+200B"]')
    assert browser.find_elements(By.CSS_SELECTOR, ".response-text.scrolls")
    bar = browser.execute_script("var r = document.querySelector('.scale').getBoundingClientRect();"
                                 "return [r.top, r.bottom, window.innerHeight]")
    assert 0 < bar[0] and bar[1] <= bar[2] + 1, bar
    assert browser.execute_script("return getComputedStyle(document.querySelector('.md pre')).fontFamily").count("mono")
    keys(browser, "r")
    raw = [e for e in browser.find_elements(By.CSS_SELECTOR, ".response .response-raw") if e.is_displayed()]
    assert len(raw) == 2 and "**list comprehension**" in raw[0].text + raw[1].text


def focus_by_tab(browser, selector, limit=80):
    """Press Tab until the element matching ``selector`` has the focus, as a person would."""
    from selenium.webdriver.common.keys import Keys

    for _ in range(limit):
        if browser.execute_script("return document.activeElement.matches(arguments[0])", selector):
            return
        keys(browser, Keys.TAB)
    raise AssertionError(f"Tab never reached {selector}")


def judgments_and_skips(site, project):
    store = Store(site["db"])
    try:
        records = store.judgments(store.project(project))
        return [r.choice for r in records], store.progress(store.project(project)).skipped
    finally:
        store.close()


def test_enter_on_a_focused_control_does_what_the_control_says(browser, site):
    """Shortcuts leave alone the keys a focused control has a meaning for (issue 18, defect 1)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    login(browser, site)
    browser.get(site["url"] + "/p/keys")
    first = browser.find_element(By.NAME, "assignment_id").get_attribute("value")
    keys(browser, "3")  # A somewhat better, then Tab to Skip and press Enter: that skips
    assert browser.find_element(By.CSS_SELECTOR, 'input[value="A2"]').is_selected()
    focus_by_tab(browser, "[data-skip]")
    keys(browser, Keys.ENTER)
    wait_for(browser, lambda d: "Why skip this item?" in body(d).text)  # the skip asks for a reason
    assert judgments_and_skips(site, "keys") == ([], 0)
    keys(browser, Keys.TAB, Keys.ENTER)  # the second reason, by keyboard
    wait_for(browser, lambda d: d.find_elements(By.ID, "task-form")
             and d.find_element(By.NAME, "assignment_id").get_attribute("value") != first)
    assert judgments_and_skips(site, "keys") == ([], 1)

    # Enter on a Flags summary opens it and submits nothing
    keys(browser, "3")
    browser.execute_script("document.querySelector('details.flags summary').focus()")
    keys(browser, Keys.ENTER)
    assert browser.find_element(By.CSS_SELECTOR, "details.flags").get_attribute("open") is not None
    assert "/p/keys" in browser.current_url and judgments_and_skips(site, "keys") == ([], 1)

    # arrow keys on a focused radio move the radio, not the response highlight
    radio = browser.find_element(By.CSS_SELECTOR, 'input[value="A2"]')
    browser.execute_script("arguments[0].focus()", radio)
    keys(browser, Keys.ARROW_RIGHT)
    assert browser.find_element(By.CSS_SELECTOR, 'input[value="A1"]').is_selected()
    assert browser.find_element(By.CSS_SELECTOR, '.response[data-position="0"]').get_attribute("class").count("current") == 1

    # Enter on the Projects link follows the link
    focus_by_tab(browser, 'nav a[href="/"]')
    keys(browser, Keys.ENTER)
    wait_for(browser, lambda d: d.current_url.rstrip("/") == site["url"])
    assert judgments_and_skips(site, "keys") == ([], 1)

    # and with the focus on the page, Enter still submits the choice
    browser.get(site["url"] + "/p/keys")
    keys(browser, "6")
    submit_and_wait(browser, Keys.ENTER)
    assert judgments_and_skips(site, "keys") == (["B2"], 1)


def test_a_failed_check_leaves_the_shortcuts_working(browser, site):
    """Enter on an incomplete ranking says what is missing and keeps the focus off the <select> (defect 8)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    login(browser, site)
    browser.get(site["url"] + "/p/keyrank")
    keys(browser, "b", "5", Keys.ENTER)
    status = browser.find_element(By.ID, "key-status").text
    assert "has no rank yet" in status
    assert browser.execute_script("return document.activeElement.tagName") == "BODY"
    assert browser.find_elements(By.CSS_SELECTOR, ".response.missing")
    keys(browser, "a", "3", "c", "1")  # the shortcuts still work
    selects = browser.find_elements(By.CSS_SELECTOR, "select[data-rank]")
    assert [s.get_attribute("value") for s in selects] == ["2", "1", "3"]
    submit_and_wait(browser, Keys.ENTER)


def drag(browser, source, target):
    """HTML5 drag and drop as the browser dispatches it (WebDriver's own drag does not fire these events)."""
    browser.execute_script("""
        const [source, target] = arguments, data = new DataTransfer();
        for (const [el, type] of [[source, 'dragstart'], [target, 'dragover'], [target, 'drop'], [source, 'dragend']])
            el.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: data}));
    """, source, target)


def test_ranking_by_drag_and_drop_shows_the_order_and_flag_mode_is_distinct(browser, site):
    """Issue 18, item 13."""
    from selenium.webdriver.common.by import By

    login(browser, site)
    browser.get(site["url"] + "/p/keyrank")
    order = browser.find_element(By.CSS_SELECTOR, "[data-rank-order]")
    keys(browser, "b", "a")
    assert order.text.startswith("B > A") and "not ranked: C" in order.text
    cards = browser.find_elements(By.CSS_SELECTOR, ".response[data-position]")
    drag(browser, cards[2], cards[1])  # C onto B, who is first: C takes first place
    selects = browser.find_elements(By.CSS_SELECTOR, "select[data-rank]")
    assert [s.get_attribute("value") for s in selects] == ["3", "2", "1"] and order.text == "C > B > A"
    keys(browser, "/")
    banner = browser.find_element(By.ID, "flag-banner")
    assert banner.is_displayed() and "response C" in banner.text
    assert browser.execute_script("return getComputedStyle(document.querySelector('.response.current')).borderTopColor") \
        != browser.execute_script("return getComputedStyle(document.querySelector('.response:not(.current)')).borderTopColor")
    keys(browser, "/")
    assert not banner.is_displayed()


def test_edit_shows_a_diff_while_typing(browser, site):
    from selenium.webdriver.common.by import By

    login(browser, site)
    browser.get(site["url"] + "/p/edit")
    browser.find_element(By.CSS_SELECTOR, "[data-diff-box] summary").click()
    keys(browser, "e", " and more")
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "[data-diff-out] ins"))
    assert "and more" in browser.find_element(By.CSS_SELECTOR, "[data-diff-out] ins").text
