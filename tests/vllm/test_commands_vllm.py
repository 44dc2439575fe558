"""`engine=vllm` in the sampling commands: kilter eval, kilter bon, kilter sample."""

from __future__ import annotations

import json

from kilter.cli import main

EAGER = ["engine=vllm", "vllm_eager=true"]


def test_greedy_eval_with_vllm_equals_eval_with_hf(sft_dir, tmp_path):
    reports = {}
    for engine in ("hf", "vllm"):
        out = tmp_path / engine
        assert main(["eval", f"models={sft_dir}", "max_prompts=8", "greedy=true", "max_new_tokens=24",
                     f"output_dir={out}", "show_prompts=0", "threads=1", f"engine={engine}", "vllm_eager=true"]) == 0
        reports[engine] = json.loads((out / "eval.json").read_text())
    hf, vllm = (reports[e]["models"][0] for e in ("hf", "vllm"))
    assert [s["response"] for s in vllm["samples"]] == [s["response"] for s in hf["samples"]]
    assert vllm["metrics"]["reward/gold"] == hf["metrics"]["reward/gold"]
    assert any(s["response"].strip() for s in vllm["samples"])


def test_bon_with_vllm_keeps_the_best_of_varied_samples(sft_dir, tmp_path):
    out = tmp_path / "bon"
    assert main(["bon", f"model={sft_dir}", f"output_dir={out}", "reward_fn=builtin:gold", "n=4", "max_prompts=6",
                 "max_new_tokens=24", "threads=1", *EAGER]) == 0
    rows = [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(len(r["responses"]) == 4 for r in rows)
    assert all(r["scores"][r["best"]] == max(r["scores"]) for r in rows)
    assert sum(len(set(r["responses"])) for r in rows) > 6  # sampled, not one answer repeated
    metrics = json.loads((out / "metrics.jsonl").read_text())
    assert metrics["reward/best"] > metrics["reward/mean"]


def test_sample_with_vllm_writes_k_responses_per_prompt(sft_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ["Write a short review of the Zorbo lamp.", "Describe the Kestrel kettle."]))
    out = tmp_path / "samples.jsonl"
    assert main(["sample", f"models={sft_dir}", f"prompts={prompts}", "k=3", "max_new_tokens=16", f"out={out}",
                 *EAGER]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["responses"]) == 3 for r in rows)
    texts = [c["text"] if isinstance(c, dict) else c for r in rows for c in r["responses"]]
    assert len(set(texts)) > 2 and all(t.strip() for t in texts)
