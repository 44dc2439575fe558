"""Per-token log-probabilities and entropies from LM logits, without a full fp32 copy.

A (B, T, V) fp32 log-softmax for a 150k vocabulary is gigabytes; the policy, the old
policy and the reference model each need one per batch.  These functions walk the
logits in chunks of at most ``max_chunk_elements`` entries, upcast only the chunk, and
keep per-token results.  Their backward passes recompute the softmax chunk by chunk
from the saved (original dtype) logits, so training is as frugal as inference: the only
full-size tensor created is the gradient itself.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.autograd.function import once_differentiable

# 2**24 fp32 values = 64 MiB per chunk: large enough that the python loop is cheap.
DEFAULT_CHUNK_ELEMENTS = 2**24


def _chunks(batch: int, time: int, vocab: int, max_elements: int) -> Iterator[tuple[slice, slice]]:
    """(batch slice, time slice) pairs covering a (B, T) grid; a chunk holds <= max(max_elements, V) logits.

    Slicing only the two leading dims keeps every chunk a view, even when the logits are
    a non-contiguous slice such as ``logits[:, :-1]`` (flattening those would copy them).
    """
    rows = max(1, max_elements // max(vocab, 1))
    if rows >= time:
        step = max(1, rows // max(time, 1))
        for b0 in range(0, batch, step):
            yield slice(b0, min(b0 + step, batch)), slice(0, time)
    else:
        for b in range(batch):
            for t0 in range(0, time, rows):
                yield slice(b, b + 1), slice(t0, min(t0 + rows, time))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 logits are upcast; fp64 stays fp64 (gradcheck relies on it).
    return torch.promote_types(dtype, torch.float32)


def _scaled(logits: torch.Tensor, dtype: torch.dtype, temperature: float, exclude: int) -> torch.Tensor:
    """A chunk of logits upcast and divided by the temperature; token ``exclude`` (>= 0) gets -inf."""
    scaled = logits.to(dtype) / temperature
    if 0 <= exclude < scaled.shape[-1]:
        scaled[..., exclude] = -torch.inf  # a fresh tensor (the division copied it): in place is safe
    return scaled


class _SelectiveLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, temperature, max_elements, exclude):  # type: ignore[override]
        batch, time, vocab = logits.shape
        dtype = _compute_dtype(logits.dtype)
        out = torch.empty(batch, time, dtype=dtype, device=logits.device)
        lse = torch.empty(batch, time, dtype=dtype, device=logits.device)
        for sb, st in _chunks(batch, time, vocab, max_elements):
            scaled = _scaled(logits[sb, st], dtype, temperature, exclude)
            chunk_lse = torch.logsumexp(scaled, dim=-1)
            picked = scaled.gather(-1, labels[sb, st].unsqueeze(-1)).squeeze(-1)
            out[sb, st] = picked - chunk_lse
            lse[sb, st] = chunk_lse
        ctx.save_for_backward(logits, labels, lse)
        ctx.temperature = temperature
        ctx.max_elements = max_elements
        ctx.exclude = exclude
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        logits, labels, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        batch, time, vocab = logits.shape
        grad = torch.empty_like(logits)
        temperature = ctx.temperature
        for sb, st in _chunks(batch, time, vocab, ctx.max_elements):
            scaled = _scaled(logits[sb, st], lse.dtype, temperature, ctx.exclude)
            probs = torch.exp(scaled - lse[sb, st].unsqueeze(-1))
            g = grad_out[sb, st].to(lse.dtype).unsqueeze(-1)
            # d log p(y) / d l = onehot(y) - softmax(l); then chain through l = z / temperature
            chunk_grad = -probs * g
            chunk_grad.scatter_add_(-1, labels[sb, st].unsqueeze(-1), g)
            grad[sb, st] = (chunk_grad / temperature).to(grad.dtype)
        return grad, None, None, None, None


def selective_log_softmax(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    exclude_token: int | None = None,
) -> torch.Tensor:
    """log softmax(logits / temperature) at ``labels``: the log-probability of each chosen token.

    logits: (B, T, V) (or (N, V)); labels: (B, T) (or (N,)) token ids in [0, V)
    -> (B, T) in fp32 (fp64 if the logits are fp64).

    Equals ``torch.log_softmax(logits / temperature, -1).gather(-1, labels[..., None])``
    but computes log-sum-exp chunk by chunk, so no (B, T, V) fp32 tensor exists at once
    (forward or backward).  Differentiable with respect to ``logits`` (first order only).
    The temperature must match the one used when sampling, or the PPO ratio is biased.
    ``exclude_token`` (the PAD id of rollouts) is removed from the distribution (logit -inf),
    as every sampler removes it: the policy that samples and the one that is scored are one.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    squeeze = logits.dim() == 2
    if squeeze:
        logits, labels = logits.unsqueeze(0), labels.unsqueeze(0)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits {tuple(logits.shape)}")
    exclude = -1 if exclude_token is None else int(exclude_token)
    out = _SelectiveLogSoftmax.apply(logits, labels.long(), float(temperature), int(max_chunk_elements), exclude)
    return out.squeeze(0) if squeeze else out


def _p_log_p(log_probs: torch.Tensor) -> torch.Tensor:
    # Tokens with probability 0 (logits of -inf, e.g. after top-k filtering) contribute 0, not nan.
    return torch.where(log_probs > -torch.inf, log_probs.exp() * log_probs, torch.zeros_like(log_probs))


class _EntropyFromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, temperature, max_elements, exclude):  # type: ignore[override]
        batch, time, vocab = logits.shape
        dtype = _compute_dtype(logits.dtype)
        out = torch.empty(batch, time, dtype=dtype, device=logits.device)
        for sb, st in _chunks(batch, time, vocab, max_elements):
            scaled = _scaled(logits[sb, st], dtype, temperature, exclude)
            log_probs = torch.log_softmax(scaled, dim=-1)
            out[sb, st] = -_p_log_p(log_probs).sum(-1)
        ctx.save_for_backward(logits)
        ctx.temperature = temperature
        ctx.max_elements = max_elements
        ctx.exclude = exclude
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        (logits,) = ctx.saved_tensors
        batch, time, vocab = logits.shape
        grad = torch.empty_like(logits)
        temperature = ctx.temperature
        dtype = _compute_dtype(logits.dtype)
        for sb, st in _chunks(batch, time, vocab, ctx.max_elements):
            scaled = _scaled(logits[sb, st], dtype, temperature, ctx.exclude)
            log_probs = torch.log_softmax(scaled, dim=-1)
            probs = log_probs.exp()
            # dH/dl_j = -p_j (log p_j - E_p[log p]); log p differs from l by a constant, which cancels.
            mean_log_prob = _p_log_p(log_probs).sum(-1, keepdim=True)
            chunk_grad = -_p_log_p(log_probs) + probs * mean_log_prob
            chunk_grad = chunk_grad * grad_out[sb, st].to(dtype).unsqueeze(-1) / temperature
            grad[sb, st] = chunk_grad.to(grad.dtype)
        return grad, None, None, None


def entropy_from_logits(
    logits: torch.Tensor, temperature: float = 1.0, max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    exclude_token: int | None = None,
) -> torch.Tensor:
    """Entropy (nats) of softmax(logits / temperature) at every position.

    logits: (B, T, V) (or (N, V)) -> (B, T) (or (N,)), computed chunk-wise like
    :func:`selective_log_softmax`, differentiable (first order); ``exclude_token`` as there.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    squeeze = logits.dim() == 2
    if squeeze:
        logits = logits.unsqueeze(0)
    exclude = -1 if exclude_token is None else int(exclude_token)
    out = _EntropyFromLogits.apply(logits, float(temperature), int(max_chunk_elements), exclude)
    return out.squeeze(0) if squeeze else out
