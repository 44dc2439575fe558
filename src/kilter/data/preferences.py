"""Preference data for reward models: comparisons, rankings and thumbs as *groups*.

A **group** is what one batch element of the reward-model loss sees (InstructGPT, section
3.5): one prompt, its distinct responses, and the labeled pairs among them::

    {"prompt": ..., "responses": [r0, r1, ...], "pairs": [(better, worse, strength | None), ...]}

Each response is forwarded once however many pairs it appears in, so a K-way ranking costs
K forwards rather than 2 * C(K, 2).  The record kinds map onto groups as follows:

* **ranking** -- one group per record; every two responses with different ranks make a
  pair (equal ranks are ties and make no pair).
* **comparison** -- with ``group_by_prompt`` (default) the comparisons that share a prompt
  form one group (at most ``max_group_size`` distinct responses; more start a new group);
  otherwise each comparison is a group of two.  The optional ``strength`` rides along.
  Such a group is marked ``independent``: its pairs were judged one by one, so each weighs as
  one comparison in the loss (a ranking's C(K, 2) pairs weigh 1 / C(K, 2) each: InstructGPT).
* **rating** (thumbs up/down) -- the ratings of one prompt form a group in which every
  thumbs-up response beats every thumbs-down one (Anthropic's preference-model pretraining
  turns binary data into pairs the same way).

A group without any pair (a ranking of ties, a prompt whose ratings all agree) teaches
nothing: it is dropped and counted in ``n_without_pairs``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kilter.data.formats import layout_kinds
from kilter.data.readers import iter_raw_rows
from kilter.data.sources import load_records, parse_spec
from kilter.errors import DataError, KilterError
from kilter.losses import ranking_pairs

__all__ = [
    "PREFERENCE_KINDS",
    "PreferenceData",
    "detect_kind",
    "encode_groups",
    "groups_from_records",
    "load_preference_groups",
    "reference_pairs",
    "split_by_prompt",
]

PREFERENCE_KINDS = ("comparison", "ranking", "rating")

Pair = tuple[int, int, "float | None"]


def prompt_key(prompt: Any) -> str:
    """A hashable identity for a prompt string or message list."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def detect_kind(spec: str, split: str | None = None, allowed: Sequence[str] = PREFERENCE_KINDS,
                format: str = "auto") -> str:
    """The record kind of a data file, judged from its first row in its layout (:mod:`kilter.data.formats`).

    Of the kinds the row can give, the first of ranking, comparison, rating, demonstration,
    prompt that is in ``allowed`` wins; a file of other records is an error naming what it holds.
    """
    if spec.startswith("builtin:"):
        from kilter.data.sources import BUILTIN, parse_builtin

        name, _ = parse_builtin(spec)
        kind = BUILTIN[name][0]
        if kind not in allowed:
            raise KilterError(f"{spec} holds {kind} records, but one of {', '.join(allowed)} is needed here")
        return kind
    path, split = parse_spec(spec, split)
    first = next(iter(iter_raw_rows(path, split)), None)
    if first is None:
        raise DataError(f"{spec}: no records")
    where, row, problem = first
    if problem is not None or not isinstance(row, dict):
        raise DataError(f"{where}: {problem or 'expected an object with named fields'}")
    found = [(layout, kind) for layout, kind in layout_kinds(row) if format in ("auto", layout)]
    order = ("ranking", "comparison", "rating", "demonstration", "text", "prompt")
    kinds = sorted({kind for _, kind in found}, key=order.index)
    for kind in kinds:
        if kind in allowed:
            return kind
    if not kinds or kinds == ["prompt"]:
        raise DataError(f"{where}: cannot tell the record kind from fields {sorted(row)}; expected one of "
                        f"{', '.join(allowed)} records in a layout of docs/data.md (or set data.format)")
    raise KilterError(f"{spec} holds {kinds[0]} records, but one of {', '.join(allowed)} is needed here")


@dataclass
class PreferenceData:
    groups: list[dict]
    kind: str
    source: str
    n_records: int
    n_invalid: int = 0
    n_without_pairs: int = 0
    first_error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def n_pairs(self) -> int:
        return sum(len(g["pairs"]) for g in self.groups)

    @property
    def n_responses(self) -> int:
        return sum(len(g["responses"]) for g in self.groups)


class _GroupBuilder:
    """Collects responses and pairs of one prompt; text identity decides 'same response'."""

    def __init__(self, prompt: Any):
        self.prompt = prompt
        self.index: dict[str, int] = {}
        self.pairs: list[Pair] = []

    def slot(self, text: str) -> int:
        if text not in self.index:
            self.index[text] = len(self.index)
        return self.index[text]

    def would_grow(self, texts: Sequence[str]) -> int:
        return len(self.index) + len({t for t in texts if t not in self.index})

    def done(self) -> dict:
        return {"prompt": self.prompt, "responses": list(self.index), "pairs": list(self.pairs)}


def groups_from_records(rows: Sequence[dict], kind: str, group_by_prompt: bool = True,
                        max_group_size: int = 16) -> tuple[list[dict], int]:
    """Turn validated records into groups; returns (groups, number dropped without pairs)."""
    if max_group_size < 2:
        raise KilterError(f"max_group_size must be at least 2, got {max_group_size}")
    groups: list[dict] = []
    if kind == "ranking":
        for row in rows:
            pairs = [(b, w, None) for b, w in ranking_pairs(row["ranks"])]
            groups.append({"prompt": row["prompt"], "responses": list(row["responses"]), "pairs": pairs})
    elif kind == "comparison":
        open_groups: dict[str, _GroupBuilder] = {}
        builders: list[_GroupBuilder] = []  # in order of creation, i.e. of first appearance
        for row in rows:
            key = prompt_key(row["prompt"]) if group_by_prompt else None
            builder = open_groups.get(key) if key is not None else None
            if builder is None or builder.would_grow([row["chosen"], row["rejected"]]) > max_group_size:
                builder = _GroupBuilder(row["prompt"])
                builders.append(builder)
                if key is not None:
                    open_groups[key] = builder
            builder.pairs.append((builder.slot(row["chosen"]), builder.slot(row["rejected"]), row.get("strength")))
        # independent comparisons weigh one each, however many share a prompt (see pair_weights)
        groups = [{**b.done(), "independent": True} for b in builders]
    elif kind == "rating":
        by_prompt: dict[str, tuple[Any, list[str], list[str]]] = {}
        for row in rows:
            entry = by_prompt.setdefault(prompt_key(row["prompt"]), (row["prompt"], [], []))
            (entry[1] if row["label"] else entry[2]).append(row["completion"])
        for prompt, ups, downs in by_prompt.values():
            builder = _GroupBuilder(prompt)
            for up in dict.fromkeys(ups):
                for down in dict.fromkeys(downs):
                    if up != down:
                        builder.pairs.append((builder.slot(up), builder.slot(down), None))
            groups.append(builder.done())
    else:
        raise KilterError(f"a reward model learns from {', '.join(PREFERENCE_KINDS)} records, not {kind}")
    kept = [g for g in groups if g["pairs"]]
    return kept, len(groups) - len(kept)


def load_preference_groups(spec: str, kind: str = "auto", *, skip_invalid: bool = False, split: str | None = None,
                           group_by_prompt: bool = True, max_group_size: int = 16,
                           format: str = "auto") -> PreferenceData:
    """Read a comparison/ranking/rating file (or a saved dataset) in any layout into groups."""
    if kind == "auto":
        kind = detect_kind(spec, split, format=format)
    if kind not in PREFERENCE_KINDS:
        raise KilterError(f"a reward model learns from {', '.join(PREFERENCE_KINDS)} records, not {kind}")
    records = load_records(spec, kind, skip_invalid=skip_invalid, split=split, format=format)
    groups, no_pairs = groups_from_records(records.rows, kind, group_by_prompt, max_group_size)
    if not groups:
        raise DataError(f"{spec}: none of its {len(records.rows)} {kind} records yields a preference pair "
                        "(every ranking is all ties, or every prompt's ratings agree)")
    return PreferenceData(groups, kind, spec, len(records.rows), records.n_skipped, no_pairs, records.first_error,
                          notes=list(records.notes))


def split_by_prompt(groups: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) with about ``fraction`` of the distinct prompts held out.

    Splitting by prompt keeps every response of a held-out prompt out of training, so the
    held-out accuracy measures generalisation to new prompts, not to new pairs.
    """
    keys = sorted({prompt_key(g["prompt"]) for g in groups})
    random.Random(f"kilter-rm-split-{seed}").shuffle(keys)
    n_held = int(round(fraction * len(keys)))
    if fraction > 0 and len(keys) >= 2:
        n_held = min(max(n_held, 1), len(keys) - 1)
    held = set(keys[:n_held])
    train = [g for g in groups if prompt_key(g["prompt"]) not in held]
    return train, [g for g in groups if prompt_key(g["prompt"]) in held]


def reference_pairs(groups: Sequence[dict]) -> list[tuple[Any, str]]:
    """The distinct (prompt, response) pairs of some groups, in order."""
    seen: dict[tuple[str, str], tuple[Any, str]] = {}
    for g in groups:
        for r in g["responses"]:
            seen.setdefault((prompt_key(g["prompt"]), r), (g["prompt"], r))
    return list(seen.values())


def reference_pairs_from_file(spec: str, split: str | None = None) -> list[tuple[Any, str]]:
    """(prompt, response) pairs of any record file that has responses (demonstrations too)."""
    kind = detect_kind(spec, split, allowed=("comparison", "ranking", "rating", "demonstration"))
    rows = load_records(spec, kind, skip_invalid=True, split=split).rows
    pairs: list[tuple[Any, str]] = []
    for row in rows:
        if kind == "comparison":
            pairs += [(row["prompt"], row["chosen"]), (row["prompt"], row["rejected"])]
        elif kind == "ranking":
            pairs += [(row["prompt"], r) for r in row["responses"]]
        else:
            pairs.append((row["prompt"], row["completion"]))
    unique = {(prompt_key(p), r): (p, r) for p, r in pairs}
    return list(unique.values())


def encode_groups(tokenizer, groups: Sequence[dict], max_length: int) -> list[dict]:
    """Token ids for every group: ``{"examples": [one per response], "pairs": [...]}``.

    All responses of a group share the same (truncated) prompt ids, as in
    :func:`kilter.data.tokenize.encode_completions`.
    """
    from kilter.data.tokenize import encode_completions

    out = []
    for g in groups:
        examples = encode_completions(tokenizer, g["prompt"], g["responses"], max_length)
        out.append({"examples": [{"input_ids": e["input_ids"]} for e in examples], "pairs": g["pairs"],
                    "independent": bool(g.get("independent", False))})
    return out


def split_eval(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows with about ``fraction`` of the distinct prompts held out."""
    if fraction <= 0:
        return rows, []
    return split_by_prompt(rows, fraction, seed)
