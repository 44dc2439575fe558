"""The reward model learns the built-in task's hidden preference.

SFT model -> `kilter label` (K=4 samples per prompt, noisy simulated labels) -> `kilter rm` on
the rankings -> held-out accuracy against the GOLD preference on held-out prompts (products
never seen in training).  Observed on 2 CPU cores: about 0.70 after 30 steps (chance 0.5).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from kilter.cli import main
from kilter.runs import read_metrics


@pytest.fixture(scope="module")
def rm_run(sft_model_dir, sim_labels_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm-smoke") / "run"
    code = main(["rm", f"model={sft_model_dir}", f"output_dir={out}",
                 f"data.train={sim_labels_dir / 'rankings.jsonl'}", f"data.eval={sim_labels_dir / 'eval_rankings.jsonl'}",
                 "batch_size=8", "max_steps=30", "optim.lr=2e-3", "log_every=10", "eval_every=1000",
                 "tensorboard=false", "n_samples=2"])
    assert code == 0
    return out


def test_reward_model_beats_chance_against_gold_on_held_out_prompts(rm_run):
    metrics = read_metrics(rm_run)
    final = metrics[-1]
    print(f"held-out gold accuracy {final['eval/accuracy']:.3f}, margin {final['eval/margin']:.3f}, "
          f"ECE {final['eval/ece']:.3f}")
    assert final["eval/accuracy"] > 0.6
    # Learning happened: the training windows' accuracy rises and the loss ends below chance (ln 2). The
    # first window's loss is no baseline: since naming the product is worth 1.0 of gold, many pairs are
    # easy and a 10-step window's loss depends on which groups it drew (measured 0.501, 0.545, 0.548
    # while the windows' accuracy went 0.59, 0.70, 0.81).
    train = [m for m in metrics if "loss/rm" in m]
    assert train[-1]["train/accuracy"] > train[0]["train/accuracy"]
    assert train[-1]["loss/rm"] < math.log(2)
    assert final["eval/margin"] > 0
    assert json.loads((rm_run / "calibration.json").read_text())["n_pairs"] > 100


def test_kilter_score_reports_the_same_accuracy_and_a_zero_mean(rm_run, sim_labels_dir, tmp_path, capsys):
    scored = tmp_path / "eval_scored.jsonl"
    code = main(["score", f"model={rm_run}", f"input={sim_labels_dir / 'eval_rankings.jsonl'}", f"output={scored}",
                 "progress=false"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["pairwise_accuracy"] == pytest.approx(read_metrics(rm_run)[-1]["eval/accuracy"], abs=1e-6)
    rows = [json.loads(line) for line in scored.read_text().splitlines()]
    assert all(len(r["rewards"]) == len(r["responses"]) for r in rows)

    # thumbs.jsonl holds exactly the training responses, the bias reference: mean reward 0.  The default
    # bias_pass=last_epoch takes the mean from the training forwards' rewards, corrected for the weights'
    # drift on 256 of the 384 responses rescored: the same mean as the full pass within 5% of the rewards'
    # standard deviation (measured: 1.5%, 0.025 against a std of 1.65, after 30 steps at lr 2e-3).
    code = main(["score", f"model={rm_run / 'final'}", f"input={sim_labels_dir / 'thumbs.jsonl'}",
                 f"output={tmp_path / 'thumbs_scored.jsonl'}", "progress=false"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    scores = [x for line in (tmp_path / "thumbs_scored.jsonl").read_text().splitlines()
              for x in json.loads(line).get("rewards", [json.loads(line).get("reward")])]
    std = float(torch.tensor(scores, dtype=torch.float64).std())
    print(f"mean reward on the training responses {summary['reward_mean']:.2e} (std {std:.3f}); "
          f"rescored {read_metrics(rm_run)[-1]['reward/bias_rescored']:.0f}")
    assert abs(summary["reward_mean"]) < 0.05 * std


def test_score_bad_input_exits_2(rm_run, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Review the lamp.", "chosen": "Nice.", "rejected": "Nice."}) + "\n")
    assert main(["score", f"model={rm_run}", f"input={bad}"]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "Review the lamp.", "response": "Nice lamp."}) + "\n")
    assert main(["score", f"model={tmp_path / 'nope'}", f"input={good}"]) == 2
    assert "reward model folder not found" in capsys.readouterr().err
    assert main(["score", f"model={rm_run}", f"input={good}", "progress=false"]) == 0
    assert "reward" in json.loads((tmp_path / "good.scored.jsonl").read_text())
