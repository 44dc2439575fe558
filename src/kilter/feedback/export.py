"""Training-ready JSONL from stored judgments, in the record formats of DESIGN.md ("Records").

=============== ===================================== =======================================
kind            record                                made from
=============== ===================================== =======================================
comparisons     prompt, chosen, rejected, strength    pairwise; ranking (every pair with
                                                      different ranks, no strength); edit
                                                      (chosen = edited, rejected = original,
                                                      strength 1.0)
rankings        prompt, responses, ranks              ranking
ratings         prompt, completion, label             rating (thumbs up = true)
demonstrations  prompt, completion                    demonstration; edit (the edited text)
raw             every stored field of every judgment  all tasks
=============== ===================================== =======================================

Overlapping judgments (the same item judged by several people) are combined by ``aggregate``:

* ``each`` -- one record per judgment; an item judged by three people appears three times, and
  conflicting pairs appear in both directions (the reward model then sees the disagreement).
* ``mean`` -- one record per item. Pairwise: the mean of the signed strengths (+s when the first
  response was preferred, -s for the second, 0 for tie and both bad); the sign picks chosen and
  the absolute value is the strength; a mean of exactly 0 drops the item. Rankings: responses
  are re-ranked by their mean rank (equal means tie). Ratings: the majority label; a split vote
  drops the item.
* ``majority`` -- one record per item. Pairwise: the response preferred by more annotators
  (ties and both-bad are abstentions), with the mean strength of the annotators who preferred
  it; an even split drops the item. Rankings and ratings: as ``mean``.

Ties and "both bad" never become comparisons on their own (a preference pair needs a winner).
Edits and demonstrations are never merged: each text someone wrote is its own record; an edit
that left the response unchanged gives no comparison and no demonstration. "Unchanged" is
judged on :func:`~kilter.feedback.importer.normalized` text (browsers send CRLF line endings
and drop a textarea's leading newline); the text exported is the stored text, byte for byte.

Every record is checked with the trainers' own validation
(:func:`kilter.data.records.validate_record`) before it is written: one a trainer would refuse
(an empty text, ``chosen == rejected``, two identical responses in a ranking) is left out and
counted in ``problems``, so an export never makes ``kilter rm | dpo | kto | sft`` fail.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Iterable
from itertools import combinations
from pathlib import Path
from typing import Any

from kilter.data.records import validate_record
from kilter.errors import DataError, KilterError
from kilter.feedback.analysis import signed_level, slot_ranks
from kilter.feedback.importer import normalized
from kilter.feedback.store import JudgmentRecord

KINDS = ("comparisons", "rankings", "ratings", "demonstrations", "raw")
AGGREGATIONS = ("each", "mean", "majority")
DEFAULT_KIND = {"pairwise": "comparisons", "ranking": "rankings", "rating": "ratings", "edit": "comparisons",
                "demonstration": "demonstrations", "clips": "raw"}
RECORD_KIND = {"comparisons": "comparison", "rankings": "ranking", "ratings": "rating",
               "demonstrations": "demonstration"}  # the kinds of kilter.data.records
KINDS_FOR_TASK = {
    "pairwise": ("comparisons", "raw"),
    "ranking": ("rankings", "comparisons", "raw"),
    "rating": ("ratings", "raw"),
    "edit": ("comparisons", "demonstrations", "raw"),
    "demonstration": ("demonstrations", "raw"),
    "clips": ("raw",),  # control-task clips go back to their run through `kilter clips-sync`
}


def _by_item(records: list[JudgmentRecord], min_judgments: int) -> list[list[JudgmentRecord]]:
    groups: dict[int, list[JudgmentRecord]] = defaultdict(list)
    for rec in records:
        groups[rec.item_id].append(rec)
    return [groups[i] for i in sorted(groups) if len(groups[i]) >= min_judgments]


def _pair(rec: JudgmentRecord, level: float) -> dict[str, Any]:
    first, second = rec.candidates[0].text, rec.candidates[1].text
    chosen, rejected = (first, second) if level > 0 else (second, first)
    return {"prompt": rec.prompt, "chosen": chosen, "rejected": rejected, "strength": round(abs(level), 6)}


def _pairwise_comparisons(groups: list[list[JudgmentRecord]], aggregate: str) -> list[dict]:
    out = []
    for group in groups:
        levels = [signed_level(r) / 4.0 for r in group]
        if aggregate == "each":
            out += [_pair(r, lv) for r, lv in zip(group, levels) if lv != 0]
        elif aggregate == "mean":
            mean = sum(levels) / len(levels)
            if mean != 0:
                out.append(_pair(group[0], mean))
        else:
            first = [lv for lv in levels if lv > 0]
            second = [-lv for lv in levels if lv < 0]
            if len(first) != len(second):
                winners, sign = (first, 1.0) if len(first) > len(second) else (second, -1.0)
                out.append(_pair(group[0], sign * statistics.fmean(winners)))
    return out


def _mean_ranks(group: list[JudgmentRecord]) -> list[int]:
    """Competition ranks (1, 1, 3, ...) of the responses ordered by their mean rank."""
    rank_lists = [slot_ranks(r) for r in group]
    means = [statistics.fmean(ranks[i] for ranks in rank_lists) for i in range(len(rank_lists[0]))]
    return [1 + sum(other < m for other in means) for m in means]


def _rankings(groups: list[list[JudgmentRecord]], aggregate: str) -> list[tuple[JudgmentRecord, list[int]]]:
    if aggregate == "each":
        return [(r, slot_ranks(r)) for group in groups for r in group]
    return [(group[0], _mean_ranks(group)) for group in groups]


def _ranking_record(rec: JudgmentRecord, ranks: list[int]) -> dict[str, Any]:
    return {"prompt": rec.prompt, "responses": [c.text for c in rec.candidates], "ranks": ranks}


def _ranking_comparisons(groups: list[list[JudgmentRecord]], aggregate: str) -> list[dict]:
    out = []
    for rec, ranks in _rankings(groups, aggregate):
        for i, j in combinations(range(len(ranks)), 2):
            if ranks[i] == ranks[j]:
                continue
            better, worse = (i, j) if ranks[i] < ranks[j] else (j, i)
            out.append({"prompt": rec.prompt, "chosen": rec.candidates[better].text,
                        "rejected": rec.candidates[worse].text})
    return out


def _edited(rec: JudgmentRecord) -> bool:
    return rec.text is not None and normalized(rec.text) != normalized(rec.candidates[0].text)


def _ratings(groups: list[list[JudgmentRecord]], aggregate: str) -> list[dict]:
    out = []
    for group in groups:
        labels = [r.label for r in group if r.label is not None]
        rec = group[0]
        base = {"prompt": rec.prompt, "completion": rec.candidates[0].text}
        if aggregate == "each":
            out += [{**base, "label": label} for label in labels]
        elif labels and 2 * sum(labels) != len(labels):
            out.append({**base, "label": 2 * sum(labels) > len(labels)})
    return out


def raw_record(rec: JudgmentRecord, project: str) -> dict[str, Any]:
    return {
        "judgment_id": rec.id,
        "project": project,
        "task": rec.task,
        "annotator": rec.user,
        "item_id": rec.item_id,
        "prompt_id": rec.prompt_id,
        "is_gold": rec.is_gold,
        "gold": rec.gold,
        "prompt": rec.prompt,
        "candidates": [{"id": c.id, "slot": c.slot, "model": c.model, "text": c.text, "sampling": c.sampling}
                       for c in rec.candidates],
        "display_order": rec.display_order,
        "shown_at": rec.shown_at.isoformat() + "Z" if rec.shown_at else None,
        "created_at": rec.created_at.isoformat() + "Z",
        "seconds": round((rec.created_at - rec.shown_at).total_seconds(), 3) if rec.shown_at else None,
        "choice": rec.choice,
        "preferred_candidate_id": rec.preferred_candidate_id,
        "strength": rec.strength,
        "tie": rec.tie,
        "both_bad": rec.both_bad,
        "label": rec.label,
        "responses": rec.responses,
        "text": rec.text,
        "comment": rec.comment,
        "category": rec.category,
        "version": rec.version,
        "review": rec.review,
        "review_reason": rec.review_reason,
        "reviewer": rec.reviewer,
    }


def trainer_ready(rows: list[dict[str, Any]], kind: str, problems: list[str] | None = None) -> list[dict[str, Any]]:
    """The rows a trainer reading ``kind`` accepts; each refused one adds a line to ``problems``."""
    if kind not in RECORD_KIND:
        return rows
    kept = []
    for number, row in enumerate(rows, start=1):
        try:
            validate_record(row, RECORD_KIND[kind])
            if kind == "comparisons" and normalized(row["chosen"]) == normalized(row["rejected"]):
                raise DataError("'chosen' and 'rejected' differ only in line endings or surrounding whitespace")
        except DataError as exc:
            if problems is not None:
                problems.append(f"{kind} record {number}: {exc}")
            continue
        kept.append(row)
    return kept


def build(records: Iterable[JudgmentRecord], task: str, kind: str, aggregate: str = "each",
          min_judgments: int = 1, project: str = "", problems: list[str] | None = None,
          include_rejected: bool = False) -> list[dict[str, Any]]:
    """The records of one ``kind`` for a project whose task is ``task`` (see module doc), each one a
    trainer accepts; what was left out is described in ``problems`` when a list is given.
    Judgments a reviewer rejected are left out unless ``include_rejected`` (``raw`` keeps them all)."""
    if kind != "raw" and not include_rejected:
        records = [r for r in records if r.review != "reject"]
    return trainer_ready(_build(records, task, kind, aggregate, min_judgments, project), kind, problems)


def _build(records: Iterable[JudgmentRecord], task: str, kind: str, aggregate: str,
           min_judgments: int, project: str) -> list[dict[str, Any]]:
    if kind not in KINDS_FOR_TASK[task]:
        raise KilterError(f"a {task} project exports {', '.join(KINDS_FOR_TASK[task])}, not {kind!r}")
    if aggregate not in AGGREGATIONS:
        raise KilterError(f"aggregate must be one of {', '.join(AGGREGATIONS)}, got {aggregate!r}")
    records = [r for r in records if r.task == task]
    if kind == "raw":
        return [raw_record(r, project) for r in sorted(records, key=lambda r: r.id)]
    groups = _by_item(records, max(1, min_judgments))
    if kind == "comparisons" and task == "pairwise":
        return _pairwise_comparisons(groups, aggregate)
    if kind == "comparisons" and task == "ranking":
        return _ranking_comparisons(groups, aggregate)
    if kind == "comparisons":  # edit
        return [{"prompt": r.prompt, "chosen": r.text, "rejected": r.candidates[0].text, "strength": 1.0}
                for group in groups for r in group if _edited(r)]
    if kind == "rankings":
        return [_ranking_record(rec, ranks) for rec, ranks in _rankings(groups, aggregate)]
    if kind == "ratings":
        return _ratings(groups, aggregate)
    # demonstrations: from demonstration and edit tasks, every written text
    return [{"prompt": r.prompt, "completion": r.text} for group in groups for r in group
            if r.text and (task == "demonstration" or _edited(r))]


def to_jsonl(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write(rows: list[dict[str, Any]], path: Path) -> None:
    """Write atomically: a half-written training file is worse than none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(to_jsonl(rows), encoding="utf-8")
    tmp.replace(path)
