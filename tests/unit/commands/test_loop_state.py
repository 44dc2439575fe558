"""The loop's round state machine: each stage interrupted and resumed, with the real feedback app in
between (publish, the simulated crowd over HTTP, export) and the trainers replaced by stand-ins.

What must hold after any interruption and `resume=true`: every finished stage is never started
again, the interrupted one is started once more, and the database holds exactly the round's quota
of judgments, each assignment judged once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kilter.commands.loop import STAGES, Loop, LoopConfig
from kilter.errors import ConfigError, KilterError
from kilter.feedback.store import Store

PRODUCTS = ["kayak", "mouse", "router", "grinder", "lamp", "kettle"]


class Interrupted(Exception):
    """Stands in for kill -9: the stage stops half way and nothing after it runs."""


class FakeLoop(Loop):
    """The real loop with the model-training stages replaced by cheap stand-ins that write their files."""

    crash_at: str | None = None

    def _maybe_crash(self, key: str) -> None:
        if self.crash_at == key:
            raise Interrupted(key)

    def _train_sft(self):
        return "fake-sft"

    def _baseline(self):
        return {"reward/gold": 0.0, "kl/sqrt": 0.0}

    def _sample(self, r):
        folder = self.round_dir(r)
        folder.mkdir(parents=True, exist_ok=True)
        rows = [{"prompt": f"Review the {p}.",
                 "responses": [{"text": f"The {p} is great. I love it (round {r}).", "model": "policy"},
                               {"text": f"It is bad (round {r}).", "model": "policy"}]} for p in PRODUCTS]
        (folder / "samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
        self._maybe_crash(f"{r}:sample")
        return {"file": str(folder / "samples.jsonl"), "prompts": len(rows)}

    def _reward(self, r):
        self._maybe_crash(f"{r}:reward")
        return {"model": f"rm-{r}"}

    def _policy(self, r):
        self._maybe_crash(f"{r}:policy")
        return {"model": f"policy-{r}"}

    def _evaluate(self, r):
        self._maybe_crash(f"{r}:evaluate")
        collected = self.state.result(f"{r}:collect")
        return {"round": r, "reward/gold": 0.1 * r, "reward/rm": 0.1 * r, "kl/sqrt": 0.5 * r,
                "agreement/heldout": 0.8, "judgments": collected["judgments"], "annotators/flagged": 0}


def _cfg(tmp_path: Path, **kw) -> LoopConfig:
    base = dict(output_dir=str(tmp_path / "loop"), rounds=2, gold_items=2, gold_fraction=0.2, threads=None,
                crowd={"size": 2, "trolls": 0})
    base.update(kw)
    return LoopConfig(**base)


def _judgments(cfg: LoopConfig, rounds: int) -> list:
    store = Store(cfg.db_url)
    try:
        return [j for r in range(1, rounds + 1) for j in store.judgments(store.project(f"loop-r{r}"))]
    finally:
        store.close()


def _check_db(cfg: LoopConfig, rounds: int) -> None:
    records = _judgments(cfg, rounds)
    regular = [j for j in records if not j.is_gold]
    assert len(regular) == rounds * len(PRODUCTS)  # the quota (every item once), not one more
    assert len({(j.user, j.item_id) for j in records}) == len(records)  # nobody judged an item twice
    assert len({j.item_id for j in regular}) == len(regular)  # overlap 1: each item judged once


def test_an_uninterrupted_loop_runs_every_stage_once(tmp_path):
    cfg = _cfg(tmp_path)
    assert FakeLoop(cfg).run() == 0
    state = json.loads((tmp_path / "loop" / "state.json").read_text())
    assert set(state["started"].values()) == {1}
    assert [k for k in state["done"] if k[0].isdigit()] == [f"{r}:{s}" for r in (1, 2) for s in STAGES]
    _check_db(cfg, 2)
    rows = [json.loads(line) for line in (tmp_path / "loop" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    # round 2's training data holds round 1's judgments too (old_data_weight 1), except each round's
    # held-out share (heldout_fraction 0.2: 1 of 6), which no reward model ever trains on
    loop = tmp_path / "loop"
    train = [json.loads(x) for x in (loop / "round-2" / "train.jsonl").read_text().splitlines()]
    held = [json.loads(x) for r in (1, 2) for x in (loop / f"round-{r}" / "heldout.jsonl").read_text().splitlines()]
    assert len(train) == 2 * len(PRODUCTS) - 2 and len(held) == 2
    assert not {x["chosen"] for x in train} & {x["chosen"] for x in held}
    assert json.loads((loop / "state.json").read_text())["done"]["2:export"]["heldout_pairs"] == 1


@pytest.mark.parametrize("stage", [f"{r}:{s}" for r, s in [(1, "sample"), (1, "reward"), (1, "policy"),
                                                             (1, "evaluate"), (2, "sample"), (2, "policy")]])
def test_each_stage_interrupted_and_resumed(tmp_path, stage):
    cfg = _cfg(tmp_path)
    loop = FakeLoop(cfg)
    loop.crash_at = stage
    with pytest.raises(Interrupted):
        loop.run()
    resumed = FakeLoop(cfg.model_copy(update={"resume": True}))
    assert resumed.run() == 0
    started = json.loads((tmp_path / "loop" / "state.json").read_text())["started"]
    assert started.pop(stage) == 2  # the interrupted stage is started again ...
    assert set(started.values()) == {1}  # ... and no finished stage is redone
    _check_db(cfg, 2)


@pytest.mark.parametrize("after", [1, 4])
def test_collection_interrupted_mid_round_loses_and_repeats_no_judgment(tmp_path, after):
    cfg = _cfg(tmp_path, rounds=1)

    def crash(made):
        if made == after:
            raise Interrupted("collect")

    with pytest.raises(Interrupted):
        FakeLoop(cfg, on_judgment=crash).run()
    assert len([j for j in _judgments(cfg, 1) if not j.is_gold]) <= after  # gold ones may be in between
    assert FakeLoop(cfg.model_copy(update={"resume": True})).run() == 0
    _check_db(cfg, 1)


def test_publish_and_export_interrupted_after_their_writes_are_redone_without_duplicates(tmp_path):
    """A kill after the import committed but before state.json recorded it: publishing again imports nothing."""
    cfg = _cfg(tmp_path, rounds=1)
    loop = FakeLoop(cfg)
    original = loop._publish

    def publish_then_die(r):
        original(r)
        raise Interrupted("publish")

    loop._publish = publish_then_die
    with pytest.raises(Interrupted):
        loop.run()
    assert FakeLoop(cfg.model_copy(update={"resume": True})).run() == 0
    store = Store(cfg.db_url)
    try:
        progress = store.progress(store.project("loop-r1"))
    finally:
        store.close()
    assert progress.items == len(PRODUCTS) and progress.gold_items == 2
    _check_db(cfg, 1)


def test_a_second_start_without_resume_is_refused_in_one_line(tmp_path):
    cfg = _cfg(tmp_path, rounds=1)
    FakeLoop(cfg).run()
    with pytest.raises(ConfigError, match="resume=true"):
        FakeLoop(cfg)


def test_bad_combinations_are_config_errors_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="ensemble_size"):
        FakeLoop(_cfg(tmp_path, selection="active"))
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        FakeLoop(_cfg(tmp_path, policy={"algorithm": "rloo"}))
    with pytest.raises(KilterError, match="trolls"):
        FakeLoop(_cfg(tmp_path, crowd={"size": 2, "trolls": 3}))
    assert not (tmp_path / "loop").exists()


def test_kill_9_in_the_middle_of_a_round_and_resume(tmp_path):
    """A real SIGKILL of the loop process while the crowd is judging; the resumed loop completes the quota exactly."""
    import os
    import subprocess
    import sys
    import time

    script = (f"import sys, time; from pathlib import Path; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
              "from test_loop_state import FakeLoop, _cfg\n"
              f"FakeLoop(_cfg(Path({str(tmp_path)!r}), rounds=1), on_judgment=lambda n: time.sleep(0.3)).run()\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    cfg = _cfg(tmp_path, rounds=1)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if (tmp_path / "loop" / "feedback.db").exists() and json.loads(
                    (tmp_path / "loop" / "state.json").read_text()).get("current", {}).get("quota"):
                if len([j for j in _judgments(cfg, 1) if not j.is_gold]) >= 2:
                    break
            assert proc.poll() is None, "the loop ended before it could be killed"
            time.sleep(0.1)
    finally:
        proc.kill()  # SIGKILL: no cleanup, no flushing
        proc.wait(10)
    assert 2 <= len([j for j in _judgments(cfg, 1) if not j.is_gold]) < len(PRODUCTS)
    assert FakeLoop(cfg.model_copy(update={"resume": True})).run() == 0
    _check_db(cfg, 1)
    started = json.loads((tmp_path / "loop" / "state.json").read_text())["started"]
    assert started.pop("1:collect") == 2 and set(started.values()) == {1}


def test_people_mode_waits_until_people_have_judged_the_quota(tmp_path, capsys):
    """mode=people: the loop waits with a progress line while a person judges in the app; then it continues."""
    import threading
    import time

    from feedback_testlib import Client, invited

    from kilter.feedback.app import create_app
    from kilter.feedback.settings import ServeConfig

    cfg = _cfg(tmp_path, rounds=1, mode="people", members=["alice"], poll_s=0.05, gold_items=0)
    (tmp_path / "loop").mkdir()
    store = Store(cfg.db_url)
    store.migrate()
    token = invited(store, "alice")
    loop = FakeLoop(cfg)
    result: list = []
    worker = threading.Thread(target=lambda: result.append(loop.run()))
    worker.start()
    app = create_app(ServeConfig(db=cfg.db_url), store=store)
    alice = Client(app)
    alice.login_invite(token)
    judged, deadline = 0, time.monotonic() + 60
    while judged < len(PRODUCTS) and time.monotonic() < deadline:
        _, assignment = alice.task("loop-r1") if "loop-r1" in {p.name for p in store.projects()} else (None, None)
        if assignment is None:
            time.sleep(0.05)
            continue
        assert alice.post("/p/loop-r1/submit", {"assignment_id": assignment, "choice": "A3"}).status_code == 303
        judged += 1
    worker.join(60)
    store.close()
    assert result == [0]
    assert "judgments (people are working in kilter serve)" in capsys.readouterr().err
    assert {j.user for j in _judgments(cfg, 1)} == {"alice"}
    _check_db(cfg, 1)


def test_both_mode_splits_the_quota_between_the_crowd_and_people(tmp_path):
    """mode=both, crowd_share=0.5: the crowd judges half of the round's items, then the loop waits for people."""
    import threading
    import time

    from feedback_testlib import Client, invited

    from kilter.feedback.app import create_app
    from kilter.feedback.settings import ServeConfig

    cfg = _cfg(tmp_path, rounds=1, mode="both", crowd_share=0.5, members=["alice"], poll_s=0.05, gold_items=0)
    (tmp_path / "loop").mkdir()
    store = Store(cfg.db_url)
    store.migrate()
    token = invited(store, "alice")
    loop = FakeLoop(cfg)
    result: list = []
    worker = threading.Thread(target=lambda: result.append(loop.run()))
    worker.start()
    app = create_app(ServeConfig(db=cfg.db_url), store=store)
    alice = Client(app)
    alice.login_invite(token)
    people_share = len(PRODUCTS) - len(PRODUCTS) // 2
    judged, deadline = 0, time.monotonic() + 60
    while judged < people_share and time.monotonic() < deadline:
        _, assignment = alice.task("loop-r1") if "loop-r1" in {p.name for p in store.projects()} else (None, None)
        if assignment is None:
            time.sleep(0.05)
            continue
        assert alice.post("/p/loop-r1/submit", {"assignment_id": assignment, "choice": "A3"}).status_code == 303
        judged += 1
    worker.join(60)
    store.close()
    assert result == [0]
    users = [j.user for j in _judgments(cfg, 1)]
    assert users.count("alice") == people_share
    assert sum(u.startswith("sim-") for u in users) == len(PRODUCTS) // 2  # the crowd stopped at its share
    collected = json.loads((tmp_path / "loop" / "state.json").read_text())["done"]["1:collect"]
    assert (collected["by_crowd"], collected["by_people"]) == (len(PRODUCTS) // 2, people_share)
    _check_db(cfg, 1)


class TournamentLoop(FakeLoop):
    """Each prompt answered by two policies, the better one always the current: a battle per item."""

    def _sample(self, r):
        folder = self.round_dir(r)
        folder.mkdir(parents=True, exist_ok=True)
        rows = [{"prompt": f"Review the {p}.",
                 "responses": [{"text": f"The {p} is great. I love the {p}.", "model": f"round-{r - 1}"},
                               {"text": "It is bad. It is bad.", "model": "sft-snapshot"}]} for p in PRODUCTS]
        (folder / "samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
        return {"file": str(folder / "samples.jsonl"), "prompts": len(rows)}


def test_a_round_with_snapshots_is_a_tournament_with_a_leaderboard(tmp_path):
    cfg = _cfg(tmp_path, rounds=1, crowd={"size": 2, "trolls": 0, "noise_min": 0.0, "noise_max": 0.0, "flip_rate": 0.0})
    assert TournamentLoop(cfg).run() == 0
    board = json.loads((tmp_path / "loop" / "state.json").read_text())["done"]["1:export"]["leaderboard"]
    assert [row["model"] for row in board] == ["round-0", "sft-snapshot"]
    assert board[0]["wins"] == len(PRODUCTS) and board[1]["wins"] == 0
