import json
import math

import pytest
import torch

from kilter.config import load_config
from kilter.errors import ConfigError, DataError
from kilter.evaluation import report as rep
from kilter.evaluation.evaluate import (
    EvalConfig,
    _rm_scores,
    check_config,
    default_name,
    load_references,
    mean_and_stderr,
    model_entries,
    resolve_gold,
    response_logps,
    sequence_kl,
    text_scores,
)


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=13, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharpen the random model so log-probs differ clearly between tokens
        model.lm_head.weight.mul_(20)
    return model


def _direct_logp(model, prompt, response, pad_id=0):
    """log p(response | prompt) from one unpadded forward pass and a log_softmax without PAD (never sampled)."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logits[:, pad_id] = -torch.inf
    logps = torch.log_softmax(logits, -1)
    return sum(float(logps[len(prompt) - 1 + t, tok]) for t, tok in enumerate(response))


def test_response_logps_match_unpadded_forward(tiny_lm):
    prompts = [[3, 4, 5], [7], [2, 9]]
    responses = [[6, 1], [8, 8, 10, 11], []]
    got = response_logps(tiny_lm, prompts, responses, pad_id=0, batch_size=2)
    assert got.dtype == torch.float64 and got.shape == (3,)
    for i in range(2):
        assert float(got[i]) == pytest.approx(_direct_logp(tiny_lm, prompts[i], responses[i]), abs=1e-4)
    assert float(got[2]) == 0.0  # an empty response has probability 1
    # batching must not change the numbers (padding is fully masked)
    alone = response_logps(tiny_lm, prompts[1:2], responses[1:2], pad_id=0)
    assert float(alone[0]) == pytest.approx(float(got[1]), abs=1e-5)


def test_sequence_kl_and_stderr_by_hand():
    terms = sequence_kl(torch.tensor([-1.0, -2.5, -4.0]), torch.tensor([-1.5, -2.0, -7.0]))
    assert terms.tolist() == pytest.approx([0.5, -0.5, 3.0])
    # mean 1.0; sample variance ((-0.5)^2 + (-1.5)^2 + 2^2) / 2 = 3.25; s.e. sqrt(3.25 / 3)
    mean, se = mean_and_stderr(terms.tolist())
    assert mean == pytest.approx(1.0) and se == pytest.approx(math.sqrt(3.25 / 3))
    assert mean_and_stderr([2.0]) == (2.0, 0.0)
    assert all(math.isnan(v) for v in mean_and_stderr([]))


def test_text_scores_perfect_and_disjoint():
    perfect = text_scores(["the blender is great", "i love it"], [["the blender is great"], ["x y", "i love it"]])
    assert perfect["text/bleu"] == pytest.approx(100.0)
    assert perfect["text/rouge1"] == perfect["text/rouge2"] == perfect["text/rougeL"] == pytest.approx(1.0)
    disjoint = text_scores(["aa bb cc dd"], [["ee ff gg hh"]])
    assert disjoint["text/bleu"] == 0.0 and disjoint["text/rouge1"] == 0.0


def test_load_references_fields_and_pooling(tmp_path):
    path = tmp_path / "refs.jsonl"
    rows = [{"prompt": "Review the lamp.", "reference": "It is bright."},
            {"prompt": "Review the lamp.", "completion": "Nice lamp."},
            {"prompt": "Review the desk.", "references": ["Solid desk.", "Good desk."]},
            {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "hello"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    refs = load_references(str(path), ["Review the desk.", "Review the lamp. ", [{"role": "user", "content": "hi"}]])
    assert refs == [["Solid desk.", "Good desk."], ["It is bright.", "Nice lamp."], ["hello"]]


def test_load_references_errors_name_file_line_and_prompt(tmp_path):
    path = tmp_path / "refs.jsonl"
    path.write_text(json.dumps({"prompt": "Review the lamp.", "reference": "Bright."}) + "\n")
    with pytest.raises(DataError, match=r"refs.jsonl: no reference for 1 of the 2 evaluated prompts .*'Review the sofa.'"):
        load_references(str(path), ["Review the lamp.", "Review the sofa."])
    path.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b", "reference": 3}) + "\n")
    with pytest.raises(DataError, match=r"refs.jsonl:1: field 'reference': missing"):
        load_references(str(path), ["a"])
    path.write_text(json.dumps({"prompt": "b", "reference": [""]}) + "\n")
    with pytest.raises(DataError, match=r"refs.jsonl:1: field 'reference': expected a non-empty string"):
        load_references(str(path), ["b"])


def test_model_names_and_reference_order():
    assert default_name("runs/demo/ppo/final") == "ppo/final"
    assert default_name("runs/x/checkpoints/step-40") == "x/checkpoints/step-40"
    assert default_name("builtin:tiny") == "builtin:tiny"
    cfg = EvalConfig(models="runs/a/final, runs/b/final,runs/a/final")  # comma-separated string, as on the CLI
    entries = model_entries(cfg)
    assert [e.name for e in entries] == ["a/final", "b/final", "a/final#2"]
    assert [e.is_reference for e in entries] == [True, False, False]
    by_name = model_entries(EvalConfig(models={"sft": "s", "ppo": "p"}, reference="ppo"))
    assert [(e.name, e.spec, e.is_reference) for e in by_name] == [("ppo", "p", True), ("sft", "s", False)]
    by_spec = model_entries(EvalConfig(models={"sft": "s", "ppo": "p"}, reference="p"))
    assert by_spec[0].name == "ppo"
    outside = model_entries(EvalConfig(models=["runs/p/final"], reference="runs/s/final"))
    assert [(e.name, e.is_reference) for e in outside] == [("s/final", True), ("p/final", False)]


def test_gold_judge_resolution():
    from kilter.data.task import gold_scores

    assert resolve_gold(EvalConfig()) is gold_scores  # built-in prompts carry their hidden judge
    assert resolve_gold(EvalConfig(prompts="my_prompts.jsonl")) is None
    assert resolve_gold(EvalConfig(prompts="my_prompts.jsonl", gold_fn="builtin:gold")) is gold_scores
    assert resolve_gold(EvalConfig(gold_fn="kilter.data.task:gold_score")).__name__ == "gold_score"


def test_config_errors():
    with pytest.raises(ConfigError, match="n_samples"):
        check_config(EvalConfig(greedy=True, n_samples=2))
    with pytest.raises(ConfigError, match="temperature"):
        load_config(EvalConfig, overrides=["temperature=0"])
    with pytest.raises(ConfigError, match="config key 'gold_fn'.*expected 'module:function'"):
        resolve_gold(EvalConfig(gold_fn="nocolon"))
    with pytest.raises(ConfigError, match="config key 'gold_fn'.*cannot import module kilter_no_such_module"):
        resolve_gold(EvalConfig(gold_fn="kilter_no_such_module:f"))
    with pytest.raises(ConfigError, match="config key 'gold_fn'.*no callable named 'nope'"):
        resolve_gold(EvalConfig(gold_fn="kilter.data.task:nope"))
    assert EvalConfig(temperature=0.7).samples_for_kl_reusable is False
    assert EvalConfig().samples_for_kl_reusable is True


class _Single:
    def score(self, prompts, responses, batch_size=32, finished=None):
        return torch.tensor([float(len(r)) for r in responses])


class _Ensemble:
    def __init__(self):
        self.members = [object(), object()]

    def score_with_std(self, prompts, responses, batch_size=32, finished=None):
        member_scores = torch.tensor([[1.0, 2.0], [3.0, 6.0]])  # (M, N)
        return member_scores.mean(0), member_scores.std(0, unbiased=False)


def test_reward_model_scores_single_and_ensemble():
    assert _rm_scores(_Single(), ["p", "q"], ["ab", "abcd"], 8) == ([2.0, 4.0], None)
    mean, std = _rm_scores(_Ensemble(), ["p", "q"], ["a", "b"], 8)
    assert mean == [2.0, 4.0] and std == [1.0, 2.0]


def _report(gold=True):
    metrics = {"kl/ref": 0.0, "kl/ref_stderr": 0.0, "response/length": 4.0}
    other = {"kl/ref": 2.5, "kl/ref_stderr": 0.25, "response/length": 6.0}
    if gold:
        metrics |= {"reward/gold": 0.1, "reward/gold_stderr": 0.05}
        other |= {"reward/gold": 0.75, "reward/gold_stderr": 0.1}
    sample = {"prompt_index": 0, "sample": 0, "response": "a | b\nc", **({"gold": 0.5} if gold else {})}
    return {"reference": "sft", "references": None, "kl_estimator": "k1", "notes": [],
            "prompts": {"source": "p.jsonl", "count": 1, "samples_per_prompt": 1, "items": ["Review the lamp."]},
            "sampling": {"greedy": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 8, "seed": 0},
            "judges": {"gold": "g" if gold else None, "reward_model": None},
            "models": [{"name": "sft", "is_reference": True, "metrics": metrics, "samples": [sample]},
                       {"name": "ppo", "is_reference": False, "metrics": other, "samples": [dict(sample, response="ok")]}]}


def test_markdown_tables_show_present_metrics_and_escape_cells():
    table = rep.metrics_markdown(_report())
    lines = table.splitlines()
    assert lines[0] == "| model | gold | KL | length |"
    assert lines[2] == "| sft (reference) | 0.100 ± 0.050 | 0.000 ± 0.000 | 4.0 |"
    assert lines[3] == "| ppo | 0.750 ± 0.100 | 2.500 ± 0.250 | 6.0 |"
    samples = rep.samples_markdown(_report()).splitlines()
    assert samples[0] == "| prompt | sft | ppo |"
    assert samples[2] == "| Review the lamp. | a \\| b<br>c [gold 0.50] | ok [gold 0.50] |"


def test_plot_only_with_gold_and_kl(tmp_path):
    assert rep.plot_gold_vs_kl(_report(gold=False), tmp_path / "none.png") is False
    assert not (tmp_path / "none.png").exists()
    files = rep.write_reports(_report(), tmp_path)
    assert files["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![gold score against KL" in files["markdown"].read_text()
    assert json.loads(files["json"].read_text())["models"][1]["metrics"]["kl/ref"] == 2.5


def test_every_eval_preset_loads():
    from pathlib import Path

    presets = sorted((Path(__file__).resolve().parents[3] / "configs" / "eval").glob("*.yaml"))
    assert presets, "configs/eval/*.yaml missing"
    for path in presets:
        cfg = load_config(EvalConfig, path)
        check_config(cfg)
        assert model_entries(cfg)[0].is_reference
    demo = load_config(EvalConfig, presets[0].parent / "demo.yaml")
    assert [e.name for e in model_entries(demo)] == ["sft", "ppo"]
