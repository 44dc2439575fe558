"""The KL penalty in `kilter ppo` does its job, end to end on the micro model.

- a reward that pulls the policy away from pi_0: every estimator with beta > 0 ends far closer
  to pi_0 than the same run with beta = 0 (same seed, same steps);
- zero reward and a policy that starts away from its ``ref_model``: the penalty alone brings it
  back (the KL to the reference falls) under every estimator, for ppo, rloo and grpo;
- the KL is exactly 0 before the first update, in fp32 and in bf16.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kilter.cli import main

REWARDS = '''
def count_e(prompts, responses):
    return [r.count("e") / 4 for r in responses]


def zero(prompts, responses):
    return [0.0 for _ in responses]
'''

COMMON = ["rollout.max_new_tokens=16", "update.epochs=2", "update.num_minibatches=1", "optim.lr=1e-2",
          "value.model=policy", "value.optim.lr=1e-2", "data.n_eval=32", "tensorboard=false", "n_samples=0",
          "save_every=100", "threads=1"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/smoke/conftest.py


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rewards") / "rewards.py"
    path.write_text(REWARDS)
    return path


def _group(algorithm: str) -> list[str]:
    return ["rollout.batch_size=4", "rollout.samples_per_prompt=4"] if algorithm != "ppo" else ["rollout.batch_size=16"]


def _run(out: Path, algorithm: str, *extra: str) -> list[dict]:
    assert main(["ppo", "model=builtin:micro", f"output_dir={out}", f"algorithm={algorithm}", *_group(algorithm),
                 *COMMON, *extra]) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _eval_kl(rows: list[dict]) -> list[float]:
    return [r["eval/kl"] for r in rows if "eval/kl" in r]


@pytest.mark.parametrize("algorithm, estimators", [("ppo", ["k1", "k2", "k3"]), ("grpo", ["k2", "k3"])])
def test_every_estimator_keeps_the_policy_near_pi0(tmp_path, reward_file, algorithm, estimators):
    chase = [f"reward.function={reward_file}:count_e", "iterations=12", "eval_every=100"]
    free = _eval_kl(_run(tmp_path / "free", algorithm, "kl.beta=0", "kl.estimator=k3", *chase))[-1]
    assert free > 10, f"the reward should pull the unpenalised policy far from pi_0 (KL {free:.2f})"
    for est in estimators:
        penalised = _eval_kl(_run(tmp_path / est, algorithm, "kl.beta=1.0", f"kl.estimator={est}", *chase))[-1]
        assert penalised < 0.35 * free, f"{algorithm} {est}: KL {penalised:.2f} vs {free:.2f} without the penalty"


@pytest.fixture(scope="module")
def displaced_policy(tmp_path_factory, reward_file) -> Path:
    """final/ of an unpenalised run that chased count_e: a policy far from builtin:micro, as when
    an earlier RL run is continued."""
    out = tmp_path_factory.mktemp("displaced") / "run"
    _run(out, "ppo", f"reward.function={reward_file}:count_e", "kl.beta=0", "iterations=8", "eval_every=100")
    return out / "final"


@pytest.mark.parametrize("algorithm, estimator", [("ppo", "k1"), ("ppo", "k2"), ("ppo", "k3"), ("rloo", "k1"),
                                                  ("rloo", "k2"), ("rloo", "k3"), ("grpo", "k2"), ("grpo", "k3")])
def test_zero_reward_brings_a_displaced_policy_back_to_its_ref_model(tmp_path, reward_file, displaced_policy,
                                                                     algorithm, estimator, capsys):
    # k1 in the reward is the noisiest pull back (a sampled log-ratio per token): with the tokenizer the
    # built-in micro model got when the task's demonstrations changed (cache v3) it took ppo and rloo
    # from 8.42 to 6.98 and 7.27 in 10 iterations (16: 6.44 for rloo), so it gets 20
    steps = 20 if estimator == "k1" else 10
    rows = _run(tmp_path / "run", algorithm, f"model={displaced_policy}", "ref_model=builtin:micro",
                f"reward.function={reward_file}:zero", "reward.missing_eos_penalty=null", f"iterations={steps}",
                f"eval_every={steps}", "kl.beta=1.0", f"kl.estimator={estimator}")
    assert "reference: ref_model builtin:micro" in capsys.readouterr().out
    start, end = _eval_kl(rows)[0], _eval_kl(rows)[-1]
    assert start > 1.0, f"the displaced policy should start away from its reference (KL {start:.2f})"
    assert end < 0.75 * start, f"{algorithm} {estimator}: KL to ref_model {start:.2f} -> {end:.2f}"


def test_lora_with_another_ref_model_does_not_use_the_adapter_disabled_shortcut(tmp_path, reward_file,
                                                                                displaced_policy, capsys):
    rows = _run(tmp_path / "run", "rloo", f"model={displaced_policy}", "ref_model=builtin:micro", "lora.enabled=true",
                f"reward.function={reward_file}:zero", "iterations=1", "eval_every=10")
    assert "reference: ref_model builtin:micro" in capsys.readouterr().out
    assert _eval_kl(rows)[0] > 1.0  # measured against builtin:micro, not against the displaced base


def test_ref_model_with_another_vocabulary_is_refused_in_one_line(tmp_path, reward_file, capsys):
    from kilter.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer("builtin:micro")
    model = load_causal_lm("builtin:micro", tok)
    tok.add_special_tokens({"additional_special_tokens": ["<|other|>"]})
    model.resize_token_embeddings(len(tok))
    other = tmp_path / "other-vocab"
    model.save_pretrained(other)
    tok.save_pretrained(other)
    code = main(["ppo", "model=builtin:micro", f"ref_model={other}", f"output_dir={tmp_path / 'run'}",
                 f"reward.function={reward_file}:zero", *COMMON])
    err = capsys.readouterr().err
    assert code == 2 and "ref_model" in err and "tokenizer" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_kl_is_exactly_zero_before_the_first_update(tmp_path, reward_file, precision):
    rows = _run(tmp_path / "run", "ppo", f"precision={precision}", f"reward.function={reward_file}:count_e",
                "iterations=1", "eval_every=100")
    first = next(r for r in rows if "kl/ref" in r)
    assert first["kl/ref"] == 0.0 and first["kl/ref_k1"] == 0.0
    assert _eval_kl(rows)[0] == 0.0  # the step-0 evaluation, before any update
