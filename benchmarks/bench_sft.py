"""SFT side by side: ``kilter sft`` vs TRL's ``SFTTrainer`` on identical model, data and settings.

    benchmarks/.venv-trl/bin/python benchmarks/bench_sft.py                 # full comparison
    benchmarks/.venv-trl/bin/python benchmarks/bench_sft.py --quick         # correctness check only

Both read ``benchmarks/out/data/sft.jsonl`` (the built-in task's 4000 demonstrations).  Kilter
joins prompt and completion as ``prompt + "\\n" + completion + EOS``; TRL gets the prompt with
that "\\n" already appended, so both train on the *same token ids* -- each TRL run checks this
against Kilter's encoder and reports mismatches.  Loss is on completion tokens only in both.

Settings (see common.py for how time is measured):
  same  fp32, random batches (Kilter data.group_by_length=false, TRL train_sampling_strategy=random)
  best-fp32 / best-bf16  length-grouped batches in both (Kilter data.group_by_length=true, TRL
        train_sampling_strategy=group_by_length), fp32 or bf16 autocast (bf16 needs the CPU's bf16
        instructions); each library's best CPU setting is the faster of the two
Common to both: AdamW(0.9, 0.95, eps 1e-8, wd 0), 5% warmup then cosine to 10% of the peak LR,
grad-norm clip 1.0, no gradient checkpointing, no evaluation or saving inside the loop, batch
size B with no accumulation, the same max_length, seed 0.  The final metric is the held-out
completion-token loss of the trained model, computed by the same code for both.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

PROFILES = {
    # model label: batch, max_length, lr, steps, warmup (timing window = steps - warmup)
    "tiny": {"batch_size": 16, "max_length": 128, "lr": 5e-4, "steps": 100, "warmup": 10},
    "gpt2-tiny": {"batch_size": 16, "max_length": 128, "lr": 5e-4, "steps": 100, "warmup": 10},
    "gpt2-small": {"batch_size": 16, "max_length": 128, "lr": 5e-4, "steps": 100, "warmup": 10},
    "gpt2-equal": {"batch_size": 16, "max_length": 128, "lr": 5e-4, "steps": 100, "warmup": 10},
    "smollm2-lora": {"batch_size": 8, "max_length": 128, "lr": 2e-4, "steps": 16, "warmup": 4},
    "smollm2-dialogue": {"eval_limit": 32, "batch_size": 4, "max_length": 512, "lr": 2e-4, "steps": 6, "warmup": 2},
}
QUICK = {"tiny": {"steps": 8, "warmup": 2}, "gpt2-tiny": {"steps": 8, "warmup": 2},
         "gpt2-small": {"steps": 8, "warmup": 2}, "gpt2-equal": {"steps": 8, "warmup": 2}, "smollm2-lora": {"steps": 4, "warmup": 1},
         "smollm2-dialogue": {"steps": 2, "warmup": 1}}


def make_spec(model_label: str, setting: str, args, files: dict) -> dict:
    spec = C.base_spec(model_label, setting, args, PROFILES, QUICK)
    spec.update(train=str(files["sft"]), eval=str(files["sft_eval"]))
    return spec


# --------------------------------------------------------------------------- Kilter


def kilter_cmd(spec: dict, run_dir: Path) -> list[str]:
    return [
        str(C.KILTER), "sft", f"model={spec['model_dir']}", f"output_dir={run_dir}",
        f"data.train={spec['train']}", "data.eval=null", f"data.max_length={spec['max_length']}",
        f"data.group_by_length={str(spec['group_by_length']).lower()}",
        "n_samples=0", *C.kilter_training_args(spec),
    ]


def run_kilter(spec: dict, work: Path, i: int) -> dict:
    return C.run_kilter_training(kilter_cmd(spec, work / f"kilter-{i}"), spec, work, i, "loss/sft")


# --------------------------------------------------------------------------- TRL


def run_trl(spec: dict, work: Path, i: int) -> dict:
    return C.run_trl_training(__file__, spec, work, i)


def trl_worker(spec_path: str) -> int:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from kilter.data.tokenize import PROMPT_SEP, encode_sft_records

    spec = json.loads(Path(spec_path).read_text())
    run_dir = Path(spec_path).parent
    torch.set_num_threads(spec["threads"])
    rows = C.read_jsonl(Path(spec["train"]))
    # The same text Kilter tokenizes: prompt + "\n" + completion (+ EOS, which TRL appends).
    dataset = Dataset.from_list([{"prompt": r["prompt"] + PROMPT_SEP, "completion": r["completion"]} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    peft_config = C.trl_lora_config(spec)
    config = SFTConfig(**C.trl_training_args(spec, run_dir), completion_only_loss=True, packing=False)
    trainer = SFTTrainer(model=spec["model_dir"], args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)

    # Same token ids as Kilter?  (input ids and which positions carry a label)
    n_check = min(500, len(rows))
    kilter_examples = encode_sft_records(tokenizer, rows[:n_check], spec["max_length"])
    mismatches = 0
    for k in range(n_check):
        trl_ex = trainer.train_dataset[k]
        trl_ids = list(trl_ex["input_ids"])
        trl_mask = ([lab != -100 for lab in trl_ex["labels"]] if "labels" in trl_ex
                    else list(map(bool, trl_ex["completion_mask"])))
        kil_mask = [lab != -100 for lab in kilter_examples[k]["labels"]]
        if trl_ids != kilter_examples[k]["input_ids"] or trl_mask != kil_mask:
            mismatches += 1
            if mismatches == 1:
                print(f"token mismatch at example {k}:\n trl    {trl_ids} {trl_mask}\n kilter "
                      f"{kilter_examples[k]['input_ids']} {kil_mask}", flush=True)

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


# --------------------------------------------------------------------------- driver


def evaluate(res: dict, spec: dict) -> float:
    return C.sft_eval_loss(res["final_dir"], spec["model_dir"], Path(spec["eval"]), spec["max_length"],
                           limit=spec.get("eval_limit") or 128)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--trl-worker":
        return trl_worker(sys.argv[2])
    args = C.base_parser("SFT: kilter sft vs TRL SFTTrainer").parse_args()
    return C.drive("sft", args, make_spec, {"kilter": run_kilter, "trl": run_trl}, evaluate, "eval loss")


if __name__ == "__main__":
    raise SystemExit(main())
