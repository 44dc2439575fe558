"""Reward model side by side: ``kilter rm`` vs TRL's ``RewardTrainer`` on identical model, data and settings.

    benchmarks/.venv-trl/bin/python benchmarks/bench_rm.py                 # full comparison
    benchmarks/.venv-trl/bin/python benchmarks/bench_rm.py --quick         # correctness check only

Both read ``benchmarks/out/data/comparisons.jsonl``: {prompt, chosen, rejected} judged by the
simulated labeler over pairs of demonstrations of the same prompt.  The model is the LM backbone
with a scalar head (``AutoModelForSequenceClassification``, num_labels=1), the loss the pairwise
Bradley-Terry term -log sigmoid(r_chosen - r_rejected), one pair = one sample, B pairs (2B
sequences) per step.  Kilter runs with ``data.group_by_prompt=false`` so each comparison is its
own group (as in TRL), no margins, no bias pass (``bias_reference=none``); TRL gets
``prompt + "\\n"`` so both score the same token ids (checked per run).  LoRA adapts every linear
layer and trains the score head fully in both.  Settings as in bench_sft.py; the final metric
is held-out pairwise accuracy (216 pairs), computed by the same code for both.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

PROFILES = {
    "tiny": {"eval_limit": None, "batch_size": 16, "max_length": 128, "lr": 5e-4, "steps": 80, "warmup": 10},
    "gpt2-tiny": {"eval_limit": None, "batch_size": 16, "max_length": 128, "lr": 5e-4, "steps": 80, "warmup": 10},
    "gpt2-small": {"eval_limit": None, "batch_size": 16, "max_length": 128, "lr": 5e-4, "steps": 80, "warmup": 10},
    "gpt2-equal": {"eval_limit": None, "batch_size": 16, "max_length": 128, "lr": 5e-4, "steps": 80, "warmup": 10},
    "smollm2-lora": {"eval_limit": 128, "batch_size": 8, "max_length": 128, "lr": 2e-4, "steps": 14, "warmup": 4},
    "smollm2-dialogue": {"eval_limit": 32, "batch_size": 4, "max_length": 512, "lr": 2e-4, "steps": 6, "warmup": 2},
}
QUICK = {"tiny": {"steps": 8, "warmup": 2}, "gpt2-tiny": {"steps": 8, "warmup": 2},
         "gpt2-small": {"steps": 8, "warmup": 2}, "gpt2-equal": {"steps": 8, "warmup": 2}, "smollm2-lora": {"steps": 4, "warmup": 1},
         "smollm2-dialogue": {"steps": 2, "warmup": 1}}


def make_spec(model_label: str, setting: str, args, files: dict) -> dict:
    spec = C.base_spec(model_label, setting, args, PROFILES, QUICK)
    spec.update(train=str(files["comparisons"]), eval=str(files["comparisons_eval"]))
    return spec


def kilter_cmd(spec: dict, run_dir: Path) -> list[str]:
    return [
        str(C.KILTER), "rm", f"model={spec['model_dir']}", f"output_dir={run_dir}",
        f"data.train={spec['train']}", "data.eval=null", "data.eval_fraction=0", "data.kind=comparison",
        f"data.max_length={spec['max_length']}", "data.group_by_prompt=false",
        f"data.group_by_length={str(spec['group_by_length']).lower()}", "strength_margin_scale=0",
        "eval_every=1000000", "bias_reference=none", "n_samples=0", *C.kilter_training_args(spec),
    ]


def run_kilter(spec: dict, work: Path, i: int) -> dict:
    return C.run_kilter_training(kilter_cmd(spec, work / f"kilter-{i}"), spec, work, i,
                                 "loss/rm", sample_key="perf/pairs_per_s")


def run_trl(spec: dict, work: Path, i: int) -> dict:
    return C.run_trl_training(__file__, spec, work, i)


def trl_worker(spec_path: str) -> int:
    import torch
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from kilter.data.tokenize import encode_pair

    spec = json.loads(Path(spec_path).read_text())
    run_dir = Path(spec_path).parent
    torch.set_num_threads(spec["threads"])
    rows = C.read_jsonl(Path(spec["train"]))
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    dataset = C.preference_dataset(rows, tokenizer, spec)
    peft_config = C.trl_lora_config(spec, "SEQ_CLS", modules_to_save=["score"])
    config = RewardConfig(**C.trl_training_args(spec, run_dir), center_rewards_coefficient=None, disable_dropout=True,
                          remove_unused_columns=not spec["group_by_length"])
    trainer = RewardTrainer(model=spec["model_dir"], args=config, train_dataset=dataset, processing_class=tokenizer,
                            peft_config=peft_config)

    n_check = min(500, len(rows))
    mismatches = 0
    for k in range(n_check):
        ex = trainer.train_dataset[k]
        mine = encode_pair(tokenizer, rows[k]["prompt"], rows[k]["chosen"], rows[k]["rejected"], spec["max_length"])
        if list(ex["chosen_ids"]) != mine["chosen"]["input_ids"] or list(ex["rejected_ids"]) != mine["rejected"]["input_ids"]:
            mismatches += 1
            if mismatches == 1:
                print(f"token mismatch at example {k}:\n trl    {list(ex['chosen_ids'])}\n kilter "
                      f"{mine['chosen']['input_ids']}", flush=True)

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
    return C.rm_eval_accuracy(res["final_dir"], spec["model_dir"], Path(spec["eval"]), spec["max_length"],
                            limit=spec["eval_limit"])


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--trl-worker":
        return trl_worker(sys.argv[2])
    args = C.base_parser("Reward model: kilter rm vs TRL RewardTrainer").parse_args()
    return C.drive("rm", args, make_spec, {"kilter": run_kilter, "trl": run_trl}, evaluate, "eval pair accuracy")


if __name__ == "__main__":
    raise SystemExit(main())
