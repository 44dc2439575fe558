"""`kilter ppo` end to end: learning on the built-in task, and every algorithm variant runs and learns something."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kilter.cli import main
from kilter.data.task import gold_scores

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/smoke/conftest.py


QUIET = ["tensorboard=false", "n_samples=2", "sample_every=100"]


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train_rows(run):
    return [r for r in _rows(run) if "reward/total" in r]


def test_ppo_with_the_gold_reward_raises_gold_and_keeps_kl_bounded(sft_model_dir, tmp_path):
    out = tmp_path / "ppo"
    code = main(["ppo", f"model={sft_model_dir}", f"output_dir={out}", "reward.function=builtin:gold",
                 "iterations=8", "rollout.batch_size=32", "rollout.max_new_tokens=32", "update.epochs=2",
                 "update.num_minibatches=2", "optim.lr=5e-4", "value.optim.lr=5e-4", "kl.beta=0.05",
                 "data.n_eval=16", "eval_every=8", "save_every=8", "eval_agreement=true", *QUIET])
    assert code == 0
    rows = _train_rows(out)
    assert len(rows) == 8
    first = sum(r["reward/gold"] for r in rows[:2]) / 2
    last = sum(r["reward/gold"] for r in rows[-2:]) / 2
    assert last > first + 0.25, f"gold did not rise: {first:.3f} -> {last:.3f}"
    assert rows[0]["kl/ref"] == 0.0  # the first rollout comes from pi_0 itself
    kls = sorted(r["kl/ref"] for r in rows)
    # bounded: a single batch may spike (the default missing-EOS penalty hits the few unfinished
    # responses of the early iterations hard), the typical iteration stays near pi_0
    assert kls[len(kls) // 2] < 6.0 and kls[-1] < 12.0, [r["kl/ref"] for r in rows]
    for key in ("reward/total", "reward/gold", "kl/ref", "policy/entropy", "response/length", "policy/clipfrac",
                "policy/approx_kl", "loss/policy", "loss/value", "value/explained_variance",
                "perf/rollout_tokens_per_s", "perf/train_tokens_per_s"):
        assert key in rows[-1], key
    evals = [r for r in _rows(out) if "eval/gold" in r]
    assert [r["step"] for r in evals] == [0, 8] and evals[0]["eval/kl"] == 0.0
    # the reward is gold itself, so it orders every pair of fresh samples as gold does
    assert [r["eval/agreement"] for r in evals] == [1.0, 1.0]
    # final/ is a plain Hugging Face causal LM; the critic sits beside it
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "final")
    assert (out / "final" / "value" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def micro_reward_dir(tmp_path_factory):
    """A random reward model on the micro backbone (learning signal irrelevant: plumbing only)."""
    from kilter.models import load_tokenizer
    from kilter.models.reward import load_reward_backbone, save_reward_model, set_reward_bias
    from kilter.models.tiny import builtin_model_dir

    path = str(builtin_model_dir("micro"))
    tok = load_tokenizer(path)
    torch.manual_seed(0)
    rm = load_reward_backbone(path, tok)
    with torch.no_grad():
        rm.score.weight.normal_(0, 1.0)
    set_reward_bias(rm, -0.1)
    out = tmp_path_factory.mktemp("rm") / "final"
    save_reward_model(rm, tok, out)
    return out


def _changed(run, reference: str = "builtin:micro") -> bool:
    from kilter.models.loading import resolve_model_path

    before = load_file(str(Path(resolve_model_path(reference)) / "model.safetensors"))
    after = load_file(str(run / "final" / "model.safetensors"))
    return any(not torch.equal(before[k], after[k]) for k in before if k in after)


TINY = ["model=builtin:micro", "iterations=2", "rollout.batch_size=4", "rollout.max_new_tokens=6",
        "update.num_minibatches=2", "optim.lr=1e-3", "data.eval_prompts=null", "save_every=100", *QUIET]


def test_early_stop_when_the_proxy_rises_while_gold_falls(sft_model_dir, tmp_path, capsys):
    """A proxy that is the opposite of gold: the proxy climbs, gold falls, and the run stops itself."""
    rewards = tmp_path / "anti.py"
    rewards.write_text("from kilter.data.task import gold_scores\n\n"
                       "def anti_gold(prompts, responses):\n    return [-g for g in gold_scores(prompts, responses)]\n")
    out = tmp_path / "ppo"
    code = main(["ppo", f"model={sft_model_dir}", f"output_dir={out}", f"reward.function={rewards}:anti_gold",
                 "iterations=12", "rollout.batch_size=16", "rollout.max_new_tokens=24", "update.epochs=2",
                 "update.num_minibatches=2", "optim.lr=5e-4", "value.optim.lr=5e-4", "kl.beta=0.0",
                 "data.n_eval=16", "eval_every=1", "save_every=100", "early_stop=true", "early_stop_patience=2",
                 *QUIET])
    assert code == 0
    evals = [r for r in _rows(out) if "eval/gold" in r]
    stops = [r for r in evals if "early_stop/iteration" in r]
    assert len(stops) == 1, [(r["eval/reward"], r["eval/gold"]) for r in evals]
    stop = stops[0]["step"]
    assert stop < 12 and len(_train_rows(out)) == stop  # no iteration after the stop
    # the two evaluations before the stop: proxy up and gold down each time
    last3 = evals[-3:]
    assert last3[0]["eval/reward"] < last3[1]["eval/reward"] < last3[2]["eval/reward"]
    assert last3[0]["eval/gold"] > last3[1]["eval/gold"] > last3[2]["eval/gold"]
    assert (out / "final" / "config.json").exists() and (out / "checkpoints" / f"step-{stop}").is_dir()
    assert "stopping (early_stop=true)" in capsys.readouterr().err


def test_variants_run_and_change_the_policy(tmp_path, micro_reward_dir, capsys):
    # a reward given as a Python function in a file: shorter is better
    rewards = tmp_path / "my_rewards.py"
    rewards.write_text("def brevity(prompts, responses):\n    return [-len(r.split()) / 10 for r in responses]\n")
    runs = {
        "rloo": ["algorithm=rloo", "rollout.samples_per_prompt=2", "reward.function=builtin:gold"],
        # GRPO with LoRA: the reference is the policy with its adapter disabled
        "grpo": ["algorithm=grpo", "rollout.samples_per_prompt=2", "reward.function=builtin:gold",
                 "lora.enabled=true", "lora.r=4", "optim.lr=1e-2"],
        # A2C against a reward model: the critic starts from it (both with LoRA adapters)
        "a2c": ["algorithm=a2c", f"reward.model={micro_reward_dir}", "kl.estimator=k3", "lora.enabled=true",
                "lora.r=4", "optim.lr=1e-2"],
        "reinforce": ["algorithm=reinforce", "baseline.kind=greedy", f"reward.function={rewards}:brevity",
                      "reward.missing_eos_penalty=1.0"],
    }
    for name, extra in runs.items():
        out = tmp_path / name
        assert main(["ppo", f"output_dir={out}", *TINY, *extra]) == 0, name
        printed = capsys.readouterr().out
        assert _changed(out), f"{name} did not change the policy"
        rows = _train_rows(out)
        assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss/policy"])) for r in rows)
        if name == "grpo":
            assert "reference: adapter-disabled policy" in printed
        if name == "a2c":
            assert f"critic: reward model {micro_reward_dir}" in printed
            assert "reward/rm" in rows[0] and "loss/value" in rows[0]
            assert rows[0]["ppo/optimizer_steps"] == 2  # one pass, two minibatches
        if name == "reinforce":
            samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
            for s in samples:  # the sample table shows the function's reward (minus the no-EOS penalty)
                brevity = -len(s["response"].split()) / 10
                assert s["reward"] == pytest.approx(brevity) or s["reward"] == pytest.approx(brevity - 1.0)
                assert s["gold"] == pytest.approx(gold_scores([s["prompt"]], [s["response"]])[0])
            assert "reward/brevity" in rows[0]
        if name in ("rloo", "grpo", "reinforce"):
            assert not (out / "final" / "value").exists()  # critic-free
