"""The five task types: what an item holds, what the form asks, how an answer is read.

Everything here is pure: the web app hands a submitted form plus the order the responses were
shown in, and gets back the column values of one judgment (or a :class:`FormError`).

Pairwise scale (Anthropic HH, Bai et al. 2022, fig. 6): eight buttons from "A much better" to
"B much better", plus "tie" and "both bad". The choice is stored as shown ("A3") *and* resolved
to the preferred candidate with a strength in (0, 1]:

====================  ========  =========
button                choice    strength
====================  ========  =========
A much better         A4        1.00
A better              A3        0.75
A somewhat better     A2        0.50
A slightly better     A1        0.25
B slightly better     B1        0.25
...mirrored for B     B2..B4    0.5..1.0
tie / both bad        tie, ...  none
====================  ========  =========
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

TASK_TITLES = {
    "pairwise": "Compare two responses",
    "ranking": "Rank responses",
    "rating": "Thumbs up or down",
    "edit": "Improve a response",
    "demonstration": "Write a response",
    "clips": "Compare two clips",
}

# (choice, label, keyboard key); the order is the order of the buttons on the page
PAIRWISE_CHOICES: tuple[tuple[str, str, str], ...] = (
    ("A4", "A much better", "1"),
    ("A3", "A better", "2"),
    ("A2", "A somewhat better", "3"),
    ("A1", "A slightly better", "4"),
    ("B1", "B slightly better", "5"),
    ("B2", "B somewhat better", "6"),
    ("B3", "B better", "7"),
    ("B4", "B much better", "8"),
    ("tie", "About the same", "t"),
    ("both_bad", "Both bad", "n"),
)
CHOICE_CODES = tuple(c for c, _, _ in PAIRWISE_CHOICES)

# "compare two clips" (control tasks, Christiano et al. 2017): the four answers of their interface
CLIP_CHOICES: tuple[tuple[str, str, str], ...] = (
    ("A", "Left is better", "l"),
    ("B", "Right is better", "r"),
    ("equal", "About the same", "e"),
    ("cant_tell", "Can't tell", "c"),
)
CLIP_CODES = tuple(c for c, _, _ in CLIP_CHOICES)

# Per-response flags, after the InstructGPT labeling instructions (Ouyang et al. 2022, table 3);
# the list index + 1 is the keyboard key in flag mode.
FLAGS: tuple[tuple[str, str], ...] = (
    ("instruction", "Fails to follow the instruction"),
    ("hallucination", "Makes things up"),
    ("inappropriate", "Inappropriate for an assistant"),
    ("harmful", "Harmful or dangerous advice"),
    ("sexual", "Sexual content"),
    ("violent", "Violent content"),
    ("demeaning", "Demeans a person or group"),
    ("opinion", "Opinion presented as fact"),
    ("moralizing", "Moralizes or lectures"),
)
FLAG_CODES = tuple(code for code, _ in FLAGS)

SCORE_RANGE = (1, 7)  # InstructGPT's 1-7 overall quality (Likert) score
MAX_RANKED = 9  # one letter key a..i per response
MAX_TEXT = 50_000


class FormError(ValueError):
    """The submitted form is incomplete or malformed; the message is shown to the annotator."""


@dataclass(frozen=True)
class Shown:
    """The responses of an assignment in display order: ``candidate_ids[0]`` was shown as "A"."""

    candidate_ids: Sequence[int]
    original_text: str = ""  # the response being edited (edit task)


def sentence(message: str) -> str:
    """``"please choose X"`` -> ``"Please choose X."`` for showing an error on a page."""
    message = message.strip()
    return (message[:1].upper() + message[1:]).rstrip(".") + "."


def letter(position: int) -> str:
    return "ABCDEFGHI"[position]


def choice_strength(choice: str) -> tuple[int | None, float | None]:
    """``"A3"`` -> (0, 0.75): the display position preferred and the strength; ties give (None, None)."""
    if choice in ("tie", "both_bad"):
        return None, None
    return (0 if choice[0] == "A" else 1), int(choice[1]) / 4.0


# --------------------------------------------------------------------------- form parsing

Getter = Callable[[str], list[str]]


def _text(values: list[str], name: str, required: bool) -> str:
    text = (values[0] if values else "").replace("\r\n", "\n")
    if len(text) > MAX_TEXT:
        raise FormError(f"{name} is longer than {MAX_TEXT} characters")
    if required and not text.strip():
        raise FormError(f"please fill in the {name}")
    return text


def _int(values: list[str], name: str, lo: int, hi: int) -> int:
    try:
        value = int(values[0])
    except (IndexError, ValueError):
        raise FormError(f"please choose the {name}") from None
    if not lo <= value <= hi:
        raise FormError(f"{name} must be between {lo} and {hi}")
    return value


def _flags(values: list[str], position: int) -> list[str]:
    bad = [v for v in values if v not in FLAG_CODES]
    if bad:
        raise FormError(f"unknown flag {bad[0]!r} on response {letter(position)}")
    return sorted(set(values), key=FLAG_CODES.index)


def parse_submission(task: str, get: Getter, shown: Shown) -> dict[str, Any]:
    """Read a submitted task form into the column values of a :class:`~kilter.feedback.models.Judgment`.

    ``get(name)`` returns every value of a form field (a list, empty when absent). Per-response
    fields are named by display position: ``rank_0``, ``score_0``, ``flags_0`` for "A".
    """
    ids = list(shown.candidate_ids)
    out: dict[str, Any] = {"comment": _text(get("comment"), "comment", required=False).strip()}
    responses = [{"candidate": cid, "position": pos, "flags": _flags(get(f"flags_{pos}"), pos)} for pos, cid in enumerate(ids)]
    if task == "pairwise":
        choice = (get("choice") or [""])[0]
        if choice not in CHOICE_CODES:
            raise FormError("please choose how A compares with B")
        position, strength = choice_strength(choice)
        out.update(
            choice=choice,
            preferred_candidate_id=None if position is None else ids[position],
            strength=strength,
            tie=choice == "tie",
            both_bad=choice == "both_bad",
        )
    elif task == "clips":
        choice = (get("choice") or [""])[0]
        if choice not in CLIP_CODES:
            raise FormError("please choose which clip is better (or about the same, or can't tell)")
        preferred = {"A": ids[0], "B": ids[1]}.get(choice)
        out.update(choice=choice, preferred_candidate_id=preferred, tie=choice == "equal")
    elif task == "ranking":
        k = len(ids)
        for pos, entry in enumerate(responses):
            entry["rank"] = _int(get(f"rank_{pos}"), f"rank of response {letter(pos)}", 1, k)
            entry["score"] = _int(get(f"score_{pos}"), f"1-7 score of response {letter(pos)}", *SCORE_RANGE)
        ranks = sorted(e["rank"] for e in responses)
        if ranks[0] != 1:
            raise FormError("one response must be ranked 1 (the best)")
    elif task == "rating":
        value = (get("label") or [""])[0]
        if value not in ("up", "down"):
            raise FormError("please choose thumbs up or thumbs down")
        out["label"] = value == "up"
    elif task == "edit":
        out["text"] = _text(get("text"), "edited response", required=True)
    elif task == "demonstration":
        out["text"] = _text(get("text"), "response", required=True)
    else:  # projects are validated at creation; a row changed behind the app's back still gets one line
        raise FormError(f"unknown task type {task!r}")
    out["responses"] = responses
    out["display_order"] = ids
    return out


# --------------------------------------------------------------------------- import planning


def plan_items(task: str, models: Sequence[str]) -> list[list[int]]:
    """Which candidates of one prompt go together into an item, as lists of candidate indexes.

    pairwise: every pair; when the candidates come from two or more models only pairs of
    *different* models (a tournament: each item is a battle). ranking: all candidates in one item.
    rating and edit: one item per candidate. demonstration: one item with no candidate.
    """
    k = len(models)
    if task == "clips":
        return [[0, 1]]
    if task == "pairwise":
        pairs = list(combinations(range(k), 2))
        if len(set(models)) > 1:
            pairs = [(i, j) for i, j in pairs if models[i] != models[j]]
        return [list(p) for p in pairs]
    if task == "ranking":
        return [list(range(k))]
    if task in ("rating", "edit"):
        return [[i] for i in range(k)]
    return [[]]


def check_response_count(task: str, k: int) -> str | None:
    """An error message when a prompt has the wrong number of responses for ``task``, else None."""
    if task == "clips" and k != 2:
        return "a clips project compares exactly 2 clips per query"
    if task == "pairwise" and k < 2:
        return "a pairwise project needs at least 2 responses per prompt"
    if task == "ranking" and not 2 <= k <= MAX_RANKED:
        return f"a ranking project needs 2 to {MAX_RANKED} responses per prompt"
    if task in ("rating", "edit") and k < 1:
        return f"a {task} project needs at least 1 response per prompt"
    if task == "demonstration" and k:
        return "a demonstration project takes prompts only (no responses)"
    return None


def gold_for_item(task: str, gold: Any, members: Sequence[int], k: int) -> dict[str, Any]:
    """Turn an import row's ``gold`` into the stored answer of one item in slot terms.

    pairwise: ``gold`` is the index (0 or 1) of the better response, or ``"tie"``; only for
    prompts with exactly two responses. ranking: a list of ranks aligned with the responses.
    rating: a boolean, or a list of booleans aligned with the responses. Raises ValueError.
    """
    if task == "pairwise":
        if k != 2:
            raise ValueError("pairwise gold needs exactly 2 responses")
        if gold == "tie":
            return {"preferred": None}
        if gold in (0, 1) and not isinstance(gold, bool):
            return {"preferred": int(gold)}
        raise ValueError("pairwise gold must be 0, 1 (index of the better response) or \"tie\"")
    if task == "ranking":
        if not (isinstance(gold, list) and len(gold) == k and all(isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= k for r in gold)):
            raise ValueError(f"ranking gold must be a list of {k} ranks between 1 and {k}")
        return {"ranks": list(gold)}
    if task == "rating":
        if isinstance(gold, bool):
            if k != 1:
                raise ValueError("a single boolean gold needs exactly 1 response; give a list of booleans")
            return {"label": gold}
        if isinstance(gold, list) and len(gold) == k and all(isinstance(g, bool) for g in gold):
            return {"label": gold[members[0]]}
        raise ValueError("rating gold must be true/false or a list of booleans aligned with the responses")
    raise ValueError(f"{task} projects have no gold answers")


def answer_summary(rec: Any) -> str:
    """A judgment's answer in a few words, in the order it was shown ("A better", "B > A = C", ...)."""
    if rec.task == "pairwise":
        return next((label for code, label, _ in PAIRWISE_CHOICES if code == rec.choice), rec.choice or "")
    if rec.task == "ranking":
        ranked = sorted((e["rank"], e["position"]) for e in rec.responses if e.get("rank") is not None)
        out = ""
        for i, (rank, pos) in enumerate(ranked):
            out += ("" if i == 0 else " = " if rank == ranked[i - 1][0] else " > ") + letter(pos)
        return out
    if rec.task == "rating":
        return "thumbs up" if rec.label else "thumbs down"
    text = " ".join((rec.text or "").split())
    return text if len(text) <= 80 else text[:77] + "..."
