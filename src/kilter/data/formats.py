"""Public data layouts, read as they are and mapped onto Kilter's record kinds.

A *layout* is the shape of one row in a public data set.  Each file is read in one layout:
judged from its first row (``format="auto"``) or named (``data.format=alpaca``).  Every row
is then turned into Kilter's own record (see :mod:`kilter.data.records`) and validated, so
errors still name the file, line and field.  docs/data.md has an example of each.

=============  ======================================================  ====================
layout         fields of a row                                          records it gives
=============  ======================================================  ====================
kilter         Kilter's own records (``prompt``/``completion``,         every kind
               ``messages``, ``chosen``/``rejected``, ``label`` ...)
ultrafeedback  ``prompt`` string + ``chosen``/``rejected`` whole        comparison,
               conversations (+ ``messages``), as UltraFeedback-         demonstration
               binarized and Zephyr ship them
hh             ``chosen``/``rejected`` Anthropic HH transcripts         comparison
               (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``)
shp            ``history``, ``human_ref_A``, ``human_ref_B``,           comparison
               ``labels`` (1: A preferred), ``score_ratio``
alpaca         ``instruction``, ``input`` (may be empty), ``output``    demonstration
sharegpt       ``conversations``: ``[{from: human|gpt|system, value}]``  demonstration
=============  ======================================================  ====================

When rating records (KTO's thumbs up/down) are wanted and a file holds comparisons, each
comparison is *unpaired*: the chosen response becomes a desirable rating and the rejected
one an undesirable rating of the same prompt, and the records say so in their ``notes``.

SHP's ``score_ratio`` (score of the preferred comment / score of the other, >= 1) becomes
the comparison's ``strength`` as ``1 - 1 / score_ratio``: the preferred comment's lead as a
fraction of its score (ratio 1 -> 0, 2 -> 0.5, 4 -> 0.75, towards 1 as the ratio grows).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kilter.data.convert import split_hh_pair
from kilter.data.readers import Records, iter_raw_rows, read_records
from kilter.data.records import FieldError, is_messages, validate_record
from kilter.errors import DataError, KilterError

__all__ = ["FORMATS", "LAYOUTS", "DataFormat", "Layout", "detect_layout", "layout_kinds", "read_layout", "shp_strength"]

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}


@dataclass(frozen=True)
class Layout:
    name: str
    fields: str
    """The fields of a row, as shown in errors and --help."""
    kinds: Callable[[dict], tuple[str, ...]]
    """The record kinds a row of this layout can give (empty: not this layout)."""
    convert: Callable[[dict, str], dict]
    """A raw row -> Kilter's record of ``kind``, still to be validated."""


def _is_conversation(value: Any) -> bool:
    """A message list that starts before the assistant's reply: a whole conversation."""
    return is_messages(value) and value[0].get("role") != "assistant"


# --------------------------------------------------------------------------- kilter (native)


def _kilter_kinds(row: dict) -> tuple[str, ...]:
    kinds = []
    if "responses" in row and "ranks" in row:
        kinds.append("ranking")
    if "chosen" in row and "rejected" in row:
        kinds.append("comparison")
    if "label" in row and "completion" in row:
        kinds.append("rating")
    # `response` is what `kilter score` reads besides `completion`
    if "completion" in row or "response" in row or ("messages" in row and "prompt" not in row):
        kinds.append("demonstration")
    if "text" in row:
        kinds.append("text")
    if "prompt" in row or "messages" in row:
        kinds.append("prompt")
    return tuple(kinds)


def _kilter_convert(row: dict, kind: str) -> dict:
    return row


# --------------------------------------------------------------------------- UltraFeedback / Zephyr


def _ultrafeedback_kinds(row: dict) -> tuple[str, ...]:
    kinds = []
    if isinstance(row.get("prompt"), str) and _is_conversation(row.get("chosen")) and _is_conversation(row.get("rejected")):
        kinds.append("comparison")
    if isinstance(row.get("prompt"), str) and is_messages(row.get("messages")) and "completion" not in row:
        kinds.append("demonstration")
    if kinds:
        kinds.append("prompt")
    return tuple(kinds)


def _ultrafeedback_convert(row: dict, kind: str) -> dict:
    if kind == "comparison":
        # The shared leading messages are the prompt (as TRL extracts it); the `prompt` string
        # repeats the first user message and is not needed.
        out = {"chosen": row.get("chosen"), "rejected": row.get("rejected")}
        if "strength" in row:
            out["strength"] = row["strength"]
        return out
    if kind == "demonstration":
        return {"messages": row.get("messages")}
    return {"prompt": row.get("prompt")}


# --------------------------------------------------------------------------- Anthropic HH


def _is_hh_transcript(value: Any) -> bool:
    return isinstance(value, str) and "\n\nHuman:" in value and "\n\nAssistant:" in value


def _hh_kinds(row: dict) -> tuple[str, ...]:
    if "prompt" not in row and _is_hh_transcript(row.get("chosen")) and _is_hh_transcript(row.get("rejected")):
        return ("comparison",)
    return ()


def _hh_convert(row: dict, kind: str) -> dict:
    for field in ("chosen", "rejected"):
        if row.get(field) is None:
            raise FieldError(field, "missing")
    # The raw-string prompt, exactly what `kilter convert-hh` writes by default.
    return split_hh_pair(row["chosen"], row["rejected"])


# --------------------------------------------------------------------------- Stanford SHP


def shp_strength(score_ratio: Any) -> float:
    """``1 - 1 / score_ratio``: SHP's score ratio (>= 1) as a comparison strength in [0, 1)."""
    if isinstance(score_ratio, bool) or not isinstance(score_ratio, (int, float)) or math.isnan(score_ratio):
        raise FieldError("score_ratio", f"expected a number >= 1, got {score_ratio!r}")
    if score_ratio < 1:
        raise FieldError("score_ratio", f"expected a number >= 1 (preferred score / other score), got {score_ratio!r}")
    if math.isinf(score_ratio):
        return 1.0
    return 1.0 - 1.0 / float(score_ratio)


def _shp_kinds(row: dict) -> tuple[str, ...]:
    if {"history", "human_ref_A", "human_ref_B", "labels"} <= row.keys():
        return ("comparison", "prompt")
    return ()


def _shp_convert(row: dict, kind: str) -> dict:
    if kind == "prompt":
        return {"prompt": row.get("history")}
    label = row.get("labels")
    if isinstance(label, str) and label.strip() in ("0", "1"):  # a CSV cell
        label = int(label)
    if isinstance(label, bool) or label not in (0, 1):
        raise FieldError("labels", f"expected 1 (human_ref_A preferred) or 0 (human_ref_B preferred), got {label!r}")
    better, worse = ("human_ref_A", "human_ref_B") if label == 1 else ("human_ref_B", "human_ref_A")
    out = {"prompt": row.get("history"), "chosen": row.get(better), "rejected": row.get(worse)}
    ratio = row.get("score_ratio")
    if isinstance(ratio, str) and ratio.strip():  # a CSV cell
        try:
            ratio = float(ratio)
        except ValueError:
            raise FieldError("score_ratio", f"expected a number >= 1, got {ratio!r}") from None
    if ratio is not None and ratio != "":
        out["strength"] = shp_strength(ratio)
    return out


# --------------------------------------------------------------------------- Alpaca


def _alpaca_kinds(row: dict) -> tuple[str, ...]:
    return ("demonstration", "prompt") if {"instruction", "output"} <= row.keys() else ()


def _alpaca_prompt(row: dict) -> list[dict[str, str]]:
    instruction = row.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise FieldError("instruction", f"expected a non-empty string, got {instruction!r}")
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise FieldError("input", f"expected a string (may be empty), got {extra!r}")
    # The instruction and its input form one user turn, separated by a blank line.
    content = instruction if not extra or not extra.strip() else f"{instruction}\n\n{extra}"
    return [{"role": "user", "content": content}]


def _alpaca_convert(row: dict, kind: str) -> dict:
    if kind == "prompt":
        return {"prompt": _alpaca_prompt(row)}
    output = row.get("output")
    if not isinstance(output, str) or not output:
        raise FieldError("output", f"expected a non-empty string, got {output!r}")
    return {"messages": _alpaca_prompt(row) + [{"role": "assistant", "content": output}]}


# --------------------------------------------------------------------------- ShareGPT


def _sharegpt_kinds(row: dict) -> tuple[str, ...]:
    turns = row.get("conversations")
    if isinstance(turns, list) and turns and all(isinstance(t, dict) and "from" in t for t in turns):
        return ("demonstration", "prompt")
    return ()


def _sharegpt_messages(row: dict) -> list[dict[str, str]]:
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise FieldError("conversations", f"expected a non-empty list of {{from, value}} turns, got {turns!r}")
    messages = []
    for i, turn in enumerate(turns, start=1):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if speaker not in _SHAREGPT_ROLES:
            raise FieldError("conversations", f"turn {i}: 'from' must be one of human, gpt, system, got {speaker!r}")
        value = turn.get("value")
        if not isinstance(value, str):
            raise FieldError("conversations", f"turn {i}: expected a 'value' string, got {value!r}")
        messages.append({"role": _SHAREGPT_ROLES[speaker], "content": value})
    return messages


def _sharegpt_convert(row: dict, kind: str) -> dict:
    return {"messages": _sharegpt_messages(row)}


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        # Most specific first: a row of several layouts is read in the first one that fits.
        Layout("hh", "{chosen, rejected} Anthropic HH transcripts", _hh_kinds, _hh_convert),
        Layout("shp", "{history, human_ref_A, human_ref_B, labels, score_ratio}", _shp_kinds, _shp_convert),
        Layout("ultrafeedback", "{prompt, chosen, rejected} with whole conversations, or {prompt, messages}",
               _ultrafeedback_kinds, _ultrafeedback_convert),
        Layout("alpaca", "{instruction, input, output}", _alpaca_kinds, _alpaca_convert),
        Layout("sharegpt", "{conversations: [{from, value}]}", _sharegpt_kinds, _sharegpt_convert),
        Layout("kilter", "Kilter's records (docs/data.md)", _kilter_kinds, _kilter_convert),
    )
}
FORMATS = ("auto", *LAYOUTS)
DataFormat = Literal["auto", "kilter", "ultrafeedback", "hh", "shp", "alpaca", "sharegpt"]
"""The ``data.format`` values of the trainers' configs."""

# Which layouts give each record kind (for the error that lists what is accepted).
_LAYOUTS_FOR = {
    "text": ("kilter",),
    "demonstration": ("kilter", "ultrafeedback", "alpaca", "sharegpt"),
    "comparison": ("kilter", "ultrafeedback", "hh", "shp"),
    "ranking": ("kilter",),
    "rating": ("kilter", "ultrafeedback", "hh", "shp"),  # comparisons are unpaired
    "prompt": ("kilter", "ultrafeedback", "shp", "alpaca", "sharegpt"),
}


def layout_kinds(row: dict) -> list[tuple[str, str]]:
    """Every ``(layout, kind)`` a row can be read as, most specific layout first."""
    return [(layout.name, kind) for layout in LAYOUTS.values() for kind in layout.kinds(row)]


def _source_kind(layout: str, row: dict, kind: str) -> str | None:
    """The kind to read a row as so that it gives ``kind`` records (comparisons for ratings)."""
    kinds = LAYOUTS[layout].kinds(row)
    if kind in kinds:
        return kind
    if kind == "rating" and "comparison" in kinds:
        return "comparison"
    return None


# Kilter's own fields of each kind, for that same error.
_NATIVE_FIELDS = {
    "text": "{text}",
    "demonstration": "{prompt, completion} or {messages}",
    "comparison": "{prompt, chosen, rejected}",
    "ranking": "{prompt, responses, ranks}",
    "rating": "{prompt, completion, label} or comparisons",
    "prompt": "{prompt} or {messages}",
}


def _no_layout_message(row: dict, kind: str) -> str:
    seen = ", ".join(sorted(map(str, row)))
    accepted = _LAYOUTS_FOR[kind]
    options = ", or ".join(
        f"data.format={name} ({_NATIVE_FIELDS[kind] if name == 'kilter' else LAYOUTS[name].fields})"
        for name in accepted
    )
    others = sorted({f"{name} ({k} records)" for name, k in layout_kinds(row) if name != "kilter" or k != "prompt"})
    looks = f"; it looks like {', '.join(others)}, which are not read as {kind} records" if others else ""
    return f"fields [{seen}]: not {kind} records in any layout Kilter reads{looks}; use {options}"


def detect_layout(row: Any, kind: str, where: str = "") -> tuple[str, str]:
    """``(layout, kind to read the rows as)`` for a file whose first row is ``row``."""
    prefix = f"{where}: " if where else ""
    if not isinstance(row, dict):
        raise DataError(f"{prefix}expected an object with named fields, got {type(row).__name__}")
    for layout in LAYOUTS:
        source = _source_kind(layout, row, kind)
        if source is not None:
            return layout, source
    raise DataError(prefix + _no_layout_message(row, kind))


def _first_row(spec: str | Path, split: str | None, skip_invalid: bool) -> tuple[str, Any] | None:
    """The row the layout is judged from: the first one (the first readable one with skip_invalid)."""
    for where, row, problem in iter_raw_rows(spec, split):
        if problem is not None:
            if skip_invalid:
                continue
            raise DataError(f"{where}: {problem}")
        return where, row
    return None


def read_layout(source: str | Path, kind: str, format: str = "auto", *, skip_invalid: bool = False,
                split: str | None = None, allow_empty: bool = False) -> Records:
    """Read ``source`` in one layout (judged from its first row, or named) as records of ``kind``."""
    if format not in LAYOUTS and format != "auto":
        raise KilterError(f"unknown data format {format!r}; expected one of {', '.join(FORMATS)}")
    found = _first_row(source, split, skip_invalid)
    if found is None:  # nothing to judge a layout from: the readers' own "no valid records"
        return read_records(source, kind, skip_invalid=skip_invalid, split=split, allow_empty=allow_empty)
    where, first = found
    if format == "auto":
        layout, source_kind = detect_layout(first, kind, where)
    else:
        if format not in _LAYOUTS_FOR[kind]:
            accepted = ", ".join(_LAYOUTS_FOR[kind])
            raise KilterError(f"data.format={format} does not hold {kind} records; formats for {kind}: auto, {accepted}")
        layout = format
        source_kind = _source_kind(layout, first, kind) if isinstance(first, dict) else None
        if source_kind is None:
            source_kind = "comparison" if kind == "rating" and layout != "kilter" else kind
    convert = LAYOUTS[layout].convert
    unpair = kind == "rating" and source_kind == "comparison"

    def to_records(row: Any) -> list[dict]:
        if not isinstance(row, dict):
            raise DataError(f"expected an object with named fields, got {type(row).__name__}")
        record = validate_record(convert(row, source_kind), source_kind)
        if not unpair:
            return [record]
        return [{"prompt": record["prompt"], "completion": record["chosen"], "label": True},
                {"prompt": record["prompt"], "completion": record["rejected"], "label": False}]

    records = read_records(source, kind, skip_invalid=skip_invalid, split=split, allow_empty=allow_empty,
                           to_records=to_records)
    records.layout = layout
    if layout != "kilter":
        records.notes.append(f"read {source} as {layout} data ({LAYOUTS[layout].fields})")
    if unpair:
        records.notes.append(
            f"{source} holds comparisons: unpaired into {len(records.rows)} ratings "
            "(chosen = desirable, rejected = undesirable)"
        )
    return records
