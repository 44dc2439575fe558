"""`kilter bon` end to end: scoring by a reward function, a reward model and an ensemble; resume."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from kilter.cli import main
from kilter.runs import read_metrics

COMMON = ["threads=2", "max_new_tokens=24", "prompts=builtin:prompts_eval"]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_best(rows: list[dict], n: int) -> None:
    for row in rows:
        assert len(row["responses"]) == len(row["scores"]) == n
        assert row["scores"][row["best"]] == max(row["scores"])


def test_bon_with_gold_reward_function_keeps_the_best(sft_model_dir, tmp_path):
    from kilter.data.readers import read_records
    from kilter.data.task import gold_scores

    out = tmp_path / "bon"
    code = main(["bon", *COMMON, f"model={sft_model_dir}", f"output_dir={out}", "n=4", "max_prompts=6",
                 "batch_size=3", "reward_fn=kilter.data.task:gold_scores"])
    assert code == 0
    candidates = _rows(out / "candidates.jsonl")
    assert len(candidates) == 6
    _check_best(candidates, 4)
    # the stored scores are the gold scores of the stored responses
    row = candidates[0]
    assert row["scores"] == pytest.approx(gold_scores([row["prompt"]] * 4, row["responses"]))
    chosen = read_records(out / "chosen.jsonl", "demonstration")  # usable as SFT data as it is
    by_prompt = {r["prompt"]: r for r in candidates}
    for rec in chosen.rows:
        r = by_prompt[rec["prompt"]]
        assert rec["completion"] == r["responses"][r["best"]]
    (metrics,) = read_metrics(out)
    assert metrics["reward/best"] >= metrics["reward/mean"]
    assert metrics["reward/best"] == pytest.approx(sum(r["scores"][r["best"]] for r in candidates) / 6)
    assert metrics["kl/bound"] == pytest.approx(math.log(4) - 0.75)
    if (out / "comparisons.jsonl").stat().st_size:
        read_records(out / "comparisons.jsonl", "comparison")
    # a second run into the same folder must not silently overwrite it
    assert main(["bon", *COMMON, f"model={sft_model_dir}", f"output_dir={out}", "n=4", "max_prompts=6",
                 "reward_fn=kilter.data.task:gold_scores"]) == 2


def test_bon_file_reward_function_resume_matches_uninterrupted(sft_model_dir, tmp_path):
    fn = tmp_path / "reward.py"
    fn.write_text("def shortness(prompts, responses):\n    return [-len(r.split()) for r in responses]\n")
    args = [*COMMON, f"model={sft_model_dir}", "n=3", "max_prompts=4", "batch_size=2", f"reward_fn={fn}:shortness",
            "eval_reward_fn=kilter.data.task:gold_scores", "min_reward=-6"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["bon", *args, f"output_dir={full}"]) == 0
    lines = (full / "candidates.jsonl").read_text().splitlines()
    cut.mkdir()
    (cut / "candidates.jsonl").write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:20])  # killed mid-chunk
    shutil.copy(full / "config.yaml", cut / "config.yaml")
    assert main(["bon", *args, f"output_dir={cut}", "resume=true"]) == 0
    for name in ("candidates.jsonl", "chosen.jsonl", "comparisons.jsonl"):
        assert (cut / name).read_text() == (full / name).read_text()
    rows = _rows(full / "candidates.jsonl")
    _check_best(rows, 3)
    assert all("eval_scores" in r for r in rows)
    kept = _rows(full / "chosen.jsonl")
    assert all(r["reward"] >= -6 for r in kept)
    (metrics,) = read_metrics(full)
    assert metrics["bon/kept"] == sum(1 for r in rows if r["scores"][r["best"]] >= -6)
    assert "reward_eval/best" in metrics


def _save_rm(sft_dir: Path, path: Path, seed: int) -> None:
    from kilter.models import load_tokenizer
    from kilter.models.reward import load_reward_backbone, save_reward_model

    tok = load_tokenizer(str(sft_dir))
    torch.manual_seed(seed)
    model = load_reward_backbone(str(sft_dir), tok)
    save_reward_model(model, tok, path)


def test_bon_with_reward_model_and_ensemble(sft_model_dir, tmp_path):
    from kilter.models.reward import load_reward, write_ensemble_manifest

    single = tmp_path / "rm"
    _save_rm(sft_model_dir, single, seed=0)
    out = tmp_path / "bon-rm"
    assert main(["bon", *COMMON, f"model={sft_model_dir}", f"output_dir={out}", "n=3", "max_prompts=3",
                 f"reward_model={single}"]) == 0
    rows = _rows(out / "candidates.jsonl")
    _check_best(rows, 3)
    rm = load_reward(single)
    # responses cut at max_new_tokens are scored as unfinished (no appended EOS), as PPO scores them
    rescored = rm.score([rows[0]["prompt"]] * 3, rows[0]["responses"], finished=rows[0]["finished"])
    assert rows[0]["scores"] == pytest.approx(rescored.tolist(), abs=1e-5)

    ensemble = tmp_path / "ensemble"
    _save_rm(sft_model_dir, ensemble / "member-0", seed=1)
    _save_rm(sft_model_dir, ensemble / "member-1", seed=2)
    write_ensemble_manifest(ensemble, ["member-0", "member-1"])
    out = tmp_path / "bon-ens"
    assert main(["bon", *COMMON, f"model={sft_model_dir}", f"output_dir={out}", "n=3", "max_prompts=3",
                 f"reward_model={ensemble}", "uncertainty_penalty=1.0"]) == 0
    rows = _rows(out / "candidates.jsonl")
    _check_best(rows, 3)
    mean, std = load_reward(ensemble).score_with_std([rows[0]["prompt"]] * 3, rows[0]["responses"],
                                                     finished=rows[0]["finished"])
    assert rows[0]["std"] == pytest.approx(std.tolist(), abs=1e-5)
    assert rows[0]["scores"] == pytest.approx((mean - std).tolist(), abs=1e-5)  # chosen by mean - 1.0 * std


@pytest.mark.parametrize("args, message", [
    ([], "exactly one of reward_model"),
    (["reward_fn=kilter.data.task:gold_scores", "reward_model=/nonexistent"], "exactly one of reward_model"),
    (["reward_fn=kilter.data.task:nope"], "no callable named 'nope'"),
    (["reward_fn=kilter.data.task:gold_scores", "n=0"], "config key 'n'"),
])
def test_bon_config_errors_exit_2(tmp_path, capsys, args, message):
    code = main(["bon", f"output_dir={tmp_path / 'run'}", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err


def test_bon_bad_prompt_file_exits_2(tmp_path, capsys):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "Review the lamp."}\n{"question": "Review the desk."}\n')
    code = main(["bon", f"prompts={bad}", "reward_fn=kilter.data.task:gold_scores", f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and f"{bad}:2" in err and "field 'prompt': missing" in err
