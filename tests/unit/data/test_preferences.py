"""Preference records -> groups (one prompt, distinct responses, labeled pairs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kilter.data.preferences import (
    detect_kind,
    encode_groups,
    groups_from_records,
    load_preference_groups,
    reference_pairs,
    reference_pairs_from_file,
    split_by_prompt,
)
from kilter.errors import DataError, KilterError


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_ranking_pairs_skip_ties():
    rows = [{"prompt": "p", "responses": ["a", "b", "c", "d"], "ranks": [2, 1, 2, 3]},
            {"prompt": "q", "responses": ["x", "y"], "ranks": [1, 1]}]
    groups, dropped = groups_from_records(rows, "ranking")
    assert dropped == 1 and len(groups) == 1
    # b(1) beats a, c, d; a and c (both 2) tie; a and c beat d: 5 of C(4,2) = 6 pairs.
    assert sorted((b, w) for b, w, _ in groups[0]["pairs"]) == [(0, 3), (1, 0), (1, 2), (1, 3), (2, 3)]


def test_comparisons_sharing_a_prompt_form_one_group_of_distinct_responses():
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "strength": 0.5},
            {"prompt": "q", "chosen": "x", "rejected": "y", "strength": None},
            {"prompt": "p", "chosen": "c", "rejected": "a", "strength": 1.0},
            {"prompt": "p", "chosen": "b", "rejected": "c", "strength": None}]
    groups, _ = groups_from_records(rows, "comparison")
    assert [g["prompt"] for g in groups] == ["p", "q"]
    assert groups[0]["responses"] == ["a", "b", "c"]  # each forwarded once, not twice per pair
    assert groups[0]["pairs"] == [(0, 1, 0.5), (2, 0, 1.0), (1, 2, None)]  # noisy cycles are kept as labeled
    ungrouped, _ = groups_from_records(rows, "comparison", group_by_prompt=False)
    assert [len(g["responses"]) for g in ungrouped] == [2, 2, 2, 2]
    capped, _ = groups_from_records(rows, "comparison", max_group_size=2)
    assert [g["responses"] for g in capped] == [["a", "b"], ["x", "y"], ["c", "a"], ["b", "c"]]


def test_thumbs_become_pairs_within_a_prompt():
    rows = [{"prompt": "p", "completion": "good1", "label": True},
            {"prompt": "p", "completion": "bad", "label": False},
            {"prompt": "p", "completion": "good2", "label": True},
            {"prompt": "q", "completion": "only", "label": True}]
    groups, dropped = groups_from_records(rows, "rating")
    assert dropped == 1  # q has no thumbs-down to compare with
    g = groups[0]
    named = sorted((g["responses"][b], g["responses"][w]) for b, w, _ in g["pairs"])
    assert named == [("good1", "bad"), ("good2", "bad")]


def test_detect_kind_and_load(tmp_path):
    ranking = _write(tmp_path / "r.jsonl", [{"prompt": "p", "responses": ["a", "b"], "ranks": [1, 2]}])
    comparison = _write(tmp_path / "c.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    rating = _write(tmp_path / "t.jsonl", [{"prompt": "p", "completion": "a", "label": True}])
    demo = _write(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "a"}])
    assert detect_kind(ranking) == "ranking"
    assert detect_kind(comparison) == "comparison"
    assert detect_kind(rating) == "rating"
    with pytest.raises(KilterError, match="demonstration records"):
        detect_kind(demo)
    assert detect_kind("builtin:sft", allowed=("demonstration",)) == "demonstration"
    loaded = load_preference_groups(comparison)
    assert (loaded.kind, loaded.n_records, loaded.n_pairs, loaded.n_responses) == ("comparison", 1, 1, 2)
    with pytest.raises(DataError, match="yields a preference pair"):
        load_preference_groups(rating)


def test_split_by_prompt_keeps_prompts_apart():
    groups = [{"prompt": f"p{i % 10}", "responses": ["a", "b"], "pairs": [(0, 1, None)]} for i in range(30)]
    train, held = split_by_prompt(groups, 0.2, seed=0)
    assert len(held) == 6 and len(train) == 24  # 2 of 10 prompts, 3 groups each
    assert not {g["prompt"] for g in train} & {g["prompt"] for g in held}
    assert split_by_prompt(groups, 0.2, seed=0) == (train, held)
    assert split_by_prompt(groups, 0.0, seed=0) == (groups, [])


def test_reference_pairs_are_distinct(tmp_path):
    groups = [{"prompt": "p", "responses": ["a", "b"], "pairs": []}, {"prompt": "p", "responses": ["b", "c"], "pairs": []}]
    assert reference_pairs(groups) == [("p", "a"), ("p", "b"), ("p", "c")]
    demo = _write(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "a"}, {"prompt": "p", "completion": "a"}])
    assert reference_pairs_from_file(demo) == [("p", "a")]


def test_encode_groups_share_the_prompt_ids():
    from kilter.models import load_tokenizer

    tok = load_tokenizer("builtin:micro")
    groups = [{"prompt": "Review the lamp.", "responses": ["It is great.", "It is bad. Avoid it."],
               "pairs": [(0, 1, None)]}]
    (enc,) = encode_groups(tok, groups, max_length=64)
    a, b = (e["input_ids"] for e in enc["examples"])
    prompt = tok("Review the lamp.\n", add_special_tokens=False)["input_ids"]
    assert a[: len(prompt)] == b[: len(prompt)] == prompt
    assert a[-1] == b[-1] == tok.eos_token_id and enc["pairs"] == [(0, 1, None)]
