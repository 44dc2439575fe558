"""The loop's small pure parts: held-out agreement, the weighting of old rounds, the PPO curve fit."""

import json
import math

import pytest

from kilter.commands.loop import _weighted_rounds, heldout_agreement, ppo_curve_fit
from kilter.evaluation.overoptimization import gao_curve


def test_heldout_agreement_counts_pairs_ordered_as_gold_does():
    samples = [{"prompt_index": 0, "gold": 1.0, "rm": 0.5}, {"prompt_index": 0, "gold": 0.0, "rm": 0.1},  # agree
               {"prompt_index": 1, "gold": 1.0, "rm": 0.0}, {"prompt_index": 1, "gold": 0.0, "rm": 0.3},  # disagree
               {"prompt_index": 2, "gold": 0.5, "rm": 0.0}, {"prompt_index": 2, "gold": 0.5, "rm": 0.9}]  # gold tie
    assert heldout_agreement(samples) == 0.5
    assert heldout_agreement(samples[4:]) is None


def test_human_calibration_bins_the_rm_against_held_out_judgments():
    from kilter.commands.loop import human_calibration

    table = human_calibration([2.0] * 20)  # RM margin 2 for the person's choice: p = sigmoid(2) = 0.88, always right
    assert table["n_pairs"] == 20
    assert table["ece"] == pytest.approx(1 - 1 / (1 + math.exp(-2)), abs=1e-6)
    # half the time the person chose the other one: p 0.88 but right only half the time
    table = human_calibration([2.0] * 10 + [-2.0] * 10)
    assert table["ece"] == pytest.approx(1 / (1 + math.exp(-2)) - 0.5, abs=1e-6)


def test_old_rounds_are_down_weighted_by_subsampling():
    rows = {1: [{"i": i} for i in range(1000)], 2: [{"i": i} for i in range(1000)], 3: [{"i": i} for i in range(100)]}
    out = _weighted_rounds(rows, 3, 0.5, seed=0)
    # round 3 in full, round 2 about half, round 1 about a quarter
    assert len(out) == pytest.approx(100 + 500 + 250, abs=60)
    assert out[-100:] == rows[3]
    assert _weighted_rounds(rows, 3, 0.5, seed=0) == out  # fixed by the seed
    assert len(_weighted_rounds(rows, 3, 1.0, seed=0)) == 2100
    assert _weighted_rounds(rows, 3, 0.0, seed=0) == rows[3]


def test_ppo_curve_fit_recovers_the_rl_form_and_flags_divergence(tmp_path):
    d = [0.2 * i for i in range(1, 16)]
    gold = [-0.5 + g for g in gao_curve("rl", 0.6, 0.3, d)]
    rows = [{"step": i, "kl/ref": x * x, "reward/gold": g, "reward/raw": 0.5 * x}
            for i, (x, g) in enumerate(zip(d, gold), start=1)]
    for r, part in ((1, rows[:7]), (2, rows[7:])):  # two rounds, the second continuing the first
        (tmp_path / f"round-{r}").mkdir()
        (tmp_path / f"round-{r}" / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in part))
    fit = ppo_curve_fit([tmp_path / "round-1", tmp_path / "round-2"], anchor=-0.5)
    assert fit["gao/alpha"] == pytest.approx(0.6) and fit["gao/beta"] == pytest.approx(0.3)
    assert fit["gao/peak_sqrt_kl"] == pytest.approx(math.exp(0.6 / 0.3 - 1))
    assert fit["ppo/diverged"] == 1.0  # round 2 runs past the gold peak (d = e) while the proxy keeps rising
    assert ppo_curve_fit([tmp_path / "round-1"], anchor=-0.5)["ppo/diverged"] == 0.0  # gold still rising there
    assert ppo_curve_fit([tmp_path / "missing"]) == {}


@pytest.mark.parametrize(("prompts", "split"), [("builtin:prompts", "product"), ("builtin:prompts@template", "template"),
                                                ("builtin:prompts@product", "product"), ("my_prompts.jsonl", "product")])
def test_the_loop_works_on_the_split_its_prompts_name(prompts, split):
    from kilter.commands.loop import LoopConfig

    # the SFT stage, the baseline and every round's evaluation use builtin:*@{task_split}
    assert LoopConfig(prompts=prompts).task_split == split
