"""`kilter eval` end to end on tiny random models: KL, win rate, gold, reward ensemble, BLEU/ROUGE, errors."""

import json

import pytest
import torch

from kilter.cli import main
from kilter.data.task import gold_scores
from kilter.evaluation.evaluate import EvalConfig, evaluate_models

FAST = ["max_prompts=4", "n_samples=2", "max_new_tokens=6", "show_prompts=2"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two micro models sharing a tokenizer: `a` as built, `b` with logits sharpened 5x (far from `a`)."""
    from kilter.models import load_causal_lm, load_tokenizer
    from kilter.models.tiny import builtin_model_dir

    base = str(builtin_model_dir("micro"))
    root = tmp_path_factory.mktemp("eval-models")
    tokenizer = load_tokenizer(base)
    model = load_causal_lm(base, tokenizer)
    model.save_pretrained(root / "a")
    tokenizer.save_pretrained(root / "a")
    with torch.no_grad():
        model.model.norm.weight.mul_(5.0)
    model.save_pretrained(root / "b")
    tokenizer.save_pretrained(root / "b")
    return root / "a", root / "b"


def test_eval_cli_self_and_other_model(models, tmp_path, capsys):
    a, b = models
    out = tmp_path / "eval"
    config = tmp_path / "eval.yaml"
    config.write_text(f"models:\n  sft: {a}\n  same: {a}\n  other: {b}\noutput_dir: {out}\n")
    assert main(["eval", "--config", str(config), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "| model | gold | KL | win (gold) |" in printed
    assert "| sft (reference) |" in printed and "| same |" in printed and "| other |" in printed

    report = json.loads((out / "eval.json").read_text())
    by_name = {m["name"]: m for m in report["models"]}
    assert list(by_name) == ["sft", "same", "other"] and report["reference"] == "sft"
    for name in ("sft", "same"):  # the reference against itself, once shared and once loaded again
        assert by_name[name]["metrics"]["kl/ref"] == 0.0
        assert by_name[name]["metrics"]["win_rate/gold"] == 0.5
    assert [s["response"] for s in by_name["same"]["samples"]] == [s["response"] for s in by_name["sft"]["samples"]]
    assert by_name["other"]["metrics"]["kl/ref"] > 1.0
    assert len(by_name["other"]["samples"]) == 4 * 2

    prompts = report["prompts"]["items"]
    assert len(prompts) == 4 and all(p.endswith((".", "?")) for p in prompts)
    for model in report["models"]:
        samples = model["samples"]
        expected = gold_scores([prompts[s["prompt_index"]] for s in samples], [s["response"] for s in samples])
        assert [s["gold"] for s in samples] == pytest.approx(expected, abs=1e-6)
        assert model["metrics"]["reward/gold"] == pytest.approx(sum(expected) / len(expected), abs=1e-6)

    markdown = (out / "eval.md").read_text()
    assert all(name in markdown for name in ("sft", "same", "other")) and "## Samples" in markdown
    assert (out / "gold_vs_kl.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_reward_ensemble_and_greedy(models, tmp_path):
    from kilter.models import load_tokenizer
    from kilter.models.reward import (
        load_reward,
        load_reward_backbone,
        save_reward_model,
        write_ensemble_manifest,
    )

    a, b = models
    tokenizer = load_tokenizer(str(a))
    ensemble = tmp_path / "rm"
    for seed in (0, 1):  # two random heads on one backbone disagree
        torch.manual_seed(seed)
        save_reward_model(load_reward_backbone(str(a), tokenizer), tokenizer, ensemble / f"member-{seed}")
    write_ensemble_manifest(ensemble, ["member-0", "member-1"])

    cfg = EvalConfig(models=[str(a), str(b)], greedy=True, reward_model=str(ensemble), max_prompts=4,
                     max_new_tokens=6, output_dir=None)
    report = evaluate_models(cfg, verbose=False)
    ref, other = report["models"]
    assert ref["metrics"]["win_rate/rm"] == 0.5 and ref["metrics"]["kl/ref"] == 0.0
    assert ref["metrics"]["reward/rm_ensemble_std"] > 0
    assert other["metrics"]["kl/ref"] > 1.0
    assert "win_rate/gold" in other["metrics"] and "files" not in report
    assert any("separate temperature-1 samples" in note for note in report["notes"])

    prompts = report["prompts"]["items"]
    mean, std = load_reward(str(ensemble)).score_with_std(prompts, [s["response"] for s in other["samples"]],
                                                          finished=[s["finished"] for s in other["samples"]])
    assert [s["rm"] for s in other["samples"]] == pytest.approx(mean.tolist(), abs=1e-5)
    assert other["metrics"]["reward/rm_ensemble_std"] == pytest.approx(float(std.mean()), abs=1e-5)


def test_eval_references_and_custom_gold(models, tmp_path, monkeypatch):
    a, _ = models
    (tmp_path / "eval_gold_words.py").write_text(
        "def words(prompts, responses):\n    return [float(len(r.split())) for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts_file = tmp_path / "prompts.jsonl"
    prompts = ["Review the lamp.", "Tell me about the kettle.", "Describe the tent."]
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))

    # sampled, not greedy (a random model's greedy output is blank lines); the fixed seed repeats the draw
    first = evaluate_models(EvalConfig(models=[str(a)], prompts=str(prompts_file), max_new_tokens=12, output_dir=None),
                            verbose=False)
    responses = [s["response"] for s in first["models"][0]["samples"]]
    assert "reward/gold" not in first["models"][0]["metrics"]  # no gold judge for a user's prompt file
    refs = tmp_path / "refs.jsonl"
    refs.write_text("".join(json.dumps({"prompt": p, "reference": r}) + "\n" for p, r in zip(prompts, responses)))

    report = evaluate_models(EvalConfig(models=[str(a)], prompts=str(prompts_file), max_new_tokens=12,
                                        references=str(refs), gold_fn="eval_gold_words:words",
                                        output_dir=str(tmp_path / "out")), verbose=False)
    metrics = report["models"][0]["metrics"]
    assert [s["response"] for s in report["models"][0]["samples"]] == responses
    assert metrics["text/bleu"] == pytest.approx(100.0)
    assert metrics["text/rouge1"] == pytest.approx(1.0) and metrics["text/rougeL"] == pytest.approx(1.0)
    assert metrics["reward/gold"] == pytest.approx(sum(len(r.split()) for r in responses) / 3)
    assert "BLEU" in (tmp_path / "out" / "eval.md").read_text()


def _fails(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_eval_bad_inputs_exit_2_with_one_line(models, tmp_path, capsys):
    a, _ = models
    out = f"output_dir={tmp_path / 'out'}"
    err = _fails(["eval", f"models={tmp_path / 'missing'}", out], capsys)
    assert err.startswith("kilter eval: error: model folder not found") and "missing" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    err = _fails(["eval", f"models={a}", f"prompts={empty}", out], capsys)
    assert "empty.jsonl: no valid prompt records" in err
    refs = tmp_path / "refs.jsonl"
    refs.write_text(json.dumps({"prompt": "Review the lamp.", "reference": "Bright."}) + "\n")
    err = _fails(["eval", f"models={a}", f"references={refs}", "max_prompts=3", out], capsys)
    assert "refs.jsonl: no reference for 3 of the 3 evaluated prompts" in err
    err = _fails(["eval", f"models={a}", "greedy=true", "n_samples=2", out], capsys)
    assert "n_samples" in err
    assert not (tmp_path / "out").exists()
