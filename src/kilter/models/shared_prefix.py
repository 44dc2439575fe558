"""Packed rows in which sequences that start alike share one copy of their common prefix.

Preference and RL batches are groups of sequences with the same prompt: a reward model's
K-way ranking (K responses), a DPO pair (chosen and rejected), PPO/RLOO's k samples per
prompt.  Forwarding each sequence separately computes the prompt K times.  Here a group is
laid out once as ``[prefix | own tokens of sequence 1 | own tokens of sequence 2 | ...]``,
where the prefix is the longest common prefix of the group's token ids, and a 4-D attention
mask lets each sequence's own tokens see the prefix and themselves but not their siblings.
Every sequence keeps its own position ids (``prefix_len, prefix_len + 1, ...`` for its own
tokens), so each token's hidden state is the one a separate forward of its sequence gives,
up to float rounding.  The saving is ``(K - 1) * prefix_len`` tokens per group: about a third
of all tokens in the built-in task's PPO batches, far more with long prompts.

:func:`pack_groups` builds the layout; ``where[s, t]`` is the flat index (row * W + column) of
token ``t`` of sequence ``s``, so any per-token quantity -- the reward at a sequence's last
token, the logits predicting token ``t`` (at ``where[s, t - 1]``) -- is a gather.  Whether a
model honours a custom 4-D mask with explicit position ids is checked once per model
(:func:`check_lm`, :func:`check_scores`); models that do not keep the plain packed rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kilter import fastpaths
from kilter.models.packed import best_packing


@dataclass
class SharedPrefixBatch:
    input_ids: torch.Tensor
    """(R, W) packed token ids."""
    position_ids: torch.Tensor
    """(R, W) each token's position within its own sequence."""
    attention_mask: torch.Tensor
    """(R, 1, W, W) bool: query (row, j) may attend key (row, i)."""
    where: torch.Tensor
    """(S, L) flat index of token t of sequence s (-1 past the end), S sequences in input order."""
    lengths: torch.Tensor
    """(S,) tokens per sequence."""
    n_tokens: int
    """Token slots computed (prefixes counted once), padding excluded."""

    def to(self, device) -> SharedPrefixBatch:
        return SharedPrefixBatch(self.input_ids.to(device), self.position_ids.to(device),
                                 self.attention_mask.to(device), self.where.to(device), self.lengths.to(device),
                                 self.n_tokens)

    def last_index(self) -> torch.Tensor:
        """(S,) flat index of every sequence's last token."""
        return self.where.gather(1, (self.lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)


def common_prefix(seqs: list[list[int]]) -> int:
    """Length of the longest common prefix of token lists (the whole list for a single sequence)."""
    if len(seqs) == 1:
        return len(seqs[0])
    n = 0
    for column in zip(*seqs):
        if any(t != column[0] for t in column[1:]):
            break
        n += 1
    return n


def pack_groups(groups: list[list[list[int]]], pad_id: int, capacity: int,
                attention_weight: float = 0.0) -> SharedPrefixBatch:
    """Lay groups of token lists out with one shared prefix each, packed into rows of at most
    ``capacity`` token slots (a group longer than that gets a row of its own).

    Sequence s is the s-th list in reading order (group by group).  Row tails are padding
    that attends only to itself, so no query row of the mask is empty.  ``attention_weight``
    as in :func:`kilter.models.packed.best_packing`.
    """
    prefixes = [common_prefix(g) for g in groups]
    units = [p + sum(len(s) - p for s in g) for g, p in zip(groups, prefixes)]
    rows, width = best_packing(units, capacity, attention_weight)
    n_rows = len(rows)
    ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    pos = torch.zeros((n_rows, width), dtype=torch.long)
    group_of = torch.full((n_rows, width), -1, dtype=torch.long)  # -1: padding
    part_of = torch.zeros((n_rows, width), dtype=torch.long)      # 0: prefix (or padding), k: k-th sequence
    seq_offset = [0]
    for g in groups:
        seq_offset.append(seq_offset[-1] + len(g))
    n_seq = seq_offset[-1]
    longest = max((len(s) for g in groups for s in g), default=1)
    where = torch.full((n_seq, max(longest, 1)), -1, dtype=torch.long)
    lengths = torch.tensor([len(s) for g in groups for s in g], dtype=torch.long)
    for r, row in enumerate(rows):
        col = 0
        for gi in row:
            g, p = groups[gi], prefixes[gi]
            prefix = g[0][:p]
            ids[r, col:col + p] = torch.tensor(prefix, dtype=torch.long)
            pos[r, col:col + p] = torch.arange(p)
            group_of[r, col:col + p] = gi
            prefix_flat = r * width + col + torch.arange(p)
            col += p
            for k, seq in enumerate(g):
                own = seq[p:]
                s = seq_offset[gi] + k
                ids[r, col:col + len(own)] = torch.tensor(own, dtype=torch.long)
                pos[r, col:col + len(own)] = torch.arange(p, p + len(own))
                group_of[r, col:col + len(own)] = gi
                part_of[r, col:col + len(own)] = k + 1
                where[s, :p] = prefix_flat
                where[s, p:len(seq)] = r * width + col + torch.arange(len(own))
                col += len(own)
        pos[r, col:] = torch.arange(width - col)
    order = torch.arange(width)
    causal = order[None, :, None] >= order[None, None, :]  # (1, query, key)
    same_group = group_of[:, :, None] == group_of[:, None, :]
    visible_part = (part_of[:, None, :] == 0) | (part_of[:, :, None] == part_of[:, None, :])
    pad_self = (group_of[:, :, None] == -1) & (group_of[:, None, :] == -1)
    mask = causal & ((same_group & visible_part & (group_of[:, :, None] >= 0)) | pad_self)
    return SharedPrefixBatch(ids, pos, mask.unsqueeze(1), where, lengths, int(sum(units)))


def predicting_index(batch: SharedPrefixBatch, seq: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Flat index of the hidden state that predicts token ``t`` (>= 1) of sequence ``seq``: (M,) each."""
    return batch.where[seq, t - 1]


# --------------------------------------------------------------------------- model checks


def _probe_groups(vocab: int, pad: int) -> list[list[list[int]]]:
    gen = torch.Generator().manual_seed(0)

    def draw(n: int) -> list[int]:
        return [t if t != pad else (pad + 1) % vocab for t in torch.randint(0, vocab, (n,), generator=gen).tolist()]

    prefix = draw(4)
    return [[prefix + draw(3), prefix + draw(5)], [draw(6)]]


def check_lm(model, wrapper, device: str) -> bool:
    """True if ``wrapper`` (a :class:`~kilter.models.packed.CompletionLogits` of ``model``) gives,
    on shared-prefix rows, the logits of separate forwards."""
    was_training = model.training
    model.eval()
    try:
        vocab = model.get_input_embeddings().weight.shape[0]
        groups = _probe_groups(vocab, -1)
        batch = pack_groups(groups, pad_id=0, capacity=64).to(device)
        seqs = [s for g in groups for s in g]
        with torch.no_grad():
            want = torch.cat([model(input_ids=torch.tensor([s], device=device), use_cache=False).logits[0].float()
                              for s in seqs])
            index = torch.cat([batch.where[i, :len(s)] for i, s in enumerate(seqs)])
            got = wrapper(batch.input_ids, batch.attention_mask, batch.position_ids, index=index).float()
        ok = bool(torch.allclose(got, want, atol=1e-4, rtol=1e-4))
        reason = "" if ok else "a 4-D shared-prefix mask gives other logits than separate forwards"
    except fastpaths.PROBE_ERRORS as exc:  # such a model keeps the plain packed rows
        ok, reason = False, f"{type(exc).__name__}: {exc}"
    finally:
        model.train(was_training)
    return fastpaths.decide("shared_prefix", ok, reason)


def check_scores(model, wrapper, device: str) -> bool:
    """True if ``wrapper`` (a :class:`~kilter.models.packed.LastTokenScores`) gives, on shared-prefix
    rows, the padded reward model's scores."""
    from kilter.models.reward import raw_scores

    was_training = model.training
    model.eval()
    try:
        vocab = model.get_input_embeddings().weight.shape[0]
        pad = int(getattr(model.config, "pad_token_id", None) or 0)
        groups = _probe_groups(vocab, pad)
        seqs = [s for g in groups for s in g]
        batch = pack_groups(groups, pad_id=pad, capacity=64).to(device)
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        with torch.no_grad():
            want = raw_scores(model, ids.to(device), mask.to(device))
            got = wrapper(batch.input_ids, batch.position_ids, batch.last_index(), attention_mask=batch.attention_mask)
        ok = bool(torch.allclose(got, want, atol=1e-4, rtol=1e-4))
        reason = "" if ok else "a 4-D shared-prefix mask gives other scores than the padded reward model"
    except fastpaths.PROBE_ERRORS as exc:  # such a model keeps the plain packed rows
        ok, reason = False, f"{type(exc).__name__}: {exc}"
    finally:
        model.train(was_training)
    return fastpaths.decide("shared_prefix_scores", ok, reason)
