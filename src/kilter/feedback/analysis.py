"""Annotator quality and model battles computed from stored judgments.

The statistics themselves live in :mod:`kilter.evaluation.agreement` and
:mod:`kilter.evaluation.ratings`; this module only turns judgments into their inputs.

What is compared, per task:

* pairwise -- the *direction* of preference in item-slot terms (+1 first response better, -1
  second better, 0 tie or both bad) for peer agreement and gold accuracy; the project statistic
  is Krippendorff's alpha at the ordinal level on the full signed 9-point scale (-4 .. +4), so
  "much better" vs "slightly better" disagreements count less than opposite preferences.
* ranking -- every pair of responses in an item is a unit whose value is which of the two was
  ranked higher (+1, -1, or 0 for equal ranks); alpha is ordinal over these units.
* rating -- the thumbs value; alpha is nominal.
* edit, demonstration -- free text: no agreement statistic.

Peer agreement of an annotator who passes the gold checks is measured only against colleagues
who pass them too (see :func:`quality`), so one troll does not get honest people flagged.

Battles (leaderboard): each pairwise judgment between candidates from two different models is
one battle; tie and "both bad" are ties. A ranking judgment gives one battle per pair of
responses from different models (equal ranks tie). Gold items are left out: their responses are
often written by hand to test annotators, not produced by the models being rated.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

from kilter.evaluation.agreement import (
    flag_annotators,
    gold_accuracy,
    krippendorff_alpha,
    pairwise_agreement,
)
from kilter.evaluation.ratings import Battle
from kilter.evaluation.ratings import leaderboard as rating_leaderboard
from kilter.feedback.store import JudgmentRecord


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def slot_ranks(rec: JudgmentRecord) -> list[int | None]:
    """Ranks in item-slot order (the stored judgment lists responses in display order)."""
    by_candidate = {r["candidate"]: r.get("rank") for r in rec.responses}
    return [by_candidate.get(c.id) for c in rec.candidates]


def signed_level(rec: JudgmentRecord) -> int:
    """Pairwise judgment on the signed scale in slot terms: +4 = first response much better."""
    if rec.preferred_candidate_id is None or rec.strength is None:
        return 0
    level = round(rec.strength * 4)
    return level if rec.preferred_candidate_id == rec.candidates[0].id else -level


def unit_values(rec: JudgmentRecord) -> dict[Any, Any]:
    """The agreement units a judgment speaks to, with its value on each (see module doc)."""
    if rec.task == "pairwise":
        return {rec.item_id: _sign(signed_level(rec))}
    if rec.task == "ranking":
        ranks = slot_ranks(rec)
        return {(rec.item_id, i, j): _sign(ranks[j] - ranks[i]) for i, j in combinations(range(len(ranks)), 2)
                if ranks[i] is not None and ranks[j] is not None}
    if rec.task == "rating" and rec.label is not None:
        return {rec.item_id: int(rec.label)}
    return {}


def gold_values(rec: JudgmentRecord) -> dict[Any, Any]:
    """The item's known answer on the same units as :func:`unit_values`."""
    gold = rec.gold or {}
    if rec.task == "pairwise" and "preferred" in gold:
        preferred = gold["preferred"]
        return {rec.item_id: 0 if preferred is None else (1 if preferred == 0 else -1)}
    if rec.task == "ranking" and "ranks" in gold:
        ranks = gold["ranks"]
        return {(rec.item_id, i, j): _sign(ranks[j] - ranks[i]) for i, j in combinations(range(len(ranks)), 2)}
    if rec.task == "rating" and "label" in gold:
        return {rec.item_id: int(gold["label"])}
    return {}


@dataclass
class AnnotatorStats:
    name: str
    judgments: int = 0
    peer: tuple[int, int] = (0, 0)
    gold: tuple[int, int] = (0, 0)
    median_seconds: float | None = None
    reasons: list[str] = field(default_factory=list)

    @staticmethod
    def _rate(pair: tuple[int, int]) -> float | None:
        return pair[0] / pair[1] if pair[1] else None

    @property
    def peer_rate(self) -> float | None:
        return self._rate(self.peer)

    @property
    def gold_rate(self) -> float | None:
        return self._rate(self.gold)


@dataclass
class QualityReport:
    alpha: float | None
    alpha_level: str | None
    annotators: list[AnnotatorStats]
    alpha_unflagged: float | None = None  # alpha once flagged annotators are left out


    @property
    def flagged(self) -> dict[str, list[str]]:
        return {a.name: a.reasons for a in self.annotators if a.reasons}


def _alpha(units: dict[Any, dict[str, Any]], level: str | None) -> float | None:
    if level is None:
        return None
    value = krippendorff_alpha(units, level=level)
    return None if math.isnan(value) else value  # nan: too few overlapping judgments


def quality(records: Iterable[JudgmentRecord], task: str, min_items: int = 5, min_gold_acc: float = 0.6,
            min_peer: float = 0.5) -> QualityReport:
    """Per-annotator peer agreement, gold accuracy, speed and flags, plus the project's alpha."""
    records = list(records)
    direction: dict[Any, dict[str, Any]] = defaultdict(dict)
    alpha_units: dict[Any, dict[str, Any]] = defaultdict(dict)
    gold: dict[Any, Any] = {}
    gold_judgments = []
    seconds: dict[str, list[float]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    for rec in records:
        counts[rec.user] += 1
        if rec.shown_at is not None:
            seconds[rec.user].append((rec.created_at - rec.shown_at).total_seconds())
        values = unit_values(rec)
        if rec.is_gold:
            answers = gold_values(rec)
            gold.update(answers)
            gold_judgments += [(rec.user, unit, v) for unit, v in values.items() if unit in answers]
            continue  # gold items measure annotators against the key, not against each other
        for unit, value in values.items():
            direction[unit][rec.user] = value
            alpha_units[unit][rec.user] = signed_level(rec) if task == "pairwise" else value
    level = {"pairwise": "ordinal", "ranking": "ordinal", "rating": "nominal"}.get(task)
    accuracy = gold_accuracy(gold_judgments, gold)
    # Two passes: someone who fails the gold items (a troll, a bot) would drag down everyone's
    # peer agreement -- with three people per item, one contrarian caps the others at 50%. So
    # honest annotators are compared only with colleagues who pass gold; the failing ones are
    # still compared with everybody.
    failing = set(flag_annotators({}, accuracy, min_items=min_items, min_gold_acc=min_gold_acc, min_peer=min_peer))
    peer_all = pairwise_agreement(direction)
    peer_clean = pairwise_agreement({u: {c: v for c, v in by.items() if c not in failing} for u, by in direction.items()})
    peer = {c: (peer_all[c] if c in failing else peer_clean.get(c, (0, 0))) for c in peer_all}
    reasons = flag_annotators(peer, accuracy, min_items=min_items, min_gold_acc=min_gold_acc, min_peer=min_peer)
    alpha = _alpha(alpha_units, level)
    kept = _alpha({u: {c: v for c, v in by.items() if c not in reasons} for u, by in alpha_units.items()}, level)
    annotators = [
        AnnotatorStats(name, counts[name], peer.get(name, (0, 0)), accuracy.get(name, (0, 0)),
                       statistics.median(seconds[name]) if seconds[name] else None, reasons.get(name, []))
        for name in sorted(counts)
    ]
    return QualityReport(alpha, level, annotators, kept if reasons else alpha)


def battles(records: Iterable[JudgmentRecord]) -> list[Battle]:
    """Model-vs-model battles from pairwise and ranking judgments (see module doc)."""
    out: list[Battle] = []
    for rec in records:
        if rec.is_gold:
            continue
        if rec.task == "pairwise" and len(rec.candidates) == 2:
            a, b = rec.candidates
            if not a.model or not b.model or a.model == b.model:
                continue
            level = signed_level(rec)
            out.append(Battle(a.model, b.model, "a" if level > 0 else "b" if level < 0 else "tie"))
        elif rec.task == "ranking":
            ranks = slot_ranks(rec)
            for i, j in combinations(range(len(rec.candidates)), 2):
                a, b = rec.candidates[i], rec.candidates[j]
                if not a.model or not b.model or a.model == b.model or ranks[i] is None or ranks[j] is None:
                    continue
                out.append(Battle(a.model, b.model, "a" if ranks[i] < ranks[j] else "b" if ranks[i] > ranks[j] else "tie"))
    return out


def model_leaderboard(records: Iterable[JudgmentRecord], n_bootstrap: int = 200, seed: int = 0) -> list[dict]:
    """Leaderboard rows (Elo, Bradley-Terry with bootstrap interval, record) of the project's models."""
    return leaderboard_report(records, n_bootstrap=n_bootstrap, seed=seed).rows


def comparison_groups(fights: Iterable[Battle]) -> list[list[str]]:
    """The connected components of the graph whose edges are battles, largest first.

    Ratings fitted on two components that never met share no anchor: how group 1's best compares
    with group 2's is not in the data, so each group is rated on its own.
    """
    parent: dict[str, str] = {}

    def root(m: str) -> str:
        while parent.setdefault(m, m) != m:
            parent[m] = parent[parent[m]]
            m = parent[m]
        return m

    for b in fights:
        parent[root(b.model_a)] = root(b.model_b)
    groups: dict[str, list[str]] = defaultdict(list)
    for m in list(parent):
        groups[root(m)].append(m)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: (-len(g), g))


FEW_BATTLES = 30  # below this a model's interval is too wide to rank it with any confidence


@dataclass
class LeaderboardReport:
    """Leaderboard rows plus what the reader must know to trust them."""

    rows: list[dict]
    battles: int  # battles in the rows
    excluded_battles: int = 0  # battles judged by left-out annotators
    excluded_annotators: list[str] = field(default_factory=list)
    groups: list[list[str]] = field(default_factory=list)  # more than one: disconnected comparisons
    few_battles: list[str] = field(default_factory=list)  # models with fewer than FEW_BATTLES battles
    style_coefficients: dict[str, float] | None = None  # log-odds per sd of length / Markdown differences

    @property
    def disconnected(self) -> bool:
        return len(self.groups) > 1


def leaderboard_report(records: Iterable[JudgmentRecord], exclude: Iterable[str] = (), n_bootstrap: int = 200,
                       seed: int = 0, category: str | None = None) -> LeaderboardReport:
    """The leaderboard without the annotators in ``exclude``, saying how many battles that left out,
    rating each disconnected group of models separately (rows carry ``group``, 1 = largest) and
    naming models whose few battles make their rating unreliable. With ``category``, only prompts
    of that category count; rows also carry ``style_bt``, the style-controlled rating (None when
    there are too few battles for that fit)."""
    records = [r for r in records if category is None or r.category == category]
    dropped = sorted(set(exclude))
    kept = battles(without_users(records, dropped))
    excluded = len(battles(records)) - len(kept)
    groups = comparison_groups(kept)
    rows: list[dict] = []
    for number, group in enumerate(groups, start=1):
        members = set(group)
        part = [b for b in kept if b.model_a in members]
        for row in rating_leaderboard(part, n_bootstrap=n_bootstrap, seed=seed):
            rows.append({**row, "group": number})
    few = sorted(r["model"] for r in rows if r["battles"] < FEW_BATTLES)
    style = style_controlled(without_users(records, dropped)) if len(groups) == 1 else None
    for row in rows:
        row["style_bt"] = style.ratings.get(row["model"]) if style else None
    return LeaderboardReport(rows, len(kept), excluded, [u for u in dropped if excluded], groups, few,
                             style.coefficients if style else None)


def without_users(records: Iterable[JudgmentRecord], users: Iterable[str]) -> list[JudgmentRecord]:
    drop = set(users)
    return [r for r in records if r.user not in drop]


# --------------------------------------------------------------------------- style control

STYLE_FEATURES = ("length", "markdown")
_MARKDOWN_LINE = re.compile(r"^\s*(#{1,6}\s|[-*+]\s|\d+[.)]\s|>\s?|```|\|)", re.MULTILINE)
_MARKDOWN_INLINE = re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__|`[^`\n]+`")


def style_features(text: str) -> tuple[float, float]:
    """(characters, Markdown elements: headers, list items, quotes, fences, table rows, bold, code spans)."""
    return float(len(text)), float(len(_MARKDOWN_LINE.findall(text)) + len(_MARKDOWN_INLINE.findall(text)))


@dataclass
class StyleControl:
    """Bradley-Terry ratings with the style of the responses as covariates (Chiang et al. 2024,
    "Does style matter?", LMSYS): what is left of a model's rating once longer or more
    Markdown-heavy answers winning more often is accounted for."""

    ratings: dict[str, float]  # Elo scale, mean ``base``
    coefficients: dict[str, float]  # log-odds per standard deviation of each style difference
    battles: int


def _style_rows(records: Iterable[JudgmentRecord]) -> list[tuple[str, str, float, list[float]]]:
    """(model a, model b, score of a: 1, 0.5 or 0, style difference features) per battle."""
    rows = []

    def add(a, b, score: float) -> None:
        fa, fb = style_features(a.text), style_features(b.text)
        diff = [(x - y) / (x + y) if x + y else 0.0 for x, y in zip(fa, fb)]  # normalised, as LMSYS
        rows.append((a.model, b.model, score, diff))

    for rec in records:
        if rec.is_gold:
            continue
        if rec.task == "pairwise" and len(rec.candidates) == 2:
            a, b = rec.candidates
            if a.model and b.model and a.model != b.model:
                level = signed_level(rec)
                add(a, b, 1.0 if level > 0 else 0.0 if level < 0 else 0.5)
        elif rec.task == "ranking":
            ranks = slot_ranks(rec)
            for i, j in combinations(range(len(rec.candidates)), 2):
                a, b = rec.candidates[i], rec.candidates[j]
                if a.model and b.model and a.model != b.model and ranks[i] is not None and ranks[j] is not None:
                    add(a, b, 1.0 if ranks[i] < ranks[j] else 0.0 if ranks[i] > ranks[j] else 0.5)
    return rows


def style_controlled(records: Iterable[JudgmentRecord], base: float = 1000.0, scale: float = 400.0,
                     l2: float = 1e-4) -> StyleControl | None:
    """Fit P(a beats b) = sigmoid(theta_a - theta_b + gamma . (f_a - f_b)) by maximum likelihood.

    theta (one per model) and gamma (one per style feature, on standardised differences) are
    fitted together with L-BFGS; a tie is half a win for each side; a small ridge ``l2`` keeps
    the fit finite when a model always wins. None when there are too few battles to fit
    (fewer than the number of parameters).
    """
    import numpy as np
    from scipy.optimize import minimize

    rows = _style_rows(records)
    models = sorted({m for a, b, _, _ in rows for m in (a, b)})
    if len(models) < 2 or len(rows) < len(models) + len(STYLE_FEATURES):
        return None
    index = {m: i for i, m in enumerate(models)}
    ia = np.array([index[a] for a, _, _, _ in rows])
    ib = np.array([index[b] for _, b, _, _ in rows])
    y = np.array([s for _, _, s, _ in rows])
    x = np.array([f for _, _, _, f in rows])
    spread = x.std(axis=0)
    x = x / np.where(spread > 0, spread, 1.0)
    n_models = len(models)

    def loss(params):
        theta, gamma = params[:n_models], params[n_models:]
        z = theta[ia] - theta[ib] + x @ gamma
        p = 1.0 / (1.0 + np.exp(-z))
        value = np.sum(np.logaddexp(0.0, z) - y * z) + l2 * (params @ params)
        residual = p - y
        grad_theta = np.bincount(ia, residual, n_models) - np.bincount(ib, residual, n_models)
        grad = np.concatenate([grad_theta, x.T @ residual]) + 2 * l2 * params
        return value, grad

    fit = minimize(loss, np.zeros(n_models + x.shape[1]), jac=True, method="L-BFGS-B")
    theta, gamma = fit.x[:n_models], fit.x[n_models:]
    elo = base + (theta - theta.mean()) * scale / math.log(10.0)
    return StyleControl({m: float(r) for m, r in zip(models, elo)},
                        {name: float(g) for name, g in zip(STYLE_FEATURES, gamma)}, len(rows))
