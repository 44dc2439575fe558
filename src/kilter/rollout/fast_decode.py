"""A lean batched KV-cached sampler for the common Hugging Face decoder families.

Why this exists: on a small CPU with small models, ``transformers``' ``generate`` spends
most of each decode step in Python and dispatch (mask builders, cache classes, logits
processor lists, per-module hooks); for the built-in tiny Llama one step at batch 32 costs
about ten times its arithmetic.  Calling the HF forward with a ``DynamicCache`` directly is
no faster, and neither is ``generate`` with a static cache (``cache_implementation="static"``
without ``torch.compile``: measured slower than the dynamic cache per decode step on CPU).
This module runs the same network straight from the model's weights: one fused QKV and one
fused MLP input matmul per layer, preallocated KV buffers, one SDPA call per layer, the LM
head on the last position only, and a sampler that reproduces exactly the distribution
:func:`kilter.rollout.generate.hf_generate_kwargs` pins down for HF.

Correctness is checked, not assumed: the first time a model object is seen, a probe batch
(two left-padded prompts, prefill + 3 greedy steps) is decoded here and compared with a
full-sequence forward of the HF model itself; any mismatch or exception marks the model
unsupported and :func:`prepare` returns ``None`` -- the caller then uses ``generate``.

Supported (:data:`SUPPORTED`): the Llama layout (Llama, Mistral, Qwen2, Qwen3 with its
per-head q/k norms, Phi-3 with its fused projections, Gemma with its scaled embedding and
``1 + w`` norms, Gemma-2 with its four norms per block and soft-capped attention and logits),
Phi (parallel attention + MLP, LayerNorm, partial rotary, LM-head bias) and GPT-2 (learned
absolute positions, ``Conv1D`` weights), in fp32 or bf16 (one dtype and one device
throughout, no autocast), optionally wrapped by peft LoRA (plain LoRA; the effective weight
is the base weight plus each active adapter's delta).  Norms and activations are the model's
own modules, so their arithmetic is HF's by construction.  Weights are read afresh by every
:func:`prepare`, so a policy that was just updated samples with its new weights.  Known
difference from HF: finished rows are dropped from the batch once they make up a quarter of
it, so the random stream (not the distribution) differs from HF's after the first compaction.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kilter import fastpaths

LLAMA_LAYOUT = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                "GemmaForCausalLM", "Gemma2ForCausalLM", "Phi3ForCausalLM"}
SUPPORTED = LLAMA_LAYOUT | {"PhiForCausalLM", "GPT2LMHeadModel"}
"""Model classes whose structure :func:`_build` knows (each still has to pass the probe)."""
_VERDICTS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


class Unsupported(Exception):
    """The model uses something the fast path does not reproduce; fall back to ``generate``."""


@dataclass
class _Layer:
    ln1: nn.Module
    ln2: nn.Module | None
    """None: a parallel block (Phi), whose attention and MLP both read ``ln1``'s output."""
    w_qkv: torch.Tensor
    b_qkv: torch.Tensor | None
    w_o: torch.Tensor
    b_o: torch.Tensor | None
    w_in: torch.Tensor
    """The MLP's input projection: gate and up stacked (gated MLPs) or the single fc."""
    b_in: torch.Tensor | None
    w_down: torch.Tensor
    b_down: torch.Tensor | None
    act: nn.Module
    gated: bool
    scaling: float
    q_norm: nn.Module | None = None
    """Per-head norms of queries and keys before rope (Qwen3, Phi's qk_layernorm)."""
    k_norm: nn.Module | None = None
    post_attn: nn.Module | None = None
    """Gemma-2's norms of the attention and MLP outputs, before their residual additions."""
    post_mlp: nn.Module | None = None


@dataclass
class FastDecoder:
    """One generate call's worth of fused weights (never reuse across calls: weights change)."""

    layers: list[_Layer]
    embed: torch.Tensor
    norm: nn.Module
    lm_head: torch.Tensor
    n_heads: int
    n_kv: int
    head_dim: int
    rotary: nn.Module | None
    """The model's rotary embedding module; None for learned absolute positions (``pos_embed``)."""
    embed_scale: torch.Tensor | None = None
    pos_embed: torch.Tensor | None = None
    lm_bias: torch.Tensor | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None

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
        if self.rotary is not None:
            cos, sin = self.rotary(self.embed[:1], torch.arange(L, device=dev)[None])
            cos, sin = cos[0], sin[0]  # (L, rotary dim): the model's own rope, whatever its type
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(P, P, dtype=torch.bool, device=dev).tril()
        # Pad queries see only themselves: a fully masked row can make SDPA emit NaN (backend
        # dependent), which would reach the pad columns' K/V and poison real rows via 0 * NaN.
        attend = (keys[:, None, :P] & causal) | torch.eye(P, dtype=torch.bool, device=dev)
        rope = (cos[pos], sin[pos]) if self.rotary is not None else None
        h = _forward(self, ids, pos, rope, kv, 0, attend[:, None])
        pos = pos[:, -1] + 1
        out = torch.full((B, max_new), pad_id, dtype=torch.long, device=dev)
        rows = torch.arange(B, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        vocab = self.lm_head.shape[0]
        pad_index = torch.tensor([pad_id], device=dev) if 0 <= pad_id < vocab else None
        for t in range(max_new):
            logits = self.logits(h)
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
            rope = (cos[pos][:, None], sin[pos][:, None]) if self.rotary is not None else None
            h = _forward(self, tok[:, None], pos[:, None], rope, kv, end - 1, keys[:, None, None, :end])
            pos = pos + 1
        return out

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 next-token logits ``(B, V)`` from final-normed hidden states ``(B, D)``, as the HF head gives them."""
        logits = F.linear(h, self.lm_head, self.lm_bias)
        if self.final_softcap is not None:  # Gemma-2, in the model's dtype as HF does
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits.float()


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, half-split convention (Su et al. 2021), on the first ``cos.shape[-1]``
    channels of each head (all of them unless the rope is partial, as in Phi).
    x ``(B, H, T, d)``, cos ``(B, 1, T, r)``."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat([_rope(x[..., :r], cos, sin), x[..., r:]], -1)
    half = r // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend: torch.Tensor, scaling: float,
               softcap: float | None) -> torch.Tensor:
    """Masked attention ``(B, H, T, d)``; with ``softcap`` the scores go through ``c * tanh(s / c)``
    first (Gemma-2's eager attention, which SDPA cannot do)."""
    groups = q.shape[1] // k.shape[1]
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attend, scale=scaling, enable_gqa=groups > 1)
    if groups > 1:
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~attend, torch.finfo(scores.dtype).min)
    return torch.matmul(scores.softmax(-1, dtype=torch.float32).to(q.dtype), v)


def _mlp(layer: _Layer, x: torch.Tensor) -> torch.Tensor:
    up = F.linear(x, layer.w_in, layer.b_in)
    if layer.gated:
        gate, up = up.chunk(2, -1)
        up = layer.act(gate) * up
    else:
        up = layer.act(up)
    return F.linear(up, layer.w_down, layer.b_down)


def _forward(d: FastDecoder, tokens: torch.Tensor, pos: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
             kv: list, start: int, attend: torch.Tensor) -> torch.Tensor:
    """Run ``tokens`` ``(B, T)`` at positions ``pos`` ``(B, T)`` written at cache columns ``[start, start+T)``;
    ``rope``: the (cos, sin) of those positions.  Returns the final-normed last hidden state ``(B, D)``."""
    B, T = tokens.shape
    hd, nq, nkv = d.head_dim, d.n_heads, d.n_kv
    h = F.embedding(tokens, d.embed)
    if d.embed_scale is not None:
        h = h * d.embed_scale
    if d.pos_embed is not None:
        h = h + F.embedding(pos, d.pos_embed)
    cos, sin = (rope[0][:, None], rope[1][:, None]) if rope is not None else (None, None)
    for layer, (k_buf, v_buf) in zip(d.layers, kv):
        x = layer.ln1(h)
        q, k, v = F.linear(x, layer.w_qkv, layer.b_qkv).split([nq * hd, nkv * hd, nkv * hd], -1)
        q, k = q.view(B, T, nq, hd), k.view(B, T, nkv, hd)
        if layer.q_norm is not None:
            q, k = layer.q_norm(q), layer.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if cos is not None:
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        k_buf[:, :, start:start + T] = k
        v_buf[:, :, start:start + T] = v.view(B, T, nkv, hd).transpose(1, 2)
        a = _attention(q, k_buf[:, :, :start + T], v_buf[:, :, :start + T], attend, layer.scaling, d.attn_softcap)
        a = F.linear(a.transpose(1, 2).reshape(B, T, nq * hd), layer.w_o, layer.b_o)
        if layer.ln2 is None:  # parallel block: attention + MLP + residual, in HF's order
            h = a + _mlp(layer, x) + h
            continue
        if layer.post_attn is not None:
            a = layer.post_attn(a)
        h = h + a
        m = _mlp(layer, layer.ln2(h))
        if layer.post_mlp is not None:
            m = layer.post_mlp(m)
        h = h + m
    return d.norm(h[:, -1])


# --------------------------------------------------------------------------- weights


def _plain_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, bool] | None:
    """(weight, bias, stored transposed) of a plain ``nn.Linear`` or a GPT-2 ``Conv1D``; else None."""
    if type(module) is nn.Linear:
        return module.weight, module.bias, False
    if type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers."):
        return module.weight, module.bias, True  # (in, out): y = x @ W + b
    return None


def _linear(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (out, in), bias) the module applies now: a plain Linear or Conv1D, or a peft LoRA
    layer's base + active deltas."""
    plain = _plain_weight(module)
    if plain is not None:
        weight, bias, transposed = plain
        return (weight.t() if transposed else weight), bias
    from peft.tuners.lora import Linear as LoraLinear  # peft is a dependency; imported only when a model has LoRA
    base = _plain_weight(module.base_layer) if isinstance(module, LoraLinear) else None
    if base is None:
        raise Unsupported(f"layer {type(module).__name__}")
    weight, bias, transposed = base
    if bool(module.fan_in_fan_out) != transposed:
        raise Unsupported("LoRA fan_in_fan_out does not match the layer's weight layout")
    if not (module.disable_adapters or module.merged):  # else peft's forward runs the base layer alone
        for name in module.active_adapters:
            if name not in module.lora_A:
                continue
            if name in module.lora_variant or module.lora_bias.get(name):
                raise Unsupported("LoRA variants (DoRA, ...) and LoRA biases")
            weight = weight + module.get_delta_weight(name).to(weight.dtype)  # in the base layer's layout
    return (weight.t() if transposed else weight), bias


def _cat(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    if all(p is None for p in parts):
        return None
    if any(p is None for p in parts):
        raise Unsupported("bias on some projections only")
    return torch.cat(parts)


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "peft_config") else model


def _embedding(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(table, scale or None): a plain embedding, or Gemma's scaled one (``* embed_scale`` in the table's dtype)."""
    if type(module) is nn.Embedding:
        return module.weight, None
    scale = getattr(module, "embed_scale", None)
    if (isinstance(module, nn.Embedding) and type(module).__name__.endswith("ScaledWordEmbedding")
            and isinstance(scale, torch.Tensor)):
        return module.weight, scale.to(module.weight.dtype)
    raise Unsupported(f"embedding {type(module).__name__}")


def _activation(mlp: nn.Module) -> nn.Module:
    for name in ("act_fn", "activation_fn", "act"):
        act = getattr(mlp, name, None)
        if isinstance(act, nn.Module) and not list(act.parameters()):
            return act
    raise Unsupported(f"MLP activation of {type(mlp).__name__}")


def _check_window(attn: nn.Module, cfg, max_len: int) -> None:
    window = getattr(attn, "sliding_window", getattr(cfg, "sliding_window", None))
    if window is not None and max_len > window:
        raise Unsupported("sliding-window attention would be active")


def _llama_layer(block: nn.Module, cfg, max_len: int) -> _Layer:
    """A block of the Llama layout: pre-norm attention then pre-norm gated MLP, with the variants
    of Qwen3 (q/k norms), Phi-3 (fused qkv / gate_up) and Gemma-2 (norms after attention and MLP)."""
    attn, mlp = block.self_attn, block.mlp
    _check_window(attn, cfg, max_len)
    if hasattr(attn, "qkv_proj"):
        w_qkv, b_qkv = _linear(attn.qkv_proj)
    else:
        (wq, bq), (wk, bk), (wv, bv) = _linear(attn.q_proj), _linear(attn.k_proj), _linear(attn.v_proj)
        w_qkv, b_qkv = torch.cat([wq, wk, wv]), _cat([bq, bk, bv])
    if hasattr(mlp, "gate_up_proj"):
        w_in, b_in = _linear(mlp.gate_up_proj)
    else:
        (wg, bg), (wu, bu) = _linear(mlp.gate_proj), _linear(mlp.up_proj)
        w_in, b_in = torch.cat([wg, wu]), _cat([bg, bu])
    w_o, b_o = _linear(attn.o_proj)
    w_down, b_down = _linear(mlp.down_proj)
    gemma2 = hasattr(block, "pre_feedforward_layernorm")
    return _Layer(block.input_layernorm, block.pre_feedforward_layernorm if gemma2 else block.post_attention_layernorm,
                  w_qkv, b_qkv, w_o, b_o, w_in, b_in, w_down, b_down, _activation(mlp), gated=True,
                  scaling=float(attn.scaling), q_norm=getattr(attn, "q_norm", None), k_norm=getattr(attn, "k_norm", None),
                  post_attn=block.post_attention_layernorm if gemma2 else None,
                  post_mlp=block.post_feedforward_layernorm if gemma2 else None)


def _phi_layer(block: nn.Module, cfg, max_len: int) -> _Layer:
    """Phi: one LayerNorm feeding attention and a plain MLP in parallel; partial rope; biases."""
    attn, mlp = block.self_attn, block.mlp
    _check_window(attn, cfg, max_len)
    (wq, bq), (wk, bk), (wv, bv) = _linear(attn.q_proj), _linear(attn.k_proj), _linear(attn.v_proj)
    (w_o, b_o), (w_in, b_in), (w_down, b_down) = _linear(attn.dense), _linear(mlp.fc1), _linear(mlp.fc2)
    qk = bool(getattr(attn, "qk_layernorm", False))
    return _Layer(block.input_layernorm, None, torch.cat([wq, wk, wv]), _cat([bq, bk, bv]), w_o, b_o, w_in, b_in,
                  w_down, b_down, _activation(mlp), gated=False, scaling=float(attn.scaling),
                  q_norm=attn.q_layernorm if qk else None, k_norm=attn.k_layernorm if qk else None)


def _gpt2_layer(block: nn.Module, cfg, max_len: int) -> _Layer:
    """GPT-2: pre-LayerNorm attention (one Conv1D for q, k, v) then a pre-LayerNorm plain MLP."""
    attn, mlp = block.attn, block.mlp
    if getattr(block, "crossattention", None) is not None or attn.is_cross_attention:
        raise Unsupported("cross-attention")
    (w_qkv, b_qkv), (w_o, b_o) = _linear(attn.c_attn), _linear(attn.c_proj)
    (w_in, b_in), (w_down, b_down) = _linear(mlp.c_fc), _linear(mlp.c_proj)
    return _Layer(block.ln_1, block.ln_2, w_qkv, b_qkv, w_o, b_o, w_in, b_in, w_down, b_down, _activation(mlp),
                  gated=False, scaling=float(attn.scaling))


@torch.no_grad()
def _build(model: nn.Module, max_len: int) -> FastDecoder:
    """Fused weights from the model's current parameters; raises :class:`Unsupported`."""
    base = _base(model)
    cfg = base.config
    kind = type(base).__name__
    if kind not in SUPPORTED:
        raise Unsupported(kind)
    if (getattr(cfg, "pretraining_tp", 1) or 1) != 1:
        raise Unsupported("pretraining_tp")
    rope = getattr(cfg, "rope_parameters", None) or {}
    if any(kind_ in str(rope.get("rope_type", "default")) for kind_ in ("dynamic", "longrope")):
        raise Unsupported("rope that depends on the sequence length")
    params = list(model.parameters())
    dtype, device = params[0].dtype, params[0].device
    if dtype not in (torch.float32, torch.bfloat16) or any(p.dtype != dtype or p.device != device for p in params):
        raise Unsupported("mixed or unsupported dtypes/devices")
    if torch.is_autocast_enabled(device.type):
        raise Unsupported("autocast")
    head = base.lm_head
    if type(head) is not nn.Linear:
        raise Unsupported("LM head")
    if kind == "GPT2LMHeadModel":
        core, blocks, make = base.transformer, base.transformer.h, _gpt2_layer
        embed, scale = _embedding(core.wte)
        if type(core.wpe) is not nn.Embedding or max_len > core.wpe.weight.shape[0]:
            raise Unsupported("position embedding (or sequences longer than it)")
        pos_embed, final_norm, rotary = core.wpe.weight, core.ln_f, None
    else:
        core = base.model
        blocks = core.layers[: cfg.num_hidden_layers]
        make = _phi_layer if kind == "PhiForCausalLM" else _llama_layer
        embed, scale = _embedding(core.embed_tokens)
        pos_embed, rotary = None, core.rotary_emb
        final_norm = core.final_layernorm if kind == "PhiForCausalLM" else core.norm
    layers = [make(block, cfg, max_len) for block in blocks]
    first = blocks[0].attn if kind == "GPT2LMHeadModel" else blocks[0].self_attn
    n_heads = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    if first.head_dim * n_heads != layers[0].w_qkv.shape[0] - 2 * n_kv * first.head_dim:
        raise Unsupported("attention head layout")
    return FastDecoder(layers, embed, final_norm, head.weight, n_heads, n_kv, int(first.head_dim), rotary,
                       embed_scale=scale, pos_embed=pos_embed, lm_bias=head.bias,
                       attn_softcap=getattr(cfg, "attn_logit_softcapping", None),
                       final_softcap=getattr(cfg, "final_logit_softcapping", None))


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
