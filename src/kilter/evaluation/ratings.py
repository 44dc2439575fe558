"""Model leaderboards from pairwise battles: online Elo and Bradley–Terry with bootstrap intervals.

A *battle* is one judgment "model A's answer vs model B's answer" with outcome ``"a"`` (A won),
``"b"`` (B won) or ``"tie"``. This is the Chatbot Arena setup (Chiang et al., 2024, "Chatbot Arena:
An Open Platform for Evaluating LLMs by Human Preference"): Elo is reported for familiarity, but
the Bradley–Terry maximum-likelihood fit is the number to rank by, because it does not depend on
the order in which the battles happened.

Ratings live on the Elo scale: a gap of ``scale`` points (400 by default) means odds of 10:1,
i.e. ``P(a beats b) = 1 / (1 + 10 ** ((r_b - r_a) / scale))``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

from kilter.errors import KilterError

Outcome = Literal["a", "b", "tie"]
_OUTCOMES = ("a", "b", "tie")


@dataclass(frozen=True)
class Battle:
    """One pairwise judgment between two models' answers to the same prompt."""

    model_a: str
    model_b: str
    outcome: Outcome


class RatingCI(NamedTuple):
    """A point rating and its bootstrap percentile interval."""

    rating: float
    lower: float
    upper: float


BattleLike = Battle | tuple[str, str, str]


def _as_battles(battles: Iterable[BattleLike]) -> list[Battle]:
    """Accept Battle objects or plain ``(model_a, model_b, outcome)`` tuples; reject nonsense early."""
    out: list[Battle] = []
    for index, item in enumerate(battles):
        if isinstance(item, Battle):
            battle = item
        else:
            try:
                model_a, model_b, outcome = item
            except (TypeError, ValueError):
                raise KilterError(
                    f"battle {index}: expected (model_a, model_b, outcome), got {item!r}"
                ) from None
            battle = Battle(str(model_a), str(model_b), outcome)
        if battle.outcome not in _OUTCOMES:
            raise KilterError(
                f"battle {index}: outcome must be one of 'a', 'b', 'tie', got {battle.outcome!r}"
            )
        if battle.model_a == battle.model_b:
            raise KilterError(f"battle {index}: model {battle.model_a!r} cannot battle itself")
        out.append(battle)
    return out


def expected_score(ra: float, rb: float, scale: float = 400.0) -> float:
    """Expected score of a player rated ``ra`` against one rated ``rb`` (Elo, 1978).

    ``E_a = 1 / (1 + 10 ** ((rb - ra) / scale))``; equal ratings give 0.5.
    """
    return 1.0 / (1.0 + 10.0 ** ((rb - ra) / scale))


def elo_ratings(
    battles: Iterable[BattleLike],
    k: float = 4.0,
    base: float = 1000.0,
    scale: float = 400.0,
) -> dict[str, float]:
    """Online Elo over ``battles`` in the order given; a tie scores 0.5 for each side.

    Each battle moves both ratings by ``k * (S_a - E_a)`` in opposite directions, where ``S_a`` is
    1 / 0.5 / 0 and ``E_a = expected_score(r_a, r_b)``. Every model starts at ``base``.

    The default ``k = 4`` is small on purpose (Chatbot Arena uses the same value): feedback sets
    hold thousands of battles between models whose quality does not change, so a chess-style
    K of 16-32 would make the final ratings mostly reflect the last few dozen battles.
    """
    ratings: dict[str, float] = {}
    for battle in _as_battles(battles):
        ra = ratings.setdefault(battle.model_a, base)
        rb = ratings.setdefault(battle.model_b, base)
        score_a = {"a": 1.0, "b": 0.0, "tie": 0.5}[battle.outcome]
        delta = k * (score_a - expected_score(ra, rb, scale))
        ratings[battle.model_a] = ra + delta
        ratings[battle.model_b] = rb - delta
    return ratings


def _encode(battles: Sequence[Battle]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Models (sorted) and per-battle index arrays ``(N,)``: a, b and A's score (1, 0.5 or 0)."""
    models = sorted({b.model_a for b in battles} | {b.model_b for b in battles})
    index = {m: i for i, m in enumerate(models)}
    ia = np.array([index[b.model_a] for b in battles], dtype=np.int64)
    ib = np.array([index[b.model_b] for b in battles], dtype=np.int64)
    score = np.array([{"a": 1.0, "b": 0.0, "tie": 0.5}[b.outcome] for b in battles])
    return models, ia, ib, score


def _win_matrix(
    n_models: int, ia: np.ndarray, ib: np.ndarray, score: np.ndarray, ties: str
) -> np.ndarray:
    """``W[i, j]`` = (weighted) number of times model i beat model j, shape ``(M, M)``.

    With ``ties="half"`` a tie is two half-weight observations, one win each way, which is what
    "score 0.5 for each side" means for a likelihood. With ``ties="drop"`` ties are discarded.
    """
    if ties == "drop":
        keep = score != 0.5
        ia, ib, score = ia[keep], ib[keep], score[keep]
    wins = np.zeros((n_models, n_models))
    np.add.at(wins, (ia, ib), score)
    np.add.at(wins, (ib, ia), 1.0 - score)
    return wins


def fit_bradley_terry(wins: np.ndarray, l2: float = 1e-6, tol: float = 1e-10) -> np.ndarray:
    """Maximum-likelihood Bradley–Terry strengths in natural log-odds units, shape ``(M,)``.

    Bradley & Terry (1952): ``P(i beats j) = sigmoid(theta_i - theta_j)``. This is logistic
    regression without intercept on a design matrix with +1 in column i and -1 in column j, with
    the battles aggregated into ``wins`` ``(M, M)``. We minimise

        -sum_ij W_ij log sigmoid(theta_i - theta_j) + l2/2 * ||theta||^2

    by Newton's method with step halving. The tiny L2 term makes the problem identifiable
    (otherwise adding a constant to every theta changes nothing) and keeps a model that won or
    lost every battle finite; because the likelihood is shift-invariant, the penalty also puts
    the mean of each connected group of models at zero.
    """
    n = wins.shape[0]
    games = wins + wins.T
    theta = np.zeros(n)

    def objective(t: np.ndarray) -> float:
        diff = t[:, None] - t[None, :]
        # log sigmoid(d) = -log1p(exp(-d)), written stably via logaddexp
        return float(np.sum(wins * np.logaddexp(0.0, -diff)) + 0.5 * l2 * t @ t)

    value = objective(theta)
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(theta[:, None] - theta[None, :])))  # P(i beats j)
        # d/dtheta_i of the negative log-likelihood: expected wins minus observed wins
        grad = (games * p).sum(axis=1) - wins.sum(axis=1) + l2 * theta
        curvature = games * p * (1.0 - p)
        hessian = np.diag(curvature.sum(axis=1)) - curvature + l2 * np.eye(n)
        step = np.linalg.solve(hessian, grad)
        shrink = 1.0
        while True:
            candidate = theta - shrink * step
            new_value = objective(candidate)
            if new_value <= value + 1e-12 or shrink < 1e-8:
                break
            shrink *= 0.5
        theta, value = candidate, new_value
        if np.max(np.abs(shrink * step)) < tol:
            break
    return theta


def _to_elo_scale(theta: np.ndarray, base: float, scale: float) -> np.ndarray:
    """Natural log-odds to Elo points, anchored so the mean rating is ``base``."""
    centred = theta - theta.mean()
    return base + centred * scale / math.log(10.0)


def _check_ties(ties: str) -> None:
    if ties not in ("half", "drop"):
        raise KilterError(f"ties must be 'half' or 'drop', got {ties!r}")


def bradley_terry(
    battles: Iterable[BattleLike],
    base: float = 1000.0,
    scale: float = 400.0,
    ties: str = "half",
    l2: float = 1e-6,
) -> dict[str, float]:
    """Bradley–Terry ratings on the Elo scale; the mean rating is ``base``.

    ``ties="half"`` (default) counts a tie as half a win for each side; ``ties="drop"`` ignores
    ties (a model that only ever tied then keeps the mean rating). ``l2`` is the ridge strength in
    log-odds units (see :func:`fit_bradley_terry`); leave it tiny.
    """
    _check_ties(ties)
    battles = _as_battles(battles)
    if not battles:
        return {}
    models, ia, ib, score = _encode(battles)
    theta = fit_bradley_terry(_win_matrix(len(models), ia, ib, score, ties), l2=l2)
    return dict(zip(models, _to_elo_scale(theta, base, scale).tolist(), strict=True))


def bradley_terry_bootstrap(
    battles: Iterable[BattleLike],
    n_rounds: int = 200,
    seed: int = 0,
    ci: float = 0.95,
    base: float = 1000.0,
    scale: float = 400.0,
    ties: str = "half",
) -> dict[str, RatingCI]:
    """Bradley–Terry ratings with percentile bootstrap intervals (Efron & Tibshirani, 1993).

    Each round resamples the battles with replacement and refits. ``rating`` is the fit on all
    battles; ``lower``/``upper`` are the ``(1 - ci) / 2`` and ``(1 + ci) / 2`` quantiles over the
    rounds. Each round is re-anchored to mean ``base`` over the models that appear in it; rounds in
    which a model does not appear say nothing about it (nan if it never appears).
    """
    _check_ties(ties)
    if n_rounds < 1:
        raise KilterError(f"n_rounds must be at least 1, got {n_rounds}")
    if not 0.0 < ci < 1.0:
        raise KilterError(f"ci must be strictly between 0 and 1, got {ci}")
    battles = _as_battles(battles)
    if not battles:
        return {}
    models, ia, ib, score = _encode(battles)
    n_models, n_battles = len(models), len(battles)
    point = _to_elo_scale(
        fit_bradley_terry(_win_matrix(n_models, ia, ib, score, ties)), base, scale
    )
    rng = np.random.default_rng(seed)
    samples = np.full((n_rounds, n_models), np.nan)
    for r in range(n_rounds):
        pick = rng.integers(0, n_battles, size=n_battles)
        wins = _win_matrix(n_models, ia[pick], ib[pick], score[pick], ties)
        present = np.zeros(n_models, dtype=bool)
        present[ia[pick]] = True
        present[ib[pick]] = True
        sub = np.flatnonzero(present)
        theta = fit_bradley_terry(wins[np.ix_(sub, sub)])
        samples[r, sub] = _to_elo_scale(theta, base, scale)
    lower, upper = (1.0 - ci) / 2.0, (1.0 + ci) / 2.0
    result: dict[str, RatingCI] = {}
    for j, model in enumerate(models):
        column = samples[:, j]
        column = column[~np.isnan(column)]
        if column.size:
            lo, hi = np.quantile(column, [lower, upper])
        else:
            lo = hi = math.nan
        result[model] = RatingCI(float(point[j]), float(lo), float(hi))
    return result


def leaderboard(
    battles: Iterable[BattleLike],
    n_bootstrap: int = 200,
    seed: int = 0,
    base: float = 1000.0,
    scale: float = 400.0,
    k: float = 4.0,
) -> list[dict]:
    """One row per model, best Bradley–Terry rating first.

    Keys: ``rank`` (1-based), ``model``, ``elo``, ``bt``, ``bt_lower``, ``bt_upper``, ``battles``,
    ``wins``, ``losses``, ``ties``, ``win_rate``. ``win_rate`` is ``(wins + ties / 2) / battles``.
    With ``n_bootstrap=0`` the interval keys are None (no resampling). Ratings are plain floats
    so rows serialise to JSON as they are.
    """
    battles = _as_battles(battles)
    if not battles:
        return []
    elo = elo_ratings(battles, k=k, base=base, scale=scale)
    if n_bootstrap > 0:
        bt = bradley_terry_bootstrap(battles, n_rounds=n_bootstrap, seed=seed, base=base, scale=scale)
    else:
        bt = {m: RatingCI(r, math.nan, math.nan) for m, r in bradley_terry(battles, base, scale).items()}
    counts = {m: {"wins": 0, "losses": 0, "ties": 0} for m in elo}
    for b in battles:
        if b.outcome == "tie":
            counts[b.model_a]["ties"] += 1
            counts[b.model_b]["ties"] += 1
        else:
            winner, loser = (b.model_a, b.model_b) if b.outcome == "a" else (b.model_b, b.model_a)
            counts[winner]["wins"] += 1
            counts[loser]["losses"] += 1

    def interval(value: float) -> float | None:
        return None if math.isnan(value) else value

    rows = []
    ordered = sorted(bt, key=lambda m: (-bt[m].rating, m))
    for rank, model in enumerate(ordered, start=1):
        c = counts[model]
        total = c["wins"] + c["losses"] + c["ties"]
        rows.append(
            {
                "rank": rank,
                "model": model,
                "elo": elo[model],
                "bt": bt[model].rating,
                "bt_lower": interval(bt[model].lower),
                "bt_upper": interval(bt[model].upper),
                "battles": total,
                **c,
                "win_rate": (c["wins"] + 0.5 * c["ties"]) / total,
            }
        )
    return rows
