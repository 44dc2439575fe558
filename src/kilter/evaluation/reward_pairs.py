"""Held-out preference groups against a trained reward model: a table of pairs, an ensemble's accuracy."""

from __future__ import annotations

from pathlib import Path

import torch

from kilter.losses import pairwise_accuracy
from kilter.models.reward import RewardModel, load_reward
from kilter.training.display import format_sample_table


def pairs_of(groups: list[dict]) -> tuple[list, list[str], list[tuple[int, int]]]:
    """Flatten text groups into (prompts, responses) and (better, worse) row indices."""
    prompts, responses, pairs = [], [], []
    for g in groups:
        offset = len(responses)
        prompts += [g["prompt"]] * len(g["responses"])
        responses += list(g["responses"])
        pairs += [(offset + b, offset + w) for b, w, _ in g["pairs"]]
    return prompts, responses, pairs


def pair_table(rm: RewardModel, groups: list[dict]) -> str:
    """The first labeled pair of each group with its rewards, as a text table."""
    firsts = [(g["prompt"], g["responses"][g["pairs"][0][0]], g["responses"][g["pairs"][0][1]]) for g in groups]
    prompts = [p for p, _, _ in firsts for _ in range(2)]
    rewards = rm.score(prompts, [r for _, b, w in firsts for r in (b, w)])
    rows = [{"prompt": p if isinstance(p, str) else p[-1]["content"], "preferred": b, "other": w,
             "r_pref": float(rewards[2 * i]), "r_other": float(rewards[2 * i + 1])}
            for i, (p, b, w) in enumerate(firsts)]
    return format_sample_table(rows, ["prompt", "preferred", "other", "r_pref", "r_other"], width=40)


def ensemble_accuracy(folder: Path, groups: list[dict], batch_size: int, device: str) -> dict[str, float]:
    """Held-out accuracy of the members' mean reward, and the mean member spread."""
    ensemble = load_reward(folder, device=device)
    prompts, responses, pairs = pairs_of(groups)
    mean, std = ensemble.score_with_std(prompts, responses, batch_size=batch_size)
    better = torch.tensor([b for b, _ in pairs])
    worse = torch.tensor([w for _, w in pairs])
    return {"ensemble/eval_accuracy": float(pairwise_accuracy(mean[better], mean[worse])),
            "ensemble/eval_margin": float((mean[better] - mean[worse]).mean()),
            "ensemble/reward_std_mean": float(std.mean())}
