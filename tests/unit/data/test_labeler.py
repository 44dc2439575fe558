"""The simulated labeler: gold plus Bradley-Terry / Plackett-Luce noise, strengths, records."""

from __future__ import annotations

import math
from itertools import permutations

import pytest

from kilter.config import load_config
from kilter.data.labeler import LabelerConfig, SimulatedLabeler, _competition_ranks, strength_from_gap
from kilter.data.task import build_task, gold_score
from kilter.errors import ConfigError

PROMPT = "Write a review of the blender."


def table_gold(scores: dict[str, float]):
    """A gold function that looks the response up in ``scores`` (ignores the prompt)."""
    return lambda prompt, response: scores[response]


@pytest.fixture(scope="module")
def demo_pairs():
    """(prompt, a, b, gold a, gold b) from consecutive demonstrations with distinct gold."""
    demos = build_task(seed=0, n_demonstrations=400, n_eval=10).demonstrations
    pairs = []
    for first, second in zip(demos[0::2], demos[1::2]):
        prompt = first["prompt"]
        a, b = first["completion"], second["completion"]
        g_a, g_b = gold_score(prompt, a), gold_score(prompt, b)
        if a != b and g_a != g_b:
            pairs.append((prompt, a, b, g_a, g_b))
    assert len(pairs) > 150
    return pairs


def test_strength_follows_the_four_level_scale():
    assert strength_from_gap(0.0) == 0.25  # slightly better
    assert strength_from_gap(0.19) == 0.25
    assert strength_from_gap(0.2) == 0.5  # somewhat better
    assert strength_from_gap(-0.49) == 0.5  # sign does not matter
    assert strength_from_gap(0.5) == 0.75  # better
    assert strength_from_gap(0.99) == 0.75
    assert strength_from_gap(1.0) == 1.0  # much better
    assert strength_from_gap(-7.0) == 1.0


def test_noise_free_labeler_always_follows_gold(demo_pairs):
    labeler = SimulatedLabeler(noise=0.0)
    for prompt, a, b, g_a, g_b in demo_pairs:
        record = labeler.compare(prompt, a, b)
        assert set(record) == {"prompt", "chosen", "rejected", "strength"}
        assert record["prompt"] == prompt
        assert record["chosen"] == (a if g_a > g_b else b)
        assert record["rejected"] == (b if g_a > g_b else a)
        assert record["strength"] == strength_from_gap(g_a - g_b)


def test_noisy_labeler_mostly_agrees_with_gold(demo_pairs):
    labeler = SimulatedLabeler(noise=0.3, seed=1)
    agree = [labeler.compare(p, a, b)["chosen"] == (a if g_a > g_b else b) for p, a, b, g_a, g_b in demo_pairs]
    rate = sum(agree) / len(agree)
    assert 0.6 < rate < 0.99
    # more noise, less agreement
    louder = SimulatedLabeler(noise=3.0, seed=1)
    loud_rate = sum(louder.compare(p, a, b)["chosen"] == (a if g_a > g_b else b) for p, a, b, g_a, g_b in demo_pairs)
    assert loud_rate / len(demo_pairs) < rate


def test_compare_matches_bradley_terry_probability():
    # gap = 0.3 * ln 3, so P(a beats b) = sigmoid(ln 3) = 3 / (3 + 1) = 0.75
    gold = table_gold({"a": 0.3 * math.log(3), "b": 0.0})
    labeler = SimulatedLabeler(noise=0.3, seed=7, gold_fn=gold)
    wins = sum(labeler.compare("p", "a", "b")["chosen"] == "a" for _ in range(4000))
    assert wins / 4000 == pytest.approx(0.75, abs=0.03)


def test_flip_rate_reverses_judgments():
    gold = table_gold({"good": 1.0, "bad": -1.0})
    always_wrong = SimulatedLabeler(noise=0.0, flip_rate=1.0, gold_fn=gold)
    assert all(always_wrong.compare("p", "good", "bad")["chosen"] == "bad" for _ in range(20))
    half = SimulatedLabeler(noise=0.0, flip_rate=0.5, seed=3, gold_fn=gold)
    wins = sum(half.compare("p", "good", "bad")["chosen"] == "good" for _ in range(2000))
    assert wins / 2000 == pytest.approx(0.5, abs=0.05)
    assert always_wrong.thumbs("p", "good") is False and always_wrong.thumbs("p", "bad") is True


def test_identical_texts_give_no_comparison_and_gold_ties_a_coin():
    labeler = SimulatedLabeler(noise=0.0, seed=0)
    assert labeler.compare(PROMPT, "The blender is fine.", "The blender is fine.") is None
    tie = SimulatedLabeler(noise=0.0, seed=0, gold_fn=table_gold({"x": 0.5, "y": 0.5}))
    records = [tie.compare("p", "x", "y") for _ in range(200)]
    assert {r["chosen"] for r in records} == {"x", "y"}
    assert {r["strength"] for r in records} == {0.25}


def test_same_seed_same_labels_other_seed_other_labels(demo_pairs):
    def run(seed):
        labeler = SimulatedLabeler(noise=0.5, seed=seed)
        return [labeler.compare(p, a, b) for p, a, b, _, _ in demo_pairs]

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_competition_ranks_worked_example():
    assert _competition_ranks([0.2, 0.9, 0.2, -1.0]) == [2, 1, 2, 4]
    assert _competition_ranks([3.0, 2.0, 1.0]) == [1, 2, 3]


def test_noise_free_rank_is_the_gold_order():
    texts = [
        "The blender is terrible.",
        "The blender is great. It works well and looks nice.",
        "The toaster is okay.",
        "great great great great",
    ]
    ranks = SimulatedLabeler(noise=0.0).rank(PROMPT, texts)
    assert sorted(ranks) == [1, 2, 3, 4]
    golds = [gold_score(PROMPT, t) for t in texts]
    by_rank = [t for _, t in sorted(zip(ranks, texts))]
    assert by_rank == [t for _, t in sorted(zip(golds, texts), reverse=True)]
    assert ranks[1] == 1


def test_identical_responses_share_a_rank():
    texts = ["The blender is fine.", "The blender is great.", "The blender is fine."]
    for noise in (0.0, 0.5):
        labeler = SimulatedLabeler(noise=noise, seed=2)
        for _ in range(20):
            ranks = labeler.rank(PROMPT, texts)
            assert ranks[0] == ranks[2]
            assert sorted(ranks) in ([1, 1, 3], [1, 2, 2])


def test_rank_samples_plackett_luce():
    # noise 1 and gold ln(1), ln(2), ln(3): Plackett-Luce weights 1 : 2 : 3, so the first
    # place goes to "c" with probability 3/6, "b" 2/6, "a" 1/6; and "c" > "b" > "a" with
    # probability 3/6 * 2/3 = 1/3.
    gold = table_gold({"a": 0.0, "b": math.log(2), "c": math.log(3)})
    labeler = SimulatedLabeler(noise=1.0, seed=11, gold_fn=gold)
    n = 6000
    rankings = [labeler.rank("p", ["a", "b", "c"]) for _ in range(n)]
    assert all(sorted(r) == [1, 2, 3] for r in rankings)
    firsts = {x: sum(r[i] == 1 for r in rankings) / n for i, x in enumerate("abc")}
    assert firsts["a"] == pytest.approx(1 / 6, abs=0.02)
    assert firsts["b"] == pytest.approx(2 / 6, abs=0.02)
    assert firsts["c"] == pytest.approx(3 / 6, abs=0.02)
    assert sum(r == [3, 2, 1] for r in rankings) / n == pytest.approx(1 / 3, abs=0.02)
    # all 6 orders occur
    assert {tuple(r) for r in rankings} == set(permutations([1, 2, 3]))


def test_thumbs_thresholds_the_perceived_gold():
    gold = table_gold({"good": 0.4, "meh": -0.1})
    labeler = SimulatedLabeler(noise=0.0, gold_fn=gold)
    assert labeler.thumbs("p", "good") is True and labeler.thumbs("p", "meh") is False
    strict = SimulatedLabeler(noise=0.0, gold_fn=gold, threshold=0.5)
    assert strict.thumbs("p", "good") is False
    # with noise, P(up) = sigmoid((0.4 - 0) / 0.4) = sigmoid(1) = 0.731
    noisy = SimulatedLabeler(noise=0.4, seed=4, gold_fn=gold)
    ups = sum(noisy.thumbs("p", "good") for _ in range(4000)) / 4000
    assert ups == pytest.approx(1 / (1 + math.exp(-1)), abs=0.03)


def test_label_comparisons_all_and_adjacent_pairs():
    labeler = SimulatedLabeler(noise=0.0)
    group = ["The blender is great.", "The blender is bad.", "The blender is okay.", "The blender is bad."]
    everything = labeler.label_comparisons([PROMPT, PROMPT], [group, group[:2]])
    # C(4,2) = 6 pairs minus the identical pair, then 1 pair from the second group
    assert len(everything) == 5 + 1
    assert all(set(r) == {"prompt", "chosen", "rejected", "strength"} for r in everything)
    assert all(gold_score(PROMPT, r["chosen"]) > gold_score(PROMPT, r["rejected"]) for r in everything)
    adjacent = labeler.label_comparisons([PROMPT], [group], pairs="adjacent")
    assert [(r["chosen"], r["rejected"]) for r in adjacent] == [
        (group[0], group[1]),
        (group[2], group[1]),
        (group[2], group[3]),
    ]
    with pytest.raises(ValueError, match="1 prompts but 2 groups"):
        labeler.label_comparisons([PROMPT], [group, group])
    with pytest.raises(ConfigError, match="pairs"):
        labeler.label_comparisons([PROMPT], [group], pairs="random")


def test_label_rankings_and_thumbs_records():
    labeler = SimulatedLabeler(noise=0.0)
    # (a negative review that names the blender still scores above 0: naming the product is worth 1.0)
    group = ["The blender is great.", "It is bad."]
    assert labeler.label_rankings([PROMPT], [group]) == [{"prompt": PROMPT, "responses": group, "ranks": [1, 2]}]
    assert labeler.label_thumbs([PROMPT, PROMPT], group) == [
        {"prompt": PROMPT, "completion": group[0], "label": True},
        {"prompt": PROMPT, "completion": group[1], "label": False},
    ]
    with pytest.raises(ValueError):
        labeler.label_thumbs([PROMPT], group)


def test_labeler_config_builds_and_validates():
    cfg = load_config(LabelerConfig, None, ["noise=0.5", "flip_rate=0.1", "seed=3"])
    labeler = cfg.build()
    assert (labeler.noise, labeler.flip_rate, labeler.threshold) == (0.5, 0.1, 0.0)
    with pytest.raises(ConfigError, match="noise"):
        load_config(LabelerConfig, None, ["noise=-1"])
    with pytest.raises(ConfigError, match="flip_rate"):
        load_config(LabelerConfig, None, ["flip_rate=2"])
    with pytest.raises(ConfigError, match="flip_rate"):
        SimulatedLabeler(flip_rate=1.5)
