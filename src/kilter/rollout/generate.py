"""Batched sampling with the KV cache through ``transformers``' ``generate``.

Prompts are left-padded so every row's new tokens start at the same column; generation
stops as soon as every row has produced EOS (or a stop string), and each response is cut
right after its first EOS, which stays part of the response.

Every sampling knob is passed explicitly.  ``generate`` otherwise fills unset ones from the
model's ``generation_config`` and from library defaults -- notably ``top_k=50`` and any
``repetition_penalty`` a checkpoint ships with -- and then the tokens would come from a
different distribution than the one the trainer scores, biasing the PPO ratio.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kilter.errors import ConfigError
from kilter.rollout import fast_decode


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
    """0 disables top-k filtering."""
    do_sample: bool = True
    stop_strings: list[str] | None = None

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0 when sampling, got {self.temperature} "
                              "(use do_sample=false for greedy decoding)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")


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


def hf_generate_kwargs(params: SamplingParams, pad_id: int, eos_id: int) -> dict:
    """Keyword arguments for ``model.generate`` that pin down the sampling distribution exactly."""
    params.check()
    kwargs: dict = dict(
        max_new_tokens=params.max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id, use_cache=True,
        num_beams=1, num_return_sequences=1, repetition_penalty=1.0, no_repeat_ngram_size=0,
        min_length=0, min_new_tokens=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, min_p=None,
        # PAD is never sampled: a sampled PAD would end the response silently and never be trained
        # down.  The scorer removes it from the distribution too (RolloutBatch.pad_id).
        bad_words_ids=None, suppress_tokens=[pad_id], begin_suppress_tokens=None,
        # Each process generates on its own: transformers would otherwise turn on synced_gpus for an
        # FSDP-sharded model and wait for every rank at each token (rank 0's samples would hang).
        synced_gpus=False,
    )
    if params.do_sample:
        kwargs.update(do_sample=True, temperature=float(params.temperature), top_p=float(params.top_p),
                      top_k=int(params.top_k))
    else:
        kwargs.update(do_sample=False, temperature=1.0, top_p=1.0, top_k=0)
    return kwargs


@torch.no_grad()
def generate_ids(model, tokenizer, prompt_ids: list[list[int]], params: SamplingParams,
                 batch_size: int = 64, fast: bool = True) -> Generation:
    """Sample one response per prompt (repeat prompts for several samples).

    ``fast`` uses :mod:`kilter.rollout.fast_decode` (same distribution, far less per-step
    overhead) when it supports the model and no stop strings are set; otherwise, or with
    ``fast=False``, ``model.generate``.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    base_kwargs = hf_generate_kwargs(params, pad, eos)
    if params.stop_strings:
        base_kwargs.update(stop_strings=params.stop_strings, tokenizer=tokenizer)
    decoder = None
    if fast and not params.stop_strings and prompt_ids and all(prompt_ids):
        decoder = fast_decode.prepare(model, max(map(len, prompt_ids)) + params.max_new_tokens)
    responses: list[list[int]] = []
    finished: list[bool] = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start:start + batch_size]
        ids, mask = left_pad(chunk, pad, device)
        if decoder is not None:
            new = fast_decode.fast_generate(decoder, ids, mask, params, eos, pad).tolist()
        else:
            out = model.generate(input_ids=ids, attention_mask=mask, **base_kwargs)
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
