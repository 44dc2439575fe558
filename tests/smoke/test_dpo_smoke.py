"""`kilter dpo` end to end on the built-in task: learning, reference modes, resume, LoRA, bad input.

Preference data: pairs of the built-in demonstrations of the same prompt, judged by the
simulated labeler (gold + noise); held-out pairs come from the held-out products' demonstrations,
judged by gold itself.  The gold-score gain of a longer run is measured in docs/dpo.md.
"""

from __future__ import annotations

import json
import shutil
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from kilter.cli import main
from kilter.runs import read_metrics

COMMON = ["tensorboard=false", "threads=2", "samples.n=0"]


def _groups(demos: list[dict]) -> tuple[list[str], list[list[str]]]:
    by_prompt: OrderedDict[str, list[str]] = OrderedDict()
    for d in demos:  # distinct demonstrations only: a ranking of two identical responses is refused
        group = by_prompt.setdefault(d["prompt"], [])
        if d["completion"] not in group:
            group.append(d["completion"])
    return list(by_prompt), list(by_prompt.values())


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory) -> dict[str, Path]:
    from kilter.data.labeler import SimulatedLabeler
    from kilter.data.task import build_task

    task = build_task()
    folder = tmp_path_factory.mktemp("dpo-data")
    prompts, groups = _groups(task.demonstrations)
    train = SimulatedLabeler(noise=0.3, seed=0).label_comparisons(prompts, groups, pairs="adjacent")
    eval_prompts, eval_groups = _groups(task.eval_demonstrations)
    held_out = SimulatedLabeler(noise=0.0, seed=1).label_comparisons(eval_prompts, eval_groups, pairs="all")
    rankings = SimulatedLabeler(noise=0.3, seed=2).label_rankings(prompts[:40], [g[:4] for g in groups[:40]])
    return {
        "train": _write(folder / "comparisons.jsonl", train[:800]),
        "small": _write(folder / "small.jsonl", train[:48]),
        "eval": _write(folder / "eval_comparisons.jsonl", held_out),
        "rankings": _write(folder / "rankings.jsonl", rankings),
    }


def _dpo(args: list[str]) -> int:
    return main(["dpo", *COMMON, *args])


def test_dpo_raises_held_out_implicit_reward_accuracy(sft_model_dir, pref_data, tmp_path):
    out = tmp_path / "dpo"
    code = _dpo([f"model={sft_model_dir}", f"output_dir={out}", f"data.train={pref_data['train']}",
                 f"data.eval={pref_data['eval']}", "data.max_eval_pairs=128", "batch_size=16", "max_steps=40",
                 "optim.lr=5e-4", "log_every=10", "eval_every=40", "save_every=1000"])
    assert code == 0
    rows = read_metrics(out)
    evals = [r for r in rows if "eval/rewards/accuracy" in r]
    train = [r for r in rows if "loss/dpo" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 40
    assert evals[0]["eval/loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference: log 2
    assert evals[-1]["eval/rewards/accuracy"] > 0.6  # chance is 0.5
    assert evals[-1]["eval/rewards/margin"] > 0 and evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 0.03
    assert train[-1]["loss/dpo"] < train[0]["loss/dpo"]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "logps/chosen", "logps/rejected",
                "eval/logps/chosen", "eval/rewards/chosen"):
        assert key in train[-1] or key in evals[-1]
    assert (out / "ref_logps.pt").is_file() and (out / "final" / "config.json").is_file()
    assert (out / "checkpoints" / "step-40" / "trainer_state.json").is_file()


def test_precomputed_and_online_reference_give_the_same_losses(sft_model_dir, pref_data, tmp_path):
    args = [f"model={sft_model_dir}", f"data.train={pref_data['small']}", f"data.eval={pref_data['eval']}",
            "data.max_eval_pairs=16", "batch_size=8", "max_steps=3", "log_every=1", "eval_every=3",
            "label_smoothing=0.1", "optim.lr=1e-3"]  # conservative DPO
    assert _dpo([*args, f"output_dir={tmp_path / 'pre'}", "reference=precompute"]) == 0
    assert _dpo([*args, f"output_dir={tmp_path / 'online'}", "reference=online"]) == 0
    assert (tmp_path / "pre" / "ref_logps.pt").is_file() and not (tmp_path / "online" / "ref_logps.pt").exists()
    pre, online = read_metrics(tmp_path / "pre"), read_metrics(tmp_path / "online")
    # Continuous quantities only: at step 0 the policy IS the reference, every margin is 0 up to
    # float rounding (which differs with the batching), so the accuracy there is a coin toss.
    keys = ("loss/dpo", "rewards/margin", "rewards/chosen", "logps/chosen", "eval/loss", "eval/rewards/margin")
    compared = 0
    assert [r["step"] for r in pre] == [r["step"] for r in online]
    for a, b in zip(pre, online):
        for key in keys:
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key)
                compared += 1
    assert compared >= 3 * 4 + 2 * 2  # three training steps, two evaluations
    assert pre[-1]["eval/rewards/accuracy"] == pytest.approx(online[-1]["eval/rewards/accuracy"])


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_resume_equals_uninterrupted(sft_model_dir, pref_data, tmp_path):
    args = [f"model={sft_model_dir}", f"data.train={pref_data['small']}", "batch_size=8", "max_steps=4",
            "log_every=1", "save_every=2", "keep_checkpoints=null", "optim.lr=1e-3"]
    full = tmp_path / "full"
    assert _dpo([*args, f"output_dir={full}"]) == 0
    # an interruption after step 2: only the step-2 checkpoint (and the reference cache) survive
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step-4")
    shutil.rmtree(cut / "final")
    assert _dpo([*args, f"output_dir={cut}"]) == 2  # refuses to overwrite checkpoints without resume=true
    assert _dpo([*args, f"output_dir={cut}", "resume=true"]) == 0
    resumed, uninterrupted = read_metrics(cut), read_metrics(full)
    assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted] == [1, 2, 3, 4]
    for a, b in zip(resumed, uninterrupted):
        a, b = ({k: v for k, v in r.items() if k != "time" and not k.startswith("perf/")} for r in (a, b))
        assert a == pytest.approx(b, rel=1e-6)
    a, b = _weights(full / "final"), _weights(cut / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_ipo_on_rankings_saves_a_plain_model(sft_model_dir, pref_data, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    code = _dpo([f"model={sft_model_dir}", f"output_dir={out}", f"data.train={pref_data['rankings']}",
                 "data.ranking_pairs=best_vs_rest", "data.eval_fraction=0.2", "loss_type=ipo", "beta=0.5",
                 "lora.enabled=true", "lora.r=4", "reference=online", "batch_size=8", "max_steps=3", "log_every=1",
                 "optim.lr=1e-3"])
    assert code == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "loss/dpo" in r] == [1, 2, 3]
    # IPO at policy == reference: (0 - 1 / (2 beta))^2 = 1 for beta = 0.5
    assert [r for r in rows if "eval/loss" in r][0]["eval/loss"] == pytest.approx(1.0, abs=1e-4)
    model = AutoModelForCausalLM.from_pretrained(out / "final")  # merged: loads without peft
    assert not any("lora" in name for name, _ in model.named_parameters())


GOOD_PAIR = {"prompt": "Review the desk.", "chosen": "Nice.", "rejected": "Bad."}
GOOD_RANKING = {"prompt": "Review the desk.", "responses": ["Nice.", "Bad."], "ranks": [1, 2]}


@pytest.mark.parametrize("good, row, message", [
    (GOOD_PAIR, {"prompt": "Review the lamp.", "chosen": "Great lamp."}, "field 'rejected': missing"),
    (GOOD_PAIR, {"prompt": "Review the lamp.", "chosen": "", "rejected": "Bad."}, "field 'chosen'"),
    (GOOD_RANKING, {"prompt": "Review the lamp.", "responses": ["a", "b"], "ranks": [1, "x"]}, "field 'ranks'"),
    (GOOD_RANKING, {"prompt": "Review the lamp.", "responses": ["a", "b"]}, "field 'ranks': missing"),
])
def test_bad_preference_rows_exit_2_with_one_line(tmp_path, capsys, good, row, message):
    bad = _write(tmp_path / "bad.jsonl", [good, row])
    code = _dpo([f"data.train={bad}", f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and f"{bad}:2" in err and message in err


def test_ipo_with_label_smoothing_is_a_config_error(tmp_path, pref_data, capsys):
    code = _dpo([f"data.train={pref_data['small']}", "loss_type=ipo", "label_smoothing=0.1",
                 f"output_dir={tmp_path / 'run'}"])
    assert code == 2 and "label_smoothing" in capsys.readouterr().err
