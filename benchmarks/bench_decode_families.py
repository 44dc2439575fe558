"""Per-token decode cost of each decoder family: Kilter's own sampler vs transformers' generate.

One tiny random model per family (hidden 128, 4 layers, vocabulary 1024, built from its
transformers config class), one batch of left-padded prompts, greedy decoding of a fixed
number of new tokens (no EOS), in one process.  Engines:

* ``kilter``: :mod:`kilter.rollout.fast_decode` (the probe runs once, untimed);
* ``hf``: ``model.generate`` with its default dynamic cache;
* ``hf-static``: ``model.generate(cache_implementation="static")`` (no ``torch.compile``).

The figure is milliseconds per decode step (wall time of the call / new tokens; the prefill is
included, as a rollout pays it), the median of ``--repeats`` calls after one warm-up call.  It
decides which engine a family should use; run it on a quiet machine:

    PYTHONPATH=src python benchmarks/bench_decode_families.py --threads 1 --out benchmarks/out/decode-families.json

``--quick`` checks that every engine runs on every family (2 tokens, 1 repeat): no figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3", "gpt2"]
ENGINES = ("kilter", "hf", "hf-static")


def build(family: str, vocab: int = 1024, hidden: int = 128, layers: int = 4, heads: int = 4):
    import torch
    import transformers as hf

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=512, pad_token_id=0)
    if family == "gpt2":
        config = hf.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512,
                               pad_token_id=0, bos_token_id=1, eos_token_id=1)
    else:
        classes = {"llama": hf.LlamaConfig, "mistral": hf.MistralConfig, "qwen2": hf.Qwen2Config,
                   "qwen3": hf.Qwen3Config, "gemma": hf.GemmaConfig, "gemma2": hf.Gemma2Config,
                   "phi": hf.PhiConfig, "phi3": hf.Phi3Config}
        extra = {"head_dim": hidden // heads} if family in ("qwen3", "gemma", "gemma2") else {}
        if family == "phi3":
            extra.update(bos_token_id=1, eos_token_id=1)
        config = classes[family](**common, **extra)
    torch.manual_seed(0)
    return hf.AutoModelForCausalLM.from_config(config).eval()


def measure(family: str, batch: int, prompt_len: int, new_tokens: int, repeats: int, engines: list[str]) -> list[dict]:
    import torch

    from kilter.rollout import fast_decode
    from kilter.rollout.generate import left_pad

    model = build(family)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 1024, (prompt_len - (i % 5),), generator=g).tolist() for i in range(batch)]
    ids, mask = left_pad(prompts, 0, "cpu")
    rows = []
    for engine in engines:
        if engine == "kilter":
            def run():
                decoder = fast_decode.prepare(model, ids.shape[1] + new_tokens)
                assert decoder is not None, f"own sampler refused {family}"
                return decoder.decode(ids, mask, new_tokens, lambda x: x.argmax(-1), eos_id=-1, pad_id=0)
        else:
            kwargs = {"cache_implementation": "static"} if engine == "hf-static" else {}

            def run(kwargs=kwargs):
                return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
                                      top_k=None, top_p=None, temperature=None, **kwargs)
        with torch.no_grad():
            run()  # warm-up (and the sampler's probe)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
        row = {"family": family, "engine": engine, "ms_per_step": 1000 * statistics.median(times) / new_tokens,
               "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "threads": torch.get_num_threads()}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the rows as JSON here too")
    parser.add_argument("--quick", action="store_true", help="2 new tokens, 1 repeat: does every engine run?")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.new_tokens, args.repeats = 2, 1
    engines = [e for e in args.engines.split(",") if e]
    if any(e not in ENGINES for e in engines):
        parser.error(f"engines: {', '.join(ENGINES)}")
    rows = []
    for family in [f for f in args.families.split(",") if f]:
        if family not in FAMILIES:
            parser.error(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
        rows += measure(family, args.batch, args.prompt_len, args.new_tokens, args.repeats, engines)
    by = {(r["family"], r["engine"]): r["ms_per_step"] for r in rows}
    print("\n| family | " + " | ".join(f"{e} ms/step" for e in engines) + " | hf / kilter |")
    print("|---|" + "---|" * (len(engines) + 1))
    for family in dict.fromkeys(r["family"] for r in rows):
        cells = [f"{by[(family, e)]:.2f}" for e in engines]
        ratio = by.get((family, "hf"), float("nan")) / by.get((family, "kilter"), float("nan"))
        print(f"| {family} | " + " | ".join(cells) + f" | {ratio:.2f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
