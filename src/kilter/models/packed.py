"""Padding-free batches and completion-only outputs for causal-LM losses.

Two speedups that change no number a loss sees (up to float rounding), shared by the SFT,
reward-model and DPO trainers:

* the examples of a micro-batch are packed into rows with position ids that restart at 0 per
  example and no attention mask, so no FLOPs go to padding; transformers isolates each
  example's attention with its packed-sequence masks, whose cost grows with the square of the
  row width, so :func:`best_packing` picks the narrowest rows that waste no slots.  (A
  gather-into-segments attention that avoids the square was tried and measured: on CPU its
  index copies cost as much as the narrow rows' masked attention, so it is not used.)
* the LM head (or the reward head) runs only at the positions a loss reads, instead of at
  every prompt and pad position.

Each is checked once per model against the ordinary forward (:func:`fast_causal_lm`) and
skipped when the numbers differ.
"""

from __future__ import annotations

import torch

from kilter import fastpaths
from kilter.ops.tokens import IGNORE_INDEX


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def model_attention_mask(model, mask: torch.Tensor | None) -> torch.Tensor | None:
    """``mask`` in the form ``model``'s attention takes a custom 4-D mask.

    transformers passes a 4-D mask to the attention function as it is.  SDPA reads a bool mask
    (True: attend); eager attention (Gemma-2, whose soft-capped scores SDPA cannot compute)
    *adds* the mask to the scores, so a bool mask would add 0/1 instead of blocking: it gets
    the additive form (0 or the dtype's minimum).
    """
    config = getattr(model, "config", None)
    if mask is None or mask.dtype != torch.bool or getattr(config, "_attn_implementation", None) != "eager":
        return mask
    dtype = next(model.parameters()).dtype
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def head_transform(model):
    """What the model's causal-LM forward does to the LM head's output, as a function; None for nothing.

    Gemma-2/3 soft-cap the logits (``c * tanh(z / c)``), Granite divides them by
    ``logits_scaling``, Cohere multiplies them by ``logit_scale``.  A split forward that calls
    the head itself must do the same: with small random weights the logits are too small for
    the probe to notice a missing cap.
    """
    config = getattr(model, "config", None)
    cap = getattr(config, "final_logit_softcapping", None)
    divide = getattr(config, "logits_scaling", None)
    multiply = getattr(config, "logit_scale", None)
    if not cap and divide in (None, 1, 1.0) and multiply in (None, 1, 1.0):
        return None

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if divide not in (None, 1, 1.0):
            logits = logits / divide
        if multiply not in (None, 1, 1.0):
            logits = logits * multiply
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform



def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing bins of example indices, each bin holding at most ``capacity`` tokens
    (an example longer than ``capacity`` gets a bin of its own)."""
    rows: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        for r, u in enumerate(used):
            if u + lengths[i] <= capacity:
                rows[r].append(i)
                used[r] += lengths[i]
                break
        else:
            rows.append([i])
            used.append(lengths[i])
    return rows


def best_packing(lengths: list[int], capacity: int, attention_weight: float = 0.0) -> tuple[list[list[int]], int]:
    """(rows, width) of :func:`pack_rows` at the row capacity between the longest example and
    ``capacity`` that costs least: ``rows * width`` token slots plus ``attention_weight *
    rows * width**2`` for the attention scores of the (masked, so not sparse) rows -- see
    :func:`attention_weight`; ties go to the narrower rows."""
    longest = max(lengths)
    best: tuple[float, int, list[list[int]]] | None = None
    for cap in sorted({longest, *range(longest, max(capacity, longest) + 1, 8), max(capacity, longest)}):
        rows = pack_rows(lengths, cap)
        width = max(sum(lengths[i] for i in row) for row in rows)
        cost = len(rows) * width * (1.0 + attention_weight * width)
        if best is None or (cost, width) < (best[0], best[1]):
            best = (cost, width, rows)
    return best[2], best[1]


def attention_weight(model) -> float:
    """Cost of one attention score relative to one token slot, for :func:`best_packing`.

    Per layer a token costs ~2 (4 d^2 + 3 d f) multiply-adds in its projections and MLP
    (hidden size d, MLP width f), and a row of width W costs 2 * 2 W^2 d in QK^T and AV.
    0 (slots only) when the config does not say.
    """
    config = getattr(model, "config", None)
    d = getattr(config, "hidden_size", None)
    f = getattr(config, "intermediate_size", None) or (4 * d if d else None)
    if not d:
        return 0.0
    return 4.0 * d / (8.0 * d * d + 6.0 * d * f)


def pack_micro_batch(examples: list[dict], pad_id: int, capacity: int, ignore_index: int = IGNORE_INDEX,
                     attention_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """``input_ids``, ``labels``, ``position_ids``, ``example_index`` (R, W) holding every example
    once, packed by :func:`best_packing` into rows of at most ``capacity`` tokens (or the longest
    example).

    No ``attention_mask``: example boundaries are where the position ids restart.  Each
    example's first label becomes ``ignore_index``, since it would be predicted from the
    previous example's last token (with right padding it is dropped by the shift anyway).
    The row tail is padding whose positions also restart at 0, so it forms its own sequence
    that no real token attends to.  ``example_index`` holds each token's example (-1 on
    padding), ``last_index`` (N,) the flat index (row * W + column) of each example's last
    token, ``n_tokens`` (0-dim) counts the real tokens.  Examples without ``labels`` get none
    (all ``ignore_index``).
    """
    lengths = [len(ex["input_ids"]) for ex in examples]
    rows, width = best_packing(lengths, capacity, attention_weight)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), ignore_index, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    owner = torch.full((len(rows), width), -1, dtype=torch.long)
    last = torch.zeros(len(examples), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = lengths[i]
            input_ids[r, start:start + n] = torch.as_tensor(list(examples[i]["input_ids"]), dtype=torch.long)
            if "labels" in examples[i]:
                labels[r, start + 1:start + n] = torch.as_tensor(list(examples[i]["labels"])[1:], dtype=torch.long)
            positions[r, start:start + n] = torch.arange(n)
            owner[r, start:start + n] = i
            last[i] = r * width + start + n - 1
            start += n
        positions[r, start:] = torch.arange(width - start)
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions, "example_index": owner,
            "last_index": last, "n_tokens": torch.tensor(sum(lengths))}


def _quiet_padding_warning(body: torch.nn.Module) -> None:
    """Packed rows end in padding and carry no attention mask on purpose (position ids mark the
    sequences); transformers' "We strongly recommend passing in an `attention_mask`" check
    (GPT-2 and others) would tell the user otherwise, so it is switched off on this decoder."""
    if hasattr(body, "warn_if_padding_and_no_attention_mask"):
        body.warn_if_padding_and_no_attention_mask = lambda *args, **kwargs: None


def split_causal_lm(model) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder that returns hidden states, LM head) of a Hugging Face causal LM, LoRA included; else None."""
    base = model.get_base_model() if _is_peft(model) else model
    try:
        body, head = base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if not isinstance(body, torch.nn.Module) or not isinstance(head, torch.nn.Module) or body is base:
        return None
    _quiet_padding_warning(body)
    return body, head


class CompletionLogits(torch.nn.Module):
    """Logits only where a label follows: (B, T) inputs + (B, T-1) bool ``select`` -> (N, V), N = select.sum().

    ``select[b, t]`` marks the positions whose logits predict ``labels[b, t + 1]``.  Wraps the
    whole model (so DistributedDataParallel sees every parameter) but calls its decoder and
    head directly, skipping the (B, T, V) logits of prompt and padding positions.
    """

    def __init__(self, model: torch.nn.Module, body: torch.nn.Module, head: torch.nn.Module):
        super().__init__()
        self.model = model
        object.__setattr__(self, "_body", body)  # already registered through self.model
        object.__setattr__(self, "_head", head)
        self.shares_prefix = False
        """True once :func:`kilter.models.shared_prefix.check_lm` passed for this model."""
        self.attention_weight = attention_weight(model)
        """For :func:`best_packing`."""
        self._transform = head_transform(model)

    def forward(self, input_ids, attention_mask=None, position_ids=None, select=None, index=None):  # type: ignore[override]
        """``index`` (M,) flat positions (row * W + column) instead of ``select``: positions may repeat
        (a shared prompt's last token predicts every sibling's first token)."""
        hidden = self._body(input_ids=input_ids, attention_mask=model_attention_mask(self.model, attention_mask),
                            position_ids=position_ids, use_cache=False)[0]
        if index is not None:
            logits = self._head(hidden.reshape(-1, hidden.shape[-1])[index])
        else:
            logits = self._head(hidden[:, :-1][select])
        return logits if self._transform is None else self._transform(logits)


@torch.no_grad()
def _probe_logits(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False, **kwargs).logits.float()


def fast_causal_lm(model, device: str, packing: bool = True) -> tuple[CompletionLogits | None, bool]:
    """(completion-only logits wrapper or None, padding-free packing usable) for this model.

    Verified on a probe against the model's ordinary forward, in eval mode (LoRA dropout off):
    a 7-token sequence ``a`` alone, then the packed row ``[a, a[:5], a[:2]]`` whose second and
    third segments must repeat the first 5 and 2 logits of ``a`` (causality).  A model whose
    decoder/head split or packed attention gives other logits (softcapping, custom masks, old
    transformers) keeps the ordinary path.
    """
    split = split_causal_lm(model)
    was_training = model.training
    model.eval()
    try:
        vocab = model.get_input_embeddings().weight.shape[0]
        a = torch.randint(0, vocab, (1, 7), generator=torch.Generator().manual_seed(0)).to(device)
        full = _probe_logits(model, a)[0]
        ids = torch.cat([a, a[:, :5], a[:, :2]], dim=1)
        pos = torch.cat([torch.arange(7), torch.arange(5), torch.arange(2)]).unsqueeze(0).to(device)
        expected = torch.cat([full, full[:5], full[:2]])[:-1]  # logits that predict a next token

        def close(x: torch.Tensor, y: torch.Tensor) -> bool:
            return torch.allclose(x.float(), y, atol=1e-4, rtol=1e-4)

        wrapper = CompletionLogits(model, *split) if split is not None else None
        packed_ok = False
        with torch.no_grad():
            every = torch.ones(1, 13, dtype=torch.bool, device=device)
            if wrapper is not None and packing:
                packed_ok = close(wrapper(ids, position_ids=pos, select=every), expected)
            if wrapper is not None and not packed_ok:
                one = wrapper(a, select=torch.ones(1, 6, dtype=torch.bool, device=device))
                wrapper = wrapper if close(one, full[:-1]) else None
            if wrapper is None and packing:
                packed_ok = close(_probe_logits(model, ids, position_ids=pos)[0, :-1], expected)
        reason = "" if packed_ok else "packed rows give other logits than separate sequences"
        head_reason = "" if wrapper is not None else ("no separable decoder/LM head" if split is None
                                                      else "its split forward gives other logits")
    except fastpaths.PROBE_ERRORS as exc:  # an unusual model keeps the ordinary path
        wrapper, packed_ok = None, False
        reason = head_reason = f"{type(exc).__name__}: {exc}"
    finally:
        model.train(was_training)
    fastpaths.decide("completion_logits", wrapper is not None, head_reason)
    if packing:
        fastpaths.decide("padding_free", packed_ok, reason)
    if wrapper is not None and packed_ok:
        from kilter.models import shared_prefix

        wrapper.shares_prefix = shared_prefix.check_lm(model, wrapper, device)
    return wrapper, packed_ok


# --------------------------------------------------------------------------- reward models


class LastTokenScores(torch.nn.Module):
    """Reward-model scores of packed examples: the score head on each example's last hidden state.

    ``forward(input_ids, position_ids, last_index)``: (R, W) packed rows and (N,) flat indices
    of the examples' last tokens -> (N,) fp32 raw scores (without the normalizing bias), the
    numbers :func:`kilter.models.reward.raw_scores` gives for the same examples padded.
    Wraps the whole model, so DistributedDataParallel sees every parameter.
    """

    def __init__(self, model: torch.nn.Module, body: torch.nn.Module, head: torch.nn.Module):
        super().__init__()
        self.model = model
        object.__setattr__(self, "_body", body)
        object.__setattr__(self, "_head", head)
        self.shares_prefix = False
        """True once :func:`kilter.models.shared_prefix.check_scores` passed for this model."""
        self.attention_weight = attention_weight(model)
        """For :func:`best_packing`."""

    def forward(self, input_ids, position_ids, last_index, attention_mask=None):  # type: ignore[override]
        hidden = self._body(input_ids=input_ids, attention_mask=model_attention_mask(self.model, attention_mask),
                            position_ids=position_ids, use_cache=False)[0]
        # a copy, not a view of the head output: FSDP2 hooks its backward on the module output
        return self._head(hidden.reshape(-1, hidden.shape[-1])[last_index])[:, 0].float().clone()


def split_sequence_classifier(model) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder that returns hidden states, score head) of a HF ``*ForSequenceClassification``; else None."""
    base = model.get_base_model() if _is_peft(model) else model
    body = getattr(base, getattr(base, "base_model_prefix", "") or "model", None)
    head = getattr(base, "score", None)
    if not isinstance(body, torch.nn.Module) or not isinstance(head, torch.nn.Module) or body is base:
        return None
    _quiet_padding_warning(body)
    return body, head


def fast_reward_model(model, device: str) -> LastTokenScores | None:
    """A :class:`LastTokenScores` for ``model`` if, on a probe, packed scores equal the padded ones."""
    from kilter.models.reward import raw_scores

    split = split_sequence_classifier(model)
    if split is None:
        return None
    wrapper = LastTokenScores(model, *split)
    was_training = model.training
    model.eval()
    try:
        vocab = model.get_input_embeddings().weight.shape[0]
        gen = torch.Generator().manual_seed(0)
        pad = int(getattr(model.config, "pad_token_id", None) or 0)
        # no PAD inside the probe: padded pooling finds the last token by looking for PAD
        seqs = [[t if t != pad else (pad + 1) % vocab for t in torch.randint(0, vocab, (n,), generator=gen).tolist()]
                for n in (7, 3, 5)]
        ids = torch.full((3, 7), pad, dtype=torch.long)
        mask = torch.zeros((3, 7), dtype=torch.long)
        for i, seq in enumerate(seqs):
            ids[i, :len(seq)] = torch.tensor(seq)
            mask[i, :len(seq)] = 1
        batch = pack_micro_batch([{"input_ids": s} for s in seqs], pad, capacity=10)
        with torch.no_grad():
            want = raw_scores(model, ids.to(device), mask.to(device))
            got = wrapper(batch["input_ids"].to(device), batch["position_ids"].to(device),
                          batch["last_index"].to(device))
        ok = bool(torch.allclose(got, want, atol=1e-4, rtol=1e-4))
        reason = "" if ok else "packed rows give other scores than the padded reward model"
    except fastpaths.PROBE_ERRORS as exc:  # an unusual model keeps the padded path
        ok, reason = False, f"{type(exc).__name__}: {exc}"
    finally:
        model.train(was_training)
    fastpaths.decide("padding_free_scores", ok, reason)
    if ok:
        from kilter.models import shared_prefix

        wrapper.shares_prefix = shared_prefix.check_scores(model, wrapper, device)
    return wrapper if ok else None
