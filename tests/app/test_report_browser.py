"""`kilter report` pages looked at in headless Chromium: every plot is there and decodes, the page
loads from a file with no network, and a screenshot is taken (kept under the test's tmp dir)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from kilter.cli import main


def _loop_dir(root: Path) -> Path:
    """A loop run directory as `kilter loop` leaves it, with made-up numbers (no training)."""
    run = root / "loop"
    done = {"baseline": {"reward/gold": -0.5, "kl/sqrt": 0.0, "response/distinct_2": 0.6}}
    for r in (1, 2, 3):
        done[f"{r}:evaluate"] = {"round": r, "judgments": 48, "pairs/train": 40 * r, "reward/gold": -0.5 + 0.15 * r,
                                 "reward/rm": 0.3 * r, "kl/sqrt": 0.8 * r, "agreement/heldout": 0.6 + 0.02 * r,
                                 "response/distinct_2": 0.55, "win_rate/gold": 0.5 + 0.05 * r,
                                 "annotators/flagged": 1, "gao/peak_sqrt_kl": 3.0}
        folder = run / f"round-{r}"
        (folder / "policy").mkdir(parents=True)
        rows = []
        for i in range(1, 9):
            d = 0.8 * (r - 1) + 0.1 * i
            rows.append({"step": i, "reward/raw": 0.4 * d, "kl/ref": d * d,
                         "reward/gold": -0.5 + d * (0.5 - 0.25 * math.log(d))})
        (folder / "policy" / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
        (folder / "eval").mkdir()
        (folder / "eval" / "eval.json").write_text(json.dumps({
            "prompts": {"items": ["Review the kayak.", "Review the <script>alert(1)</script> lamp."]},
            "models": [{"name": "policy", "samples": [
                {"prompt_index": 0, "response": "The kayak is great.", "gold": 0.9, "rm": 1.2},
                {"prompt_index": 1, "response": "<img src=x onerror=alert(1)>", "gold": -1.0, "rm": 0.1}]}]}))
        (folder / "quality.json").write_text(json.dumps({
            "alpha": 0.4, "flagged": {"sim-0": ["gold accuracy 10%"]},
            "annotators": {"sim-0": {"judgments": 30, "gold_rate": 0.1, "peer_rate": None},
                           "sim-1": {"judgments": 30, "gold_rate": 0.95, "peer_rate": None}}}))
    done["2:export"] = {"leaderboard": [
        {"rank": 1, "model": "round-1", "bt": 1050.0, "bt_lower": 990.0, "bt_upper": 1110.0, "elo": 1012.0,
         "wins": 13, "losses": 7, "ties": 0},
        {"rank": 2, "model": "sft", "bt": 950.0, "bt_lower": 890.0, "bt_upper": 1010.0, "elo": 988.0,
         "wins": 7, "losses": 13, "ties": 0}]}
    (run / "state.json").write_text(json.dumps({"version": 1, "done": done, "started": {}, "stopped": None}))
    return run


def _look(browser, page: Path, shot: Path) -> dict:
    browser.get(page.as_uri())
    info = browser.execute_script("""
        const imgs = [...document.querySelectorAll('figure.plot img')];
        return {plots: [...document.querySelectorAll('figure.plot')].map(f => f.dataset.plot),
                decoded: imgs.map(i => i.complete && i.naturalWidth > 100 && i.naturalHeight > 100),
                external: [...document.querySelectorAll('[src],[href]')].map(e => e.getAttribute('src') || e.getAttribute('href'))
                          .filter(u => !u.startsWith('data:')),
                scripts: document.querySelectorAll('script').length,
                tables: document.querySelectorAll('table').length};""")
    browser.save_screenshot(str(shot))
    return info


def test_a_loop_report_renders_with_every_plot(browser, tmp_path):
    run = _loop_dir(tmp_path)
    assert main(["report", str(run)]) == 0
    info = _look(browser, run / "report.html", tmp_path / "loop.png")
    assert info["plots"] == ["gold-vs-kl", "ppo-curves", "agreement"]
    assert all(info["decoded"]) and len(info["decoded"]) == 3
    assert info["external"] == []  # self-contained: nothing to fetch
    assert info["scripts"] == 0  # model outputs are escaped, never run
    assert info["tables"] >= 4  # rounds, tournament, annotators, samples
    assert (tmp_path / "loop.png").stat().st_size > 20_000
    text = (run / "report.html").read_text()
    assert "fitted gold peak at sqrt(KL)" in text and "gold accuracy 10%" in text
    assert "Round 2 tournament" in text and "round-1" in text


def test_a_trainer_run_report_renders_its_curves(browser, tmp_path):
    run = tmp_path / "ppo"
    run.mkdir()
    rows = [{"step": i, "loss/policy": 1 / i, "reward/total": 0.1 * i, "kl/ref": 0.05 * i, "perf/tokens_per_s": 9.0}
            for i in range(1, 20)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    (run / "samples.jsonl").write_text(json.dumps({"step": 19, "prompt": "Review the kayak.",
                                                   "response": "The kayak is great.", "reward": 1.0}) + "\n")
    (run / "calibration.json").write_text(json.dumps({"n_pairs": 40, "ece": 0.05, "bins": [
        {"lo": i / 5, "hi": (i + 1) / 5, "count": 8, "mean_predicted": (i + 0.5) / 5, "observed": (i + 0.4) / 5}
        for i in range(5)] + [{"lo": 0.9, "hi": 1.0, "count": 0, "mean_predicted": None, "observed": None}]}))
    out = tmp_path / "elsewhere.html"
    assert main(["report", str(run), "--out", str(out)]) == 0
    info = _look(browser, out, tmp_path / "ppo.png")
    assert info["plots"] == ["loss", "reward", "kl", "calibration"]  # perf/ is left out
    assert all(info["decoded"]) and info["external"] == []


def test_report_errors_are_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--bogus"]) == 2
