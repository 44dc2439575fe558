"""Which segment pairs to ask about, and how many labels to ask for by when.

Christiano et al. 2017 (section 2.2.4): sample many candidate pairs from recent segments and
ask about those the reward-model ensemble disagrees on most (variance of the members'
P̂[σ¹ ≻ σ²]); random selection is the baseline.  They ask for labels at a rate that falls
as training goes on (for Atari, proportional to 5·10⁶ / (T + 5·10⁶)) after an initial batch
labeled before any RL; :func:`labels_due` is that schedule made explicit.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field

from kilter.config import BaseConfig
from kilter.control.reward_model import PairBatch, RewardEnsemble
from kilter.control.segments import Segment, stack_segments


class QueryConfig(BaseConfig):
    """Segments, query selection and the label budget."""

    segment_length: int = Field(25, gt=0)
    """Steps per segment (the paper: 1-2 s of video; e.g. 50 steps of CartPole at 50 fps is 1 s)."""
    pool_size: int = Field(400, ge=2)
    """Most recent segments kept to draw query pairs from."""
    method: Literal["active", "random"] = "active"
    """active: the pairs the ensemble disagrees on most; random: uniformly random pairs."""
    oversample: int = Field(10, gt=0)
    """Active queries: candidate pairs drawn per pair asked (the best 1/oversample by disagreement are kept)."""
    total_labels: int = Field(500, gt=0)
    """Label budget of the whole run."""
    initial_fraction: float = Field(0.25, ge=0.0, le=1.0)
    """Part of the budget asked before any RL, on segments of a random policy (the paper: 25 %)."""
    schedule: Literal["hyperbolic", "constant"] = "hyperbolic"
    """hyperbolic: label rate ∝ 1 / (1 + t / schedule_scale), more early, fewer later; constant: a fixed rate."""
    schedule_scale: float = Field(0.1, gt=0.0)
    """Hyperbolic schedule: the fraction of the run after which the rate has halved."""


def labels_due(step: int, total_steps: int, cfg: QueryConfig) -> int:
    """Cumulative labels that should have been asked once ``step`` of ``total_steps`` agent steps are done.

    The initial batch ``initial_fraction · total_labels`` is due at step 0; the rest is spread
    over the run with rate ∝ 1 / (1 + x / s) (x = step / total_steps, s = schedule_scale), whose
    integral is s·ln(1 + x / s), normalised so the whole budget is due at the end.
    """
    initial = round(cfg.total_labels * cfg.initial_fraction)
    x = min(max(step / max(total_steps, 1), 0.0), 1.0)
    if cfg.schedule == "constant":
        share = x
    else:
        s = cfg.schedule_scale
        share = math.log1p(x / s) / math.log1p(1.0 / s)
    return initial + round((cfg.total_labels - initial) * share)


def candidate_pairs(n_segments: int, n_pairs: int, rng: np.random.Generator) -> np.ndarray:
    """(n_pairs, 2) random index pairs of distinct segments, without repeats when possible."""
    if n_segments < 2:
        return np.zeros((0, 2), dtype=np.int64)
    max_pairs = n_segments * (n_segments - 1) // 2
    n_pairs = min(n_pairs, max_pairs)
    seen: set[tuple[int, int]] = set()
    out = []
    while len(out) < n_pairs:
        i, j = rng.choice(n_segments, size=2, replace=False)
        key = (min(i, j), max(i, j))
        if key in seen:
            continue
        seen.add(key)
        out.append((int(i), int(j)))
    return np.asarray(out, dtype=np.int64)


def as_pair_batch(segments: list[Segment], pairs: np.ndarray, mu: np.ndarray | None = None) -> PairBatch:
    obs_1, acts_1 = stack_segments([segments[i] for i in pairs[:, 0]])
    obs_2, acts_2 = stack_segments([segments[j] for j in pairs[:, 1]])
    mu = np.full(len(pairs), 0.5, dtype=np.float32) if mu is None else mu.astype(np.float32)
    return PairBatch(obs_1, acts_1, obs_2, acts_2, mu)


def select_queries(
    segments: list[Segment], n: int, cfg: QueryConfig, ensemble: RewardEnsemble | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Choose ``n`` pairs from ``segments`` -> ((n, 2) indices, (n,) disagreement scores; zeros when random)."""
    if n <= 0:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0)
    if cfg.method == "random" or ensemble is None:
        pairs = candidate_pairs(len(segments), n, rng)
        return pairs, np.zeros(len(pairs))
    pairs = candidate_pairs(len(segments), n * cfg.oversample, rng)
    scores = ensemble.disagreement(as_pair_batch(segments, pairs))
    top = np.argsort(-scores, kind="stable")[:n]
    return pairs[top], scores[top]
