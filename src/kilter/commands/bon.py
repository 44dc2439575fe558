"""Best-of-n sampling and rejection sampling (``kilter bon``).

For each prompt the policy samples n responses; a reward model, an ensemble or a Python
reward function scores them, and the best one is kept.  The kept responses form an SFT
data set (``chosen.jsonl``, {prompt, completion}): fine-tuning on them is rejection
sampling fine-tuning (Llama 2, Touvron et al. 2023; RAFT, Dong et al. 2023).  Best-of-n is also a
strong baseline policy on its own, whose divergence from the sampler is known in closed
form: KL(best-of-n || pi) <= log n - (n - 1) / n (Stiennon et al. 2020, appendix; Beirami
et al. 2024 show it is an upper bound), which is reported next to the reward gain.

Files in ``output_dir``: ``candidates.jsonl`` (every prompt's responses and scores, and
which was best), ``chosen.jsonl``, ``comparisons.jsonl`` (best vs worst, usable by
``kilter dpo`` and ``kilter rm``), ``metrics.jsonl`` and ``config.yaml``.  Prompts are
processed in chunks, each sampled from a seed fixed by its position, and appended to
``candidates.jsonl`` as it finishes; ``resume=true`` continues after the last complete
chunk and gives the same files as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm

from kilter.config import dump_config
from kilter.data.readers import write_jsonl
from kilter.data.sources import load_records
from kilter.distributed import resolve_device
from kilter.errors import ConfigError, DataError
from kilter.rewards.base import call_function, load_function
from kilter.rollout.engine import EngineOptions
from kilter.runs import atomic_write_text

__all__ = ["BonConfig", "run", "kl_bound", "select_best"]

RewardFn = Callable[[list, list], Sequence[float]]


class BonConfig(EngineOptions):
    """Sample n responses per prompt, score them, keep the best (best-of-n / rejection sampling)."""

    model: str = "runs/sft/final"
    """Policy that samples: a folder, a preset (smollm2-135m), builtin:tiny, or a hub id when online."""
    prompts: str = "builtin:prompts"
    """Prompts {prompt}: a .jsonl/.json/.csv/.parquet file, a save_to_disk folder, or builtin:prompts / builtin:prompts_eval."""
    max_prompts: int | None = Field(None, gt=0)
    """Use only the first N prompts (null: all)."""
    output_dir: str = "runs/bon"
    """Run directory (candidates.jsonl, chosen.jsonl, comparisons.jsonl, metrics.jsonl, config.yaml)."""
    n: int = Field(8, ge=1)
    """Responses sampled per prompt."""
    reward_model: str | None = None
    """Reward model or ensemble folder (or a kilter rm run directory) to score responses with."""
    reward_fn: str | None = None
    """Instead of a reward model: a Python function 'module:function' or 'file.py:function', f(prompts, responses) -> list of floats (kilter.data.task:gold_scores is the built-in task's gold)."""
    uncertainty_penalty: float = Field(0.0, ge=0)
    """With an ensemble, choose by mean - k * std across members (k = this; 0: the mean alone)."""
    eval_reward_fn: str | None = None
    """A second function reported for the kept responses but not used to choose (e.g. gold, to watch reward over-optimisation)."""
    min_reward: float | None = None
    """Rejection threshold: chosen.jsonl keeps a prompt's best response only if its score reaches this (null: always)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling: keep the smallest set of tokens with this much probability."""
    top_k: int = Field(0, ge=0)
    """Sample among the k most likely tokens only (0: no limit)."""
    max_new_tokens: int = Field(48, gt=0)
    """Length limit of each response."""
    max_prompt_length: int = Field(256, gt=0)
    """Prompts longer than this many tokens are cut from the left."""
    batch_size: int = Field(8, gt=0)
    """Prompts per generation chunk (each sampled n times)."""
    score_batch_size: int = Field(32, gt=0)
    """Responses per reward-model forward pass."""
    write_pairs: bool = True
    """Also write comparisons.jsonl: each prompt's best response against its worst."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Weights of the sampling model and the reward model: fp32 or bf16."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to run (auto: cuda when available)."""
    seed: int = 0
    """Seed of the sampling (each chunk of prompts gets its own seed derived from it)."""
    resume: bool = False
    """Continue an interrupted run in output_dir after its last complete chunk."""
    threads: int | None = Field(None, gt=0)
    """torch CPU threads (null: torch's default)."""


# --------------------------------------------------------------------------- reward functions


# --------------------------------------------------------------------------- math


def kl_bound(n: int) -> float:
    """Upper bound on KL(best-of-n || sampler) in nats: log n - (n - 1) / n.

    n = 1 -> 0; n = 4 -> 0.636; n = 16 -> 1.835.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def select_best(scores: Sequence[float]) -> int:
    """Index of the highest score (the first one on ties)."""
    if not scores:
        raise ValueError("select_best needs at least one score")
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


# --------------------------------------------------------------------------- scoring


class _Scorer:
    """One interface over a reward model/ensemble and a reward function."""

    def __init__(self, cfg: BonConfig, device: str):
        self.fn: RewardFn | None = None
        self.rm = None
        self.penalty = cfg.uncertainty_penalty
        self.batch_size = cfg.score_batch_size
        if cfg.reward_fn:
            self.fn = load_function(cfg.reward_fn)
        else:
            from kilter.models.reward import load_reward

            self.rm = load_reward(cfg.reward_model, device=device, dtype=cfg.precision)

    def __call__(self, prompts: list, responses: list[str],
                 finished: list[bool] | None = None) -> tuple[list[float], list[float] | None]:
        """(scores used to choose, ensemble std or None); unfinished responses are scored without EOS."""
        if self.fn is not None:
            return call_function(self.fn, prompts, responses), None
        mean, std = self.rm.score_with_std(prompts, responses, batch_size=self.batch_size, finished=finished)
        chosen_by = mean - self.penalty * std if self.penalty else mean
        has_spread = bool((std > 0).any())
        return chosen_by.tolist(), (std.tolist() if has_spread else None)


# --------------------------------------------------------------------------- run


def _read_done(path: Path, chunk: int, total: int) -> list[dict]:
    """Complete rows already in candidates.jsonl, cut back to a whole number of chunks."""
    rows: list[dict] = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a kill; it and anything after are redone
    keep = len(rows) if len(rows) >= total else (len(rows) // chunk) * chunk
    return rows[:keep]


def _append(path: Path, rows: list[dict]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def run(cfg: BonConfig) -> int:
    from kilter.data.tokenize import encode_prompt
    from kilter.models import load_tokenizer
    from kilter.rollout.engine import close_engine, load_engine
    from kilter.rollout.generate import SamplingParams

    if (cfg.reward_fn is None) == (cfg.reward_model is None):
        raise ConfigError("set exactly one of reward_model (a reward model or ensemble folder) and reward_fn "
                          "('module:function')")
    cfg.check_available()
    if cfg.uncertainty_penalty and cfg.reward_fn:
        raise ConfigError("uncertainty_penalty needs a reward_model ensemble, not a reward_fn")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)

    prompts = [r["prompt"] for r in load_records(cfg.prompts, "prompt").rows]
    if cfg.max_prompts:
        prompts = prompts[: cfg.max_prompts]
    out = Path(cfg.output_dir)
    candidates_path = out / "candidates.jsonl"
    if candidates_path.exists() and not cfg.resume:
        raise ConfigError(f"output_dir {cfg.output_dir} already holds candidates.jsonl; pass resume=true to continue "
                          "or choose another output_dir")
    eval_fn = load_function(cfg.eval_reward_fn) if cfg.eval_reward_fn else None
    scorer = _Scorer(cfg, device)
    out.mkdir(parents=True, exist_ok=True)
    done = _read_done(candidates_path, cfg.batch_size, len(prompts)) if cfg.resume else []
    if cfg.resume:
        for i, row in enumerate(done):
            if i >= len(prompts) or row.get("prompt") != prompts[i]:
                raise ConfigError(f"{candidates_path} does not match the prompts of this config (row {i + 1}); "
                                  "resume with the same prompts, or choose another output_dir")
            if len(row.get("responses", ())) != cfg.n:
                raise ConfigError(f"{candidates_path} row {i + 1} has {len(row.get('responses', ()))} responses, "
                                  f"but n={cfg.n}; resume with the same n")
    write_jsonl(candidates_path, done)  # drops any half-written tail
    atomic_write_text(out / "config.yaml", dump_config(cfg))

    tokenizer = load_tokenizer(cfg.model)
    engine, _ = load_engine(cfg, cfg.model, tokenizer, device=device, dtype=cfg.precision, batch_size=max(cfg.n, 64),
                            seed=cfg.seed, max_model_len=cfg.max_prompt_length + cfg.max_new_tokens)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            top_k=cfg.top_k, do_sample=True)
    print(f"kilter bon: {len(prompts)} prompts x {cfg.n} samples, scored by "
          f"{cfg.reward_fn or cfg.reward_model}, device {device}"
          + (f"; resuming after {len(done)} prompts" if done else ""))

    progress = tqdm(total=len(prompts), initial=len(done), desc="bon", dynamic_ncols=True)
    for start in range(len(done), len(prompts), cfg.batch_size):
        chunk = prompts[start:start + cfg.batch_size]
        repeated = [p for p in chunk for _ in range(cfg.n)]
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed * 1_000_003 + start // cfg.batch_size)
            gen = engine.generate([encode_prompt(tokenizer, p, cfg.max_prompt_length) for p in repeated], params)
        texts = gen.texts
        scores, std = scorer(repeated, texts, gen.finished)
        eval_scores = call_function(eval_fn, repeated, texts) if eval_fn else None
        rows = []
        for j, prompt in enumerate(chunk):
            group = slice(j * cfg.n, (j + 1) * cfg.n)
            row = {"prompt": prompt, "responses": texts[group], "scores": scores[group],
                   "finished": gen.finished[group]}
            row["best"] = select_best(row["scores"])
            if std is not None:
                row["std"] = std[group]
            if eval_scores is not None:
                row["eval_scores"] = eval_scores[group]
            rows.append(row)
        _append(candidates_path, rows)
        done.extend(rows)
        progress.update(len(chunk))
        progress.set_postfix(best=f"{sum(r['scores'][r['best']] for r in done) / len(done):.3f}")
    progress.close()
    close_engine(engine)

    metrics = summarize(done, cfg.n, cfg.min_reward)
    chosen = [{"prompt": r["prompt"], "completion": r["responses"][r["best"]], "reward": r["scores"][r["best"]]}
              for r in done if cfg.min_reward is None or r["scores"][r["best"]] >= cfg.min_reward]
    chosen = [c for c in chosen if c["completion"].strip()]  # an empty answer is no demonstration
    write_jsonl(out / "chosen.jsonl", chosen)
    if cfg.write_pairs:
        write_jsonl(out / "comparisons.jsonl", best_vs_worst(done))
    # One metrics line, in the run-directory format (step = prompts done), replacing any earlier one.
    atomic_write_text(out / "metrics.jsonl", json.dumps({"step": len(done), "time": round(time.time(), 3), **metrics}) + "\n")
    print(f"kilter bon: mean reward {metrics['reward/mean']:.4f} -> best-of-{cfg.n} {metrics['reward/best']:.4f} "
          f"(gain {metrics['reward/gain']:+.4f}); KL bound log n - (n-1)/n = {metrics['kl/bound']:.4f} nats")
    if "reward_eval/best" in metrics:
        print(f"kilter bon: {cfg.eval_reward_fn}: mean {metrics['reward_eval/mean']:.4f} -> "
              f"chosen {metrics['reward_eval/best']:.4f}")
    print(f"kilter bon: kept {len(chosen)} of {len(done)} prompts in {out / 'chosen.jsonl'}", file=sys.stdout)
    return 0


def summarize(rows: list[dict], n: int, min_reward: float | None = None) -> dict[str, float]:
    """Mean reward of all candidates vs of the chosen ones, the KL bound and how many were kept."""
    if not rows:
        raise DataError("best-of-n needs at least one prompt")
    all_scores = [s for r in rows for s in r["scores"]]
    best = [r["scores"][r["best"]] for r in rows]
    metrics = {
        "reward/mean": sum(all_scores) / len(all_scores),
        "reward/best": sum(best) / len(best),
        "kl/bound": kl_bound(n),
        "bon/n": float(n),
        "bon/prompts": float(len(rows)),
        "bon/kept": float(sum(1 for b in best if min_reward is None or b >= min_reward)),
    }
    metrics["reward/gain"] = metrics["reward/best"] - metrics["reward/mean"]
    if rows and "eval_scores" in rows[0]:
        everything = [s for r in rows for s in r["eval_scores"]]
        metrics["reward_eval/mean"] = sum(everything) / len(everything)
        metrics["reward_eval/best"] = sum(r["eval_scores"][r["best"]] for r in rows) / len(rows)
    return metrics


def best_vs_worst(rows: list[dict]) -> list[dict]:
    """One comparison per prompt whose best and worst responses differ in text and score."""
    pairs = []
    for r in rows:
        worst = min(range(len(r["scores"])), key=lambda i: (r["scores"][i], i))
        chosen, rejected = r["responses"][r["best"]], r["responses"][worst]
        if r["scores"][r["best"]] > r["scores"][worst] and chosen != rejected and chosen.strip() and rejected.strip():
            pairs.append({"prompt": r["prompt"], "chosen": chosen, "rejected": rejected})
    return pairs
