"""A simulated labeler: stands in for people by judging with a hidden gold score plus noise.

Every judgment starts from the gold score ``g`` of each response (by default
:func:`kilter.data.task.gold_score`) and a *perceived* score ``g + noise * e`` with random
``e``, the way a random-utility model of a person works:

* **compare** (Bradley-Terry): ``e_a - e_b`` is standard-logistic, so
  ``P(a beats b) = sigmoid((g_a - g_b) / noise)`` (Bradley & Terry 1952; the preference model
  of Christiano et al. 2017 and InstructGPT).  The perceived gap also sets the *strength* on
  the 4-level scale of Anthropic's 8-point interface (Bai et al. 2022), see
  :func:`strength_from_gap`.
* **rank** (Plackett-Luce): ``e`` is standard-Gumbel per distinct response; sorting
  ``g + noise * e`` samples a Plackett-Luce ranking with scores ``exp(g / noise)``
  (the Gumbel-max trick).  Identical responses share one draw, hence tie.
* **thumbs**: thumbs up when ``g + noise * e > threshold`` with logistic ``e``.

``noise = 0`` gives a deterministic, perfectly consistent labeler (exact gold ties in a
comparison are broken by a fair coin).  ``flip_rate`` adds careless mistakes on top: with
that probability a comparison or thumb is reversed, or two responses swap places in a ranking.

Records follow DESIGN.md: comparison ``{"prompt", "chosen", "rejected", "strength"}``,
ranking ``{"prompt", "responses", "ranks"}`` (rank 1 best, equal ranks tie), rating
``{"prompt", "completion", "label"}``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Literal

from kilter.config import BaseConfig, Field
from kilter.data.task import gold_score
from kilter.errors import ConfigError

__all__ = ["STRENGTH_THRESHOLDS", "strength_from_gap", "SimulatedLabeler", "LabelerConfig"]

GoldFn = Callable[[str, str], float]
Pairs = Literal["all", "adjacent"]

# (upper bound on |perceived gold gap|, strength): "slightly", "somewhat", "better", then
# "much better" for anything larger.  Bounds are in gold units; demonstrations spread over
# about 3.5 units, so a whole unit is a large difference.
STRENGTH_THRESHOLDS: tuple[tuple[float, float], ...] = ((0.2, 0.25), (0.5, 0.5), (1.0, 0.75))
MUCH_BETTER = 1.0


def strength_from_gap(gap: float) -> float:
    """Map a gold gap onto Anthropic's four preference strengths (sign ignored).

    |gap| < 0.2 -> 0.25 "slightly better"; < 0.5 -> 0.5 "somewhat better";
    < 1.0 -> 0.75 "better"; otherwise 1.0 "much better".
    """
    size = abs(gap)
    for bound, strength in STRENGTH_THRESHOLDS:
        if size < bound:
            return strength
    return MUCH_BETTER


def _competition_ranks(utilities: list[float]) -> list[int]:
    """Ranks with 1 = largest utility and equal utilities sharing the best rank ("1 1 3").

    (K,) -> (K,); e.g. [0.2, 0.9, 0.2, -1.0] -> [2, 1, 2, 4].
    """
    return [1 + sum(other > u for other in utilities) for u in utilities]


class SimulatedLabeler:
    """Judges responses like a noisy person whose taste is ``gold_fn``; see the module docstring.

    Results depend on the seed and on the order of calls, like a session with one annotator.
    """

    def __init__(
        self,
        noise: float = 0.3,
        flip_rate: float = 0.0,
        seed: int = 0,
        gold_fn: GoldFn = gold_score,
        threshold: float = 0.0,
    ) -> None:
        if not (noise >= 0 and math.isfinite(noise)):
            raise ConfigError(f"labeler noise must be a finite number >= 0, got {noise!r}")
        if not 0.0 <= flip_rate <= 1.0:
            raise ConfigError(f"labeler flip_rate must be in [0, 1], got {flip_rate!r}")
        self.noise = float(noise)
        self.flip_rate = float(flip_rate)
        self.gold_fn = gold_fn
        self.threshold = float(threshold)
        self._rng = random.Random(seed)

    # ------------------------------------------------------------------ noise draws

    def _logistic(self) -> float:
        u = self._rng.random()
        while u == 0.0:  # random() can return exactly 0; log(0) would fail
            u = self._rng.random()
        return math.log(u / (1.0 - u))

    def _gumbel(self) -> float:
        u = self._rng.random()
        while u == 0.0:
            u = self._rng.random()
        return -math.log(-math.log(u))

    def _careless(self) -> bool:
        return self.flip_rate > 0.0 and self._rng.random() < self.flip_rate

    # ------------------------------------------------------------------ single judgments

    def _compare_scored(self, prompt: str, a: str, b: str, g_a: float, g_b: float) -> dict | None:
        if a == b:
            return None
        gap = g_a - g_b
        if self.noise > 0:
            gap += self.noise * self._logistic()
        a_wins = gap > 0 if gap != 0 else self._rng.random() < 0.5
        if self._careless():
            a_wins = not a_wins
        chosen, rejected = (a, b) if a_wins else (b, a)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "strength": strength_from_gap(gap)}

    def compare(self, prompt: str, a: str, b: str) -> dict | None:
        """Which of ``a`` and ``b`` is better, as a comparison record; None if ``a == b``."""
        return self._compare_scored(prompt, a, b, self.gold_fn(prompt, a), self.gold_fn(prompt, b))

    def _rank_scored(self, responses: list[str], golds: list[float]) -> list[int]:
        utility: dict[str, float] = {}
        for text, g in zip(responses, golds):
            if text not in utility:  # identical responses share one draw, so they tie
                utility[text] = g + (self.noise * self._gumbel() if self.noise > 0 else 0.0)
        if len(utility) >= 2 and self._careless():
            x, y = self._rng.sample(list(utility), 2)
            utility[x], utility[y] = utility[y], utility[x]
        return _competition_ranks([utility[text] for text in responses])

    def rank(self, prompt: str, responses: list[str]) -> list[int]:
        """Rank of each response (1 = best; identical responses share a rank)."""
        return self._rank_scored(responses, [self.gold_fn(prompt, r) for r in responses])

    def thumbs(self, prompt: str, response: str) -> bool:
        """Thumbs up (True) if the perceived gold score exceeds ``threshold``."""
        perceived = self.gold_fn(prompt, response)
        if self.noise > 0:
            perceived += self.noise * self._logistic()
        up = perceived > self.threshold
        return (not up) if self._careless() else up

    # ------------------------------------------------------------------ batches

    def label_comparisons(self, prompts: list[str], groups: list[list[str]], pairs: Pairs = "all") -> list[dict]:
        """Comparison records from each prompt's group of responses.

        ``pairs="all"`` judges every pair i < j (C(K, 2) per group, as InstructGPT's K-way
        labeling yields); ``"adjacent"`` judges (0, 1), (1, 2), ... (K - 1 per group).
        Pairs of identical responses are skipped.
        """
        _check_lengths(prompts, groups, "groups")
        if pairs not in ("all", "adjacent"):
            raise ConfigError(f"pairs must be 'all' or 'adjacent', got {pairs!r}")
        records = []
        for prompt, group in zip(prompts, groups):
            golds = [self.gold_fn(prompt, r) for r in group]
            k = len(group)
            index_pairs = (
                [(i, j) for i in range(k) for j in range(i + 1, k)]
                if pairs == "all"
                else [(i, i + 1) for i in range(k - 1)]
            )
            for i, j in index_pairs:
                record = self._compare_scored(prompt, group[i], group[j], golds[i], golds[j])
                if record is not None:
                    records.append(record)
        return records

    def label_rankings(self, prompts: list[str], groups: list[list[str]]) -> list[dict]:
        """One ranking record ``{"prompt", "responses", "ranks"}`` per prompt."""
        _check_lengths(prompts, groups, "groups")
        return [
            {"prompt": p, "responses": list(g), "ranks": self._rank_scored(g, [self.gold_fn(p, r) for r in g])}
            for p, g in zip(prompts, groups)
        ]

    def label_thumbs(self, prompts: list[str], responses: list[str]) -> list[dict]:
        """One rating record ``{"prompt", "completion", "label"}`` per (prompt, response)."""
        _check_lengths(prompts, responses, "responses")
        return [{"prompt": p, "completion": r, "label": self.thumbs(p, r)} for p, r in zip(prompts, responses)]


def _check_lengths(prompts: list, other: list, name: str) -> None:
    if len(prompts) != len(other):
        raise ValueError(f"got {len(prompts)} prompts but {len(other)} {name}")


class LabelerConfig(BaseConfig):
    """The simulated labeler: gold preference plus Bradley-Terry noise and careless flips."""

    noise: float = Field(0.3, ge=0)
    """Temperature on gold differences: P(a beats b) = sigmoid((g_a - g_b) / noise); 0 = always follows gold."""
    flip_rate: float = Field(0.0, ge=0, le=1)
    """Probability that a judgment is reversed on top of the noise (careless annotators)."""
    seed: int = 0
    """Seed of the labeler's random draws."""
    threshold: float = 0.0
    """Thumbs up when the perceived gold score exceeds this."""
    pairs: Pairs = "all"
    """Which pairs of each group of responses to compare: "all" (C(K,2)) or "adjacent" (K-1)."""

    def build(self, gold_fn: GoldFn = gold_score) -> SimulatedLabeler:
        return SimulatedLabeler(self.noise, self.flip_rate, self.seed, gold_fn, self.threshold)
