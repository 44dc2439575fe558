"""DPO data handling and bookkeeping: rankings to pairs, pair batches, logged statistics."""

from __future__ import annotations

import math

import pytest
import torch

from kilter.errors import ConfigError
from kilter.trainers.dpo import (
    DPOConfig,
    flat_examples,
    pair_batch,
    pair_stats,
    ranking_to_pairs,
    stats_to_metrics,
)


def test_ranking_to_pairs_all_and_best_vs_rest_with_ties():
    record = {"prompt": "p", "responses": ["a", "b", "c", "d"], "ranks": [2, 1, 2, 3]}
    pairs = [(p["chosen"], p["rejected"]) for p in ranking_to_pairs(record, "all")]
    # a~c tie (no pair); b beats everyone; a and c beat d
    assert sorted(pairs) == sorted([("b", "a"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")])
    best = [(p["chosen"], p["rejected"]) for p in ranking_to_pairs(record, "best_vs_rest")]
    assert best == [("b", "a"), ("b", "c"), ("b", "d")]
    tied_best = {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 1, 2]}
    assert [(p["chosen"], p["rejected"]) for p in ranking_to_pairs(tied_best, "best_vs_rest")] == [("a", "c"), ("b", "c")]
    assert ranking_to_pairs({"prompt": "p", "responses": ["a", "b"], "ranks": [1, 1]}, "all") == []
    with pytest.raises(ConfigError):
        ranking_to_pairs(record, "worst")


def test_pair_batch_stacks_chosen_then_rejected():
    enc = [
        {"chosen": {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, "rejected": {"input_ids": [5, 8], "labels": [-100, 8]}},
        {"chosen": {"input_ids": [9, 4], "labels": [-100, 4]}, "rejected": {"input_ids": [9, 3, 3, 2], "labels": [-100, 3, 3, 2]}},
    ]
    batch = pair_batch(enc, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [9, 4, 0, 0], [5, 8, 0, 0], [9, 3, 3, 2]]
    assert batch["labels"][2].tolist() == [-100, 8, -100, -100]
    assert [e["input_ids"] for e in flat_examples(enc)] == [[5, 6, 7], [5, 8], [9, 4], [9, 3, 3, 2]]


def test_pair_stats_and_metrics_by_hand():
    losses = torch.tensor([0.5, 1.5])
    chosen, rejected = torch.tensor([0.2, -0.1]), torch.tensor([0.0, -0.1])  # one win, one tie
    stats = pair_stats(losses, chosen, rejected, torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -6.0]))
    m = stats_to_metrics({"pairs": 2.0, **{k: float(v) for k, v in stats.items()}}, "eval/", "loss")
    assert m["eval/loss"] == pytest.approx(1.0)
    assert m["eval/rewards/accuracy"] == pytest.approx(0.75)  # the tie counts as half
    assert m["eval/rewards/margin"] == pytest.approx(0.1)
    assert m["eval/rewards/chosen"] == pytest.approx(0.05)
    assert m["eval/logps/chosen"] == pytest.approx(-4.0) and m["eval/logps/rejected"] == pytest.approx(-5.0)


def test_config_ranges_and_literals():
    from kilter.config import load_config

    with pytest.raises(ConfigError, match="beta"):
        load_config(DPOConfig, None, ["beta=0"])
    with pytest.raises(ConfigError, match="label_smoothing"):
        load_config(DPOConfig, None, ["label_smoothing=0.5"])
    with pytest.raises(ConfigError, match="loss_type"):
        load_config(DPOConfig, None, ["loss_type=hinge"])
    cfg = load_config(DPOConfig, None, ["loss_type=ipo", "data.ranking_pairs=best_vs_rest", "reference=online"])
    assert cfg.loss_type == "ipo" and cfg.data.ranking_pairs == "best_vs_rest" and cfg.reference == "online"
    assert math.isclose(cfg.beta, 0.1)
