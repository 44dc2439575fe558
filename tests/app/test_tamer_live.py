"""The live TAMER page: frames stream, + / - presses reach the agent, in-process and in headless Chromium."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from feedback_testlib import free_port

from kilter.control.envs import EnvConfig
from kilter.control.tamer import TamerConfig
from kilter.feedback.tamer_live import TamerLiveConfig, create_tamer_app
from kilter.runs import read_metrics


def _cfg(tmp_path, episodes=2, step_s=0.02) -> TamerLiveConfig:
    return TamerLiveConfig(
        tamer=TamerConfig(
            output_dir=str(tmp_path / "tamer"),
            episodes=episodes,
            step_s=step_s,
            trainer="human",
            env=EnvConfig(id="corridor", n_envs=1),
        )
    )


def test_presses_reach_the_agent_and_bad_requests_are_refused(tmp_path):
    app = create_tamer_app(_cfg(tmp_path, episodes=1, step_s=0.1))
    with TestClient(app) as client:
        deadline = time.monotonic() + 10
        while client.get("/frame").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        frame = client.get("/frame")
        assert frame.headers["content-type"] == "image/png" and frame.content[:4] == b"\x89PNG"
        page = client.get("/")
        assert "tamer.js" in page.text and "script-src 'self'" in page.headers["content-security-policy"]
        assert (
            client.post(
                "/press", content="h=1", headers={"content-type": "application/x-www-form-urlencoded"}
            ).status_code
            == 415
        )
        assert client.post("/press", json={"h": 3}).status_code == 422
        for _ in range(3):
            assert client.post("/press", json={"h": 1}).status_code == 200
            time.sleep(0.3)  # inside the credit window (0.2-4 s) of the steps shown meanwhile
        while not client.get("/status").json()["done"] and time.monotonic() < deadline + 30:
            time.sleep(0.05)
    rows = read_metrics(tmp_path / "tamer")
    assert rows and sum(r["feedback/presses"] for r in rows) == 3
    assert rows[-1]["feedback/updates"] >= 1  # the presses updated Ĥ


@pytest.mark.browser
def test_live_page_in_headless_chromium_by_keyboard(browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    out = tmp_path / "tamer"
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kilter",
                "tamer-live",
                f"port={port}",
                f"tamer.output_dir={out}",
                "tamer.episodes=100",  # longer than the test: the presses must land while it trains
                "tamer.step_s=0.1",
                "tamer.env.id=corridor",
                "tamer.env.n_envs=1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if httpx.get(url + "/status", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            browser.get(url + "/")
            WebDriverWait(browser, 15).until(
                lambda d: (
                    d.execute_script("var i = document.getElementById('frame'); return i.complete && i.naturalWidth")
                    > 0
                )
            )
            for key in ("+", "+", "-"):
                ActionChains(browser).send_keys(key).perform()
                time.sleep(0.3)
            WebDriverWait(browser, 15).until(lambda d: "presses sent: 3" in d.find_element(By.ID, "tamer-status").text)
            # the training loop picked all three up (it polls once per step)
            WebDriverWait(browser, 15).until(lambda d: httpx.get(url + "/status").json()["used"] == 3)
        finally:
            proc.terminate()
            proc.wait(10)
    assert (out / "config.yaml").is_file()  # the run it fed is a normal run folder
