"""DPO side by side: ``kilter dpo`` vs TRL's ``DPOTrainer`` on identical model, data and settings.

    benchmarks/.venv-trl/bin/python benchmarks/bench_dpo.py                 # full comparison
    benchmarks/.venv-trl/bin/python benchmarks/bench_dpo.py --quick         # correctness check only

Both read ``benchmarks/out/data/comparisons.jsonl`` and start from the same model, which is also
the frozen reference (with LoRA: the adapter-disabled policy in both).  Sigmoid DPO loss,
beta 0.1, summed response log-probs, one pair = one sample, B pairs (2B sequences) per step.
TRL gets ``prompt + "\\n"`` so both see the same token ids (checked per run).

Settings:
  same  fp32, random batches, reference log-probs computed online every step in both
        (Kilter reference=online, TRL precompute_ref_log_probs=false)
  best-fp32 / best-bf16  length-grouped batches, fp32 or bf16 autocast, reference
        log-probs precomputed once before training in both (Kilter reference=precompute, TRL
        precompute_ref_log_probs=true); the precompute pass runs before the first step, so it is
        outside the timed window for both (its cost is in wall_s in the JSON)
The final metric is held-out implicit-reward accuracy (216 pairs) against the starting model,
computed by the same code for both.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

PROFILES = {
    "tiny": {"eval_limit": None, "batch_size": 16, "max_length": 128, "lr": 5e-4, "steps": 80, "warmup": 10, "beta": 0.1},
    "gpt2-tiny": {"eval_limit": None, "batch_size": 16, "max_length": 128, "lr": 5e-4, "steps": 80, "warmup": 10, "beta": 0.1},
    "gpt2-small": {"eval_limit": None, "batch_size": 16, "max_length": 128, "lr": 5e-4, "steps": 80, "warmup": 10, "beta": 0.1},
    "gpt2-equal": {"eval_limit": None, "batch_size": 16, "max_length": 128, "lr": 5e-4, "steps": 80, "warmup": 10, "beta": 0.1},
    "smollm2-lora": {"eval_limit": 128, "batch_size": 8, "max_length": 128, "lr": 2e-4, "steps": 14, "warmup": 4, "beta": 0.1},
    "smollm2-dialogue": {"eval_limit": 32, "batch_size": 4, "max_length": 512, "lr": 2e-4, "steps": 6, "warmup": 2, "beta": 0.1},
}
QUICK = {"tiny": {"steps": 8, "warmup": 2}, "gpt2-tiny": {"steps": 8, "warmup": 2},
         "gpt2-small": {"steps": 8, "warmup": 2}, "gpt2-equal": {"steps": 8, "warmup": 2}, "smollm2-lora": {"steps": 4, "warmup": 1},
         "smollm2-dialogue": {"steps": 2, "warmup": 1}}


def make_spec(model_label: str, setting: str, args, files: dict) -> dict:
    spec = C.base_spec(model_label, setting, args, PROFILES, QUICK)
    spec.update(train=str(files["comparisons"]), eval=str(files["comparisons_eval"]),
                precompute_ref=setting.startswith("best"))
    return spec


def kilter_cmd(spec: dict, run_dir: Path) -> list[str]:
    return [
        str(C.KILTER), "dpo", f"model={spec['model_dir']}", f"output_dir={run_dir}",
        f"data.train={spec['train']}", "data.eval=null", "data.eval_fraction=0", "data.kind=comparison",
        f"data.max_length={spec['max_length']}", f"data.group_by_length={str(spec['group_by_length']).lower()}",
        "loss_type=sigmoid", f"beta={spec['beta']}", "label_smoothing=0", "average_logps=false",
        f"reference={'precompute' if spec['precompute_ref'] else 'online'}",
        "eval_every=1000000", "samples.n=0", *C.kilter_training_args(spec),
    ]


def run_kilter(spec: dict, work: Path, i: int) -> dict:
    return C.run_kilter_training(kilter_cmd(spec, work / f"kilter-{i}"), spec, work, i,
                                 "loss/dpo", sample_key="perf/pairs_per_s")


def run_trl(spec: dict, work: Path, i: int) -> dict:
    return C.run_trl_training(__file__, spec, work, i)


def trl_worker(spec_path: str) -> int:
    import torch
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from kilter.data.tokenize import encode_pair

    spec = json.loads(Path(spec_path).read_text())
    run_dir = Path(spec_path).parent
    torch.set_num_threads(spec["threads"])
    rows = C.read_jsonl(Path(spec["train"]))
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    dataset = C.preference_dataset(rows, tokenizer, spec)
    peft_config = C.trl_lora_config(spec)
    config = DPOConfig(**C.trl_training_args(spec, run_dir), beta=spec["beta"], loss_type=["sigmoid"], label_smoothing=0.0,
                       precompute_ref_log_probs=spec["precompute_ref"], disable_dropout=True,
                       remove_unused_columns=not spec["group_by_length"])
    trainer = DPOTrainer(model=spec["model_dir"], args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)

    n_check = min(500, len(rows))
    mismatches = 0
    for k in range(n_check):
        ex = trainer.train_dataset[k]
        mine = encode_pair(tokenizer, rows[k]["prompt"], rows[k]["chosen"], rows[k]["rejected"], spec["max_length"])
        prompt = list(ex["prompt_ids"])
        if (prompt + list(ex["chosen_ids"]) != mine["chosen"]["input_ids"]
                or prompt + list(ex["rejected_ids"]) != mine["rejected"]["input_ids"]
                or len(prompt) != mine["chosen"]["prompt_len"]):
            mismatches += 1
            if mismatches == 1:
                print(f"token mismatch at example {k}:\n trl    {prompt} | {list(ex['chosen_ids'])}\n kilter "
                      f"{mine['chosen']['input_ids']} (prompt {mine['chosen']['prompt_len']})", flush=True)

    tokens: list[int] = []
    times: list[float] = []
    C.StepClockMixin.count_tokens(trainer, tokens)
    trainer.add_callback(C.StepClockMixin.clock(times))
    output = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h] or [output.training_loss]
    C.save_trl_final(trainer, tokenizer, run_dir / "final", spec["lora"])
    n = len(times)
    result = {"times": times, "samples": [spec["batch_size"]] * n, "tokens": tokens[:n],
              "train_loss_last10": losses[-1], "token_mismatches": mismatches, "token_checked": n_check}
    (run_dir / "result.json").write_text(json.dumps(result))
    return 0


def evaluate(res: dict, spec: dict) -> float:
    return C.dpo_eval_accuracy(res["final_dir"], spec["model_dir"], Path(spec["eval"]), spec["max_length"],
                            limit=spec["eval_limit"])


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--trl-worker":
        return trl_worker(sys.argv[2])
    args = C.base_parser("DPO: kilter dpo vs TRL DPOTrainer").parse_args()
    return C.drive("dpo", args, make_spec, {"kilter": run_kilter, "trl": run_trl}, evaluate,
                   "eval reward accuracy")


if __name__ == "__main__":
    raise SystemExit(main())
