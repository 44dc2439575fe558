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
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kilter.errors import DataError
from kilter.feedback.tasks import check_response_count, gold_for_item, plan_items

_KNOWN = {"prompt", "id", "responses", "completion", "gold"}


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


def _candidate(value: Any, where: str, index: int) -> CandidateIn:
    name = f"responses[{index}]"
    if isinstance(value, str):
        return CandidateIn(value)
    if not isinstance(value, dict):
        raise DataError(f"{where}: field {name!r}: expected a string or an object with 'text'")
    text = value.get("text")
    if not isinstance(text, str):
        raise DataError(f"{where}: field '{name}.text': expected a string")
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
    if external is not None and not isinstance(external, (str, int)):
        raise DataError(f"{where}: field 'id': expected a string")
    if "responses" in row and "completion" in row:
        raise DataError(f"{where}: give either 'responses' or 'completion', not both")
    raw = row.get("responses", [row["completion"]] if "completion" in row else [])
    if not isinstance(raw, list):
        raise DataError(f"{where}: field 'responses': expected a list")
    responses = [_candidate(v, where, i) for i, v in enumerate(raw)]
    return PromptIn(prompt, None if external is None else str(external), responses, row.get("gold"), where)


def check_for_task(rows: list[PromptIn], task: str) -> None:
    """Check counts and gold answers before anything is written, so an import is all or nothing."""
    seen: dict[str, str] = {}
    for row in rows:
        problem = check_response_count(task, len(row.responses))
        if problem:
            raise DataError(f"{row.where}: field 'responses': {problem}, got {len(row.responses)}")
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


def read_jsonl(path: str | Path) -> list[PromptIn]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
            rows.append(parse_row(value, where))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def write_jsonl(rows: list[PromptIn], path: str | Path) -> None:
    """Write rows in the import format (used by ``kilter sample --out``)."""
    with Path(path).open("w", encoding="utf-8") as handle:
        for row in rows:
            obj: dict[str, Any] = {"prompt": row.prompt}
            if row.external_id is not None:
                obj["id"] = row.external_id
            obj["responses"] = [{"text": c.text, "model": c.model, "sampling": c.sampling} for c in row.responses]
            handle.write(json.dumps(obj, ensure_ascii=False) + "\n")
