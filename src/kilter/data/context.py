"""A context shown to a model before every prompt: read from a string or a file, and placed in front.

Context distillation (``kilter distill``) conditions a teacher on such a context -- an instruction,
example reviews, an HHH prompt with example dialogues -- and trains a student without it.  Text
contexts go verbatim in front of text prompts (write your own separator at the end of the context)
and as a system message in front of conversations; a context given as a list of messages (example
dialogues) goes in front of conversational prompts and is rendered with the chat template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kilter.data.tokenize import render_prompt
from kilter.errors import ConfigError, DataError

__all__ = ["Context", "load_context", "with_context", "context_tokens"]

Prompt = str | list[dict[str, str]]
Context = str | list[dict[str, str]]


def load_context(context: str | None, context_file: str | None) -> Context:
    """The context as text or as a list of messages; exactly one of ``context`` / ``context_file``.

    A ``.json`` file holds a string or a list of ``{role, content}`` messages; any other file is text,
    read verbatim (a trailing newline included).
    """
    if (context is None) == (context_file is None):
        raise ConfigError("give exactly one of context (a string) and context_file (a path)")
    if context is not None:
        return context
    path = Path(context_file)
    if not path.is_file():
        raise ConfigError(f"context_file {path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".json":
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                              and isinstance(m.get("content"), str) for m in value):
        raise DataError(f"{path}: expected a string or a list of {{role, content}} messages")
    return value


def with_context(context: Context, prompt: Prompt) -> Prompt:
    """The teacher's prompt: ``context`` in front of ``prompt`` (an empty context changes nothing).

    Text + text: concatenated verbatim.  Text + conversation: a system message (merged in front of
    the conversation's own system message).  Messages + conversation: prepended.
    """
    if not context:
        return prompt
    if isinstance(prompt, str):
        if not isinstance(context, str):
            raise DataError("a conversational context (a list of messages) needs conversational prompts (messages)")
        return context + prompt
    if isinstance(context, list):
        return list(context) + list(prompt)
    if prompt and prompt[0].get("role") == "system":
        return [{"role": "system", "content": context + "\n\n" + prompt[0]["content"]}] + list(prompt[1:])
    return [{"role": "system", "content": context}] + list(prompt)


def context_tokens(tokenizer: Any, context: Context) -> int:
    """An upper bound on the tokens the context adds, so that a prompt limit raised by it never cuts it."""
    if not context:
        return 0
    text = context if isinstance(context, str) else render_prompt(tokenizer, context)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 8
