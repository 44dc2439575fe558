"""Reading prompts and candidate responses from JSONL for ``kilter import`` and ``kilter sample``.

One object per line::

    {"prompt": "Explain photosynthesis to a child.",
     "id": "p17",                                   # optional, unique within the project
     "responses": [                                 # strings, or objects with text/model/sampling
        "Plants eat sunlight ...",
        {"text": "Photosynthesis is ...", "model": "sft-v2",
         "sampling": {"temperature": 0.7, "top_p": 0.95, "max_new_tokens": 128}}],
     "gold": 1}                                     # optional known answer (see tasks.gold_for_item)

``completion`` (a single response) is accepted in place of ``responses``. Errors name the file,
line and field.

Responses a trainer would refuse are refused here, before anyone spends time on them: an empty
(or whitespace-only) response, and in pairwise and ranking projects two responses of one prompt
whose texts are the same once line endings and surrounding whitespace are ignored (they would
export as ``chosen == rejected``). ``kilter sample`` drops such responses instead (see
:func:`distinct_responses`), since a generation run should not fail at the end.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kilter.errors import DataError
from kilter.feedback.tasks import check_response_count, gold_for_item, plan_items

_KNOWN = {"prompt", "id", "responses", "completion", "gold", "category"}


@dataclass
class CandidateIn:
    text: str
    model: str = ""
    sampling: dict[str, Any] | None = None


@dataclass
class PromptIn:
    prompt: str
    external_id: str | None = None
    responses: list[CandidateIn] = field(default_factory=list)
    gold: Any = None
    where: str = ""  # "file.jsonl line 3", for error messages
    category: str | None = None  # e.g. "coding": per-category leaderboards and filters


def normalized(text: str) -> str:
    """The text as compared for sameness: line endings unified, surrounding whitespace dropped.

    Browsers send every textarea back with CRLF line endings and drop a leading newline, so two
    texts equal under this are the same response to a person, and to a preference trainer.
    """
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def _candidate(value: Any, where: str, index: int) -> CandidateIn:
    name = f"responses[{index}]"
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field {name!r}: empty response; trainers refuse empty texts")
        return CandidateIn(value)
    if not isinstance(value, dict):
        raise DataError(f"{where}: field {name!r}: expected a string or an object with 'text'")
    text = value.get("text")
    if not isinstance(text, str):
        raise DataError(f"{where}: field '{name}.text': expected a string")
    if not text.strip():
        raise DataError(f"{where}: field '{name}.text': empty response; trainers refuse empty texts")
    model = value.get("model", "")
    if not isinstance(model, str):
        raise DataError(f"{where}: field '{name}.model': expected a string")
    sampling = value.get("sampling")
    if sampling is not None and not isinstance(sampling, dict):
        raise DataError(f"{where}: field '{name}.sampling': expected an object")
    return CandidateIn(text, model, sampling)


def parse_row(row: Any, where: str) -> PromptIn:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object")
    unknown = sorted(set(row) - _KNOWN)
    if unknown:
        raise DataError(f"{where}: unknown field {unknown[0]!r}; known fields: {', '.join(sorted(_KNOWN))}")
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: field 'prompt': expected a non-empty string")
    external = row.get("id")
    if external is not None and (isinstance(external, bool) or not isinstance(external, (str, int))):
        raise DataError(f"{where}: field 'id': expected a string or an integer, got {json.dumps(external)}")
    if isinstance(external, str) and not external.strip():
        raise DataError(f"{where}: field 'id': empty")
    if "responses" in row and "completion" in row:
        raise DataError(f"{where}: give either 'responses' or 'completion', not both")
    raw = row.get("responses", [row["completion"]] if "completion" in row else [])
    if not isinstance(raw, list):
        raise DataError(f"{where}: field 'responses': expected a list")
    responses = [_candidate(v, where, i) for i, v in enumerate(raw)]
    category = row.get("category")
    if category is not None and (not isinstance(category, str) or not category.strip() or len(category) > 64):
        raise DataError(f"{where}: field 'category': expected a non-empty string of at most 64 characters")
    return PromptIn(prompt, None if external is None else str(external), responses, row.get("gold"), where,
                    category.strip() if category else None)


def same_text(responses: list[CandidateIn]) -> tuple[int, int] | None:
    """The indexes of the first two responses with the same :func:`normalized` text, if any."""
    first: dict[str, int] = {}
    for i, c in enumerate(responses):
        key = normalized(c.text)
        if key in first:
            return first[key], i
        first[key] = i
    return None


COMPARED_TASKS = ("pairwise", "ranking")  # tasks whose items put responses side by side


def check_for_task(rows: list[PromptIn], task: str) -> None:
    """Check counts and gold answers before anything is written, so an import is all or nothing."""
    seen: dict[str, str] = {}
    for row in rows:
        problem = check_response_count(task, len(row.responses))
        if problem:
            raise DataError(f"{row.where}: field 'responses': {problem}, got {len(row.responses)}")
        if task in COMPARED_TASKS and (pair := same_text(row.responses)):
            raise DataError(f"{row.where}: field 'responses': responses[{pair[0]}] and responses[{pair[1]}] have the "
                            f"same text; a {task} item needs different responses (a trainer rejects chosen == rejected)")
        if row.external_id is not None:
            if row.external_id in seen:
                raise DataError(f"{row.where}: field 'id': {row.external_id!r} already used on {seen[row.external_id]}")
            seen[row.external_id] = row.where
        if row.gold is not None:
            members = plan_items(task, [c.model for c in row.responses])
            try:
                for m in members:
                    gold_for_item(task, row.gold, m, len(row.responses))
            except ValueError as exc:
                raise DataError(f"{row.where}: field 'gold': {exc}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def read_jsonl(path: str | Path) -> list[PromptIn]:
    """Rows of a UTF-8 JSONL file (a byte-order mark is allowed); errors name the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with path.open("rb") as handle:
        return parse_jsonl(handle, str(path))


def parse_jsonl(lines: Iterable[bytes], source: str) -> list[PromptIn]:
    """Rows of JSONL given as byte lines (a file, an upload); ``source`` names it in errors."""
    rows = []
    for number, raw in enumerate(lines, start=1):
        where = f"{source} line {number}"
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # the UTF-8 byte-order mark some editors write
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{where}: not UTF-8 text (byte {exc.start + 1} of the line); save the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            value = json.loads(line, parse_constant=_no_constant)  # NaN and Infinity are not JSON
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
        except ValueError as exc:
            raise DataError(f"{where}: not valid JSON ({exc})") from None
        rows.append(parse_row(value, where))
    if not rows:
        raise DataError(f"{source}: no rows")
    return rows


def distinct_responses(rows: list[PromptIn], task: str | None) -> tuple[list[PromptIn], dict[str, int]]:
    """Drop empty responses and repeats of a response (by :func:`normalized` text) from sampled rows.

    Two copies of one model sampled with one seed write the same texts, and short generations
    can be empty; neither gives a usable comparison. Prompts left with too few responses for
    ``task`` (None: fewer than 2 when more were sampled) are left out. Returns the rows kept and
    the counts of what was dropped, for the report.
    """
    kept, dropped = [], {"empty": 0, "repeated": 0, "prompts": 0}
    for row in rows:
        seen: set[str] = set()
        responses = []
        for c in row.responses:
            key = normalized(c.text)
            if not key:
                dropped["empty"] += 1
            elif key in seen:
                dropped["repeated"] += 1
            else:
                seen.add(key)
                responses.append(c)
        if task is not None:
            short = check_response_count(task, len(responses)) is not None
        else:
            short = len(responses) < min(2, len(row.responses))
        if short:
            dropped["prompts"] += 1
            continue
        kept.append(PromptIn(row.prompt, row.external_id, responses, row.gold, row.where, row.category))
    return kept, dropped


def write_jsonl(rows: list[PromptIn], path: str | Path) -> None:
    """Write rows in the import format (used by ``kilter sample --out``)."""
    with Path(path).open("w", encoding="utf-8") as handle:
        for row in rows:
            obj: dict[str, Any] = {"prompt": row.prompt}
            if row.external_id is not None:
                obj["id"] = row.external_id
            if row.category is not None:
                obj["category"] = row.category
            obj["responses"] = [{"text": c.text, "model": c.model, "sampling": c.sampling} for c in row.responses]
            handle.write(json.dumps(obj, ensure_ascii=False) + "\n")
