"""Annotator quality: inter-annotator agreement, accuracy on gold items, and who to review.

The data layout everywhere is ``units[unit_id][coder_id] = value``: each unit (a comparison, a
rating task) was judged by some of the coders, not necessarily all of them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

import numpy as np

from kilter.errors import KilterError

Units = Mapping[Hashable, Mapping[Hashable, Any]]

_LEVELS = ("nominal", "ordinal", "interval", "ratio")


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _pairable_units(units: Units) -> list[list[Any]]:
    """Values of each unit that has at least two non-missing values (the rest cannot be paired)."""
    out = []
    for judgments in units.values():
        values = [v for v in judgments.values() if not _is_missing(v)]
        if len(values) >= 2:
            out.append(values)
    return out


def coincidence_matrix(units: Units) -> tuple[list[Any], np.ndarray]:
    """Krippendorff's coincidence matrix over the sorted distinct values.

    Returns ``(values, o)`` with ``o`` of shape ``(V, V)``: every ordered pair of values from two
    different coders on a unit with ``m_u`` values adds ``1 / (m_u - 1)``, so each pairable value
    contributes exactly 1 to its row and ``o.sum()`` is the number ``n`` of pairable values.
    """
    pairable = _pairable_units(units)
    try:
        values = sorted({v for unit in pairable for v in unit})
    except TypeError:
        raise KilterError(
            "agreement: values within one task must be comparable (all numbers or all strings)"
        ) from None
    index = {v: i for i, v in enumerate(values)}
    o = np.zeros((len(values), len(values)))
    for unit in pairable:
        counts = np.zeros(len(values))
        for v in unit:
            counts[index[v]] += 1
        # all ordered pairs of distinct coders: n_c * n_k, minus the value paired with itself
        o += (np.outer(counts, counts) - np.diag(counts)) / (len(unit) - 1)
    return values, o


def _delta_squared(values: list[Any], marginals: np.ndarray, level: str) -> np.ndarray:
    """Squared difference function delta^2(c, k) for the metric ``level`` (Krippendorff 2011, §B)."""
    if level == "nominal":
        return 1.0 - np.eye(len(values))
    if any(isinstance(v, str) or not isinstance(v, (int, float, np.number)) for v in values):
        if level != "ordinal":
            raise KilterError(f"agreement: level={level!r} needs numeric values, got {values[:5]!r}")
    if level == "ordinal":
        # distance between ranks c < k: marginal mass from c to k, counting c and k by half
        cumulative = np.concatenate([[0.0], np.cumsum(marginals)])
        c = np.arange(len(values))
        lo, hi = np.minimum.outer(c, c), np.maximum.outer(c, c)
        between = cumulative[hi + 1] - cumulative[lo] - (marginals[lo] + marginals[hi]) / 2.0
        return between**2
    x = np.asarray(values, dtype=float)
    if level == "interval":
        return np.subtract.outer(x, x) ** 2
    # ratio
    total = np.add.outer(x, x)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(total == 0, 0.0, np.subtract.outer(x, x) / np.where(total == 0, 1.0, total))
    return d**2


def krippendorff_alpha(units: Units, level: str = "nominal") -> float:
    """Krippendorff's alpha reliability, ``1 - D_o / D_e``.

    Implements the coincidence-matrix form of Krippendorff (2011), "Computing Krippendorff's
    Alpha-Reliability":

        alpha = 1 - (n - 1) * sum_ck o_ck delta2_ck / sum_ck n_c n_k delta2_ck

    ``level`` is ``"nominal"``, ``"ordinal"``, ``"interval"`` or ``"ratio"``. Missing values
    (None, nan) are skipped; units with fewer than two values are ignored. Returns nan when alpha
    is undefined: fewer than two pairable values, or no variation at all (every value equal).
    Alpha is 1 for perfect agreement, about 0 for chance agreement, and can be negative.
    """
    if level not in _LEVELS:
        raise KilterError(f"agreement: level must be one of {', '.join(_LEVELS)}, got {level!r}")
    values, o = coincidence_matrix(units)
    n = o.sum()
    if n < 2:
        return math.nan
    marginals = o.sum(axis=1)
    delta2 = _delta_squared(values, marginals, level)
    observed = float((o * delta2).sum())
    expected = float((np.outer(marginals, marginals) * delta2).sum())
    if expected == 0.0:
        return math.nan
    return 1.0 - (n - 1.0) * observed / expected


def pairwise_agreement(units: Units) -> dict[Hashable, tuple[int, int]]:
    """Per coder ``(agree, total)`` over all (unit, other coder) pairs where both gave a value.

    ``agree / total`` is the fraction of times the coder's value equalled a colleague's on the
    same unit: an unnormalised peer-agreement rate, useful for spotting one careless annotator
    (alpha describes the whole team, this points at individuals). Coders who never shared a
    unit with anyone get ``(0, 0)``.
    """
    result: dict[Hashable, list[int]] = {}
    for judgments in units.values():
        present = [(c, v) for c, v in judgments.items() if not _is_missing(v)]
        for coder, value in present:
            stats = result.setdefault(coder, [0, 0])
            for other, other_value in present:
                if other == coder:
                    continue
                stats[1] += 1
                stats[0] += int(value == other_value)
    return {coder: (agree, total) for coder, (agree, total) in result.items()}


def gold_accuracy(
    judgments: Iterable[tuple[Hashable, Hashable, Any]], gold: Mapping[Hashable, Any]
) -> dict[Hashable, tuple[int, int]]:
    """Per coder ``(correct, total)`` on units that have a gold answer.

    ``judgments`` yields ``(coder, unit, value)``; units missing from ``gold`` are skipped, and
    coders who judged no gold unit are absent from the result.
    """
    result: dict[Hashable, list[int]] = defaultdict(lambda: [0, 0])
    for coder, unit, value in judgments:
        if unit not in gold or _is_missing(value):
            continue
        stats = result[coder]
        stats[1] += 1
        stats[0] += int(value == gold[unit])
    return {coder: (correct, total) for coder, (correct, total) in result.items()}


def flag_annotators(
    peer: Mapping[Hashable, tuple[int, int]],
    gold: Mapping[Hashable, tuple[int, int]],
    min_items: int = 5,
    min_gold_acc: float = 0.6,
    min_peer: float = 0.5,
) -> dict[Hashable, list[str]]:
    """Coders to review, each with the reasons, from :func:`pairwise_agreement` / :func:`gold_accuracy`.

    A rate is only judged once it rests on at least ``min_items`` items, so a new annotator is
    not flagged for one unlucky answer. Only flagged coders appear in the result.
    """
    flags: dict[Hashable, list[str]] = {}
    checks = (
        ("gold accuracy", gold, min_gold_acc),
        ("peer agreement", peer, min_peer),
    )
    for coder in list(dict.fromkeys([*gold, *peer])):
        reasons = []
        for name, stats, threshold in checks:
            hits, total = stats.get(coder, (0, 0))
            if total >= min_items and hits / total < threshold:
                reasons.append(f"{name} {hits / total:.2f} ({hits}/{total}) is below {threshold:.2f}")
        if reasons:
            flags[coder] = reasons
    return flags
