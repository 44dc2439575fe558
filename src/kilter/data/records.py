"""Record kinds and their validation.

Every data file Kilter reads holds one kind of record (DESIGN.md, "Records").  Conversational
variants use lists of ``{"role", "content"}`` messages, as in the Hugging Face formats:

=============  ==========================================================================
kind           fields (extra columns are ignored)
=============  ==========================================================================
text           ``text``
demonstration  ``prompt`` + ``completion``, or ``messages`` (the last one, from the
               assistant, is the completion; the earlier ones are the prompt; a conversation
               with earlier assistant turns is also kept whole as ``messages``, so every
               assistant turn can be trained)
comparison     ``prompt`` + ``chosen`` + ``rejected`` (+ optional ``strength`` in [0, 1]);
               conversational: ``prompt`` is a message list and ``chosen``/``rejected``
               are lists holding the assistant turn.  With message lists and no
               ``prompt`` column, the shared leading messages of chosen and rejected are
               the prompt (the "implicit prompt" form of public preference sets).
ranking        ``prompt`` + ``responses`` + ``ranks`` (rank 1 is best; equal ranks tie)
rating         ``prompt`` + ``completion`` + ``label`` (thumbs up or down: true/false, or 1/0)
prompt         ``prompt``, or ``messages`` (a trailing assistant message is dropped: the
               prompt is what comes before the reply)
=============  ==========================================================================

:func:`validate_record` returns one normalised shape per kind, so trainers handle a single
form: ``prompt`` is a string or a list of messages, and every response (``completion``,
``chosen``, ``rejected``, each of ``responses``) is a plain string -- the assistant's text.
"""

from __future__ import annotations

import math
from typing import Any

from kilter.errors import DataError

__all__ = ["RECORD_KINDS", "FieldError", "is_messages", "validate_record"]

RECORD_KINDS = ("text", "demonstration", "comparison", "ranking", "rating", "prompt")


class FieldError(DataError):
    """A problem with one field of one row; readers add the file and line to the message."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"field {field!r}: {problem}")


def _show(value: Any, limit: int = 60) -> str:
    """``repr`` of a bad value, cut short so the error stays on one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_messages(value: Any) -> bool:
    """True for a list of dicts that look like chat messages (each has a ``role``)."""
    return isinstance(value, list) and len(value) > 0 and all(isinstance(m, dict) and "role" in m for m in value)


ROLES = ("system", "developer", "user", "assistant", "tool")
"""Message roles a chat template renders; any other is refused (it would be rendered silently, or dropped)."""


def _require(row: dict, field: str) -> Any:
    if field not in row or row[field] is None:
        raise FieldError(field, "missing")
    return row[field]


def _text(row: dict, field: str) -> str:
    value = _require(row, field)
    if not isinstance(value, str) or not value.strip():
        raise FieldError(field, f"expected a non-empty string, got {_show(value)}")
    return value


def _messages(value: Any, field: str) -> list[dict[str, str]]:
    """Check a list of ``{role, content}`` messages; keep only those two keys."""
    if not isinstance(value, list) or not value:
        raise FieldError(field, f"expected a non-empty list of messages, got {_show(value)}")
    out = []
    for i, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            raise FieldError(field, f"message {i}: expected an object with 'role' and 'content', got {_show(message)}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise FieldError(field, f"message {i}: expected a non-empty 'role' string, got {_show(role)}")
        if role not in ROLES:
            raise FieldError(field, f"message {i}: unknown role {_show(role)}; roles accepted: {', '.join(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str):
            raise FieldError(field, f"message {i}: expected a 'content' string, got {_show(content)}")
        out.append({"role": role, "content": content})
    return out


def _prompt(row: dict, field: str = "prompt") -> str | list[dict[str, str]]:
    value = _require(row, field)
    if isinstance(value, str):
        if not value.strip():
            raise FieldError(field, f"expected a non-empty string or a list of messages, got {_show(value)}")
        return value
    if isinstance(value, list):
        return _messages(value, field)
    raise FieldError(field, f"expected a non-empty string or a list of messages, got {_show(value)}")


def _response_value(value: Any, field: str) -> str:
    """A response is a non-empty string, or a list holding one assistant message."""
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value:
        messages = _messages(value, field)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            roles = [m["role"] for m in messages]
            raise FieldError(field, f"expected a list holding one assistant message, got roles {roles}")
        if not messages[0]["content"].strip():
            raise FieldError(field, "the assistant message has empty content")
        return messages[0]["content"]
    raise FieldError(field, f"expected a non-empty string or a list of messages, got {_show(value)}")


def _response(row: dict, field: str) -> str:
    return _response_value(_require(row, field), field)


def _split_conversation(messages: list[dict[str, str]], field: str) -> tuple[list[dict[str, str]], str]:
    """(prompt messages, final assistant content) of a whole conversation."""
    last = messages[-1]
    if last["role"] != "assistant":
        raise FieldError(field, f"the last message must be from the assistant (the completion), got role {last['role']!r}")
    if not last["content"].strip():
        raise FieldError(field, "the last (assistant) message has empty content")
    if len(messages) < 2:
        raise FieldError(field, "expected at least one message before the final assistant message")
    return messages[:-1], last["content"]


def _demonstration(row: dict) -> dict:
    if "prompt" not in row and "completion" not in row and "messages" in row:
        messages = _messages(_require(row, "messages"), "messages")
        prompt, completion = _split_conversation(messages, "messages")
        if any(m["role"] == "assistant" for m in prompt):  # multi-turn: keep every turn for train_on=all_assistant
            return {"prompt": prompt, "completion": completion, "messages": messages}
        return {"prompt": prompt, "completion": completion}
    return {"prompt": _prompt(row), "completion": _response(row, "completion")}


def _implicit_prompt_pair(row: dict) -> tuple[list[dict[str, str]], str, str]:
    """Chosen/rejected are whole conversations; their shared leading messages are the prompt."""
    chosen = _messages(row["chosen"], "chosen")
    rejected = _messages(row["rejected"], "rejected")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    for field, messages in (("chosen", chosen), ("rejected", rejected)):
        if len(messages) - shared != 1:
            raise FieldError(
                field,
                f"without a 'prompt' field, chosen and rejected must share every message but the final "
                f"assistant one ({len(messages) - shared} messages differ)",
            )
    _, chosen_text = _split_conversation(chosen, "chosen")
    _, rejected_text = _split_conversation(rejected, "rejected")
    return chosen[:shared], chosen_text, rejected_text


def _strength(row: dict) -> float | None:
    value = row.get("strength")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise FieldError("strength", f"expected a number in [0, 1], got {_show(value)}")
    if not 0.0 <= value <= 1.0:
        raise FieldError("strength", f"expected a number in [0, 1], got {_show(value)}")
    return float(value)


def _comparison(row: dict) -> dict:
    if "prompt" not in row and is_messages(row.get("chosen")) and is_messages(row.get("rejected")):
        prompt, chosen, rejected = _implicit_prompt_pair(row)
    else:
        prompt = _prompt(row)
        chosen = _response(row, "chosen")
        rejected = _response(row, "rejected")
    if chosen == rejected:
        raise FieldError("rejected", "same text as 'chosen'; a comparison needs two different responses")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "strength": _strength(row)}


def _ranking(row: dict) -> dict:
    prompt = _prompt(row)
    raw = _require(row, "responses")
    if not isinstance(raw, list) or len(raw) < 2:
        raise FieldError("responses", f"expected a list of at least 2 responses, got {_show(raw)}")
    responses = [_response_value(r, f"responses[{i}]") for i, r in enumerate(raw)]
    first_seen: dict[str, int] = {}
    for i, response in enumerate(responses):
        if response in first_seen:
            raise FieldError("responses", f"responses[{first_seen[response]}] and responses[{i}] are identical")
        first_seen[response] = i
    ranks = _require(row, "ranks")
    if not isinstance(ranks, list):
        raise FieldError("ranks", f"expected a list of positive integers, got {_show(ranks)}")
    if len(ranks) != len(responses):
        raise FieldError("ranks", f"expected {len(responses)} ranks (one per response), got {len(ranks)}")
    for rank in ranks:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise FieldError("ranks", f"expected positive integers (1 = best), got {_show(rank)}")
    return {"prompt": prompt, "responses": responses, "ranks": list(ranks)}


def _rating(row: dict) -> dict:
    prompt = _prompt(row)
    completion = _response(row, "completion")
    label = _require(row, "label")
    if not isinstance(label, bool) and not (isinstance(label, int) and label in (0, 1)):
        raise FieldError("label", f"expected true or false (or 1 / 0), got {_show(label)}")
    return {"prompt": prompt, "completion": completion, "label": bool(label)}


def _prompt_record(row: dict) -> dict:
    if "prompt" not in row and "messages" in row:
        messages = _messages(_require(row, "messages"), "messages")
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise FieldError("messages", "expected at least one message before the assistant's reply")
        return {"prompt": messages}
    return {"prompt": _prompt(row)}


def validate_record(row: dict, kind: str) -> dict:
    """Check one row against ``kind`` and return its normalised form.

    Raises :class:`FieldError` naming the first bad field; readers prefix ``file:line:``.
    """
    if not isinstance(row, dict):
        raise DataError(f"expected an object with named fields, got {_show(row)}")
    if kind == "text":
        return {"text": _text(row, "text")}
    if kind == "demonstration":
        return _demonstration(row)
    if kind == "comparison":
        return _comparison(row)
    if kind == "ranking":
        return _ranking(row)
    if kind == "rating":
        return _rating(row)
    if kind == "prompt":
        return _prompt_record(row)
    raise DataError(f"unknown record kind {kind!r}; expected one of {', '.join(RECORD_KINDS)}")
