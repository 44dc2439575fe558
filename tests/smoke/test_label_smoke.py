"""`kilter label`: K samples per prompt from the SFT model, judged by the simulated labeler."""

from __future__ import annotations

import json
from math import comb

from kilter.cli import main
from kilter.data.readers import read_records
from kilter.data.task import gold_score


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_label_writes_valid_comparisons_rankings_and_thumbs(sim_labels_dir):
    out = sim_labels_dir
    rankings = read_records(out / "rankings.jsonl", "ranking").rows
    comparisons = read_records(out / "comparisons.jsonl", "comparison").rows
    thumbs = read_records(out / "thumbs.jsonl", "rating").rows
    summary = json.loads((out / "summary.json").read_text())
    train = summary["train"]
    assert train["prompts"] == 96 and len(rankings) == 96 - train["prompts_skipped"] >= 90
    sizes = [len(r["responses"]) for r in rankings]
    assert all(2 <= k <= 4 for k in sizes) and sum(sizes) >= 0.9 * 4 * len(rankings)
    assert sum(sizes) == train["responses"] == len(thumbs)
    assert len(comparisons) == sum(comb(k, 2) for k in sizes) == train["comparisons"]
    # Every comparison compares two responses the ranking file holds for that prompt.
    by_prompt = {r["prompt"]: set(r["responses"]) for r in rankings}
    assert all({c["chosen"], c["rejected"]} <= by_prompt[c["prompt"]] for c in comparisons)
    assert {c["strength"] for c in comparisons} <= {0.25, 0.5, 0.75, 1.0}
    # noise 0.3: mostly, not always, the gold preference.
    assert 0.6 < train["labeler_gold_agreement"] < 0.99
    samples = _rows(out / "samples.jsonl")
    s = samples[0]
    assert s["gold"] == [gold_score(s["prompt"], r) for r in s["responses"]]


def test_held_out_labels_are_the_gold_preference(sim_labels_dir):
    out = sim_labels_dir
    eval_rankings = read_records(out / "eval_rankings.jsonl", "ranking").rows
    assert len(eval_rankings) >= 30
    for row in eval_rankings:
        golds = [gold_score(row["prompt"], r) for r in row["responses"]]
        assert row["ranks"] == [1 + sum(o > g for o in golds) for g in golds]
    assert json.loads((out / "summary.json").read_text())["eval"]["labeler_gold_agreement"] == 1.0
    train_prompts = {r["prompt"] for r in read_records(out / "rankings.jsonl", "ranking").rows}
    assert not train_prompts & {r["prompt"] for r in eval_rankings}


def test_label_config_errors_exit_2(tmp_path, capsys):
    assert main(["label", "k=1", f"output_dir={tmp_path}"]) == 2
    assert "'k'" in capsys.readouterr().err
    assert main(["label", f"model={tmp_path / 'missing'}", f"output_dir={tmp_path}"]) == 2
    assert "not found" in capsys.readouterr().err
