"""Shared machinery of the side-by-side benchmarks (Kilter vs TRL).

Every comparison script (bench_sft.py, bench_rm.py, bench_dpo.py, bench_rl.py) does the same:

1. write the built-in task's data to JSONL once (both libraries read the same file);
2. measure this machine's matmul peak (fp32 and bf16, large ``torch.matmul``) in the same
   invocation, before and after the runs;
3. run Kilter and TRL alternately (K, T, K, T, ...), each in its own subprocess, with the
   same model folder, data, lengths, batch size, optimizer and step count;
4. report medians of samples/s, tokens/s, peak RSS, final metric, MFU and the K/T ratio.

How time is measured (the same way for both libraries).  Each run records a wall-clock
timestamp at the end of every optimizer step (Kilter: the ``time`` field of its
``metrics.jsonl`` with ``log_every=1``; TRL: a ``TrainerCallback.on_step_end``).  The
throughput is the work done in steps ``warmup+1 .. N`` divided by ``t[N] - t[warmup]``: model
loading, tokenization, the first (allocator-warming) steps, evaluation and saving are all
outside the window, for both.  Tokens are real (non-padding) tokens; padding a library
chooses to compute is its own cost.

Peak RSS is the child's ``ru_maxrss`` from ``os.wait4`` (the whole process, load included).
MFU = F * N * tokens / time / peak, against the measured matmul peak of the precision used,
where N counts the weights that take part in matmuls (the transformer blocks, plus the LM head
where the task computes one -- not the input embedding, whose lookup is no matmul, and not the
head for a reward model) and F is the multiply-adds per token per weight x 2: 6 for full
fine-tuning (forward, input gradients, weight gradients), 4 with LoRA (frozen weights get no
weight gradient).  Attention-score FLOPs are ignored, so MFU is a lower bound; it counts the
model's FLOPs, not what a library happens to compute (padding, logits nobody reads).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
VENV = HERE / ".venv-trl"
PY = VENV / "bin" / "python" if (VENV / "bin" / "python").exists() else Path(sys.executable)
KILTER = PY.parent / "kilter"

MODELS = {
    # label: (kilter model spec, LoRA?)
    "tiny": ("builtin:tiny", False),
    "smollm2-lora": ("smollm2-135m", True),
    # GPT-2 (learned positions, LayerNorm, Conv1D): a family Kilter's fast paths were not tuned on.
    # gpt2-small is ~3.5M parameters, the size of issue 20's side-by-side that found the gap.
    "gpt2-tiny": ("builtin:gpt2-tiny", False),
    "gpt2-small": ("builtin:gpt2-small", False),
    # The real-length case: SmolLM2-135M + LoRA on dialogues of 200-400 tokens (see prepare_dialogues).
    "smollm2-dialogue": ("smollm2-135m", True),
    # Issue 20's original finding: the same GPT-2 on equal-length random text with random labels (no
    # padding to drop; a prompt shared by a pair is the only repeated work), see prepare_equal.
    "gpt2-equal": ("builtin:gpt2-small", False),
}

DATASETS = {"smollm2-dialogue": "dialogue", "gpt2-equal": "equal"}
"""Model labels that read another data set than the built-in task's (prepare_data's ``kind``)."""


# setting: (precision, length-grouped batches).  "same" is the identical-settings comparison;
# best-* are candidates for each library's best CPU settings (the better of the two counts).
SETTINGS = {"same": ("fp32", False), "best-fp32": ("fp32", True), "best-bf16": ("bf16", True),
            "best": ("bf16", True)}


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_hardware() -> str:
    flags = cpu_flags()
    found = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return ",".join(found) if found else "none"


def machine_line(threads: int) -> str:
    import torch

    return (f"{cpu_model()}, {os.cpu_count()} cores, bf16 ISA: {bf16_hardware()}, "
            f"torch {torch.__version__}, {threads} threads, python {platform.python_version()}")


def library_versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "kilter"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:  # noqa: BLE001
            out[name] = "-"
    return out


def matmul_peak_gflops(dtype_name: str, n: int = 2048, repeats: int = 5, threads: int | None = None) -> float:
    """Best GFLOP/s of an (n x n) @ (n x n) torch.matmul over ``repeats`` timed calls.

    bf16 inputs go straight to torch.matmul (oneDNN uses avx512_bf16/AMX when the CPU has them),
    the same kernels that bf16 autocast reaches.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    for _ in range(2):
        torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best / 1e9


def measure_peaks(threads: int, quick: bool = False) -> dict[str, float]:
    n = 1024 if quick else 2048
    return {p: matmul_peak_gflops(p, n=n, threads=threads) for p in ("fp32", "bf16")}


# --------------------------------------------------------------------------- subprocesses


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "DISABLE_TQDM": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "WANDB_DISABLED": "true",
        "PYTHONUNBUFFERED": "1",
    })
    env["PATH"] = f"{PY.parent}{os.pathsep}{env.get('PATH', '')}"
    if _CHILD_SRC:
        env["PYTHONPATH"] = _CHILD_SRC + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


_CHILD_SRC: str | None = None
"""Where the ``kilter-before`` runner's children import Kilter from (KILTER_BEFORE_SRC)."""


def with_before_runner(runners: dict[str, Callable]) -> dict[str, Callable]:
    """Add ``kilter-before``: the same Kilter runs with another checkout's sources, to measure a change.

    ``KILTER_BEFORE_SRC=/path/to/old/checkout/src`` (e.g. a ``git worktree add /tmp/before REV``)
    makes it available; ``--libs kilter-before,kilter`` then alternates the old and new code in one
    invocation (before, after, before, after, ...), on the same data, model and settings.
    """
    src = os.environ.get("KILTER_BEFORE_SRC")
    if not src or "kilter" not in runners:
        return runners

    def run_before(spec: dict, work: Path, i: int) -> dict:
        global _CHILD_SRC
        _CHILD_SRC = src
        try:
            return runners["kilter"](spec, work / "before", i)
        finally:
            _CHILD_SRC = None

    return {**runners, "kilter-before": run_before}


@dataclass
class ChildResult:
    rc: int
    wall_s: float
    max_rss_mb: float
    log: Path


def run_child(cmd: list[str], log: Path, threads: int, cwd: Path = ROOT, timeout: float | None = None) -> ChildResult:
    """Run ``cmd`` to completion; peak RSS comes from this child's own rusage (os.wait4).

    With ``BENCH_PROFILE_DIR`` set the child runs under :mod:`profiled` (its operator profile goes
    to that folder, named after the run; the run's timings are then not benchmark figures)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    profiles = os.environ.get("BENCH_PROFILE_DIR")
    if profiles:
        cmd = [str(PY), str(HERE / "profiled.py"), "--out", str(Path(profiles) / f"{log.parent.name}-{log.stem}.json"),
               "--", *cmd]
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd, env=child_env(threads))
        deadline = None if timeout is None else start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return ChildResult(proc.returncode, wall, usage.ru_maxrss / 1024.0, log)


def tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# --------------------------------------------------------------------------- step records


@dataclass
class StepLog:
    """Per optimizer step: end timestamp, samples (examples/episodes) and real tokens."""

    times: list[float] = field(default_factory=list)
    samples: list[float] = field(default_factory=list)
    tokens: list[float] = field(default_factory=list)

    def window(self, warmup: int) -> dict[str, float]:
        """Throughput over steps warmup+1..N (needs N > warmup)."""
        n = len(self.times)
        if n <= warmup:
            raise ValueError(f"only {n} steps logged; need more than warmup={warmup}")
        elapsed = self.times[-1] - self.times[warmup - 1] if warmup > 0 else None
        if elapsed is None:
            raise ValueError("warmup must be >= 1 (the window starts at the end of a step)")
        samples = sum(self.samples[warmup:])
        tokens = sum(self.tokens[warmup:])
        return {"steps": n - warmup, "seconds": elapsed, "samples_per_s": samples / elapsed,
                "tokens_per_s": tokens / elapsed, "step_s": elapsed / (n - warmup),
                "tokens_per_sample": tokens / max(samples, 1)}


def read_kilter_steps(run_dir: Path, samples_per_step: int, token_key: str = "perf/tokens_per_s",
                      sample_key: str = "perf/samples_per_s") -> tuple[StepLog, list[dict]]:
    """Step log of a Kilter run logged every step; tokens per step = samples x (tok/s) / (samples/s)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    by_step: dict[int, dict] = {}
    for row in rows:
        by_step.setdefault(row["step"], {}).update(row)
    log = StepLog()
    for step in sorted(by_step):
        row = by_step[step]
        if sample_key not in row:
            continue
        log.times.append(row["time"])
        log.samples.append(samples_per_step)
        ratio = (row.get(token_key) or 0.0) / max(row.get(sample_key) or 1e-12, 1e-12)
        log.tokens.append(samples_per_step * ratio)
    return log, [by_step[s] for s in sorted(by_step)]


# --------------------------------------------------------------------------- statistics and tables


def median(values: list[float]) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def mfu(params: int, tokens_per_s: float, peak_gflops: float, flops_per_token_param: float = 6.0) -> float:
    return flops_per_token_param * params * tokens_per_s / (peak_gflops * 1e9)


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.1f}"
        return f"{v:.{digits}g}"
    return str(v)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(title for _, title in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(key)) for key, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


SUMMARY_COLUMNS = [
    ("bench", "bench"), ("model", "model"), ("setting", "setting"), ("lib", "library"),
    ("samples_per_s", "samples/s"), ("tokens_per_s", "tokens/s"), ("step_s", "s/step"),
    ("max_rss_mb", "peak RSS MB"), ("metric", "final metric"), ("mfu_pct", "MFU %"), ("ratio", "K/T samples/s"),
]


def flop_factor(flops_per_token_param: float | dict[str, float], lib: str, lora: bool) -> float:
    """F of the MFU formula: a dict gives it per library (``lib`` or ``lib:lora``); a number is the
    full fine-tuning factor, 2 less with LoRA (no weight-gradient matmuls for frozen weights)."""
    if isinstance(flops_per_token_param, dict):
        return flops_per_token_param.get(f"{lib}:lora" if lora else lib, flops_per_token_param.get(lib, 6.0))
    return flops_per_token_param - 2.0 if lora else flops_per_token_param


def summarize(bench: str, model: str, setting: str, runs: dict[str, list[dict]], params: int, peak: float,
              metric_name: str, flops_per_token_param: float | dict[str, float] = 6.0,
              lora: bool = False) -> list[dict]:
    """One row per library: medians over its runs, plus each Kilter row's ratio to the TRL row
    (ratio of the medians of samples/s)."""
    rows = []
    med = {}
    for lib, samples in runs.items():
        ok = [r for r in samples if r.get("ok")]
        factor = flop_factor(flops_per_token_param, lib, lora)
        row = {"bench": bench, "model": model, "setting": setting, "lib": lib, "n": len(ok),
               "samples_per_s": median([r["samples_per_s"] for r in ok]),
               "tokens_per_s": median([r["tokens_per_s"] for r in ok]),
               "step_s": median([r["step_s"] for r in ok]),
               "max_rss_mb": median([r["max_rss_mb"] for r in ok]),
               "metric": median([r.get("metric") for r in ok]),
               "metric_name": metric_name,
               "samples_per_s_all": [round(r["samples_per_s"], 4) for r in ok]}
        row["mfu_pct"] = 100 * mfu(params, row["tokens_per_s"], peak, factor) if ok else float("nan")
        row["flops_per_token_param"] = factor
        med[lib] = row
        rows.append(row)
    base = next((lib for lib in med if lib.startswith("trl")), None)
    if base is not None and med[base]["samples_per_s"] == med[base]["samples_per_s"]:
        for lib in med:
            if lib.startswith("kilter"):
                med[lib]["ratio"] = med[lib]["samples_per_s"] / med[base]["samples_per_s"]
    return rows


# --------------------------------------------------------------------------- driver


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--models", default="tiny,smollm2-lora", help="comma list of: " + ", ".join(MODELS))
    p.add_argument("--settings", default="same,best-bf16",
                   help="comma list of: same (fp32, random batches, identical everything), best-fp32 / best-bf16 "
                        "(length-grouped batches in both libraries, fp32 or bf16 autocast): candidates for each "
                        "library's best CPU settings")
    p.add_argument("--pairs", type=int, default=3, help="K/T alternations per model and setting (medians over them)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default per model)")
    p.add_argument("--warmup", type=int, default=None, help="steps excluded from the timing window (default per model)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for every run")
    p.add_argument("--libs", default=None, help="comma list to run a subset (e.g. kilter or trl)")
    p.add_argument("--quick", action="store_true", help="phase-A check: tiny step counts, 1 pair, no real timing")
    p.add_argument("--out", default=str(OUT), help="where logs, run folders and results go")
    p.add_argument("--keep-runs", action="store_true", help="keep every run's output folder (default: keep logs only)")
    return p


def start_report(bench: str, args) -> dict:
    peaks = measure_peaks(args.threads, quick=args.quick)
    report = {
        "bench": bench,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_line(args.threads),
        "versions": library_versions(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "peaks_start": peaks,
        "quick": bool(args.quick),
        "rows": [],
        "runs": [],
        "notes": [],
    }
    print(f"[{bench}] {report['machine']}")
    print(f"[{bench}] matmul peak (start): fp32 {peaks['fp32']:.1f} GFLOP/s, bf16 {peaks['bf16']:.1f} GFLOP/s")
    load = os.getloadavg()
    print(f"[{bench}] load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    report["loadavg_start"] = load
    return report


def finish_report(report: dict, args, groups: list[dict], metric_name: str,
                  flops_per_token_param: float | dict[str, float] = 6.0) -> Path:
    """Measure the end peak, build the summary rows (medians, ratios, MFU), print and save them.

    ``groups``: one dict per (model, setting) with keys model, setting, spec (holding model_dir,
    lora, precision) and runs ({lib: [run results]}).
    """
    peaks = measure_peaks(args.threads, quick=args.quick)
    report["peaks_end"] = peaks
    report["loadavg_end"] = os.getloadavg()
    print(f"[{report['bench']}] matmul peak (end): fp32 {peaks['fp32']:.1f} GFLOP/s, bf16 {peaks['bf16']:.1f} GFLOP/s")
    for g in groups:
        spec = g["spec"]
        params = count_params(spec["model_dir"], head=report["bench"] != "rm")
        peak = peak_for(report, spec.get("precision", "fp32"))
        report["rows"] += summarize(report["bench"], g["model"], g["setting"] + f" ({spec.get('precision', 'fp32')})",
                                    g["runs"], params, peak, metric_name, flops_per_token_param,
                                    lora=bool(spec.get("lora", False)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    path = out / f"{report['bench']}-{args.models.replace(',', '+')}{suffix}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    print()
    print(markdown_table(report["rows"], SUMMARY_COLUMNS))
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"\n[{report['bench']}] results in {path}")
    return path


def peak_for(report: dict, precision: str) -> float:
    """The higher of the start and end measurements of the matmul peak (a peak is the best seen)."""
    start = report["peaks_start"][precision]
    end = report.get("peaks_end", {}).get(precision, start)
    return max(start, end)


def alternate(libs: list[str], pairs: int, run_one: Callable[[str, int], dict]) -> dict[str, list[dict]]:
    """K, T, K, T, ... : each library's i-th run follows the other's (i-1)-th."""
    results: dict[str, list[dict]] = {lib: [] for lib in libs}
    for i in range(pairs):
        for lib in libs:
            res = run_one(lib, i)
            results[lib].append(res)
            status = "ok" if res.get("ok") else f"FAILED ({res.get('error', '?')})"
            if res.get("ok"):
                print(f"  {lib:<14} run {i}: {res['samples_per_s']:8.2f} samples/s {res['tokens_per_s']:10.1f} tok/s "
                      f"{res['max_rss_mb']:7.0f} MB  metric {fmt(res.get('metric'))}  [{status}]", flush=True)
            else:
                print(f"  {lib:<14} run {i}: {status}\n{res.get('log_tail', '')}", flush=True)
    return results


def clean_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


UNGATED_MLP = ("gpt2", "gpt_neo", "gpt_neox", "phi", "opt", "bloom", "falcon")
"""Model types whose MLP is two matrices (fc, proj) rather than three (gate, up, down)."""


def count_params(model_dir: str, head: bool = True) -> int:
    """Weights that take part in matmuls: the transformer blocks, plus the LM head when ``head``
    (the input embedding is a lookup; a reward model has a 1-wide head instead).  Reads Llama-style
    and GPT-2-style config keys."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    h = cfg.get("hidden_size") or cfg["n_embd"]
    layers = cfg.get("num_hidden_layers") or cfg["n_layer"]
    inter = cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * h
    heads = cfg.get("num_attention_heads") or cfg["n_head"]
    kv, vocab = cfg.get("num_key_value_heads") or heads, cfg["vocab_size"]
    head_dim = cfg.get("head_dim") or h // heads
    attn = h * heads * head_dim * 2 + h * kv * head_dim * 2
    mlp = (2 if cfg.get("model_type") in UNGATED_MLP else 3) * h * inter
    return layers * (attn + mlp) + (vocab * h if head else h)


DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout", "attention_dropout",
                "hidden_dropout", "dropout", "activation_dropout")


def padded_model_dir(spec_name: str, out: Path = OUT) -> str:
    """The model folder both libraries read: as resolved, except that a tokenizer without a PAD token
    (GPT-2's) gets Kilter's distinct PAD saved into a copy, so TRL does not fall back to PAD = EOS and
    both libraries pad, mask and stop alike, and a config with dropout (GPT-2's 0.1 defaults) gets
    it set to 0 in that copy: Kilter always trains without dropout (deterministic log-probs), so
    TRL must too for the two to do the same work (its dropout masks were ~10% of a GPT-2 step)."""
    from kilter.models import resolve_model_path
    from kilter.models.loading import ensure_pad_token, set_dropout

    path = resolve_model_path(spec_name)
    config = json.loads((Path(path) / "config.json").read_text())
    dropout = any(isinstance(config.get(k), float) and config[k] > 0 for k in DROPOUT_KEYS)
    if config.get("pad_token_id") is not None and not dropout:
        return path
    target = Path(out) / "models" / (Path(path).name + "-pad-nodropout")
    if (target / "config.json").is_file():
        return str(target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kilter.models.loading import align_embeddings

    tok = AutoTokenizer.from_pretrained(path)
    ensure_pad_token(tok)
    model = AutoModelForCausalLM.from_pretrained(path)
    align_embeddings(model, tok)
    set_dropout(model, 0.0)
    tmp = target.with_name(target.name + ".tmp")
    clean_dir(tmp)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, target)
    return str(target)


# --------------------------------------------------------------------------- data (built-in task -> JSONL)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _pairs_by_prompt(demos: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Disjoint pairs of distinct demonstrations of the same prompt, in a fixed order."""
    groups: dict[str, list[str]] = {}
    for d in demos:
        groups.setdefault(d["prompt"], []).append(d["completion"])
    prompts, pairs = [], []
    for prompt, completions in groups.items():
        for i in range(0, len(completions) - 1, 2):
            if completions[i] != completions[i + 1]:
                prompts.append(prompt)
                pairs.append([completions[i], completions[i + 1]])
    return prompts, pairs


DATA_FILES = ("sft", "sft_eval", "comparisons", "comparisons_eval", "prompts", "prompts_eval")


def data_files(data_dir: Path) -> dict[str, Path]:
    """The JSONL files every data set of the benchmarks has, by name (see :func:`prepare_data`)."""
    return {name: data_dir / f"{name}.jsonl" for name in DATA_FILES}


def prepare_data(out: Path, seed: int = 0, kind: str = "task") -> dict[str, Path]:
    """The built-in task as JSONL files that both libraries read (idempotent).

    ``kind="dialogue"``: the real-length case instead (:func:`prepare_dialogues`); ``kind="equal"``:
    equal-length random text (:func:`prepare_equal`).

    sft*.jsonl: {prompt, completion} demonstrations; comparisons*.jsonl: {prompt, chosen, rejected}
    from the SimulatedLabeler (noise 0.3) over pairs of demonstrations of the same prompt;
    prompts*.jsonl: {prompt}.
    """
    from kilter.data.labeler import SimulatedLabeler
    from kilter.data.task import build_task

    if kind == "dialogue":
        return prepare_dialogues(out, seed)
    if kind == "equal":
        return prepare_equal(out, seed)
    data_dir = out / "data"
    files = data_files(data_dir)
    if all(p.exists() for p in files.values()):
        return files
    task = build_task(seed=seed)
    write_jsonl(files["sft"], task.demonstrations)
    write_jsonl(files["sft_eval"], task.eval_demonstrations)
    labeler = SimulatedLabeler(noise=0.3, seed=seed)
    prompts, pairs = _pairs_by_prompt(task.demonstrations)
    train_records = labeler.label_comparisons(prompts, pairs, pairs="adjacent")
    # Held-out prompts have ~3 demonstrations each: judge every pair for a finer accuracy estimate.
    groups: dict[str, list[str]] = {}
    for d in task.eval_demonstrations:
        groups.setdefault(d["prompt"], []).append(d["completion"])
    eval_records = labeler.label_comparisons(list(groups), [list(dict.fromkeys(g)) for g in groups.values()], pairs="all")
    for name, records in (("comparisons", train_records), ("comparisons_eval", eval_records)):
        write_jsonl(files[name], [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
                                  for r in records])
    write_jsonl(files["prompts"], [{"prompt": p} for p in task.train_prompts])
    write_jsonl(files["prompts_eval"], [{"prompt": p} for p in task.eval_prompts])
    return files


DIALOGUE_TOKENIZER = "smollm2-135m"


def _dialogue_turn(rng, product: str, others: list[str], budget: int, count) -> str:
    """Review paragraphs about ``product`` (the built-in task's sentences) until ``budget`` tokens."""
    from kilter.data.task import write_review

    text = write_review(rng, product, others)
    while count(text) < budget:
        text += " " + write_review(rng, product, others)
    return text


def prepare_dialogues(out: Path, seed: int = 0, n_sft: int = 1200, n_pairs: int = 800, n_eval: int = 96) -> dict[str, Path]:
    """The real-length case (issue 20): multi-turn dialogues of 200-400 tokens (idempotent).

    Real human-preference dialogues (Anthropic HH, ~224 tokens per response) cannot be downloaded
    here, so these are built from the built-in task's review sentences with those *lengths*: a
    conversation of 1-3 earlier user/assistant turns about products, then a last user turn; the
    completion (SFT) or each of the two responses (comparisons, DPO) is the assistant's long answer.
    Prompt + response length is drawn uniformly from 200-400 SmolLM2 tokens, the response's share
    from 55-90% (rows whose prompt + response falls outside 200-400 are drawn again), so batches
    mix long and short sequences as real data do (which is what padding costs).  Comparisons are judged by the simulated labeler (noise 0.3) with the task's gold score.
    Files: the same names as :func:`prepare_data`, under OUT/data-dialogue.
    """
    import random

    from transformers import AutoTokenizer

    from kilter.data.labeler import SimulatedLabeler
    from kilter.data.task import PRODUCTS, PROMPT_TEMPLATES
    from kilter.models import resolve_model_path

    data_dir = out / "data-dialogue"
    files = data_files(data_dir)
    if all(p.exists() for p in files.values()):
        return files
    tok = AutoTokenizer.from_pretrained(resolve_model_path(DIALOGUE_TOKENIZER))

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    rng = random.Random(seed)
    products = list(PRODUCTS)

    def conversation() -> tuple[str, str, int]:
        total = rng.randint(200, 400)
        response_budget = int(total * rng.uniform(0.55, 0.90))
        prompt_budget = total - response_budget
        product = rng.choice(products)
        others = [p for p in products if p != product]
        turns = []
        for _ in range(rng.randint(1, 3)):
            earlier = rng.choice(others)
            turns.append("User: " + rng.choice(PROMPT_TEMPLATES).format(product=earlier))
            turns.append("Assistant: " + _dialogue_turn(rng, earlier, [p for p in products if p != earlier],
                                                        max(8, prompt_budget // 3), count))
            if count("\n".join(turns)) >= prompt_budget:
                break
        turns.append("User: " + rng.choice(PROMPT_TEMPLATES).format(product=product))
        return "\n".join(turns), product, response_budget

    def answer(product: str, budget: int) -> str:
        return _dialogue_turn(rng, product, [p for p in products if p != product], budget, count)

    def fits(prompt: str, *responses: str) -> bool:  # every prompt + response within 200-400 tokens
        n = count(prompt) + 1
        return all(200 <= n + count(r) <= 400 for r in responses)

    def sft_rows(n: int) -> list[dict]:
        rows = []
        while len(rows) < n:
            prompt, product, budget = conversation()
            completion = answer(product, budget)
            if fits(prompt, completion):
                rows.append({"prompt": prompt, "completion": completion})
        return rows

    labeler = SimulatedLabeler(noise=0.3, seed=seed)

    def comparison_rows(n: int) -> list[dict]:
        prompts, pairs = [], []
        while len(prompts) < n:
            prompt, product, budget = conversation()
            a = answer(product, budget)
            b = answer(product, int(budget * rng.uniform(0.6, 1.4)))
            if a != b and fits(prompt, a, b):
                prompts.append(prompt)
                pairs.append([a, b])
        records = labeler.label_comparisons(prompts, pairs, pairs="adjacent")
        return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in records]

    write_jsonl(files["sft"], sft_rows(n_sft))
    write_jsonl(files["sft_eval"], sft_rows(n_eval))
    write_jsonl(files["comparisons"], comparison_rows(n_pairs))
    write_jsonl(files["comparisons_eval"], comparison_rows(n_eval))
    write_jsonl(files["prompts"], [{"prompt": conversation()[0]} for _ in range(256)])
    write_jsonl(files["prompts_eval"], [{"prompt": conversation()[0]} for _ in range(n_eval)])
    return files


EQUAL_TOKENIZER = "builtin:gpt2-small"


def prepare_equal(out: Path, seed: int = 0, prompt_tokens: int = 16, response_tokens: int = 48,
                  n_train: int = 1600, n_eval: int = 128) -> dict[str, Path]:
    """Issue 20's original GPT-2 case: equal-length random text, random preference labels (idempotent).

    Every prompt is exactly ``prompt_tokens`` and every completion / chosen / rejected response
    exactly ``response_tokens`` tokens of the GPT-2 tokenizer: random words, each one token with
    its leading space (texts that tokenize to another count are drawn again), and which response
    is "chosen" is a coin flip. Nothing to unpad and no group of samples to share, so what a
    library can still skip is a pair's shared prompt and the prompt positions' LM head.
    Files: the same names as :func:`prepare_data`, under OUT/data-equal.
    """
    import random

    from kilter.models import load_tokenizer

    data_dir = out / "data-equal"
    files = data_files(data_dir)
    if all(p.exists() for p in files.values()):
        return files
    tok = load_tokenizer(EQUAL_TOKENIZER)
    words = sorted(w[1:] for w in tok.get_vocab() if w.startswith("\u0120") and w[1:].isalpha())
    rng = random.Random(seed)

    def text(n: int) -> str:
        while True:
            candidate = " ".join(rng.choice(words) for _ in range(n))
            if len(tok(candidate, add_special_tokens=False)["input_ids"]) == n:
                return candidate

    def sft_rows(n: int) -> list[dict]:
        return [{"prompt": text(prompt_tokens), "completion": text(response_tokens)} for _ in range(n)]

    def comparison_rows(n: int) -> list[dict]:
        return [{"prompt": text(prompt_tokens), "chosen": text(response_tokens), "rejected": text(response_tokens)}
                for _ in range(n)]

    write_jsonl(files["sft"], sft_rows(n_train))
    write_jsonl(files["sft_eval"], sft_rows(n_eval))
    write_jsonl(files["comparisons"], comparison_rows(n_train))
    write_jsonl(files["comparisons_eval"], comparison_rows(n_eval))
    write_jsonl(files["prompts"], [{"prompt": text(prompt_tokens)} for _ in range(256)])
    write_jsonl(files["prompts_eval"], [{"prompt": text(prompt_tokens)} for _ in range(n_eval)])
    return files


# --------------------------------------------------------------------------- evaluation (same code for both)


def load_for_eval(model_dir: str, kind: str = "causal"):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cls = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    model = cls.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model


def sft_eval_loss(model_dir: str, tokenizer_dir: str, eval_file: Path, max_length: int, limit: int = 128,
                  batch_size: int = 16) -> float:
    """Mean completion-token cross-entropy on held-out demonstrations (Kilter's encoding, which the
    SFT benchmark checks is token-identical to TRL's)."""
    import torch

    from kilter.data.collate import pad_batch
    from kilter.data.tokenize import encode_sft_records
    from kilter.losses import causal_lm_loss
    from kilter.models import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    model = load_for_eval(model_dir)
    examples = encode_sft_records(tok, read_jsonl(eval_file)[:limit], max_length)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = pad_batch(examples[start:start + batch_size], tok.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            mean, n = causal_lm_loss(logits, batch["labels"])
            total += float(mean) * int(n)
            count += int(n)
    return total / max(count, 1)


# --------------------------------------------------------------------------- generic driver


def base_spec(model_label: str, setting: str, args, profiles: dict, quick: dict) -> dict:
    """Fields every benchmark spec shares: model folder, LoRA, precision/grouping of the setting, profile."""
    from kilter.models import resolve_model_path

    spec_name, lora = MODELS[model_label]
    prof = dict(profiles[model_label])
    if args.quick:
        prof.update(quick[model_label])
    if args.steps:
        prof["steps"] = args.steps
    if args.warmup is not None:
        prof["warmup"] = args.warmup
    if setting not in SETTINGS:
        raise SystemExit(f"unknown setting {setting!r}; choose from {', '.join(SETTINGS)}")
    precision, grouped = SETTINGS[setting]
    if precision == "bf16" and bf16_hardware() == "none":
        precision = "fp32"
    model_dir = padded_model_dir(spec_name, Path(args.out)) if spec_name.startswith("builtin:gpt2") \
        else resolve_model_path(spec_name)
    return {"model_label": model_label, "model_dir": model_dir, "lora": lora, "setting": setting,
            "precision": precision, "group_by_length": grouped, "threads": args.threads, "seed": 0, **prof}


def run_kilter_cli(cmd: list[str], run_dir: Path, log: Path, spec: dict, samples_per_step: float,
                   sample_key: str = "perf/samples_per_s", token_key: str = "perf/tokens_per_s") -> tuple[dict, list[dict]]:
    """Run one ``kilter ...`` command; the result dict plus the run's metrics rows."""
    clean_dir(run_dir)
    child = run_child(cmd, log, spec["threads"])
    if child.rc != 0:
        return {"ok": False, "error": f"exit {child.rc}", "log_tail": tail(child.log)}, []
    steps, rows = read_kilter_steps(run_dir, samples_per_step, token_key=token_key, sample_key=sample_key)
    res = {"ok": True, "max_rss_mb": child.max_rss_mb, "wall_s": child.wall_s, **steps.window(spec["warmup"]),
           "final_dir": str(run_dir / "final"), "run_dir": str(run_dir)}
    return res, rows


def run_trl_worker(script: str, spec: dict, work: Path, i: int) -> tuple[dict, dict]:
    """Run ``script --trl-worker spec.json`` in its own process; it writes result.json with
    ``times``, ``samples``, ``tokens`` per step (and anything else the script wants to report)."""
    run_dir = work / f"trl-{i}"
    clean_dir(run_dir)
    run_dir.mkdir(parents=True)
    spec_path = run_dir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    child = run_child([str(PY), script, "--trl-worker", str(spec_path)], work / f"trl-{i}.log", spec["threads"])
    result_path = run_dir / "result.json"
    if child.rc != 0 or not result_path.exists():
        return {"ok": False, "error": f"exit {child.rc}", "log_tail": tail(child.log)}, {}
    out = json.loads(result_path.read_text())
    steps = StepLog(out["times"], out["samples"], out["tokens"])
    res = {"ok": True, "max_rss_mb": child.max_rss_mb, "wall_s": child.wall_s, **steps.window(spec["warmup"]),
           "final_dir": str(run_dir / "final"), "run_dir": str(run_dir)}
    return res, out


def kilter_training_args(spec: dict) -> list[str]:
    """The ``kilter sft|rm|dpo`` overrides every supervised comparison shares with TRL's
    :func:`trl_training_args`: batch, steps, AdamW and its schedule, precision, LoRA, device,
    seed, per-step logging and no saving inside the loop."""
    return [
        f"batch_size={spec['batch_size']}", "grad_accum=1", f"max_steps={spec['steps']}",
        f"optim.lr={spec['lr']}", "optim.warmup_ratio=0.05", "optim.schedule=cosine", "optim.min_lr_ratio=0.1",
        "optim.weight_decay=0.0", "optim.max_grad_norm=1.0", f"precision={spec['precision']}",
        f"lora.enabled={str(spec['lora']).lower()}", "lora.r=8", "lora.alpha=16", "lora.dropout=0.0",
        "gradient_checkpointing=false", "device=cpu", f"seed={spec['seed']}", "log_every=1",
        "save_every=1000000", "tensorboard=false", f"threads={spec['threads']}",
    ]


def run_kilter_training(cmd: list[str], spec: dict, work: Path, i: int, loss_key: str,
                        sample_key: str = "perf/samples_per_s") -> dict:
    """Run a supervised ``kilter`` command as run ``i`` and add its mean loss over the last 10 steps."""
    run_dir = work / f"kilter-{i}"
    res, rows = run_kilter_cli(cmd, run_dir, work / f"kilter-{i}.log", spec, spec["batch_size"],
                               sample_key=sample_key)
    if (loss := mean_last(rows, loss_key)) is not None:
        res["train_loss_last10"] = loss
    return res


def run_trl_training(script: str, spec: dict, work: Path, i: int) -> dict:
    """:func:`run_trl_worker` for the supervised comparisons, keeping the loss and token check."""
    res, out = run_trl_worker(script, spec, work, i)
    res.update({k: out[k] for k in ("train_loss_last10", "token_mismatches", "token_checked") if k in out})
    return res


def preference_dataset(rows: list[dict], tokenizer, spec: dict):
    """TRL's {prompt, chosen, rejected} dataset of comparison rows, with the prompt ending in
    Kilter's separator so both libraries see the same token ids.  With length grouping it gets a
    ``length`` column (the pair's longer sequence): TRL's grouped sampler needs one and preference
    data has none (keep it with remove_unused_columns=False)."""
    from datasets import Dataset

    from kilter.data.tokenize import PROMPT_SEP, encode_pair

    dataset = Dataset.from_list([{"prompt": r["prompt"] + PROMPT_SEP, "chosen": r["chosen"], "rejected": r["rejected"]}
                                 for r in rows])
    if spec["group_by_length"]:
        encoded = [encode_pair(tokenizer, r["prompt"], r["chosen"], r["rejected"], spec["max_length"]) for r in rows]
        dataset = dataset.add_column("length", [max(len(e["chosen"]["input_ids"]), len(e["rejected"]["input_ids"]))
                                                for e in encoded])
    return dataset


class StepClockMixin:
    """Pieces of a TRL worker: a TrainerCallback stamping each optimizer step, and a collator
    wrapper counting each batch's real tokens (``attention_mask`` ones)."""

    @staticmethod
    def clock(times: list[float]):
        from transformers import TrainerCallback

        class StepClock(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                times.append(time.time())

        return StepClock()

    @staticmethod
    def count_tokens(trainer, counts: list[int], key: str = "attention_mask") -> None:
        """Wrap ``trainer.training_step`` to record the real tokens of every training micro-batch
        (the collator would also see look-ahead and reference-precompute batches)."""
        inner = trainer.training_step

        def training_step(model, inputs, *args, **kwargs):
            counts.append(int(inputs[key].sum()) if key in inputs else int(inputs["input_ids"].numel()))
            return inner(model, inputs, *args, **kwargs)

        trainer.training_step = training_step


def trl_training_args(spec: dict, run_dir: Path) -> dict:
    """The TrainingArguments every supervised TRL run shares with Kilter's command line: steps,
    batch, AdamW(0.9, 0.95, 1e-8, wd 0), 5% warmup + cosine to 10%, clip 1.0, precision,
    sampling order, no checkpointing/eval/saving/logging overhead, CPU, seed."""
    return dict(
        output_dir=str(run_dir / "trainer"), max_steps=spec["steps"], per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1, learning_rate=spec["lr"], lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=0.05, adam_beta1=0.9, adam_beta2=0.95,
        adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0, bf16=spec["precision"] == "bf16", fp16=False,
        gradient_checkpointing=False, max_length=spec["max_length"],
        train_sampling_strategy="group_by_length" if spec["group_by_length"] else "random",
        logging_steps=10, save_strategy="no", eval_strategy="no", report_to="none", seed=spec["seed"],
        data_seed=spec["seed"], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
    )


def trl_lora_config(spec: dict, task_type: str = "CAUSAL_LM", **extra):
    """peft LoraConfig matching Kilter's lora.r=8 alpha=16 dropout=0 on all linear layers (None without LoRA)."""
    if not spec["lora"]:
        return None
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type=task_type, **extra)


def mean_last(rows: list[dict], key: str, n: int = 10) -> float | None:
    """Mean of the last ``n`` logged values of ``key`` in Kilter's metrics rows (None if never logged)."""
    values = [r[key] for r in rows if key in r]
    return sum(values[-n:]) / len(values[-n:]) if values else None


def save_trl_final(trainer, tokenizer, path: Path, lora: bool) -> None:
    """The trained model as a plain HF folder (LoRA merged), like Kilter's final/."""
    model = trainer.model
    if lora:
        model = model.merge_and_unload()
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def drive(bench: str, args, make_spec: Callable, runners: dict[str, Callable], evaluate: Callable | None,
          metric_name: str, flops_per_token_param: float | dict[str, float] = 6.0) -> int:
    """Alternate the runners per (model, setting), evaluate each run, print and save the summary."""
    out = Path(args.out)
    report = start_report(bench, args)
    runners = with_before_runner(runners)
    libs = args.libs.split(",") if args.libs else [lib for lib in runners if lib != "kilter-before"]
    pairs = 1 if args.quick else args.pairs
    groups = []
    for model_label in args.models.split(","):
        files = prepare_data(out, kind=DATASETS.get(model_label, "task"))
        for setting in args.settings.split(","):
            spec = make_spec(model_label, setting, args, files)
            work = out / "runs" / f"{bench}-{model_label}-{setting}"
            shown = {k: v for k, v in spec.items() if k not in ("model_dir", "threads", "seed") and not str(v).startswith("/")}
            print(f"\n[{bench}] {model_label} / {setting}: {json.dumps(shown)}", flush=True)

            def run_one(lib: str, i: int, spec: dict = spec, work: Path = work) -> dict:
                res = runners[lib](spec, work, i)
                if res.get("ok") and evaluate is not None:
                    try:
                        res["metric"] = evaluate(res, spec)
                    except Exception as exc:  # noqa: BLE001 - report, keep the timing
                        res["metric"] = None
                        res["metric_error"] = repr(exc)
                if res.get("ok") and not args.keep_runs and res.get("run_dir"):
                    clean_dir(Path(res["run_dir"]))
                return res

            runs = alternate(libs, pairs, run_one)
            groups.append({"model": model_label, "setting": setting, "spec": spec, "runs": runs})
            mism = [r.get("token_mismatches") for lib in runs if lib.startswith("trl") for r in runs[lib] if r.get("ok")]
            if mism and any(mism):
                report["notes"].append(f"{model_label}/{setting}: TRL token ids differ from Kilter's on {max(mism)} "
                                       "checked examples")
    report["runs"] = groups
    finish_report(report, args, groups, metric_name, flops_per_token_param)
    return 0


def rm_eval_accuracy(model_dir: str, tokenizer_dir: str, eval_file: Path, max_length: int,
                     batch_size: int = 32, limit: int | None = None) -> float:
    """Held-out pairwise accuracy of a reward model: share of pairs with r(chosen) > r(rejected)."""
    import torch

    from kilter.data.collate import pad_batch
    from kilter.data.tokenize import encode_pair
    from kilter.models import load_tokenizer
    from kilter.models.reward import raw_scores

    tok = load_tokenizer(tokenizer_dir)
    model = load_for_eval(model_dir, kind="seq_cls")
    model.config.pad_token_id = tok.pad_token_id
    rows = read_jsonl(eval_file)[:limit]
    wins = 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            pairs = [encode_pair(tok, r["prompt"], r["chosen"], r["rejected"], max_length) for r in chunk]
            flat = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
            batch = pad_batch(flat, tok.pad_token_id, keys=("input_ids",))
            scores = raw_scores(model, batch["input_ids"], batch["attention_mask"])
            wins += int((scores[: len(chunk)] > scores[len(chunk):]).sum())
    return wins / max(len(rows), 1)


def sequence_logps(model, examples: list[dict], pad_id: int, batch_size: int = 32):
    """Summed completion-token log-probs of encoded examples ({input_ids, labels}) -> (N,) float64."""
    import torch

    from kilter.data.collate import pad_batch

    out = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = pad_batch(examples[start:start + batch_size], pad_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            mask = labels != -100
            logp = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            out.append((logp * mask).sum(-1))
    return torch.cat(out)


_REF_LOGPS: dict[tuple, Any] = {}


def dpo_eval_accuracy(model_dir: str, ref_dir: str, eval_file: Path, max_length: int, limit: int | None = None) -> float:
    """Held-out implicit-reward accuracy of a DPO policy: share of pairs where
    log pi/pi_ref (chosen) > log pi/pi_ref (rejected), the reference being the starting model
    (its log-probs are computed once per invocation and reused for every run)."""
    from kilter.data.tokenize import encode_pair
    from kilter.models import load_tokenizer

    tok = load_tokenizer(ref_dir)
    rows = read_jsonl(eval_file)[:limit]
    pairs = [encode_pair(tok, r["prompt"], r["chosen"], r["rejected"], max_length) for r in rows]
    flat = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    policy = sequence_logps(load_for_eval(model_dir), flat, tok.pad_token_id)
    key = (ref_dir, str(eval_file), max_length, limit)
    if key not in _REF_LOGPS:
        _REF_LOGPS[key] = sequence_logps(load_for_eval(ref_dir), flat, tok.pad_token_id)
    ref = _REF_LOGPS[key]
    margin = policy - ref
    n = len(rows)
    return float((margin[:n] > margin[n:]).double().mean())
