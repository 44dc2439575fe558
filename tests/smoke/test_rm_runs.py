"""``kilter rm`` end to end on the built-in micro model with a handful of groups.

The model is random and the runs are a few steps long: these tests check mechanics (K forwards
per prompt, the bias, resume, ensembles, init_from, LoRA, bad input), not learning -- the
smoke test checks learning.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kilter.cli import main
from kilter.config import load_config
from kilter.data.task import build_task, gold_score
from kilter.models.reward import RewardEnsemble, RewardModel, load_reward
from kilter.runs import read_metrics
from kilter.trainers.rm import RMConfig

BASE = ["model=builtin:micro", "batch_size=2", "tensorboard=false", "n_samples=0", "log_every=1",
        "optim.lr=1e-3", "data.max_length=64", "eval_batch_size=16", "threads=1"]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Rankings of K=4 demonstrations per prompt (ranked by gold), their comparisons and thumbs."""
    root = tmp_path_factory.mktemp("rm-data")
    by_prompt: dict[str, list[str]] = defaultdict(list)
    for d in build_task(seed=0, n_demonstrations=1600, n_eval=10).demonstrations:
        if d["completion"] not in by_prompt[d["prompt"]]:
            by_prompt[d["prompt"]].append(d["completion"])
    rankings, comparisons, thumbs, demos = [], [], [], []
    for prompt, responses in [(p, r[:4]) for p, r in by_prompt.items() if len(r) >= 4][:10]:
        golds = [gold_score(prompt, r) for r in responses]
        ranks = [1 + sum(o > g for o in golds) for g in golds]
        rankings.append({"prompt": prompt, "responses": responses, "ranks": ranks})
        best, worst = ranks.index(min(ranks)), ranks.index(max(ranks))
        comparisons.append({"prompt": prompt, "chosen": responses[best], "rejected": responses[worst],
                            "strength": 1.0})
        thumbs += [{"prompt": prompt, "completion": r, "label": g > 0} for r, g in zip(responses, golds)]
        demos.append({"prompt": prompt, "completion": responses[best]})
    return {"rankings": _write(root / "rankings.jsonl", rankings),
            "comparisons": _write(root / "comparisons.jsonl", comparisons),
            "thumbs": _write(root / "thumbs.jsonl", thumbs), "demos": _write(root / "demos.jsonl", demos)}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(*args: str) -> int:
    return main(["rm", *BASE, *args])


@pytest.fixture(scope="module")
def base_run(data, tmp_path_factory) -> Path:
    """4 steps on 8 training rankings, 2 held out; a checkpoint at every step."""
    out = tmp_path_factory.mktemp("rm-base") / "run"
    assert _run(f"output_dir={out}", f"data.train={data['rankings']}", "data.eval_fraction=0.2", "max_steps=4",
                "save_every=1", "keep_checkpoints=null", "eval_every=2") == 0
    return out


def _raw_scores(folder: Path, prompts: list, responses: list[str]) -> torch.Tensor:
    scorer = load_reward(folder)
    return scorer.score(prompts, responses) - scorer.bias


@pytest.mark.parametrize("padding_free", [False, True])
def test_each_response_is_forwarded_once_per_prompt(data, tmp_path, monkeypatch, padding_free):
    from kilter.models import packed, reward_batches

    rows_seen: list[int] = []
    original = reward_batches.raw_scores
    original_packed = packed.LastTokenScores.forward

    def counting(model, input_ids, attention_mask):
        rows_seen.append(int(input_ids.shape[0]))
        return original(model, input_ids, attention_mask)

    def counting_packed(self, input_ids, position_ids, last_index, attention_mask=None):
        if torch.is_grad_enabled():  # training forwards, not the no-grad checks of the fast path
            rows_seen.append(int(last_index.numel()))  # one score per packed response
        return original_packed(self, input_ids, position_ids, last_index, attention_mask=attention_mask)

    monkeypatch.setattr(reward_batches, "raw_scores", counting)
    monkeypatch.setattr(packed.LastTokenScores, "forward", counting_packed)
    code = _run(f"output_dir={tmp_path / 'run'}", f"data.train={data['rankings']}", "data.eval_fraction=0",
                "batch_size=4", "max_steps=1", "bias_reference=none", f"data.padding_free={str(padding_free).lower()}")
    assert code == 0
    # One step of 4 prompts x K=4 responses (6 pairs each): 16 rows, not 2 x 24 = 48.
    assert rows_seen == [16]


def test_metrics_calibration_and_checkpoints(base_run):
    metrics = read_metrics(base_run)
    keys = set().union(*metrics)
    for key in ("loss/rm", "train/accuracy", "train/margin", "reward/mean", "reward/std", "perf/pairs_per_s",
                "eval/loss", "eval/accuracy", "eval/margin", "eval/ece", "reward/bias"):
        assert key in keys, key
    assert [m["step"] for m in metrics if "loss/rm" in m] == [1, 2, 3, 4]
    calibration = json.loads((base_run / "calibration.json").read_text())
    assert calibration["n_pairs"] > 0 and len(calibration["bins"]) == 10
    assert sum(b["count"] for b in calibration["bins"]) == 2 * calibration["n_pairs"]
    assert calibration["ece"] == pytest.approx(metrics[-1]["eval/ece"])
    assert [p.name for p in sorted((base_run / "checkpoints").iterdir())] == ["step-1", "step-2", "step-3", "step-4"]
    config = json.loads((base_run / "final" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1


def test_bias_makes_the_reference_mean_zero(base_run, data):
    # Reference = the training responses (the 8 prompts not held out).
    from kilter.data.preferences import load_preference_groups, split_by_prompt

    groups = load_preference_groups(str(data["rankings"])).groups
    train, held = split_by_prompt(groups, 0.2, seed=0)
    assert len(train) == 8 and len(held) == 2
    prompts = [g["prompt"] for g in train for _ in g["responses"]]
    responses = [r for g in train for r in g["responses"]]
    scorer = load_reward(base_run)
    rewards = scorer.score(prompts, responses)
    assert abs(float(rewards.mean())) < 1e-5
    assert scorer.bias != 0.0
    assert read_metrics(base_run)[-1]["reward/bias"] == pytest.approx(scorer.bias)


def test_bias_reference_can_be_a_file(data, tmp_path):
    out = tmp_path / "run"
    assert _run(f"output_dir={out}", f"data.train={data['comparisons']}", "data.eval_fraction=0", "max_steps=1",
                f"bias_reference={data['demos']}") == 0
    demos = _rows(data["demos"])
    rewards = load_reward(out).score([d["prompt"] for d in demos], [d["completion"] for d in demos])
    assert abs(float(rewards.mean())) < 1e-5


def test_resume_gives_the_same_model_as_an_uninterrupted_run(base_run, data, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(base_run, copy)
    shutil.rmtree(copy / "final")
    shutil.rmtree(copy / "checkpoints" / "step-4")
    shutil.rmtree(copy / "checkpoints" / "step-3")
    assert _run(f"output_dir={copy}", f"data.train={data['rankings']}", "data.eval_fraction=0.2", "max_steps=4",
                "save_every=1", "keep_checkpoints=null", "eval_every=2", "resume=true") == 0
    a = load_file(str(base_run / "final" / "model.safetensors"))
    b = load_file(str(copy / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    assert [m["step"] for m in read_metrics(copy) if "loss/rm" in m] == [1, 2, 3, 4]


def test_without_resume_existing_checkpoints_are_an_error(base_run, data, capsys):
    assert _run(f"output_dir={base_run}", f"data.train={data['rankings']}") == 2
    assert "resume=true" in capsys.readouterr().err


def test_ensemble_trains_members_on_bootstrap_resamples(data, tmp_path):
    out = tmp_path / "ens"
    assert _run(f"output_dir={out}", f"data.train={data['rankings']}", f"data.eval={data['comparisons']}",
                "max_steps=2", "ensemble_size=2") == 0
    manifest = json.loads((out / "final" / "ensemble.json").read_text())
    assert manifest["members"] == ["member-0", "member-1"] and manifest["seeds"] == [0, 1]
    ensemble = load_reward(out)
    assert isinstance(ensemble, RewardEnsemble)
    rows = _rows(data["rankings"])
    prompts = [r["prompt"] for r in rows for _ in r["responses"]]
    responses = [x for r in rows for x in r["responses"]]
    mean, std = ensemble.score_with_std(prompts, responses)
    assert bool((std > 0).all())
    for member in ensemble.members:  # each member is zero-mean on the (full) training responses
        assert abs(float(member.score(prompts, responses).mean())) < 1e-5
    assert "ensemble/eval_accuracy" in read_metrics(out)[-1]
    assert (out / "member-1" / "metrics.jsonl").is_file()


def test_init_from_starts_stage_two_from_the_stage_one_model(base_run, data, tmp_path):
    out = tmp_path / "stage2"
    # A vanishing learning rate: the stage-2 model must still be the stage-1 model.
    assert _run(f"output_dir={out}", f"init_from={base_run}", f"data.train={data['thumbs']}",
                "data.eval_fraction=0", "max_steps=1", "optim.lr=1e-12") == 0
    rows = _rows(data["demos"])
    prompts, responses = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    torch.testing.assert_close(_raw_scores(out / "final", prompts, responses),
                               _raw_scores(base_run / "final", prompts, responses), atol=1e-4, rtol=0)
    # ... and stage 2 recomputed the bias on its own reference: the thumbs responses of the
    # prompts that have both a thumbs up and a thumbs down (the others yield no pair).
    labels = defaultdict(set)
    for t in _rows(data["thumbs"]):
        labels[t["prompt"]].add(t["label"])
    thumbs = [t for t in _rows(data["thumbs"]) if len(labels[t["prompt"]]) == 2]
    assert 0 < len(thumbs) < 40
    stage2 = load_reward(out).score([t["prompt"] for t in thumbs], [t["completion"] for t in thumbs])
    assert abs(float(stage2.mean())) < 1e-5


def test_lora_run_saves_a_merged_plain_reward_model(data, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "lora"
    assert _run(f"output_dir={out}", f"data.train={data['comparisons']}", "data.eval_fraction=0", "max_steps=2",
                "lora.enabled=true", "lora.r=4", "n_samples=2", f"data.eval={data['comparisons']}") == 0
    final = out / "final"
    assert not (final / "adapter_config.json").exists()
    plain = AutoModelForSequenceClassification.from_pretrained(final)
    assert plain.score.weight.shape == (1, 64)
    scorer = load_reward(out)
    assert isinstance(scorer, RewardModel)
    # The bias was set through the peft wrapper and survived the merge: the training
    # responses (every chosen and rejected) have mean reward 0.
    rows = _rows(data["comparisons"])
    prompts = [r["prompt"] for r in rows for _ in range(2)]
    responses = [x for r in rows for x in (r["chosen"], r["rejected"])]
    assert scorer.bias != 0.0
    assert abs(float(scorer.score(prompts, responses).mean())) < 1e-5


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "responses": ["only one"], "ranks": [1]}, "at least 2 responses"),
    ({"prompt": "p", "responses": ["same", "same"], "ranks": [1, 2]}, "are identical"),
    ({"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 2]}, "expected 3 ranks"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "same text as 'chosen'"),
])
def test_bad_rows_stop_the_run_with_exit_code_2(row, message, tmp_path, capsys):
    bad = _write(tmp_path / "bad.jsonl", [row])
    assert _run(f"output_dir={tmp_path / 'run'}", f"data.train={bad}") == 2
    err = capsys.readouterr().err
    assert message in err and "bad.jsonl:1" in err and "Traceback" not in err


def test_rankings_of_only_ties_are_an_error_and_skips_are_counted(data, tmp_path, capsys):
    ties = _write(tmp_path / "ties.jsonl", [{"prompt": "p", "responses": ["a", "b"], "ranks": [1, 1]}])
    assert _run(f"output_dir={tmp_path / 'run'}", f"data.train={ties}") == 2
    assert "yields a preference pair" in capsys.readouterr().err
    rows = _rows(data["rankings"]) + [{"prompt": "p", "responses": ["x"], "ranks": [1]},
                                      {"prompt": "q", "responses": ["a", "b"], "ranks": [2, 2]}]
    mixed = _write(tmp_path / "mixed.jsonl", rows)
    assert _run(f"output_dir={tmp_path / 'run2'}", f"data.train={mixed}", "data.skip_invalid=true",
                "data.eval_fraction=0", "max_steps=1", "bias_reference=none") == 0
    captured = capsys.readouterr()
    assert "skipped 1 invalid rows" in captured.err and "mixed.jsonl:11" in captured.err
    assert "skipped 1 groups without a strict preference" in captured.err


def test_config_errors(tmp_path, capsys):
    assert main(["rm", f"output_dir={tmp_path}"]) == 2
    assert "data.train is required" in capsys.readouterr().err
    assert main(["rm", "data.train=x.jsonl", "lora.enabled=true", "lora.merge_on_save=false"]) == 2
    assert "merge_on_save" in capsys.readouterr().err
    assert main(["rm", "data.train=x.jsonl", "ensemble_size=0"]) == 2


@pytest.mark.parametrize("preset", sorted(Path(__file__).resolve().parents[2].joinpath("configs", "rm").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_presets_load(preset):
    cfg = load_config(RMConfig, preset)
    assert cfg.data.train and cfg.output_dir
