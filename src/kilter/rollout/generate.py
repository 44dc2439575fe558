"""Batched sampling with the KV cache through ``transformers``' ``generate``.

Prompts are left-padded so every row's new tokens start at the same column; generation
stops as soon as every row has produced EOS (or a stop string), and each response is cut
right after its first EOS, which stays part of the response.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Generation:
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    """Tokens after the prompt, cut after the first EOS (EOS included when produced)."""
    texts: list[str]
    """Decoded responses without special tokens."""
    finished: list[bool]
    """True where the response ended with EOS or a stop string rather than the length limit."""
    extras: dict = field(default_factory=dict)


@dataclass
class SamplingParams:
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True
    stop_strings: list[str] | None = None


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def cut_after_eos(tokens: list[int], eos_id: int, pad_id: int) -> tuple[list[int], bool]:
    out = []
    for t in tokens:
        if t == pad_id:
            break
        out.append(t)
        if t == eos_id:
            return out, True
    return out, False


@torch.no_grad()
def generate_ids(model, tokenizer, prompt_ids: list[list[int]], params: SamplingParams,
                 batch_size: int = 64) -> Generation:
    """Sample one response per prompt (repeat prompts for several samples)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    responses: list[list[int]] = []
    finished: list[bool] = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start:start + batch_size]
        ids, mask = left_pad(chunk, pad, device)
        kwargs = dict(
            input_ids=ids, attention_mask=mask, max_new_tokens=params.max_new_tokens,
            pad_token_id=pad, eos_token_id=eos, use_cache=True,
        )
        if params.do_sample:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                          top_k=params.top_k if params.top_k > 0 else None)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if params.stop_strings:
            kwargs.update(stop_strings=params.stop_strings, tokenizer=tokenizer)
        out = model.generate(**kwargs)
        new = out[:, ids.shape[1]:].tolist()
        for row in new:
            resp, done = cut_after_eos(row, eos, pad)
            if not done and params.stop_strings:
                text = tokenizer.decode(resp, skip_special_tokens=True)
                done = any(s in text for s in params.stop_strings)
            responses.append(resp)
            finished.append(done)
    if was_training:
        model.train()
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    if params.stop_strings:
        texts = [_cut_stop(t, params.stop_strings) for t in texts]
    return Generation(prompt_ids=list(prompt_ids), response_ids=responses, texts=texts, finished=finished)


def _cut_stop(text: str, stops: list[str]) -> str:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return text[:cut] if cut >= 0 else text


def generate_texts(model, tokenizer, prompts: list, params: SamplingParams, max_prompt_length: int = 256,
                   batch_size: int = 64) -> Generation:
    """Render prompts (strings or message lists) with Kilter's prompt convention and sample."""
    from kilter.data.tokenize import encode_prompt

    prompt_ids = [encode_prompt(tokenizer, p, max_prompt_length) for p in prompts]
    return generate_ids(model, tokenizer, prompt_ids, params, batch_size=batch_size)
