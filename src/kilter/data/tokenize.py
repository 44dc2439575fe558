"""Turn records into token ids: one convention shared by SFT, reward-model, DPO, KTO and PPO.

**The convention.**  A model input is ``prompt tokens + completion tokens``, where

* a plain-text prompt renders as ``prompt + PROMPT_SEP`` (``PROMPT_SEP = "\\n"``), and a
  message-list prompt renders with the tokenizer's chat template and its generation
  prompt (``apply_chat_template(..., add_generation_prompt=True)``);
* the completion is the response text followed by ``eos_token_id``.

Prompt and completion are tokenized *separately*, with no special tokens added by the
tokenizer, so the boundary between them is exact and the prompt ids used in training are
the very ids :func:`encode_prompt` gives for generation.  The one exception: when the
tokenizer normally starts every sequence with a BOS token (Llama-style), a plain-text prompt
gets that BOS in front; chat templates write their own.

**Labels** are ``-100`` on every prompt token and equal the input ids on the completion, so
the loss covers the response and its EOS.  The tokenizer's PAD differs from EOS (the model
loader guarantees it), so padding never hides the EOS from the loss.

**Multi-turn demonstrations** (``train_on="all_assistant"``, the default of ``kilter sft``)
learn every assistant turn of a conversation, not only the last: the whole conversation is
rendered once with the chat template, and the labels cover each assistant turn -- the
tokens the template marks with ``{% generation %}`` where it has those markers
(``return_assistant_tokens_mask``), otherwise the text between the turn's generation prompt
and the end of its rendering (its content and the template's end-of-turn text).  EOS
follows the last turn when the template has not written it.  Such a sequence is cut from
the right.  ``train_on="last"`` keeps the single prompt/completion convention above.

**Truncation** to ``max_length`` cuts the prompt first (from the left by default, keeping
the most recent context and a plain prompt's BOS) but never below ``min(len(prompt), max_length // 2)``
tokens, so a long completion cannot leave it with no context at all; then the completion
is cut from the right.  A cut completion loses its EOS: the model must not learn to stop
where the text was merely clipped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from kilter.errors import DataError, KilterError
from kilter.ops.tokens import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "PROMPT_SEP",
    "TRAIN_ON",
    "encode_completions",
    "encode_conversation",
    "encode_pair",
    "encode_prompt",
    "encode_prompt_completion",
    "encode_sft_records",
    "encode_text",
    "render_prompt",
]

TRAIN_ON = ("last", "all_assistant")

PROMPT_SEP = "\n"

Prompt = str | list[dict[str, str]]


def render_prompt(tokenizer: Any, prompt: Prompt) -> str:
    """The prompt as text, ready for the completion to follow it directly."""
    if isinstance(prompt, str):
        return prompt + PROMPT_SEP
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(
            f"conversational records (message lists) need a tokenizer with a chat template; {name} has none"
        )
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos_token_id]`` if the tokenizer normally starts sequences with BOS, else ``[]``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or bos == tokenizer.eos_token_id:
        return []
    with_specials = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if with_specials and with_specials[0] == bos else []


def _eos_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise KilterError("the tokenizer has no eos_token; load it through kilter.models so one is set")
    return eos


def _prompt_ids(tokenizer: Any, prompt: Prompt) -> tuple[list[int], list[int]]:
    """(kept-prefix ids never truncated, body ids) of a rendered prompt."""
    if isinstance(prompt, str):
        return _bos_prefix(tokenizer), _ids(tokenizer, render_prompt(tokenizer, prompt))
    return [], _ids(tokenizer, render_prompt(tokenizer, prompt))


def _completion_text(completion: str | list[dict[str, str]]) -> str:
    if isinstance(completion, list):  # [{"role": "assistant", "content": ...}]
        if len(completion) != 1 or not isinstance(completion[0], dict) or "content" not in completion[0]:
            raise DataError("a completion given as messages must be a list holding one assistant message")
        return completion[0]["content"]
    return completion


def _cut(ids: list[int], keep: int, side: str) -> list[int]:
    if len(ids) <= keep:
        return ids
    if keep <= 0:
        return []
    return ids[-keep:] if side == "left" else ids[:keep]


def _fit(
    prefix: list[int], body: list[int], completions: list[list[int]], max_length: int, side: str
) -> tuple[list[int], list[list[int]]]:
    """Truncate one prompt (shared by every completion) and each completion to ``max_length``.

    The prompt budget is set by the longest completion, so all completions see the same prompt.
    """
    if max_length < 2:
        raise KilterError(f"max_length must be at least 2, got {max_length}")
    if side not in ("left", "right"):
        raise KilterError(f"truncation_side must be 'left' or 'right', got {side!r}")
    prompt_len = len(prefix) + len(body)
    longest = max(len(c) for c in completions)
    if prompt_len + longest > max_length:
        floor = min(prompt_len, max_length // 2)
        budget = max(floor, max_length - longest)
        prompt = prefix + _cut(body, max(0, budget - len(prefix)), side)
    else:
        prompt = prefix + body
    room = max_length - len(prompt)
    return prompt, [c[:room] for c in completions]


def _example(prompt: list[int], completion: list[int]) -> dict:
    return {
        "input_ids": prompt + completion,
        "labels": [IGNORE_INDEX] * len(prompt) + completion,
        "prompt_len": len(prompt),
    }


def encode_completions(
    tokenizer: Any,
    prompt: Prompt,
    completions: Sequence[str | list[dict[str, str]]],
    max_length: int,
    truncation_side: str = "left",
    finished: Sequence[bool] | None = None,
) -> list[dict]:
    """Encode several completions of one prompt, all with the same (truncated) prompt ids.

    Returns one ``{"input_ids", "labels", "prompt_len"}`` per completion (lists of ints;
    labels are -100 on the ``prompt_len`` prompt tokens).  Used for K-way reward-model data.
    Each completion ends with EOS, except where ``finished`` says it was cut at the length limit:
    a sampled response that never ended is scored as unfinished, not as if it had ended.
    """
    if not completions:
        raise KilterError("encode_completions needs at least one completion")
    eos = _eos_id(tokenizer)
    prefix, body = _prompt_ids(tokenizer, prompt)
    ends = [True] * len(completions) if finished is None else [bool(f) for f in finished]
    encoded = [_ids(tokenizer, _completion_text(c)) + ([eos] if end else []) for c, end in zip(completions, ends)]
    kept_prompt, kept = _fit(prefix, body, encoded, max_length, truncation_side)
    return [_example(kept_prompt, c) for c in kept]


def encode_prompt_completion(
    tokenizer: Any,
    prompt: Prompt,
    completion: str | list[dict[str, str]],
    max_length: int,
    truncation_side: str = "left",
    finished: bool = True,
) -> dict:
    """``{"input_ids", "labels", "prompt_len"}`` for one prompt and its completion (+ EOS when ``finished``).

    ``truncation_side`` is where the prompt is cut when too long (see the module docstring).
    """
    return encode_completions(tokenizer, prompt, [completion], max_length, truncation_side, [finished])[0]


def encode_pair(
    tokenizer: Any,
    prompt: Prompt,
    chosen: str | list[dict[str, str]],
    rejected: str | list[dict[str, str]],
    max_length: int,
    truncation_side: str = "left",
) -> dict:
    """``{"chosen": {...}, "rejected": {...}}`` sharing identical prompt ids (RM and DPO)."""
    chosen_ex, rejected_ex = encode_completions(tokenizer, prompt, [chosen, rejected], max_length, truncation_side)
    return {"chosen": chosen_ex, "rejected": rejected_ex}


def encode_prompt(tokenizer: Any, prompt: Prompt, max_length: int) -> list[int]:
    """Prompt ids for generation: exactly the prompt part of the training examples.

    Cut from the left when longer than ``max_length`` (keeping any BOS in front).
    """
    if max_length < 1:
        raise KilterError(f"max_length must be at least 1, got {max_length}")
    prefix, body = _prompt_ids(tokenizer, prompt)
    if len(prefix) + len(body) <= max_length:
        return prefix + body
    if len(prefix) >= max_length:
        return (prefix + body)[-max_length:]
    return prefix + body[len(body) - (max_length - len(prefix)) :]


def encode_text(tokenizer: Any, text: str, max_length: int) -> dict:
    """A plain ``text`` record for language modelling: (BOS +) text + EOS, all tokens labelled.

    Cut from the right; a cut text loses its EOS.
    """
    ids = _bos_prefix(tokenizer) + _ids(tokenizer, text) + [_eos_id(tokenizer)]
    ids = ids[:max_length]
    return {"input_ids": ids, "labels": list(ids), "prompt_len": 0}


def _has_generation_markers(template: Any) -> bool:
    return isinstance(template, str) and re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _assistant_spans(tokenizer: Any, messages: list[dict[str, str]], full: str) -> list[tuple[int, int]]:
    """Character spans of ``full`` holding each assistant turn (content + end-of-turn text)."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True)
        through = _render(tokenizer, messages[: i + 1], False)
        if not (full.startswith(before) and full.startswith(through) and len(through) > len(before)):
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise DataError(
                f"the chat template of {name} does not render the conversation turn by turn (assistant turn "
                f"{len(spans) + 1} renders differently inside the whole conversation); use data.train_on=last"
            )
        spans.append((len(before), len(through)))
    return spans


def encode_conversation(tokenizer: Any, messages: list[dict[str, str]], max_length: int) -> dict:
    """``{"input_ids", "labels", "prompt_len"}`` of a whole conversation with every assistant turn labelled.

    ``prompt_len`` is the number of tokens before the first labelled one.  See the module
    docstring for which tokens count as an assistant turn.
    """
    if max_length < 2:
        raise KilterError(f"max_length must be at least 2, got {max_length}")
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        render_prompt(tokenizer, messages)  # raises the one-line "needs a chat template" error
    eos = _eos_id(tokenizer)
    if _has_generation_markers(template):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids = list(out["input_ids"])
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, out["assistant_masks"])]
    else:
        full = _render(tokenizer, messages, False)
        spans = _assistant_spans(tokenizer, messages, full)
        encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        # A token belongs to a turn when it starts inside the turn's span.
        labels = [t if any(a <= start < b for a, b in spans) else IGNORE_INDEX
                  for t, (start, _) in zip(ids, encoded["offset_mapping"])]
    end = len(labels) - next((i for i, t in enumerate(reversed(labels)) if t != IGNORE_INDEX), len(labels))
    if end == 0:
        raise DataError("the conversation has no assistant turn to learn")
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    if eos not in labels[start:end]:  # the template ends turns without EOS: learn to stop after the last one
        ids, labels = ids + [eos], labels + [eos]
    ids, labels = ids[:max_length], labels[:max_length]
    first = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))
    return {"input_ids": ids, "labels": labels, "prompt_len": first}


def encode_sft_records(tokenizer: Any, records: Iterable[dict], max_length: int, train_on: str = "last") -> list[dict]:
    """Encode demonstration records (``prompt`` + ``completion``, normalised by the readers)
    or ``text`` records; the result feeds :func:`kilter.data.collate.pad_batch` or packing.

    ``train_on="all_assistant"`` learns every assistant turn of multi-turn conversations
    (records that keep ``messages``); ``"last"`` learns only the final completion.
    """
    if train_on not in TRAIN_ON:
        raise KilterError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    out = []
    for record in records:
        if "text" in record and "completion" not in record:
            out.append(encode_text(tokenizer, record["text"], max_length))
        elif train_on == "all_assistant" and "messages" in record:
            out.append(encode_conversation(tokenizer, record["messages"], max_length))
        else:
            out.append(encode_prompt_completion(tokenizer, record["prompt"], record["completion"], max_length))
    return out
