"""fp32 vs bf16 autocast on SmolLM2-135M (+ LoRA): SFT, RM, DPO steps and PPO scoring at 64, 256 and 1024 tokens.

    PYTHONPATH=src python benchmarks/bench_precision.py                  # the table (needs a quiet machine)
    PYTHONPATH=src python benchmarks/bench_precision.py --quick          # correctness check: 32 tokens, 1 step
    ONEDNN_MAX_CPU_ISA=AVX2 PYTHONPATH=src python benchmarks/bench_precision.py --force-bf16 ...
                                                 # what a CPU without bf16 kernels does when bf16 is forced

Each (workload, precision, length) runs in its own process (peak memory is that process's max RSS):
the model is loaded, one step warms up, then ``--steps`` steps are timed.  A step holds about
``--tokens-per-step`` tokens (rows = tokens_per_step // length, at least 2).  SFT, RM and DPO are
forward + backward through Kilter's precision routing (``kilter.models.precision.autocast``, as
the trainers use it); PPO scoring is the no-grad log-probs of the policy and of the reference
(the adapter-disabled base) for a rollout batch.  The ``ran`` column says what precision the
forwards actually ran in: on a CPU without bf16 instructions ``precision=bf16`` runs in fp32
(docs/performance.md); ``--force-bf16`` skips that routing to show what it avoids.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = ("sft", "rm", "dpo", "ppo-score")


def _rows(length: int, tokens_per_step: int) -> int:
    return max(2, tokens_per_step // length)


def _child(args) -> dict:
    import torch
    import torch.nn.functional as F

    from kilter.models import presets
    from kilter.models.logprobs import per_token_logps
    from kilter.models.lora import LoraSection, apply_lora
    from kilter.models.precision import cpu_bf16_support, effective_precision
    from kilter.models.reward import raw_scores

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = str(presets.prepare("smollm2-135m", install=False))
    ran = "bf16" if args.force_bf16 and args.precision == "bf16" else effective_precision(args.precision, "cpu")

    def cast():
        if ran == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    T, n = args.length, _rows(args.length, args.tokens_per_step)
    lora = LoraSection(enabled=not args.full, r=16, alpha=32)
    if args.workload == "rm":
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = 0
        if lora.enabled:
            model = apply_lora(model, lora, "SEQ_CLS")
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        if lora.enabled:
            model = apply_lora(model, lora)
    model.train()
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(1, vocab, (n, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[:, T // 4:] = True  # a quarter prompt, the rest response
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def logps(m, rows):
        with cast():
            return per_token_logps(m, ids[rows], mask[rows], response[rows]).sum(-1)

    def step():
        if args.workload == "sft":
            with cast():
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), ids[:, 1:].reshape(-1))
        elif args.workload == "rm":
            with cast():
                r = raw_scores(model, ids, mask)
            loss = -F.logsigmoid(r[0::2] - r[1::2]).mean()
        elif args.workload == "dpo":
            policy = logps(model, slice(None))
            with torch.no_grad(), (model.disable_adapter() if lora.enabled else contextlib.nullcontext()):
                reference = logps(model, slice(None))
            margin = (policy - reference)[0::2] - (policy - reference)[1::2]
            loss = -F.logsigmoid(0.1 * margin).mean()
        else:  # ppo-score: old log-probs of the policy and the reference's, no gradients
            with torch.no_grad():
                logps(model, slice(None))
                with model.disable_adapter() if lora.enabled else contextlib.nullcontext():
                    logps(model, slice(None))
            return
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - start) / args.steps
    return {"workload": args.workload, "precision": args.precision, "ran": ran, "length": T, "rows": n,
            "s_per_step": seconds, "steps_per_s": 1.0 / seconds, "tokens_per_s": n * T / seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "cpu_bf16_support": cpu_bf16_support()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="64,256,1024", help="sequence lengths (tokens per row)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="of " + ", ".join(WORKLOADS))
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    ap.add_argument("--tokens-per-step", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--full", action="store_true", help="train all weights instead of LoRA adapters")
    ap.add_argument("--force-bf16", action="store_true", help="run bf16 autocast even where Kilter would route it to fp32")
    ap.add_argument("--quick", action="store_true", help="32 tokens, 64 per step, 1 timed step: a correctness check")
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON lines here")
    # one configuration in this process (what the driver launches)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workload", help=argparse.SUPPRESS)
    ap.add_argument("--precision", help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args)))
        return 0
    if args.quick:
        args.lengths, args.steps, args.tokens_per_step = "32", 1, 64
    lengths = [int(x) for x in args.lengths.split(",")]
    workloads = args.workloads.split(",")
    bad = [w for w in workloads if w not in WORKLOADS]
    if bad:
        ap.error(f"unknown workload {bad[0]!r}; choose from {', '.join(WORKLOADS)}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    rows = []
    for workload in workloads:
        for length in lengths:
            for precision in args.precisions.split(","):
                cmd = [sys.executable, __file__, "--child", "--workload", workload, "--precision", precision,
                       "--length", str(length), "--steps", str(args.steps), "--threads", str(args.threads),
                       "--tokens-per-step", str(args.tokens_per_step)]
                cmd += ["--full"] * args.full + ["--force-bf16"] * args.force_bf16
                done = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    print(f"{workload} {precision} {length}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                    return 1
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{workload:9s} {precision:4s} (ran {row['ran']}) T={length:5d} x{row['rows']:3d}: "
                      f"{row['steps_per_s']:.3f} steps/s, {row['tokens_per_s']:,.0f} tok/s, "
                      f"peak {row['peak_rss_mib']:,.0f} MiB", flush=True)
    print(f"\ncpu bf16 support: {rows[0]['cpu_bf16_support']}; threads {args.threads}; "
          f"{'full weights' if args.full else 'LoRA r=16'}\n")
    print("| workload | tokens | fp32 steps/s | bf16 steps/s (ran) | bf16/fp32 | fp32 tok/s | bf16 tok/s | "
          "fp32 peak MiB | bf16 peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    by = {(r["workload"], r["length"], r["precision"]): r for r in rows}
    for workload in workloads:
        for length in lengths:
            a, b = by.get((workload, length, "fp32")), by.get((workload, length, "bf16"))
            if a is None or b is None:
                continue
            print(f"| {workload} | {length} | {a['steps_per_s']:.3f} | {b['steps_per_s']:.3f} ({b['ran']}) | "
                  f"{b['steps_per_s'] / a['steps_per_s']:.2f}x | {a['tokens_per_s']:,.0f} | {b['tokens_per_s']:,.0f} | "
                  f"{a['peak_rss_mib']:,.0f} | {b['peak_rss_mib']:,.0f} |")
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
