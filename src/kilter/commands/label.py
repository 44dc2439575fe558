"""``kilter label``: sample K responses per prompt and label them with the simulated labeler.

The stand-in for people in the built-in task (DESIGN.md, "The embedded default"): a model
(usually the SFT model) samples ``k`` responses to each prompt, and
:class:`kilter.data.labeler.SimulatedLabeler` -- the hidden gold score plus Bradley-Terry /
Plackett-Luce noise and careless flips -- judges them.  Files written to ``output_dir``:

==========================  ==================================================================
``comparisons.jsonl``       every pair of a prompt's responses (C(k, 2)), with strength
``rankings.jsonl``          one K-way ranking per prompt (rank 1 best)
``thumbs.jsonl``            a thumbs up/down per response (binary data for preference-model
                            pretraining)
``samples.jsonl``           the raw samples with their gold scores, for inspection
``eval_comparisons.jsonl``  on held-out prompts, labeled with ``eval_noise`` (default 0: the
``eval_rankings.jsonl``     gold preference itself), to measure a reward model against gold
``summary.json``            counts, the labeler's agreement with gold, mean gold
==========================  ==================================================================

Responses that are empty or that repeat another response of the same prompt cannot be
ranked; they are re-sampled up to ``resample_rounds`` times, then dropped, and a prompt left
with fewer than 2 distinct responses is skipped (both counted in ``summary.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import Field

from kilter.config import BaseConfig
from kilter.data.labeler import SimulatedLabeler
from kilter.data.readers import write_jsonl
from kilter.data.sources import load_records
from kilter.data.task import gold_score
from kilter.distributed import resolve_device
from kilter.errors import KilterError
from kilter.runs import atomic_write_text


class LabelConfig(BaseConfig):
    """Sample K responses per prompt from a model and label them with the simulated (gold + noise) labeler."""

    model: str = "runs/sft/final"
    """Model that samples the responses: an SFT run's final/, any HF causal-LM folder, a preset or builtin:tiny."""
    prompts: str = "builtin:prompts"
    """Prompt file ({"prompt"} records) or builtin:prompts (the built-in task's training prompts)."""
    eval_prompts: str | None = "builtin:prompts_eval"
    """Held-out prompts for eval_comparisons.jsonl / eval_rankings.jsonl (null: none)."""
    output_dir: str = "runs/labels"
    """Folder for the JSONL files (created if missing; files are replaced)."""
    k: int = Field(4, ge=2, le=64)
    """Responses sampled per prompt (InstructGPT used 4 to 9)."""
    n_prompts: int | None = Field(None, gt=0)
    """Use only this many prompts, a fixed random subset (null: all)."""
    n_eval_prompts: int | None = Field(64, gt=0)
    """Use only this many held-out prompts (null: all)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature (higher: more varied responses to compare)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling threshold."""
    max_new_tokens: int = Field(48, gt=0)
    """Longest response, in tokens."""
    noise: float = Field(0.3, ge=0)
    """Labeler noise: P(a beats b) = sigmoid((gold_a - gold_b) / noise); 0 always follows gold."""
    flip_rate: float = Field(0.0, ge=0, le=1)
    """Probability that a judgment is reversed on top of the noise (careless annotators)."""
    eval_noise: float = Field(0.0, ge=0)
    """Labeler noise on the held-out prompts (0: the gold preference, for measuring against gold)."""
    thumbs_threshold: float = 0.0
    """Thumbs up when the perceived gold score exceeds this."""
    resample_rounds: int = Field(3, ge=0)
    """Re-sample empty or duplicate responses this many times before dropping them."""
    batch_size: int = Field(64, gt=0)
    """Sequences generated together."""
    device: str = "auto"
    """Torch device for generation: auto (cuda when available), cpu or cuda."""
    seed: int = 0
    """Seed for the prompt subset, sampling and the labeler."""
    threads: int | None = Field(None, gt=0)
    """torch CPU threads (null: torch's default)."""


def _prompts(spec: str, limit: int | None, seed: int) -> list:
    rows = load_records(spec, "prompt").rows
    prompts = [r["prompt"] for r in rows]
    if limit is not None and limit < len(prompts):
        import random

        picked = sorted(random.Random(f"kilter-label-{seed}").sample(range(len(prompts)), limit))
        prompts = [prompts[i] for i in picked]
    return prompts


def sample_groups(model, tokenizer, prompts: list, cfg: LabelConfig) -> tuple[list[list[str]], int]:
    """K distinct non-empty responses per prompt where possible; returns (groups, dropped responses)."""
    from tqdm.auto import tqdm

    from kilter.rollout.generate import SamplingParams, generate_texts

    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
    groups: list[list[str]] = [[] for _ in prompts]
    wanted = list(range(len(prompts)))
    need = {i: cfg.k for i in wanted}
    bar = tqdm(total=len(prompts) * cfg.k, desc="label", dynamic_ncols=True)
    for _ in range(cfg.resample_rounds + 1):
        jobs = [i for i in wanted for _ in range(need[i])]
        if not jobs:
            break
        texts = generate_texts(model, tokenizer, [prompts[i] for i in jobs], params, batch_size=cfg.batch_size).texts
        for i, text in zip(jobs, texts):
            text = text.strip()
            if text and text not in groups[i] and len(groups[i]) < cfg.k:
                groups[i].append(text)
                bar.update(1)
        need = {i: cfg.k - len(groups[i]) for i in wanted}
        wanted = [i for i in wanted if need[i] > 0]
    bar.close()
    dropped = sum(cfg.k - len(g) for g in groups)
    return groups, dropped


def _agreement(records: list[dict]) -> float | None:
    """Share of comparisons whose chosen response also has the higher gold score (gold ties excluded)."""
    agree = total = 0
    for r in records:
        g_c, g_r = gold_score(r["prompt"], r["chosen"]), gold_score(r["prompt"], r["rejected"])
        if g_c != g_r:
            total += 1
            agree += g_c > g_r
    return agree / total if total else None


def run(cfg: LabelConfig) -> int:
    from kilter.models import load_causal_lm, load_tokenizer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, tokenizer, device=device)
    model.eval()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"model": cfg.model, "k": cfg.k, "noise": cfg.noise, "flip_rate": cfg.flip_rate}

    splits = [("", cfg.prompts, cfg.n_prompts, cfg.noise, cfg.flip_rate)]
    if cfg.eval_prompts:
        splits.append(("eval_", cfg.eval_prompts, cfg.n_eval_prompts, cfg.eval_noise, 0.0))
    for prefix, spec, limit, noise, flips in splits:
        prompts = _prompts(spec, limit, cfg.seed)
        groups, dropped = sample_groups(model, tokenizer, prompts, cfg)
        kept = [(p, g) for p, g in zip(prompts, groups) if len(g) >= 2]
        if not kept:
            raise KilterError(f"no prompt of {spec} got 2 distinct non-empty responses from {cfg.model}; "
                              "raise temperature or max_new_tokens")
        kp, kg = [p for p, _ in kept], [g for _, g in kept]
        # Separate labelers per file: the same seed and order always give the same labels.
        seed = cfg.seed if not prefix else cfg.seed + 1
        comparisons = SimulatedLabeler(noise, flips, seed, threshold=cfg.thumbs_threshold).label_comparisons(kp, kg)
        rankings = SimulatedLabeler(noise, flips, seed + 10, threshold=cfg.thumbs_threshold).label_rankings(kp, kg)
        files = {"comparisons.jsonl": comparisons, "rankings.jsonl": rankings}
        if not prefix:
            flat_p = [p for p, g in kept for _ in g]
            flat_r = [r for _, g in kept for r in g]
            thumbs = SimulatedLabeler(noise, flips, seed + 20, threshold=cfg.thumbs_threshold)
            files["thumbs.jsonl"] = thumbs.label_thumbs(flat_p, flat_r)
            files["samples.jsonl"] = [{"prompt": p, "responses": g, "gold": [gold_score(p, r) for r in g]}
                                      for p, g in kept]
        for name, rows in files.items():
            write_jsonl(out / f"{prefix}{name}", rows)
        golds = [gold_score(p, r) for p, g in kept for r in g]
        part = {"prompts": len(prompts), "prompts_skipped": len(prompts) - len(kept), "responses": len(golds),
                "responses_dropped": dropped, "comparisons": len(comparisons),
                "labeler_gold_agreement": _agreement(comparisons), "mean_gold": sum(golds) / len(golds)}
        summary[prefix.rstrip("_") or "train"] = part
        agreement = part["labeler_gold_agreement"]
        print(f"kilter label: {prefix.rstrip('_') or 'train'} ({spec}): {len(kept)} prompts x up to {cfg.k} responses "
              f"({dropped} dropped, {part['prompts_skipped']} prompts skipped) -> {len(comparisons)} comparisons, "
              f"{len(rankings)} rankings; mean gold {part['mean_gold']:+.3f}, labeler agrees with gold on "
              + (f"{agreement:.1%}" if agreement is not None else "n/a"))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"kilter label: wrote {', '.join(sorted(p.name for p in out.glob('*.jsonl')))} to {out}")
    return 0
