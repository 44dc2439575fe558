"""``kilter score``: score a JSONL file with a saved reward model or ensemble.

Input kinds (detected from the first row, or set with ``kind``):

* prompt/response rows -- ``{"prompt", "completion"}`` (or ``"response"``, or ``{"messages"}``,
  or thumbs ratings): each row gets ``reward`` (and ``reward_std`` for an ensemble);
* comparisons ``{"prompt", "chosen", "rejected"}``: each row gets ``reward_chosen``,
  ``reward_rejected`` and ``correct``; the summary reports the accuracy (ties count half);
* rankings ``{"prompt", "responses", "ranks"}``: each row gets ``rewards``; the summary
  reports the pairwise accuracy over non-tied pairs.

Rewards include the model's normalizing bias.  Rows are written normalised by the readers
(message lists stay message lists; a ``response`` field is renamed ``completion``).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from kilter.config import BaseConfig
from kilter.data.preferences import detect_kind, prompt_key
from kilter.data.readers import iter_raw_rows, write_jsonl
from kilter.data.records import validate_record
from kilter.data.sources import load_records
from kilter.distributed import resolve_device
from kilter.errors import ConfigError, DataError
from kilter.losses import ranking_pairs
from kilter.models.reward import RewardEnsemble, load_reward, resolve_reward_dir


class ScoreConfig(BaseConfig):
    """Score prompt/response pairs (or comparisons, reporting accuracy) with a reward model or ensemble."""

    model: str | None = None
    """Reward model folder, ensemble folder, or a kilter rm run directory (required)."""
    input: str | None = None
    """Data file: prompt/completion rows, comparisons or rankings (required)."""
    output: str | None = None
    """Where to write the scored rows as JSONL (default: <input>.scored.jsonl beside the input)."""
    kind: Literal["auto", "demonstration", "rating", "comparison", "ranking"] = "auto"
    """Record kind of the input (auto: from the first row's fields)."""
    split: str | None = None
    """Split of a saved DatasetDict (default train)."""
    skip_invalid: bool = False
    """Skip malformed rows (counted and reported) instead of stopping at the first."""
    batch_size: int = Field(32, gt=0)
    """Responses per forward pass."""
    max_length: int | None = Field(None, gt=1)
    """Cut prompt + response to this many tokens (null: the model's limit, at most 2048)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to run (auto: cuda when available)."""
    progress: bool = True
    """Show a progress bar."""
    threads: int | None = Field(None, gt=0)
    """torch CPU threads (null: torch's default)."""


def _read_responses(spec: str, kind: str, skip_invalid: bool, split: str | None) -> tuple[list[dict], int]:
    """Prompt/response rows; a ``response`` field stands in for ``completion``."""
    rows, skipped, first = [], 0, None
    for where, row, problem in iter_raw_rows(spec, split):
        try:
            if problem is not None:
                raise DataError(problem)
            if isinstance(row, dict) and "completion" not in row and "response" in row:
                row = {**row, "completion": row["response"]}
                row.pop("response")
            rows.append(validate_record(row, kind))
        except DataError as exc:
            if not skip_invalid:
                raise DataError(f"{where}: {exc}") from None
            skipped += 1
            first = first or f"{where}: {exc}"
    if skipped:
        print(f"kilter score: skipped {skipped} invalid rows (first: {first})", file=sys.stderr)
    if not rows:
        raise DataError(f"{spec}: no valid {kind} records")
    return rows, skipped


def run(cfg: ScoreConfig) -> int:
    if not cfg.model:
        raise ConfigError("model is required: a reward model folder, an ensemble folder or a kilter rm run directory")
    if not cfg.input:
        raise ConfigError("input is required: a JSONL file of prompt/completion rows, comparisons or rankings")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    folder = resolve_reward_dir(cfg.model)  # fail on a wrong model path before reading any data
    kind = cfg.kind if cfg.kind != "auto" else detect_kind(
        cfg.input, cfg.split, allowed=("demonstration", "rating", "comparison", "ranking"))
    if kind in ("comparison", "ranking"):
        records = load_records(cfg.input, kind, skip_invalid=cfg.skip_invalid, split=cfg.split)
        rows = records.rows
        if records.n_skipped:
            print(f"kilter score: skipped {records.n_skipped} invalid rows (first: {records.first_error})",
                  file=sys.stderr)
    else:
        rows, _ = _read_responses(cfg.input, kind, cfg.skip_invalid, cfg.split)

    # Every distinct (prompt, response) is scored once, however many rows mention it.
    slots: dict[tuple[str, str], int] = {}
    prompts, responses = [], []

    def slot(prompt, response: str) -> int:
        key = (prompt_key(prompt), response)
        if key not in slots:
            slots[key] = len(prompts)
            prompts.append(prompt)
            responses.append(response)
        return slots[key]

    if kind == "comparison":
        index = [(slot(r["prompt"], r["chosen"]), slot(r["prompt"], r["rejected"])) for r in rows]
    elif kind == "ranking":
        index = [[slot(r["prompt"], x) for x in r["responses"]] for r in rows]
    else:
        index = [slot(r["prompt"], r["completion"]) for r in rows]

    model = load_reward(folder, device=device, max_length=cfg.max_length)
    is_ensemble = isinstance(model, RewardEnsemble)
    mean, std = model.score_with_std(prompts, responses, batch_size=cfg.batch_size, progress=cfg.progress)
    mean, std = mean.tolist(), std.tolist()

    out_rows, summary = [], {"rows": len(rows), "responses": len(prompts)}
    if kind == "comparison":
        wins = 0.0
        for r, (c, j) in zip(rows, index):
            row = {**r, "reward_chosen": mean[c], "reward_rejected": mean[j], "correct": mean[c] > mean[j]}
            if is_ensemble:
                row.update(reward_chosen_std=std[c], reward_rejected_std=std[j])
            wins += 1.0 if mean[c] > mean[j] else (0.5 if mean[c] == mean[j] else 0.0)
            out_rows.append(row)
        summary["accuracy"] = wins / len(rows)
    elif kind == "ranking":
        wins = pairs = 0.0
        for r, idx in zip(rows, index):
            row = {**r, "rewards": [mean[i] for i in idx]}
            if is_ensemble:
                row["rewards_std"] = [std[i] for i in idx]
            for b, w in ranking_pairs(r["ranks"]):
                pairs += 1
                wins += 1.0 if mean[idx[b]] > mean[idx[w]] else (0.5 if mean[idx[b]] == mean[idx[w]] else 0.0)
            out_rows.append(row)
        summary["pairwise_accuracy"] = wins / pairs if pairs else None
    else:
        for r, i in zip(rows, index):
            row = {**r, "reward": mean[i]}
            if is_ensemble:
                row["reward_std"] = std[i]
            out_rows.append(row)
    summary["reward_mean"] = sum(mean) / len(mean)
    summary["reward_std"] = math.sqrt(sum((m - summary["reward_mean"]) ** 2 for m in mean) / len(mean))
    if is_ensemble:
        summary["ensemble_std_mean"] = sum(std) / len(std)

    output = Path(cfg.output) if cfg.output else _default_output(cfg.input)
    write_jsonl(output, out_rows)
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
    print(f"kilter score: {shown}; wrote {output}")
    print(json.dumps(summary))
    return 0


def _default_output(spec: str) -> Path:
    path = Path(spec)
    if path.is_dir():
        return path.with_name(path.name + ".scored.jsonl")
    return path.with_name(path.stem + ".scored.jsonl")
