"""Turn sampled responses into padded tensors and score them in batched forward passes.

Layout of a rollout batch (N rows): ``[left-padded prompt (P columns) | right-padded response
(R columns)]``.  The logits that predict response token ``t`` sit at column ``P + t - 1``, so
``logits[:, P - 1 : P + R - 1]`` lines up with the (N, R) response grid; the value of the state
*before* token ``t`` is read at the same column (the critic's V(s_t) for action a_t).

Position ids are passed explicitly as ``cumsum(attention_mask) - 1``: a plain forward call
would otherwise number the left padding too and see other positions than ``generate`` did,
so the "old" log-probs would not be those of the sampling policy.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, fields

import torch

from kilter.models import packed
from kilter.models.precision import autocast
from kilter.ops.logprobs import entropy_from_logits, selective_log_softmax


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor
    """(N, P + R) prompt and response ids."""
    attention_mask: torch.Tensor
    """(N, P + R) 1 on real tokens."""
    position_ids: torch.Tensor
    """(N, P + R) positions counted over real tokens only."""
    response_mask: torch.Tensor
    """(N, R) float, 1 on response tokens up to and including the first EOS."""
    prompt_width: int
    """P: the column where responses start."""
    pad_id: int | None = None
    """The PAD token: never sampled, so it is removed from the scored distribution too (None: keep all)."""

    @property
    def response_ids(self) -> torch.Tensor:
        """(N, R) the sampled tokens (padding where the mask is 0)."""
        return self.input_ids[:, self.prompt_width:]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: torch.Tensor | list[int], trim: bool = True) -> RolloutBatch:
        """A sub-batch of ``rows``; with ``trim`` the all-padding columns at either end are dropped.

        Dropping columns changes no result: left prompt padding is masked out of attention and
        position ids, and response columns past every row's end are masked out of every loss.
        Returns a batch whose per-token (n, R') tensors line up with ``trim_columns``.
        """
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.input_ids.device)
        sub = RolloutBatch(self.input_ids[rows], self.attention_mask[rows], self.position_ids[rows],
                           self.response_mask[rows], self.prompt_width, self.pad_id)
        if not trim:
            return sub
        lead = int((sub.attention_mask[:, : self.prompt_width].sum(0) == 0).cumprod(0).sum())
        lead = min(lead, self.prompt_width - 1)  # keep column P - 1: it predicts the first response token
        live = (sub.response_mask.sum(0) > 0).nonzero()
        width = int(live.max()) + 1 if len(live) else 1
        end = self.prompt_width + width
        return RolloutBatch(sub.input_ids[:, lead:end], sub.attention_mask[:, lead:end],
                            sub.position_ids[:, lead:end], sub.response_mask[:, :width], self.prompt_width - lead,
                            self.pad_id)

    def to(self, device) -> RolloutBatch:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return RolloutBatch(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in values.items()})


def assemble(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int,
             device: str | torch.device = "cpu") -> RolloutBatch:
    """Pack prompts (left-padded) and responses (right-padded) into one :class:`RolloutBatch`.

    An empty response (the limit was 0 or generation failed) keeps one padding column so the
    shapes stay valid; its mask row is all zeros and it contributes nothing to any loss.
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    n = len(prompt_ids)
    width_p = max(len(p) for p in prompt_ids)
    width_r = max(1, max(len(r) for r in response_ids))
    ids = torch.full((n, width_p + width_r), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width_p + width_r), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        ids[i, width_p - len(p):width_p] = torch.tensor(p, dtype=torch.long)
        attn[i, width_p - len(p):width_p] = 1
        if r:
            ids[i, width_p:width_p + len(r)] = torch.tensor(r, dtype=torch.long)
            attn[i, width_p:width_p + len(r)] = 1
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    resp_mask = attn[:, width_p:].float()
    return RolloutBatch(ids, attn, positions, resp_mask, width_p, pad_id).to(device)


# --------------------------------------------------------------------------- padding-free scoring
# A rollout batch is mostly padding on CPU-sized runs (left-padded prompts, right-padded responses
# of very different lengths: half the slots in the benchmark's batches), and the k samples of a
# prompt repeat it k times.  The scoring forwards -- policy, reference, critic, with and without
# grad -- instead pack each prompt once with its k responses (kilter.models.shared_prefix; plain
# packed rows for models that fail that check) and run the head only at the positions that
# predict a response token, then scatter the results back onto the (n, R) response grid.  Whether
# a model allows it is checked once per model object against its padded forward.

_FAST_POLICY: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_FAST_CRITIC: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _fast_policy(model):
    if model not in _FAST_POLICY:
        device = str(next(model.parameters()).device)
        wrapper, ok = packed.fast_causal_lm(model, device)
        _FAST_POLICY[model] = wrapper if ok else None
    return _FAST_POLICY[model]


def _fast_critic(model):
    if model not in _FAST_CRITIC:
        _FAST_CRITIC[model] = packed.fast_reward_model(model, str(next(model.parameters()).device))
    return _FAST_CRITIC[model]


def prepare_fast_paths(policy, critic=None) -> tuple:
    """Run the once-per-model fast-path checks now, on every process alike; returns the modules the
    scoring forwards will call: (policy's padding-free wrapper or the policy, critic's or the critic).

    Data-parallel PPO calls this before sharding: under FSDP every forward is a collective, so
    a check first reached inside rank 0's evaluation alone would leave the other ranks to run
    theirs later, without rank 0, and wait forever; and the returned modules are the FSDP roots.
    """
    fast_policy = _fast_policy(policy)
    fast_critic = _fast_critic(critic) if critic is not None else None
    return (fast_policy if fast_policy is not None else policy,
            fast_critic if fast_critic is not None else critic)


@dataclass
class _Packed:
    input_ids: torch.Tensor
    """(rows, W) packed real tokens."""
    position_ids: torch.Tensor
    """(rows, W)."""
    attention_mask: torch.Tensor | None
    """(rows, 1, W, W) with shared prompts, else None (transformers' packed-sequence masks)."""
    index: torch.Tensor
    """(M,) flat indices (row * W + column) of the hidden states that predict the response tokens."""
    grid: tuple[torch.Tensor, torch.Tensor]
    """(M,) response-grid row and column of each of them."""
    targets: torch.Tensor
    """(M,) the response token each one predicts."""


def _pack_rollout(batch: RolloutBatch, shared: bool, attention_weight: float = 0.0) -> _Packed | None:
    """The padding-free layout of a rollout batch, or None when a row has no prompt token.

    With ``shared``, rows with the same prompt (the k samples of a prompt) form one group
    whose prompt is computed once (:mod:`kilter.models.shared_prefix`).
    """
    from kilter.models import shared_prefix

    mask = batch.attention_mask.bool().cpu()
    p_width = batch.prompt_width
    prompt_len = mask[:, :p_width].sum(1)
    resp_len = mask[:, p_width:].sum(1)
    if bool((prompt_len == 0).any()):
        return None
    ids = batch.input_ids.cpu()
    seqs = [ids[i][mask[i]].tolist() for i in range(len(batch))]
    rows = torch.repeat_interleave(torch.arange(len(batch)), resp_len)
    cols = torch.cat([torch.arange(int(n)) for n in resp_len]) if len(rows) else torch.zeros(0, dtype=torch.long)
    if shared:
        by_prompt: dict[tuple, list[int]] = {}
        for i, seq in enumerate(seqs):
            by_prompt.setdefault(tuple(seq[:int(prompt_len[i])]), []).append(i)
        members = list(by_prompt.values())
        sp = shared_prefix.pack_groups([[seqs[i] for i in g] for g in members], pad_id=0,
                                       capacity=4 * max(len(s) for s in seqs), attention_weight=attention_weight)
        seq_of_row = torch.empty(len(batch), dtype=torch.long)
        seq_of_row[torch.tensor([i for g in members for i in g])] = torch.arange(len(batch))
        index = shared_prefix.predicting_index(sp, seq_of_row[rows], prompt_len[rows] + cols)
        input_ids, position_ids, attention = sp.input_ids, sp.position_ids, sp.attention_mask
    else:
        lengths = (prompt_len + resp_len).tolist()
        pk = packed.pack_micro_batch([{"input_ids": s} for s in seqs], pad_id=0, capacity=4 * max(lengths),
                                     attention_weight=attention_weight)
        starts = pk["last_index"] - (prompt_len + resp_len) + 1
        index = starts[rows] + prompt_len[rows] - 1 + cols
        input_ids, position_ids, attention = pk["input_ids"], pk["position_ids"], None
    device = batch.input_ids.device
    targets = batch.input_ids[rows.to(device), (p_width + cols).to(device)]
    return _Packed(input_ids.to(device), position_ids.to(device), None if attention is None else attention.to(device),
                   index.to(device), (rows.to(device), cols.to(device)), targets)


def _to_grid(values: torch.Tensor, lay: _Packed, shape: tuple[int, int]) -> torch.Tensor:
    out = values.new_zeros(shape)
    return out.index_put(lay.grid, values)


def response_logits(model, batch: RolloutBatch, precision: str = "fp32") -> torch.Tensor:
    """(n, R, V) logits of the policy at the columns that predict each response token.

    The LM head runs on the last R + 1 hidden states only (``logits_to_keep``), not on the
    prompt: a (n, P + R, V) logits tensor is most of a forward's memory for a large vocabulary.
    The call still goes through the model's own forward, so wrappers (peft, DDP) and any
    post-processing of the logits (softcapping, logit scales) apply as usual.  A model that
    does not know ``logits_to_keep`` returns every column; the slice below fits both.
    """
    device = batch.input_ids.device
    r = batch.response_mask.shape[1]
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                  use_cache=False)
    with autocast(precision, device.type):
        try:
            logits = model(**inputs, logits_to_keep=r + 1).logits
        except TypeError as err:
            if "logits_to_keep" not in str(err):
                raise
            logits = model(**inputs).logits
    # the last column predicts the token after the response; the R before it predict the response
    return logits[:, -(r + 1):-1]


def token_logprobs(model, batch: RolloutBatch, temperature: float, precision: str = "fp32",
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(n, R) log pi(token) at ``temperature`` (and the entropy of that distribution); with grad.

    pi is the softmax without the PAD token (``batch.pad_id``), which no sampler emits.
    Padding-free when the model allows it (0 at padding positions), else :func:`response_logits`
    (padding positions then hold the log-prob of an arbitrary non-PAD token; callers mask them).
    """
    logp, entropy, _ = token_scores(model, batch, temperature, precision, with_entropy)
    return logp, entropy


def token_scores(model, batch: RolloutBatch, temperature: float, precision: str = "fp32",
                 with_entropy: bool = False, value_head=None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:func:`token_logprobs`, and with ``value_head`` (:class:`kilter.models.value.TrunkValueHead`)
    the (n, R) values V(s_t) from the same forward: the head on the policy's last hidden state at
    each column that predicts a response token (where the log-prob is read).  With grad."""
    pad = batch.pad_id
    fast = _fast_policy(model)  # its one-time probe forwards run before the head starts reading
    lay = _pack_rollout(batch, fast.shares_prefix, fast.attention_weight) if fast is not None else None
    reading = value_head.reading() if value_head is not None else contextlib.nullcontext([])
    if lay is not None:
        with autocast(precision, batch.input_ids.device.type), reading as seen:
            logits = fast(lay.input_ids, lay.attention_mask, lay.position_ids, index=lay.index)
            if value_head is not None:  # the packed rows' hidden states at the log-probs' own positions
                hidden = _one(seen)
                values = value_head(hidden.reshape(-1, hidden.shape[-1])[lay.index])
            else:
                values = None
        shape = tuple(batch.response_mask.shape)
        logp = _to_grid(selective_log_softmax(logits, lay.targets, temperature, exclude_token=pad).float(), lay, shape)
        entropy = (_to_grid(entropy_from_logits(logits, temperature, exclude_token=pad).float(), lay, shape)
                   if with_entropy else None)
        return logp, entropy, _to_grid(values.float(), lay, shape) if values is not None else None
    with reading as seen:
        logits = response_logits(model, batch, precision)
        if value_head is not None:
            p, r = batch.prompt_width, batch.response_mask.shape[1]
            with autocast(precision, batch.input_ids.device.type):
                values = value_head(_one(seen)[:, p - 1:p + r - 1]).float()
        else:
            values = None
    targets = batch.response_ids
    if pad is not None:  # padding columns hold PAD, whose log-prob is now -inf: score another token there
        targets = torch.where(batch.response_mask != 0, targets, (pad + 1) % logits.shape[-1])
    logp = selective_log_softmax(logits, targets, temperature, exclude_token=pad)
    entropy = entropy_from_logits(logits, temperature, exclude_token=pad) if with_entropy else None
    return logp, entropy, values


def _one(seen: list) -> torch.Tensor:
    """The hidden states of the one decoder forward a scoring call made."""
    if len(seen) != 1:
        raise RuntimeError(f"the value head read {len(seen)} decoder forwards, expected exactly one")
    return seen[0]


@torch.no_grad()
def batched_logprobs(model, batch: RolloutBatch, temperature: float, batch_size: int, precision: str = "fp32",
                     with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`token_logprobs` for a whole rollout in chunks of ``batch_size`` rows, without grad.

    Returns (N, R) tensors on the batch's device; padding positions hold 0.
    """
    logp, entropy, _ = batched_scores(model, batch, temperature, batch_size, precision, with_entropy)
    return logp, entropy


@torch.no_grad()
def batched_scores(model, batch: RolloutBatch, temperature: float, batch_size: int, precision: str = "fp32",
                   with_entropy: bool = False, value_head=None
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:func:`token_scores` for a whole rollout in chunks, without grad: (N, R) log-probs, entropy
    (``with_entropy``) and values (``value_head``), 0 on padding."""
    n, width = batch.response_mask.shape
    device = batch.input_ids.device
    logp = torch.zeros(n, width, device=device)
    entropy = torch.zeros(n, width, device=device) if with_entropy else None
    values = torch.zeros(n, width, device=device) if value_head is not None else None
    for start in range(0, n, batch_size):
        rows = list(range(start, min(start + batch_size, n)))
        sub = batch.select(rows)
        lp, ent, val = token_scores(model, sub, temperature, precision, with_entropy, value_head)
        cols = sub.response_mask.shape[1]
        logp[start:start + len(rows), :cols] = lp.float() * sub.response_mask
        if entropy is not None and ent is not None:
            entropy[start:start + len(rows), :cols] = ent.float() * sub.response_mask
        if values is not None and val is not None:
            values[start:start + len(rows), :cols] = val.float() * sub.response_mask
    return logp, entropy, values


def token_values(value_model, batch: RolloutBatch, precision: str = "fp32") -> torch.Tensor:
    """(n, R) critic values V(s_t) read from every response column's hidden state; with grad.

    The reward model's head applied per token (:func:`kilter.models.reward.token_values`):
    the value model starts as the reward model (InstructGPT), so at the last token it
    begins by predicting the reward itself.
    """
    from kilter.models.reward import get_reward_bias
    from kilter.models.reward import token_values as all_token_values

    fast = _fast_critic(value_model)
    lay = _pack_rollout(batch, fast.shares_prefix, fast.attention_weight) if fast is not None else None
    if lay is not None:
        with autocast(precision, batch.input_ids.device.type):
            values = fast(lay.input_ids, lay.position_ids, lay.index, attention_mask=lay.attention_mask)
        return _to_grid(values + get_reward_bias(value_model), lay, tuple(batch.response_mask.shape))
    with autocast(precision, batch.input_ids.device.type):
        values = all_token_values(value_model, batch.input_ids, batch.attention_mask)
    p, r = batch.prompt_width, batch.response_mask.shape[1]
    return values[:, p - 1:p + r - 1].float()


@torch.no_grad()
def batched_values(value_model, batch: RolloutBatch, batch_size: int, precision: str = "fp32") -> torch.Tensor:
    """:func:`token_values` for a whole rollout in chunks, without grad: (N, R), 0 on padding."""
    n, width = batch.response_mask.shape
    values = torch.zeros(n, width, device=batch.input_ids.device)
    for start in range(0, n, batch_size):
        rows = list(range(start, min(start + batch_size, n)))
        sub = batch.select(rows)
        cols = sub.response_mask.shape[1]
        values[start:start + len(rows), :cols] = token_values(value_model, sub, precision) * sub.response_mask
    return values
