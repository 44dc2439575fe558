"""A lean batched KV-cached sampler for Llama-family decoder-only models.

Why this exists: on a small CPU with small models, ``transformers``' ``generate`` spends
most of each decode step in Python and dispatch (mask builders, cache classes, logits
processor lists, per-module hooks); for the built-in tiny Llama one step at batch 32 costs
about ten times its arithmetic.  Calling the HF forward with a ``DynamicCache`` directly is
no faster.  This module runs the same network straight from the model's weights: one fused
QKV and one fused gate/up matmul per layer, preallocated KV buffers, one SDPA call per
layer, the LM head on the last position only, and a sampler that reproduces exactly the
distribution :func:`kilter.rollout.generate.hf_generate_kwargs` pins down for HF.

Correctness is checked, not assumed: the first time a model object is seen, a probe batch
(two left-padded prompts, prefill + 3 greedy steps) is decoded here and compared with a
full-sequence forward of the HF model itself; any mismatch or exception marks the model
unsupported and :func:`prepare` returns ``None`` -- the caller then uses ``generate``.

Supported: ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` in fp32 or bf16
(one dtype and one device throughout, no autocast), optionally wrapped by peft LoRA (plain
LoRA; the effective weight is the base weight plus each active adapter's delta).  Weights
are read afresh by every :func:`prepare`, so a policy that was just updated samples with its
new weights.  Known difference from HF: finished rows are dropped from the batch once they
make up a quarter of it, so the random stream (not the distribution) differs from HF's
after the first compaction.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kilter import fastpaths

SUPPORTED = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}
_VERDICTS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


class Unsupported(Exception):
    """The model uses something the fast path does not reproduce; fall back to ``generate``."""


@dataclass
class _Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    w_qkv: torch.Tensor
    b_qkv: torch.Tensor | None
    w_o: torch.Tensor
    b_o: torch.Tensor | None
    w_gu: torch.Tensor
    b_gu: torch.Tensor | None
    w_down: torch.Tensor
    b_down: torch.Tensor | None


@dataclass
class FastDecoder:
    """One generate call's worth of fused weights (never reuse across calls: weights change)."""

    layers: list[_Layer]
    embed: torch.Tensor
    norm: torch.Tensor
    lm_head: torch.Tensor
    eps: float
    n_heads: int
    n_kv: int
    head_dim: int
    scaling: float
    rotary: nn.Module

    def decode(self, ids: torch.Tensor, mask: torch.Tensor, max_new: int,
               choose: Callable[[torch.Tensor], torch.Tensor], eos_id: int, pad_id: int,
               on_logits: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
        """New tokens ``(B, max_new)`` for left-padded ``ids``/``mask`` ``(B, P)``; pad after EOS.

        PAD's logit is set to -inf before ``choose``: it is never sampled.

        ``choose`` maps fp32 logits ``(b, V)`` to tokens ``(b,)``; ``on_logits(rows, logits)``
        sees every step's logits with the original row index of each live row (tests, probe).
        """
        B, P = ids.shape
        L, dev = P + max_new, ids.device
        kv = [(self.embed.new_empty(B, self.n_kv, L, self.head_dim),
               self.embed.new_empty(B, self.n_kv, L, self.head_dim)) for _ in self.layers]
        keys = torch.cat([mask.bool(), torch.ones(B, max_new, dtype=torch.bool, device=dev)], 1)
        cos, sin = self.rotary(self.embed[:1], torch.arange(L, device=dev)[None])
        cos, sin = cos[0], sin[0]  # (L, head_dim): the model's own rope, whatever its type
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(P, P, dtype=torch.bool, device=dev).tril()
        # Pad queries see only themselves: a fully masked row can make SDPA emit NaN (backend
        # dependent), which would reach the pad columns' K/V and poison real rows via 0 * NaN.
        attend = (keys[:, None, :P] & causal) | torch.eye(P, dtype=torch.bool, device=dev)
        h = _forward(self, ids, cos[pos], sin[pos], kv, 0, attend[:, None])
        pos = pos[:, -1] + 1
        out = torch.full((B, max_new), pad_id, dtype=torch.long, device=dev)
        rows = torch.arange(B, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        vocab = self.lm_head.shape[0]
        pad_index = torch.tensor([pad_id], device=dev) if 0 <= pad_id < vocab else None
        for t in range(max_new):
            logits = F.linear(h, self.lm_head).float()
            if on_logits is not None:
                on_logits(rows, logits)
            # PAD is never sampled (as suppress_tokens does in generate); out of place: on_logits keeps its view
            tok = torch.where(done, pad_id, choose(logits.index_fill(-1, pad_index, -torch.inf) if pad_index is not None
                                                   else logits))
            out[rows, t] = tok
            done = done | (tok == eos_id)
            n_done = int(done.sum())
            if n_done == len(rows) or t == max_new - 1:
                break
            if 4 * n_done >= len(rows):  # drop finished rows; amortised, the copies stay small
                keep = (~done).nonzero().squeeze(1)
                rows, done, tok, pos, keys = rows[keep], done[keep], tok[keep], pos[keep], keys[keep]
                kv = [(k[keep], v[keep]) for k, v in kv]
            end = P + t + 1
            h = _forward(self, tok[:, None], cos[pos][:, None], sin[pos][:, None], kv, end - 1,
                         keys[:, None, None, :end])
            pos = pos + 1
        return out


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm exactly as HF's Llama: normalise in fp32, cast back, then scale.  x ``(..., D)``."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, half-split convention (Su et al. 2021).  x ``(B, H, T, d)``, cos ``(B, 1, T, d)``."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def _forward(d: FastDecoder, tokens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: list,
             start: int, attend: torch.Tensor) -> torch.Tensor:
    """Run ``tokens`` ``(B, T)`` written at cache columns ``[start, start+T)``; final-normed last hidden ``(B, D)``."""
    B, T = tokens.shape
    hd, nq, nkv = d.head_dim, d.n_heads, d.n_kv
    cos, sin = cos[:, None], sin[:, None]
    h = F.embedding(tokens, d.embed)
    for layer, (k_buf, v_buf) in zip(d.layers, kv):
        q, k, v = F.linear(_rms(h, layer.ln1, d.eps), layer.w_qkv, layer.b_qkv).split(
            [nq * hd, nkv * hd, nkv * hd], -1)
        q = _rope(q.view(B, T, nq, hd).transpose(1, 2), cos, sin)
        k_buf[:, :, start:start + T] = _rope(k.view(B, T, nkv, hd).transpose(1, 2), cos, sin)
        v_buf[:, :, start:start + T] = v.view(B, T, nkv, hd).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k_buf[:, :, :start + T], v_buf[:, :, :start + T], attn_mask=attend,
                                           scale=d.scaling, enable_gqa=nkv != nq)
        h = h + F.linear(a.transpose(1, 2).reshape(B, T, nq * hd), layer.w_o, layer.b_o)
        gate, up = F.linear(_rms(h, layer.ln2, d.eps), layer.w_gu, layer.b_gu).chunk(2, -1)
        h = h + F.linear(F.silu(gate) * up, layer.w_down, layer.b_down)
    return _rms(h[:, -1], d.norm, d.eps)


# --------------------------------------------------------------------------- weights


def _linear(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) the module applies now: a plain Linear, or a peft LoRA Linear's base + active deltas."""
    if type(module) is nn.Linear:
        return module.weight, module.bias
    from peft.tuners.lora import Linear as LoraLinear  # peft is a dependency; imported only when a model has LoRA
    if not isinstance(module, LoraLinear) or type(module.base_layer) is not nn.Linear:
        raise Unsupported(f"layer {type(module).__name__}")
    weight, bias = module.base_layer.weight, module.base_layer.bias
    if module.disable_adapters or module.merged:  # peft's forward then runs the base layer alone
        return weight, bias
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if name in module.lora_variant or module.lora_bias.get(name):
            raise Unsupported("LoRA variants (DoRA, ...) and LoRA biases")
        weight = weight + module.get_delta_weight(name).to(weight.dtype)
    return weight, bias


def _cat(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    if all(p is None for p in parts):
        return None
    if any(p is None for p in parts):
        raise Unsupported("bias on some projections only")
    return torch.cat(parts)


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "peft_config") else model


@torch.no_grad()
def _build(model: nn.Module, max_len: int) -> FastDecoder:
    """Fused weights from the model's current parameters; raises :class:`Unsupported`."""
    base = _base(model)
    cfg = base.config
    if type(base).__name__ not in SUPPORTED:
        raise Unsupported(type(base).__name__)
    if (getattr(cfg, "pretraining_tp", 1) or 1) != 1:
        raise Unsupported("pretraining_tp")
    rope = getattr(cfg, "rope_parameters", None) or {}
    if any(kind in str(rope.get("rope_type", "default")) for kind in ("dynamic", "longrope")):
        raise Unsupported("rope that depends on the sequence length")
    params = list(model.parameters())
    dtype, device = params[0].dtype, params[0].device
    if dtype not in (torch.float32, torch.bfloat16) or any(p.dtype != dtype or p.device != device for p in params):
        raise Unsupported("mixed or unsupported dtypes/devices")
    if torch.is_autocast_enabled(device.type):
        raise Unsupported("autocast")
    core = base.model
    if type(core.embed_tokens) is not nn.Embedding or type(base.lm_head) is not nn.Linear or base.lm_head.bias is not None:
        raise Unsupported("embedding or LM head")
    layers = []
    first = core.layers[0].self_attn
    for block in core.layers[: cfg.num_hidden_layers]:
        attn, mlp = block.self_attn, block.mlp
        window = getattr(attn, "sliding_window", getattr(cfg, "sliding_window", None))
        if window is not None and max_len > window:
            raise Unsupported("sliding-window attention would be active")
        if getattr(attn, "scaling", None) != first.scaling or type(mlp.act_fn).__name__ not in ("SiLU", "SiLUActivation"):
            raise Unsupported("attention scaling or activation")
        eps = {block.input_layernorm.variance_epsilon, block.post_attention_layernorm.variance_epsilon,
               core.norm.variance_epsilon}
        if len(eps) != 1:
            raise Unsupported("different RMSNorm epsilons")
        (wq, bq), (wk, bk), (wv, bv) = (_linear(attn.q_proj), _linear(attn.k_proj), _linear(attn.v_proj))
        (wg, bg), (wu, bu) = _linear(mlp.gate_proj), _linear(mlp.up_proj)
        w_o, b_o = _linear(attn.o_proj)
        w_down, b_down = _linear(mlp.down_proj)
        layers.append(_Layer(block.input_layernorm.weight, block.post_attention_layernorm.weight,
                             torch.cat([wq, wk, wv]), _cat([bq, bk, bv]), w_o, b_o,
                             torch.cat([wg, wu]), _cat([bg, bu]), w_down, b_down))
    head_dim = first.head_dim
    return FastDecoder(layers, core.embed_tokens.weight, core.norm.weight, base.lm_head.weight,
                       core.norm.variance_epsilon, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim,
                       first.scaling, core.rotary_emb)


# --------------------------------------------------------------------------- sampling


def process_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """HF's warpers in HF's order: divide by temperature, top-k, then nucleus (top-p).  ``(B, V)`` fp32.

    Removed tokens get ``-inf``.  Top-k keeps every token tied with the k-th score.  Top-p
    (Holtzman et al. 2020) keeps the smallest set of most likely tokens whose mass reaches
    ``top_p``: in ascending order, a token goes when the mass up to and including it is
    ``<= 1 - top_p`` -- computed the same way as ``TopPLogitsWarper``, so the kept set is
    identical down to float rounding; the most likely token always stays.
    """
    if temperature != 1.0:
        logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ascending, order = torch.sort(logits, descending=False)
        drop_sorted = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
        drop_sorted[..., -1] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def chooser(params) -> Callable[[torch.Tensor], torch.Tensor]:
    """Token selection for :class:`~kilter.rollout.generate.SamplingParams`: argmax, or a multinomial draw."""
    if not params.do_sample:
        return lambda logits: logits.argmax(-1)
    t, k, p = float(params.temperature), int(params.top_k), float(params.top_p)
    return lambda logits: torch.multinomial(process_logits(logits, t, k, p).softmax(-1), 1).squeeze(1)


# --------------------------------------------------------------------------- entry points


@torch.no_grad()
def _probe(model: nn.Module, decoder: FastDecoder) -> bool:
    """Prefill + 3 greedy steps on two left-padded rows agree with HF's full-sequence forward."""
    base = _base(model)
    vocab = decoder.embed.shape[0]
    device = decoder.embed.device
    prompts = [[(3 + 7 * i) % vocab for i in range(5)], [(11 + 5 * i) % vocab for i in range(3)]]
    ids = torch.zeros(2, 5, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, 5 - len(p):], mask[r, 5 - len(p):] = torch.tensor(p, device=device), 1
    seen: list[torch.Tensor] = []
    new = decoder.decode(ids, mask, 4, lambda x: x.argmax(-1), eos_id=-1, pad_id=0,
                         on_logits=lambda rows, logits: seen.append(logits))
    full_ids = torch.cat([ids, new[:, :3]], 1)
    full_mask = torch.cat([mask, torch.ones_like(new[:, :3])], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    ref = base(input_ids=full_ids, attention_mask=full_mask, position_ids=positions).logits[:, 4:].float()
    ours = torch.stack(seen, 1)
    if decoder.embed.dtype == torch.float32:
        return bool(torch.allclose(ours, ref, atol=1e-4, rtol=1e-4))
    return bool((ours - ref).abs().max() <= 0.05 * max(1.0, float(ref.abs().max())))


def prepare(model: nn.Module, max_len: int) -> FastDecoder | None:
    """A decoder over ``model``'s current weights for sequences up to ``max_len``, or None to fall back.

    The probe verdict is cached per model object, dtype and device; the weights are not.
    Decoding never applies dropout; :func:`~kilter.rollout.generate.generate_ids` also puts the
    model in eval mode around the call so the HF fallback behaves the same.
    """
    try:
        decoder = _build(model, max_len)
    except (Unsupported, *fastpaths.PROBE_ERRORS) as exc:  # a structure this sampler does not know
        fastpaths.decide("own_sampler", False, f"{type(exc).__name__}: {exc}")
        return None
    key = (decoder.embed.dtype, str(decoder.embed.device))
    verdicts = _VERDICTS.setdefault(model, {})
    if key not in verdicts:
        was_training = model.training
        model.eval()  # the reference forward must not apply dropout
        reason = "its logits differ from the model's own forward"
        try:
            verdicts[key] = _probe(model, decoder)
        except fastpaths.PROBE_ERRORS as exc:  # anything odd in the model means "use generate"
            verdicts[key], reason = False, f"{type(exc).__name__}: {exc}"
        finally:
            model.train(was_training)
        fastpaths.decide("own_sampler", verdicts[key], reason)
    return decoder if verdicts[key] else None


@torch.no_grad()
def fast_generate(decoder: FastDecoder, ids: torch.Tensor, mask: torch.Tensor, params, eos_id: int,
                  pad_id: int) -> torch.Tensor:
    """Sample ``(B, max_new_tokens)`` new tokens (pad after each row's EOS) with HF's semantics."""
    params.check()
    return decoder.decode(ids, mask, params.max_new_tokens, chooser(params), eos_id, pad_id)
