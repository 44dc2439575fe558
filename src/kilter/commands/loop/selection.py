"""Which pairs people see (reward-ensemble disagreement, expected information gain) and how old rounds are weighted."""

from __future__ import annotations

import math
import random
from collections.abc import Callable


def gap_spread(diffs: list[float]) -> float:
    """Standard deviation over ensemble members of their reward gaps r_i - r_j of one pair, (M,) -> scalar."""
    mean = sum(diffs) / len(diffs)
    return math.sqrt(sum((x - mean) ** 2 for x in diffs) / len(diffs))


def _entropy(p: float) -> float:
    """Binary entropy in nats (0 at p = 0 or 1)."""
    return -sum(q * math.log(q) for q in (p, 1.0 - p) if q > 0.0)


def information_gain(diffs: list[float]) -> float:
    """Expected information gain of one label on a pair about the reward model (BALD, Houlsby et al. 2011).

    The members' reward gaps ``diffs`` (M,) give Bradley-Terry probabilities p_m = sigmoid(r_i - r_j);
    with the ensemble as the posterior, the mutual information between the label y and the model is
    I = H(mean_m p_m) - mean_m H(p_m) (nats): high when members are each confident but disagree, zero
    when they agree, however unsure they are. Worked: gaps (+1, -1) -> p = (0.731, 0.269), H(0.5) = 0.693,
    H(0.731) = 0.582, I = 0.111; gaps (+10, +14) -> I ~ 0.
    """
    probs = [1.0 / (1.0 + math.exp(-d)) for d in diffs]
    return max(0.0, _entropy(sum(probs) / len(probs)) - sum(map(_entropy, probs)) / len(probs))


def disagreement_pairs(member_scores: list[list[list[float]]], n: int,
                       score: Callable[[list[float]], float] = gap_spread) -> list[tuple[int, int, int]]:
    """The ``n`` (prompt, i, j) pairs the reward ensemble is most unsure about, at most one per prompt.

    ``member_scores[p][r][m]``: member m's reward of response r to prompt p, shapes (P, K, M).
    ``score`` rates a pair from its members' gaps r_i - r_j: by default their standard deviation (how
    unsure the ensemble is about which is better, Christiano et al. 2017 section 2.2.4), or
    :func:`information_gain`. Each prompt offers its highest-scoring pair, and the prompts are taken in
    order of that score (ties: lower index).
    """
    best: list[tuple[float, int, int, int]] = []
    for p, responses in enumerate(member_scores):
        top: tuple[float, int, int, int] | None = None
        for i in range(len(responses)):
            for j in range(i + 1, len(responses)):
                value = score([a - b for a, b in zip(responses[i], responses[j])])
                if top is None or value > top[0]:
                    top = (value, p, i, j)
        if top is not None:
            best.append(top)
    best.sort(key=lambda t: (-t[0], t[1]))
    return [(p, i, j) for _, p, i, j in best[:n]]


def _weighted_rounds(rows_by_round: dict[int, list[dict]], current: int, weight: float, seed: int) -> list[dict]:
    """All rounds' comparisons, round r' kept with probability weight ** (current - r') (fixed by the seed)."""
    out: list[dict] = []
    for r, rows in sorted(rows_by_round.items()):
        keep = weight ** (current - r)
        rng = random.Random(f"loop-weight-{seed}-{current}-{r}")
        out.extend(row for row in rows if keep >= 1.0 or rng.random() < keep)
    return out
