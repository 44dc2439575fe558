"""Online RL side by side: ``kilter ppo`` (algorithm=ppo and algorithm=rloo) vs TRL's ``RLOOTrainer``.

    benchmarks/.venv-trl/bin/python benchmarks/bench_rl.py                 # full comparison
    benchmarks/.venv-trl/bin/python benchmarks/bench_rl.py --quick         # correctness check only

TRL 1.16 has an ``RLOOTrainer`` (the online, GRPO-style rewrite), so it is the comparison.
Every run samples P prompts x k responses per iteration (k = samples per prompt) with the same
generation settings -- at most T new tokens, temperature 1, no top-p/top-k, stop at EOS, HF
``generate`` with a KV cache -- scores them with the same reward (the built-in task's gold
function, ``kilter.data.task.gold_scores``), applies a KL penalty (beta 0.05) to the starting
model, and makes ONE optimizer update per iteration on all P x k responses (Kilter
``update.epochs=1 update.num_minibatches=1``; TRL ``num_iterations=1``, one generation per step).
Kilter PPO also trains a critic (policy backbone + value head), so it does more work per
episode than either RLOO.  The starting policy is an SFT'd tiny model (made once by
``kilter sft``) or SmolLM2-135M-Instruct with LoRA (reference = adapter-disabled policy in all).

Reported per run: episodes/s (= samples/s), generated tokens/s, peak RSS, and the final metric:
mean gold score of greedy answers to 32 held-out prompts, computed by the same code for all.
MFU counts, per generated token, 10 N FLOPs for the RLOO runs (2N sampling + 2N reference
forward + 6N policy forward and backward: with one update per batch neither library needs a
separate old-log-prob forward) and 16 N for PPO (plus 6N for the critic's forward and backward,
its N without the LM head counted as N for simplicity); with LoRA 2N less per trained model.
``kilter-ppo-shared`` (``value.model=shared``, LoRA only) counts as PPO; ``kilter-ppo-trunk``
(``value.model=trunk``: a value head on the policy's own hidden states, one forward and backward)
as RLOO, the head's ~6H FLOPs per token left out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

PROFILES = {
    # P prompts x k samples per iteration, T new tokens; steps = iterations
    "tiny": {"prompts": 8, "k": 4, "max_new_tokens": 48, "lr": 1e-4, "steps": 24, "warmup": 4},
    "gpt2-tiny": {"prompts": 8, "k": 4, "max_new_tokens": 48, "lr": 1e-4, "steps": 24, "warmup": 4},
    "gpt2-small": {"prompts": 8, "k": 4, "max_new_tokens": 48, "lr": 1e-4, "steps": 24, "warmup": 4},
    "gpt2-equal": {"prompts": 8, "k": 4, "max_new_tokens": 48, "lr": 1e-4, "steps": 24, "warmup": 4},
    "smollm2-lora": {"prompts": 4, "k": 4, "max_new_tokens": 48, "lr": 5e-5, "steps": 7, "warmup": 2},
}
QUICK = {"tiny": {"steps": 4, "warmup": 1}, "gpt2-tiny": {"steps": 4, "warmup": 1},
         "gpt2-small": {"steps": 4, "warmup": 1}, "gpt2-equal": {"steps": 4, "warmup": 1},
         "smollm2-lora": {"steps": 3, "warmup": 1}}
FLOPS_PER_TOKEN_PARAM = {"kilter-ppo": 16.0, "kilter-rloo": 10.0, "trl-rloo": 10.0,
                         "kilter-ppo:lora": 12.0, "kilter-rloo:lora": 8.0, "trl-rloo:lora": 8.0,
                         # value.model=shared: the critic's trunk is the policy's base run again with the
                         # critic's adapter, so the same FLOPs as a separate critic (one copy of the weights)
                         "kilter-ppo-shared:lora": 12.0,
                         # value.model=trunk: the values come from the policy's own forward and the value
                         # loss joins its backward, so RLOO's FLOPs plus a Linear(hidden, 1) head (~6 H per
                         # token, nothing beside N)
                         "kilter-ppo-trunk": 10.0, "kilter-ppo-trunk:lora": 8.0}
N_EVAL_PROMPTS = 32


def tiny_sft_policy(out: Path, threads: int, label: str = "tiny", start: str = "builtin:tiny") -> str:
    """A small model after a short ``kilter sft`` run (cached), so that it writes reviews that end."""
    final = out / "models" / f"{label}-sft" / "final"
    if (final / "config.json").is_file():
        return str(final)
    run_dir = final.parent
    C.clean_dir(run_dir)
    cmd = [str(C.KILTER), "sft", f"model={start}", f"output_dir={run_dir}", "data.eval=null", "max_steps=300",
           "batch_size=32", "optim.lr=2e-3", "n_samples=0", "save_every=1000000", "tensorboard=false",
           f"threads={threads}"]
    child = C.run_child(cmd, out / "models" / f"{label}-sft.log", threads)
    if child.rc != 0:
        raise SystemExit(f"could not make the tiny SFT policy:\n{C.tail(child.log)}")
    return str(final)


def make_spec(model_label: str, setting: str, args, files: dict) -> dict:
    spec = C.base_spec(model_label, setting, args, PROFILES, QUICK)
    if model_label == "tiny" or model_label.startswith("gpt2"):
        spec["model_dir"] = tiny_sft_policy(Path(args.out), args.threads, model_label, spec["model_dir"])
    spec.update(prompts_file=str(files["prompts"]), eval_prompts_file=str(files["prompts_eval"]), beta=0.05)
    return spec


# --------------------------------------------------------------------------- Kilter


def kilter_cmd(spec: dict, run_dir: Path, algorithm: str, extra: tuple[str, ...] = ()) -> list[str]:
    rows = spec["prompts"] * spec["k"]
    return [
        str(C.KILTER), "ppo", f"model={spec['model_dir']}", f"output_dir={run_dir}", f"algorithm={algorithm}",
        f"iterations={spec['steps']}", f"data.prompts={spec['prompts_file']}", "data.eval_prompts=null",
        "data.max_prompt_length=64", f"rollout.batch_size={spec['prompts']}", f"rollout.samples_per_prompt={spec['k']}",
        f"rollout.max_new_tokens={spec['max_new_tokens']}", "rollout.temperature=1.0", "rollout.top_p=1.0",
        "rollout.top_k=0", f"rollout.generation_batch_size={rows}", f"rollout.forward_batch_size={rows}",
        "reward.function=builtin:gold", f"kl.beta={spec['beta']}", "kl.estimator=k1",
        "update.epochs=1", "update.num_minibatches=1", "update.grad_accum=1",
        f"update.whiten_advantages={'true' if algorithm == 'ppo' else 'false'}",
        f"optim.lr={spec['lr']}", "optim.warmup_ratio=0", "optim.schedule=constant", "optim.max_grad_norm=1.0",
        f"precision={spec['precision']}", f"lora.enabled={str(spec['lora']).lower()}", "lora.r=8", "lora.alpha=16",
        "lora.dropout=0.0", "device=cpu", f"seed={spec['seed']}", "log_every=1", "sample_every=1000000",
        "n_samples=0", "eval_every=1000000", "save_every=1000000", "save_value_model=false", "tensorboard=false",
        f"threads={spec['threads']}", *extra,
    ]


def kilter_runner(algorithm: str, extra: tuple[str, ...] = (), label: str | None = None):
    def run(spec: dict, work: Path, i: int) -> dict:
        name = f"{label or 'kilter-' + algorithm}-{i}"
        run_dir = work / name
        episodes = spec["prompts"] * spec["k"]
        C.clean_dir(run_dir)
        child = C.run_child(kilter_cmd(spec, run_dir, algorithm, extra), work / f"{name}.log", spec["threads"])
        if child.rc != 0:
            return {"ok": False, "error": f"exit {child.rc}", "log_tail": C.tail(child.log)}
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        rows = [r for r in rows if "response/length" in r]
        steps = C.StepLog([r["time"] for r in rows], [episodes] * len(rows),
                          [r["response/length"] * episodes for r in rows])
        res = {"ok": True, "max_rss_mb": child.max_rss_mb, "wall_s": child.wall_s, **steps.window(spec["warmup"]),
               "final_dir": str(run_dir / "final"), "run_dir": str(run_dir),
               "train_reward_last": sum(r["reward/total"] for r in rows[-3:]) / len(rows[-3:])}
        return res

    return run


# --------------------------------------------------------------------------- TRL


def run_trl(spec: dict, work: Path, i: int) -> dict:
    res, out = C.run_trl_worker(__file__, spec, work, i)
    if out:
        res["train_reward_last"] = out.get("train_reward_last")
    return res


def gold_reward(prompts, completions, **kwargs) -> list[float]:
    from kilter.data.task import gold_scores

    return gold_scores([p.rstrip("\n") for p in prompts], list(completions))


def trl_worker(spec_path: str) -> int:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

    from kilter.data.tokenize import PROMPT_SEP

    spec = json.loads(Path(spec_path).read_text())
    run_dir = Path(spec_path).parent
    torch.set_num_threads(spec["threads"])
    rows = C.read_jsonl(Path(spec["prompts_file"]))
    dataset = Dataset.from_list([{"prompt": r["prompt"] + PROMPT_SEP} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    tokenizer.padding_side = "left"
    peft_config = None
    if spec["lora"]:
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    episodes = spec["prompts"] * spec["k"]
    config = RLOOConfig(
        output_dir=str(run_dir / "trainer"), max_steps=spec["steps"], per_device_train_batch_size=episodes,
        gradient_accumulation_steps=1, num_generations=spec["k"], max_completion_length=spec["max_new_tokens"],
        temperature=1.0, top_p=1.0, top_k=0, beta=spec["beta"], num_iterations=1, normalize_advantages=False,
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, adam_beta1=0.9, adam_beta2=0.95,
        adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0, bf16=spec["precision"] == "bf16", fp16=False,
        gradient_checkpointing=False, disable_dropout=True, logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to="none", seed=spec["seed"], data_seed=spec["seed"], use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = RLOOTrainer(model=spec["model_dir"], reward_funcs=[gold_reward], args=config, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config)
    times: list[float] = []
    trainer.add_callback(C.StepClockMixin.clock(times))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    C.save_trl_final(trainer, tokenizer, run_dir / "final", spec["lora"])
    n = len(times)
    lengths = [h["completions/mean_length"] for h in logs][:n]
    rewards = [h.get("reward", float("nan")) for h in logs]
    result = {"times": times, "samples": [episodes] * n, "tokens": [x * episodes for x in lengths],
              "train_reward_last": sum(rewards[-3:]) / max(len(rewards[-3:]), 1)}
    (run_dir / "result.json").write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------- evaluation and driver


def evaluate(res: dict, spec: dict) -> float:
    """Mean gold score of greedy answers (T new tokens) to the first 32 held-out prompts."""
    import torch

    from kilter.data.task import gold_scores
    from kilter.models import load_tokenizer
    from kilter.rollout.generate import SamplingParams, generate_texts

    tok = load_tokenizer(spec["model_dir"])
    model = C.load_for_eval(res["final_dir"])
    prompts = [r["prompt"] for r in C.read_jsonl(Path(spec["eval_prompts_file"]))[:N_EVAL_PROMPTS]]
    with torch.no_grad():
        gen = generate_texts(model, tok, prompts, SamplingParams(max_new_tokens=spec["max_new_tokens"], do_sample=False),
                             batch_size=N_EVAL_PROMPTS)
    scores = gold_scores(prompts, gen.texts)
    return sum(scores) / len(scores)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--trl-worker":
        return trl_worker(sys.argv[2])
    parser = C.base_parser("Online RL: kilter ppo (ppo, rloo) vs TRL RLOOTrainer")
    args = parser.parse_args()
    runners = {"kilter-ppo": kilter_runner("ppo"), "kilter-rloo": kilter_runner("rloo"), "trl-rloo": run_trl,
               # LoRA models only (smollm2-lora): the critic shares the policy's frozen base (kilter.models.value)
               "kilter-ppo-shared": kilter_runner("ppo", ("value.model=shared",), "kilter-ppo-shared"),
               # a value head on the policy's own trunk: no critic forward or backward (kilter.models.value)
               "kilter-ppo-trunk": kilter_runner("ppo", ("value.model=trunk",), "kilter-ppo-trunk")}
    if args.libs is None:  # the shared critic needs LoRA: by default only where every model has it
        lora = all(C.MODELS[m.strip()][1] for m in args.models.split(",") if m.strip() in C.MODELS)
        args.libs = ",".join(lib for lib in runners if lora or lib != "kilter-ppo-shared")
    return C.drive("rl", args, make_spec, runners, evaluate, "eval gold (greedy)", FLOPS_PER_TOKEN_PARAM)


if __name__ == "__main__":
    raise SystemExit(main())
