"""Answers to held-out prompts before and after training, as a table and mean rewards."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from kilter.config import BaseConfig
from kilter.data.sources import load_records
from kilter.rewards.base import call_function
from kilter.rollout.generate import SamplingParams, generate_texts
from kilter.training.display import format_sample_table


class SampleSection(BaseConfig):
    """Answers to held-out prompts before and after training, scored by a reward function."""

    n: int | None = Field(None, ge=0)
    """How many prompts to answer before and after training (0: none; null: 4 when the training data is the built-in task or samples.prompts is set, else none, since on a real model the generations cost minutes)."""
    prompts: str | None = None
    """Prompt source (a prompt file or builtin:prompts_eval); null: the prompts of the eval data, else of the training data."""
    reward_fn: str | None = None
    """Reward function 'module:function' or 'file.py:function', f(prompts, responses) -> list of floats, to score the samples (kilter.data.task:gold_scores on the built-in task)."""
    max_new_tokens: int = Field(48, gt=0)
    """Length limit of the samples."""
    show: int = Field(4, ge=0)
    """Rows of the printed before/after table."""


    def count(self, train_spec: str | None) -> int:
        """Prompts to sample: ``n``, or when null 4 on the built-in task (or with ``prompts`` set) and 0 on user data."""
        return default_sample_count(self.n, train_spec, asked=self.prompts is not None)


def default_sample_count(n: int | None, train_spec: str | None, asked: bool = False, default: int = 4) -> int:
    """``n`` if set; else ``default`` when the training data is the built-in task (or samples were
    ``asked`` for another way), 0 on user data: sample tables are the built-in task's demonstration."""
    if n is not None:
        return n
    return default if asked or str(train_spec or "").startswith("builtin:") else 0


def sample_prompts(spec: str | None, fallback_rows: list[dict], n: int) -> list:
    """Up to ``n`` distinct prompts from ``spec`` (prompt records) or from ``fallback_rows``."""
    from kilter.data.preferences import prompt_key

    if n == 0:
        return []
    rows = load_records(spec, "prompt").rows if spec else fallback_rows
    seen: dict[str, Any] = {}
    for row in rows:
        seen.setdefault(prompt_key(row["prompt"]), row["prompt"])
        if len(seen) >= n:
            break
    return list(seen.values())


def sample_report(model, tokenizer, prompts: list, section: SampleSection, seed: int, reward_fn=None
                  ) -> tuple[str, dict[str, float]]:
    """Greedy answers as a table, plus mean rewards of greedy and of sampled (T=1) answers."""
    from kilter.data.preferences import prompt_key

    metrics: dict[str, float] = {}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        greedy = generate_texts(model, tokenizer, prompts, SamplingParams(section.max_new_tokens, do_sample=False))
        sampled = generate_texts(model, tokenizer, prompts, SamplingParams(section.max_new_tokens, do_sample=True))
    shown = prompts[: section.show]
    rows = [{"prompt": p if isinstance(p, str) else prompt_key(p), "response": t}
            for p, t in zip(shown, greedy.texts)]
    columns = ["prompt", "response"]
    if reward_fn is not None:
        greedy_scores = call_function(reward_fn, prompts, greedy.texts)
        sampled_scores = call_function(reward_fn, prompts, sampled.texts)
        metrics["samples/reward_greedy"] = sum(greedy_scores) / len(greedy_scores)
        metrics["samples/reward_sampled"] = sum(sampled_scores) / len(sampled_scores)
        for row, score in zip(rows, greedy_scores):
            row["reward"] = score
        columns.append("reward")
    metrics["samples/length_greedy"] = sum(len(r) for r in greedy.response_ids) / max(1, len(prompts))
    return format_sample_table(rows, columns), metrics


def log_samples(run_dir, step: int, when: str, model, tokenizer, prompts: list, section: SampleSection, seed: int,
                reward_fn=None) -> dict[str, float]:
    """:func:`sample_report` logged at ``step`` and printed as "samples {when} training" (main process only)."""
    if not prompts:
        return {}
    table, metrics = sample_report(model, tokenizer, prompts, section, seed, reward_fn)
    run_dir.log(step, metrics)
    print(f"samples {when} training:\n" + table)
    return metrics
