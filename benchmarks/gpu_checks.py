"""The checks to run whenever a GPU machine is available (docs/distributed.md, "GPU checks").

    python benchmarks/gpu_checks.py                       # every check
    python benchmarks/gpu_checks.py --only bf16,fsdp      # some of them

1. bf16 + SDPA / flash attention: forward+backward of a small Llama in bf16 (step time, tokens/s,
   peak memory, loss vs fp32), and whether the flash SDPA backend runs.
2. vLLM on CUDA (when importable): start-up, greedy output equal to HF greedy, throughput.
3. NCCL all-reduce over every visible GPU (torchrun): bus bandwidth at 1/16/256 MB.
4. FSDP2 on 2+ GPUs (torchrun): `kilter sft` with parallel=fsdp vs parallel=ddp, loss agreement and
   tokens/s.  Without 2 GPUs it is a dry run on CPU with gloo (2 processes), which checks the
   command and the agreement but records no speed.
5. Data-parallel PPO (torchrun): `kilter ppo` parallel=ddp vs parallel=fsdp (SmolLM2-135M in bf16 on the
   GPUs; the micro model on CPU/gloo as a dry run): KL agreement and seconds per iteration.

Each check records its figures (or why it was skipped) in ``--json`` (benchmarks/gpu_checks.json).
When at least one check ran on CUDA a section is appended to ``--results`` (benchmarks/RESULTS.md);
a machine without CUDA only prints what it skipped (``--append-always`` appends anyway).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CHECKS = ("bf16", "vllm", "nccl", "fsdp", "ppo")


def _cuda_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _small_llama(dtype: torch.dtype, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to("cuda", dtype=dtype)


# --------------------------------------------------------------------------- 1. bf16 + SDPA


def check_bf16() -> dict:
    reason = _cuda_reason()
    if reason:
        return {"status": "skipped", "reason": reason}
    batch, seq, steps = 4, 1024, 10
    ids = torch.randint(0, 32000, (batch, seq), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    out: dict = {"status": "ok", "device": torch.cuda.get_device_name(), "batch": batch, "seq": seq}
    losses = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = _small_llama(dtype, "sdpa")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        torch.cuda.reset_peak_memory_stats()
        for step in range(steps + 2):
            if step == 2:
                torch.cuda.synchronize()
                start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step == 0:
                losses[name] = float(loss)
        torch.cuda.synchronize()
        per_step = (time.perf_counter() - start) / steps
        out[f"{name}_step_s"] = round(per_step, 4)
        out[f"{name}_tokens_per_s"] = round(batch * seq / per_step)
        out[f"{name}_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        del model, opt
        torch.cuda.empty_cache()
    out["first_loss_fp32"], out["first_loss_bf16"] = losses["fp32"], losses["bf16"]
    out["bf16_loss_diff"] = abs(losses["fp32"] - losses["bf16"])
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, 16, 1024, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for backend, key in ((SDPBackend.FLASH_ATTENTION, "flash"), (SDPBackend.EFFICIENT_ATTENTION, "mem_efficient")):
        try:
            with sdpa_kernel(backend):
                torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
            out[f"sdpa_{key}"] = "runs"
        except RuntimeError as exc:
            out[f"sdpa_{key}"] = f"unavailable: {str(exc).splitlines()[0][:120]}"
    return out


# --------------------------------------------------------------------------- 2. vLLM


def check_vllm() -> dict:
    reason = _cuda_reason()
    if reason:
        return {"status": "skipped", "reason": reason}
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        return {"status": "skipped", "reason": f"vllm is not importable ({exc})"}
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    from kilter.models.loading import resolve_model_path

    path = resolve_model_path("builtin:tiny")
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Review the product number {i}."}],
                                       tokenize=False, add_generation_prompt=True) for i in range(64)]
    start = time.perf_counter()
    llm = LLM(model=path, dtype="float32", gpu_memory_utilization=0.3, enforce_eager=True)
    startup = time.perf_counter() - start
    params = SamplingParams(max_tokens=32, temperature=0.0)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    gen_s = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    hf = AutoModelForCausalLM.from_pretrained(path).to("cuda").eval()
    same = 0
    for prompt, o in zip(prompts[:8], outs[:8]):
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to("cuda")
        greedy = hf.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
        same += greedy[0, ids.shape[1]:].tolist()[: len(o.outputs[0].token_ids)] == list(o.outputs[0].token_ids)
    return {"status": "ok", "vllm": vllm.__version__, "startup_s": round(startup, 1),
            "tokens_per_s": round(tokens / gen_s), "greedy_equal_hf": f"{same}/8"}


# --------------------------------------------------------------------------- 3. NCCL


def _nccl_worker(out_path: str) -> None:
    import torch.distributed as dist

    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    world = dist.get_world_size()
    rows = []
    for mb in (1, 16, 256):
        x = torch.ones(mb * 2**20 // 4, device="cuda")
        for _ in range(3):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        reps = 20
        start = time.perf_counter()
        for _ in range(reps):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        t = (time.perf_counter() - start) / reps
        # bus bandwidth as nccl-tests defines it: size * 2 (n-1)/n / time
        rows.append({"mb": mb, "time_ms": round(t * 1e3, 3),
                     "busbw_gb_s": round(x.numel() * 4 * 2 * (world - 1) / world / t / 1e9, 1)})
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps({"world_size": world, "all_reduce": rows}))
    dist.destroy_process_group()


def check_nccl() -> dict:
    reason = _cuda_reason()
    if reason:
        return {"status": "skipped", "reason": reason}
    n = torch.cuda.device_count()
    if n < 2:
        return {"status": "skipped", "reason": f"needs 2+ GPUs, this machine has {n}"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "nccl.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
               __file__, "--nccl-worker", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            return {"status": "failed", "reason": (proc.stdout + proc.stderr)[-1500:]}
        return {"status": "ok", **json.loads(out.read_text())}


# --------------------------------------------------------------------------- 4. FSDP2


def _sft_run(out_dir: Path, data: Path, procs: int, parallel: str, device: str, steps: int) -> tuple[int, str]:
    common = ["sft", f"data.train={data}", "data.group_by_length=false", f"max_steps={steps}", "log_every=1",
              "eval_every=100000", "save_every=100000", "optim.lr=1e-3", "seed=7", "n_samples=0",
              "tensorboard=false", f"device={device}", f"output_dir={out_dir}", f"parallel={parallel}",
              f"batch_size={16 // procs}"]
    if device == "cuda":
        common.append("precision=bf16")
    return _torchrun(common, procs)


def _torchrun(args: list[str], procs: int) -> tuple[int, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), "-m", "kilter", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    return proc.returncode, (proc.stdout + proc.stderr)[-1500:]


def check_fsdp() -> dict:
    from kilter.data.task import build_task
    from kilter.runs import read_metrics

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    dry = gpus < 2
    procs, device, steps = (2, "cpu", 3) if dry else (min(gpus, 8), "cuda", 30)
    out: dict = {"status": "ok", "processes": procs, "device": device}
    if dry:
        out["dry_run"] = (f"{'no CUDA device' if gpus == 0 else 'one GPU'}: 2 CPU processes on gloo, "
                          "agreement only, no speed figures")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        task = build_task(seed=4, n_demonstrations=256 if not dry else 64, n_eval=10)
        data = root / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in task.demonstrations))
        rows = {}
        for parallel in ("ddp", "fsdp"):
            code, log = _sft_run(root / parallel, data, procs, parallel, device, steps)
            if code != 0:
                return {"status": "failed", "parallel": parallel, "reason": log}
            rows[parallel] = [r for r in read_metrics(root / parallel) if "loss/sft" in r]
        diffs = [abs(a["loss/sft"] - b["loss/sft"]) for a, b in zip(rows["ddp"], rows["fsdp"])]
        out["max_loss_diff_fsdp_vs_ddp"] = max(diffs)
        out["final_loss"] = rows["fsdp"][-1]["loss/sft"]
        if not dry:
            for parallel in ("ddp", "fsdp"):
                speeds = [r["perf/tokens_per_s"] for r in rows[parallel][5:]]
                out[f"{parallel}_tokens_per_s"] = round(sorted(speeds)[len(speeds) // 2])
    return out


def check_ppo() -> dict:
    """`kilter ppo` under torchrun, parallel=ddp vs parallel=fsdp: the same rollouts and steps, so the
    same metrics; on GPUs also the iteration rate of each."""
    from kilter.runs import read_metrics

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    dry = gpus < 2
    procs, device, iterations = (2, "cpu", 2) if dry else (min(gpus, 8), "cuda", 10)
    out: dict = {"status": "ok", "processes": procs, "device": device}
    if dry:
        out["dry_run"] = f"{'no CUDA device' if gpus == 0 else 'one GPU'}: 2 CPU processes on gloo, agreement only"
    with tempfile.TemporaryDirectory() as tmp:
        rows = {}
        for parallel in ("ddp", "fsdp"):
            args = ["ppo", "model=builtin:micro" if dry else "model=smollm2-135m", "reward.function=builtin:gold",
                    f"iterations={iterations}", f"rollout.batch_size={4 * procs}", "rollout.max_new_tokens=16",
                    "data.n_eval=4", "eval_every=100000", "save_every=100000", "n_samples=0", "tensorboard=false",
                    f"device={device}", f"parallel={parallel}", f"output_dir={Path(tmp) / parallel}"]
            code, log = _torchrun(args + ([] if dry else ["precision=bf16"]), procs)
            if code != 0:
                return {"status": "failed", "parallel": parallel, "reason": log}
            rows[parallel] = [r for r in read_metrics(Path(tmp) / parallel) if "reward/total" in r]
        out["max_kl_diff_fsdp_vs_ddp"] = max(abs(a["kl/ref"] - b["kl/ref"]) for a, b in zip(rows["ddp"], rows["fsdp"]))
        for parallel in ("ddp", "fsdp"):
            its = [r["perf/iteration_s"] for r in rows[parallel][1:]]
            out[f"{parallel}_iteration_s"] = round(sorted(its)[len(its) // 2], 3) if its else None
    return out


# --------------------------------------------------------------------------- report


def _section(results: dict) -> str:
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"
    lines = [f"\n## GPU checks ({when}; {gpu} x {torch.cuda.device_count()}, torch {torch.__version__})\n",
             "Command: `python benchmarks/gpu_checks.py` (figures also in benchmarks/gpu_checks.json).\n",
             "| check | status | figures |", "|---|---|---|"]
    for name, res in results.items():
        figures = {k: v for k, v in res.items() if k not in ("status",)}
        lines.append(f"| {name} | {res['status']} | {json.dumps(figures)[:600]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {', '.join(CHECKS)}")
    ap.add_argument("--json", default=str(HERE / "gpu_checks.json"))
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--append-always", action="store_true", help="append to --results even without CUDA")
    ap.add_argument("--nccl-worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.nccl_worker:
        _nccl_worker(args.nccl_worker)
        return 0
    wanted = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in CHECKS]
    if unknown:
        print(f"gpu_checks: unknown check {unknown[0]!r}; choose from {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    funcs = {"bf16": check_bf16, "vllm": check_vllm, "nccl": check_nccl, "fsdp": check_fsdp, "ppo": check_ppo}
    results: dict = {}
    for name in wanted:
        start = time.perf_counter()
        try:
            results[name] = funcs[name]()
        except Exception as exc:  # noqa: BLE001 -- one failing check must not hide the others
            results[name] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:1500]}
        results[name]["wall_s"] = round(time.perf_counter() - start, 1)
        res = results[name]
        print(f"gpu_checks: {name}: {res['status']}" + (f" ({res['reason'][:200]})" if "reason" in res else ""))
    record = {"time": dt.datetime.now(dt.timezone.utc).isoformat(), "host": platform.node(),
              "torch": torch.__version__, "cuda": torch.version.cuda, "checks": results}
    Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    ran_on_cuda = any(r["status"] != "skipped" for n, r in results.items() if n not in ("fsdp", "ppo")) or \
        any(results.get(n, {}).get("device") == "cuda" for n in ("fsdp", "ppo"))
    if ran_on_cuda or args.append_always:
        with open(args.results, "a", encoding="utf-8") as fh:
            fh.write(_section(results))
        print(f"gpu_checks: appended a section to {args.results}")
    else:
        print(f"gpu_checks: nothing ran on CUDA; figures in {args.json}, {args.results} left as it was")
    return 1 if any(r["status"] == "failed" for r in results.values()) else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
