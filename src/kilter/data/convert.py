"""Convert Anthropic HH-style transcripts into prompt/chosen/rejected comparison records.

The Anthropic HH preference data (Bai et al., 2022) stores each comparison as two whole
transcripts, ``chosen`` and ``rejected``, of ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` turns
that share every turn except the final assistant response.  Kilter's comparison record
keeps the shared history once, as the prompt, and the two final responses apart::

    prompt   = "\\n\\nHuman: Hi\\n\\nAssistant: Hello!\\n\\nHuman: Tell me a joke\\n\\nAssistant:"
    chosen   = "Why did the ..."      (leading whitespace removed)
    rejected = "No."

With ``conversational=True`` the prompt becomes a message list and the responses become
``[{"role": "assistant", "content": ...}]`` lists, the Hugging Face preference format.
"""

from __future__ import annotations

import logging
import re

from kilter.config import BaseConfig
from kilter.data.readers import iter_raw_rows, write_jsonl
from kilter.data.records import FieldError
from kilter.errors import DataError

__all__ = ["split_hh_pair", "hh_to_messages", "ConvertHHConfig", "run", "ASSISTANT_MARKER"]

log = logging.getLogger("kilter.data")

ASSISTANT_MARKER = "\n\nAssistant:"
_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}


def hh_to_messages(transcript: str, field: str = "transcript") -> list[dict[str, str]]:
    """Split an HH transcript into ``{role, content}`` messages (Human -> user).

    Contents are stripped of surrounding whitespace.  A transcript ending in an empty
    ``Assistant:`` turn (a prompt awaiting the reply) ends with the last user message: the
    empty turn is what a chat template's generation prompt adds back.
    """
    parts = _TURN.split(transcript)
    if parts[0].strip() or len(parts) < 3:
        raise FieldError(field, "expected a transcript of '\\n\\nHuman: ...' / '\\n\\nAssistant: ...' turns")
    messages = [
        {"role": _ROLES[speaker], "content": content.strip()} for speaker, content in zip(parts[1::2], parts[2::2])
    ]
    if messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def _final_turn_start(transcript: str, field: str) -> int:
    """Index just past the last ``\\n\\nAssistant:`` marker."""
    at = transcript.rfind(ASSISTANT_MARKER)
    if at < 0:
        raise FieldError(field, "no '\\n\\nAssistant:' turn in the transcript")
    return at + len(ASSISTANT_MARKER)


def split_hh_pair(chosen: str, rejected: str, conversational: bool = False) -> dict:
    """Split two HH transcripts into ``{prompt, chosen, rejected}``.

    The prompt is the shared history up to and including the last ``"\\n\\nAssistant:"``,
    kept as the raw string; the responses follow it, with leading whitespace removed.
    Raises :class:`FieldError` (a :class:`DataError`) when a transcript has no assistant
    turn, the histories differ, a response is empty, or both responses are the same.
    """
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str):
            raise FieldError(field, f"expected a transcript string, got {type(value).__name__}")
    cut_chosen = _final_turn_start(chosen, "chosen")
    cut_rejected = _final_turn_start(rejected, "rejected")
    prompt = chosen[:cut_chosen]
    if prompt != rejected[:cut_rejected]:
        other = rejected[:cut_rejected]
        differ = next((i for i, (a, b) in enumerate(zip(prompt, other)) if a != b), min(len(prompt), len(other)))
        raise FieldError(
            "rejected",
            f"does not share the history of 'chosen' before the final Assistant turn (first difference at character {differ})",
        )
    chosen_text = chosen[cut_chosen:].lstrip()
    rejected_text = rejected[cut_rejected:].lstrip()
    for field, text in (("chosen", chosen_text), ("rejected", rejected_text)):
        if not text.strip():
            raise FieldError(field, "the final Assistant turn is empty")
    if chosen_text == rejected_text:
        raise FieldError("rejected", "same final response as 'chosen'; a comparison needs two different responses")
    if not conversational:
        return {"prompt": prompt, "chosen": chosen_text, "rejected": rejected_text}
    return {
        "prompt": hh_to_messages(prompt, "chosen"),
        "chosen": [{"role": "assistant", "content": chosen_text.strip()}],
        "rejected": [{"role": "assistant", "content": rejected_text.strip()}],
    }


class ConvertHHConfig(BaseConfig):
    """Turn a file of HH-style chosen/rejected transcripts into prompt/chosen/rejected JSONL."""

    input: str
    """Data file (.jsonl/.json/.csv/.tsv/.parquet) or saved `datasets` folder with string columns `chosen` and `rejected`."""
    output: str
    """JSONL file to write (written atomically; parent folders are created)."""
    split: str | None = None
    """Split to read when `input` is a saved DatasetDict folder (default: train)."""
    conversational: bool = False
    """Write the prompt as a message list and chosen/rejected as assistant-message lists."""
    skip_invalid: bool = False
    """Skip (and count) rows that cannot be converted instead of stopping at the first one."""


def run(cfg: ConvertHHConfig) -> int:
    pairs: list[dict] = []
    skipped = 0
    first_error: str | None = None
    for where, row, problem in iter_raw_rows(cfg.input, cfg.split):
        try:
            if problem is not None:
                raise DataError(problem)
            if not isinstance(row, dict):
                raise DataError(f"expected an object with 'chosen' and 'rejected', got {type(row).__name__}")
            for field in ("chosen", "rejected"):
                if row.get(field) is None:
                    raise FieldError(field, "missing")
            pairs.append(split_hh_pair(row["chosen"], row["rejected"], cfg.conversational))
        except DataError as exc:
            message = f"{where}: {exc}"
            if not cfg.skip_invalid:
                raise DataError(message) from None
            skipped += 1
            first_error = first_error or message
    if skipped:
        log.warning("skipped %d invalid rows in %s (first: %s)", skipped, cfg.input, first_error)
    if not pairs:
        raise DataError(f"{cfg.input}: no convertible rows" + (f" (first error: {first_error})" if first_error else ""))
    write_jsonl(cfg.output, pairs)
    print(f"convert-hh: wrote {len(pairs)} comparisons to {cfg.output} ({skipped} invalid rows skipped)")
    return 0
