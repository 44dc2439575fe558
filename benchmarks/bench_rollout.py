"""Rollout throughput: vLLM vs Kilter's own sampler vs transformers' generate, side by side in one process.

Every engine gets the same prompts (the built-in task's held-out prompts, repeated to ``--prompts``),
the same length limit and the same sampling settings (temperature 1, no top-p/top-k, PAD suppressed),
in one call per repetition, as a PPO rollout makes it.  The figure is generated response tokens
(up to and including EOS) per second of wall-clock, the median over ``--repeats`` timed calls after
one untimed warm-up call; vLLM's start-up (``LLM(...)``, compilation included) is reported apart.

Runs in the vLLM venv (``make vllm-venv``), on a quiet machine:

    for m in tiny smollm2; do KILTER_CACHE=$PWD/.cache/kilter-tests VLLM_CPU_KVCACHE_SPACE=4 \\
      .venv-vllm/bin/python benchmarks/bench_rollout.py --models $m --prompts 64 --max-new-tokens 128 \\
      --repeats 3 --out benchmarks/out/rollout-$m.json; done

    .venv-vllm/bin/python benchmarks/bench_rollout.py --quick     # a correctness check, no figures

The hf and kilter engines run first: vLLM's CPU worker binds this process's threads when it starts
(on 2 cores it keeps one for itself), so give each model its own invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"tiny": "builtin:tiny", "smollm2": "smollm2-135m", "gpt2-tiny": "builtin:gpt2-tiny",
          "gpt2-small": "builtin:gpt2-small"}
ENGINES = ("kilter", "hf", "vllm")


def _prompt_ids(tokenizer, n: int) -> list[list[int]]:
    from kilter.data.sources import load_records
    from kilter.data.tokenize import encode_prompt

    rows = load_records("builtin:prompts_eval", "prompt").rows
    ids = [encode_prompt(tokenizer, r["prompt"], 128) for r in rows]
    return [ids[i % len(ids)] for i in range(n)]


def _time(generate, prompt_ids, params, repeats: int) -> dict:
    import torch

    torch.manual_seed(0)
    generate(prompt_ids, params)  # warm-up: first-call allocations, caches, lazy compilation
    rates, tokens = [], []
    for r in range(repeats):
        torch.manual_seed(1 + r)
        t0 = time.perf_counter()
        gen = generate(prompt_ids, params)
        elapsed = time.perf_counter() - t0
        n = sum(len(x) for x in gen.response_ids)
        rates.append(n / elapsed)
        tokens.append(n)
    return {"tokens_per_s": statistics.median(rates), "tokens_per_call": statistics.mean(tokens),
            "all_tokens_per_s": [round(x, 1) for x in rates]}


def bench_model(name: str, spec: str, engines: list[str], n_prompts: int, max_new_tokens: int, repeats: int,
                threads: int | None, eager: bool) -> list[dict]:
    import torch

    from kilter.models import load_causal_lm, load_tokenizer, resolve_model_path
    from kilter.rollout.generate import SamplingParams, generate_ids

    if threads:
        torch.set_num_threads(threads)
    path = resolve_model_path(spec)
    tok = load_tokenizer(path)
    model = load_causal_lm(path, tok).eval()
    prompt_ids = _prompt_ids(tok, n_prompts)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0)
    common = {"model": name, "prompts": n_prompts, "max_new_tokens": max_new_tokens, "threads": torch.get_num_threads()}
    rows = []
    for engine in [e for e in ENGINES if e in engines]:
        row = {**common, "engine": engine}
        if engine == "kilter":
            fn = lambda ids, p: generate_ids(model, tok, ids, p, batch_size=len(ids), fast=True)  # noqa: E731
        elif engine == "hf":
            fn = lambda ids, p: generate_ids(model, tok, ids, p, batch_size=len(ids), fast=False)  # noqa: E731
        else:
            from kilter.rollout.vllm_engine import VLLMEngine

            t0 = time.perf_counter()
            vllm_engine = VLLMEngine(path, tok, max_model_len=128 + max_new_tokens, enforce_eager=eager)
            row["startup_s"] = round(time.perf_counter() - t0, 1)
            row["eager"] = eager
            fn = vllm_engine.generate
        row.update(_time(fn, prompt_ids, params, repeats))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--prompts", type=int, default=64, help="prompts per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for hf/kilter (default torch's)")
    parser.add_argument("--eager", action="store_true", help="vLLM without torch.compile (faster start-up)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here too")
    parser.add_argument("--quick", action="store_true", help="tiny model, 4 prompts, 8 tokens, 1 repeat, eager")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.prompts, args.max_new_tokens, args.repeats, args.eager = "tiny", 4, 8, 1, True
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        parser.error(f"unknown engines {unknown}; choose from {', '.join(ENGINES)}")
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
        if "vllm" in engines and rows and any(r["engine"] == "vllm" for r in rows):
            print(f"note: {name} runs after a vLLM engine in this process (threads bound by vLLM); "
                  "run one model per invocation for clean figures", file=sys.stderr)
        rows += bench_model(name, MODELS[name], engines, args.prompts, args.max_new_tokens, args.repeats,
                            args.threads, args.eager)
    print("\n| model | engine | tokens/s | tokens per call | vLLM start-up s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['engine']} | {r['tokens_per_s']:.0f} | {r['tokens_per_call']:.0f} | "
              f"{r.get('startup_s', '')} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
