"""Evaluation: leaderboards (Elo, Bradley–Terry), annotator agreement, text metrics.

Import-light on purpose (the web app imports it): no torch here, and names are resolved lazily,
so ``import kilter.evaluation`` costs nothing until a function is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "kilter.evaluation.ratings": (
        "Battle",
        "RatingCI",
        "bradley_terry",
        "bradley_terry_bootstrap",
        "elo_ratings",
        "expected_score",
        "leaderboard",
    ),
    "kilter.evaluation.agreement": (
        "flag_annotators",
        "gold_accuracy",
        "krippendorff_alpha",
        "pairwise_agreement",
    ),
    "kilter.rewards.text_metrics": (
        "bleu",
        "distinct_n",
        "mean_length",
        "rouge",
        "sentence_bleu",
        "win_rate",
    ),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'kilter.evaluation' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
