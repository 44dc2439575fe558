"""Who answers the queries: a synthetic labeler from the true reward, or people (through clips).

The synthetic labeler follows B-Pref's simulated teachers (Lee et al. 2021): the preference
comes from the segments' true returns, optionally discounted toward the end of the clip
(``myopia``, γ < 1 weighs recent steps more), made stochastic by a Boltzmann choice with
rationality ``beta`` (null: always the better one), corrupted by ``error_rate`` random flips,
answered "equal" when the returns differ by less than ``equal_margin`` and "can't tell" with
probability ``cant_tell_prob``, or when both returns are below ``skip_below``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from kilter.config import BaseConfig
from kilter.control.segments import Segment

Answer = Literal["left", "right", "equal", "cant_tell"]
ANSWERS: tuple[Answer, ...] = ("left", "right", "equal", "cant_tell")
# P(first segment is better) of each answer; "can't tell" gives no training pair
MU: dict[str, float | None] = {"left": 1.0, "right": 0.0, "equal": 0.5, "cant_tell": None}


class LabelerConfig(BaseConfig):
    """Who labels: the synthetic oracle (true reward + noise) or people in the web app."""

    kind: Literal["synthetic", "human"] = "synthetic"
    """synthetic: answers from the true reward; human: clips go to <output_dir>/queries/, the run waits."""
    error_rate: float = Field(0.0, ge=0.0, le=0.5)
    """Synthetic: chance an answer is flipped (B-Pref's "mistake" teacher)."""
    beta: float | None = Field(None, gt=0.0)
    """Synthetic: Boltzmann rationality, P(left) = sigmoid(beta (R1 - R2)); null answers deterministically."""
    myopia: float = Field(1.0, gt=0.0, le=1.0)
    """Synthetic: γ weighting step t of T by γ^(T-1-t), so recent steps count more (1: no myopia)."""
    equal_margin: float = Field(0.0, ge=0.0)
    """Synthetic: answer "equal" when |R1 - R2| <= this (0: only exact ties)."""
    cant_tell_prob: float = Field(0.0, ge=0.0, le=1.0)
    """Synthetic: chance of "can't tell" regardless of the segments."""
    skip_below: float | None = None
    """Synthetic: answer "can't tell" when both returns are below this (B-Pref's "skip" teacher); null never."""
    wait_timeout_s: float = Field(3600.0, gt=0.0)
    """Human: stop after this many seconds without a new answer (one-line error; resume=true continues)."""
    poll_s: float = Field(2.0, gt=0.0)
    """Human: seconds between looks for new answers."""


class SyntheticLabeler:
    """Answers from the true reward of the two segments (the labeler never sees the learned reward)."""

    def __init__(self, cfg: LabelerConfig):
        self.cfg = cfg

    def segment_value(self, seg: Segment) -> float:
        r = seg.true_rewards
        if self.cfg.myopia == 1.0:
            return float(r.sum())
        weights = self.cfg.myopia ** np.arange(len(r) - 1, -1, -1, dtype=np.float64)
        return float((weights * r).sum())

    def answer(self, left: Segment, right: Segment, rng: np.random.Generator) -> Answer:
        cfg = self.cfg
        r1, r2 = self.segment_value(left), self.segment_value(right)
        if cfg.cant_tell_prob and rng.random() < cfg.cant_tell_prob:
            return "cant_tell"
        if cfg.skip_below is not None and r1 < cfg.skip_below and r2 < cfg.skip_below:
            return "cant_tell"
        if abs(r1 - r2) <= cfg.equal_margin:
            return "equal"
        if cfg.beta is None:
            first = r1 > r2
        else:
            first = rng.random() < 1.0 / (1.0 + np.exp(-cfg.beta * (r1 - r2)))
        if cfg.error_rate and rng.random() < cfg.error_rate:
            first = not first
        return "left" if first else "right"

    def label(self, pairs: list[tuple[Segment, Segment]], rng: np.random.Generator) -> list[Answer]:
        return [self.answer(a, b, rng) for a, b in pairs]
