"""Operator profile of Kilter SFT steps: tiny model, length-grouped batches of 16, fp32, 2 threads.

    benchmarks/.venv-trl/bin/python benchmarks/profile_sft.py    (after bench_sft.py wrote out/data)

Shows where a training step's time goes once padding is gone: the table of RESULTS.md's
"What limits it" section.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from kilter.data.tokenize import encode_sft_records  # noqa: E402
from kilter.models import packed  # noqa: E402
from kilter.models.tiny import builtin_model_dir  # noqa: E402
from kilter.trainers import sft  # noqa: E402

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm")


def main() -> int:
    torch.set_num_threads(2)
    path = str(builtin_model_dir("tiny"))
    tok = AutoTokenizer.from_pretrained(path)
    rows = [json.loads(line) for line in open(HERE / "out" / "data" / "sft.jsonl", encoding="utf-8")][:1600]
    examples = encode_sft_records(tok, rows, 128)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    batches = [order[i:i + 16] for i in range(0, 16 * 60, 16)]
    random.Random(0).shuffle(batches)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.train()
    loss_model, _ = packed.fast_causal_lm(model, "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(idx: list[int]) -> None:
        batch = packed.pack_micro_batch([examples[j] for j in idx], tok.pad_token_id, 128,
                                        attention_weight=loss_model.attention_weight)
        loss, n = sft._forward_sum_fast(loss_model, batch, "fp32", "cpu")
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    for idx in batches[:10]:
        step(idx)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for idx in batches[10:50]:
            step(idx)
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL)
    attention = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key)
    print(f"per step: {total / 40 / 1000:.1f} ms of operator time; matmuls {100 * matmul / total:.0f}%, "
          f"attention kernels {100 * attention / total:.0f}%, everything else {100 * (1 - (matmul + attention) / total):.0f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
