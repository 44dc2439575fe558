"""Best-of-n pieces: KL bound, selection, reward-function loading and checking, summaries."""

from __future__ import annotations

import json
import math

import pytest

from kilter.commands.bon import (
    _read_done,
    best_vs_worst,
    kl_bound,
    select_best,
    summarize,
)


def test_kl_bound_by_hand():
    assert kl_bound(1) == 0.0
    assert kl_bound(2) == pytest.approx(math.log(2) - 0.5)  # 0.1931
    assert kl_bound(4) == pytest.approx(1.386294 - 0.75, abs=1e-6)  # 0.6363
    assert kl_bound(16) == pytest.approx(2.772589 - 0.9375, abs=1e-6)  # 1.8351
    with pytest.raises(ValueError):
        kl_bound(0)


def test_select_best_takes_the_first_maximum():
    assert select_best([0.1, 0.7, -2.0, 0.7]) == 1
    assert select_best([-1.0]) == 0


def test_summarize_and_pairs_by_hand():
    rows = [
        {"prompt": "p1", "responses": ["a", "b", "c"], "scores": [0.0, 3.0, 0.0], "best": 1, "eval_scores": [1, 2, 3]},
        {"prompt": "p2", "responses": ["d", "e", "f"], "scores": [1.0, 1.0, 1.0], "best": 0, "eval_scores": [0, 0, 0]},
    ]
    m = summarize(rows, n=3, min_reward=2.0)
    assert m["reward/mean"] == pytest.approx(1.0)  # (0 + 3 + 0 + 1 + 1 + 1) / 6
    assert m["reward/best"] == pytest.approx(2.0)  # (3 + 1) / 2
    assert m["reward/gain"] == pytest.approx(1.0)
    assert m["kl/bound"] == pytest.approx(math.log(3) - 2 / 3)
    assert m["bon/kept"] == 1.0  # only p1's best reaches 2.0
    assert m["reward_eval/best"] == pytest.approx(1.0) and m["reward_eval/mean"] == pytest.approx(1.0)
    # p2's responses all score the same: no comparison can be made from it
    assert best_vs_worst(rows) == [{"prompt": "p1", "chosen": "b", "rejected": "a"}]


def test_read_done_drops_a_partial_chunk_and_a_cut_line(tmp_path):
    path = tmp_path / "candidates.jsonl"
    rows = [{"prompt": str(i)} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"prompt": "5", "respo')
    assert [r["prompt"] for r in _read_done(path, chunk=2, total=9)] == ["0", "1", "2", "3"]
    assert len(_read_done(path, chunk=2, total=5)) == 5  # all prompts done: keep everything
    assert _read_done(tmp_path / "missing.jsonl", chunk=2, total=5) == []
