"""The learning half of ``kilter ppo``: advantages for each algorithm and the update epochs.

Kept apart from :mod:`kilter.trainers.ppo` (config, models, rollout loop, checkpoints) so
each file reads top to bottom.  Everything here works on one rollout batch of N responses
laid out as :class:`kilter.rollout.scoring.RolloutBatch` with (N, R) per-token tensors.

When the update's first minibatch is the whole rollout in one micro-batch, its forward passes
run *before* scoring (:func:`first_pass`) and serve both as the rollout's old log-probs,
entropy and values (detached) and as the first gradient step's graph: the no-grad scoring
forwards of policy and critic would compute exactly the same numbers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from kilter.losses import causal_lm_loss, pg_loss, ppo_policy_loss, ppo_value_loss
from kilter.losses.ppo import aggregate, aggregation_weight, kl_penalty_loss
from kilter.models.precision import autocast
from kilter.models.value import TrunkValueHead
from kilter.ops import (
    build_token_rewards,
    discounted_returns,
    gae,
    grpo_advantages,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    rloo_advantages,
)
from kilter.ops.kl import kl_placement
from kilter.ops.masked import Reduce
from kilter.rollout.scoring import RolloutBatch, token_logprobs, token_scores, token_values
from kilter.training.optim import clip_and_norm
from kilter.training.parallel import Ranks

CLIPPED = ("ppo", "rloo", "grpo")
"""Algorithms that optimise the clipped surrogate (and may take several epochs per batch)."""
CRITIC = ("ppo", "a2c")
"""Algorithms with a learned value function."""


def on_trunk(value_model) -> bool:
    """True for ``value.model=trunk``: the critic is a head on the policy's own forward
    (:class:`kilter.models.value.TrunkValueHead`), trained through the policy's backward and optimizer."""
    return isinstance(value_model, TrunkValueHead)


# --------------------------------------------------------------------------- advantages


@dataclass
class Advantages:
    advantages: torch.Tensor
    """(N, R) per-token advantages (0 on padding)."""
    returns: torch.Tensor | None
    """(N, R) value targets for the critic (ppo/a2c), else None."""
    baseline: torch.Tensor | None = None
    """(N,) the baseline subtracted per response (reinforce/rloo/grpo), for logging."""


class MovingAverageBaseline:
    """b <- decay * b + (1 - decay) * mean(batch returns); the first batch sets b directly.

    The baseline used for a batch is the value *before* that batch is folded in, so it does
    not depend on the batch's own actions (which keeps the policy gradient unbiased); before
    any batch has been seen it is 0 (no baseline), never the first batch's own mean.
    """

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.value: float | None = None

    def current(self) -> float:
        return 0.0 if self.value is None else self.value

    def update(self, batch_mean: float) -> None:
        self.value = batch_mean if self.value is None else self.decay * self.value + (1 - self.decay) * batch_mean

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float,
                   estimator: str) -> torch.Tensor:
    """(N, R) per-token rewards: the score on the last token, and ``-beta * k1`` per token when
    the estimator's penalty belongs in the reward (:func:`kilter.ops.kl.kl_placement`).

    With k2/k3 the penalty is a loss term instead, so the rewards -- and every advantage built
    from them, GRPO's group-standardised ones included -- do not depend on beta at all.
    """
    in_reward = kl_placement(estimator) == "reward"
    return build_token_rewards(scores, kl, mask, beta if in_reward else 0.0)


def sequence_returns(token_rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, R) -> (N,): the undiscounted return of each response (score minus its summed KL penalty)."""
    return masked_sum(token_rewards, mask, dim=1)


def compute_advantages(algorithm: str, token_rewards: torch.Tensor, mask: torch.Tensor, *,
                       values: torch.Tensor | None = None, gamma: float = 1.0, lam: float = 0.95,
                       group_size: int = 1, baseline: torch.Tensor | None = None, whiten: bool = True,
                       group_std_scale: bool = True, reduce: Reduce | None = None) -> Advantages:
    """Per-token advantages for one rollout batch.

    token_rewards, mask: (N, R) -- the score on the last token, plus ``-beta * k1`` per token
    when the KL penalty is in the reward (with k2/k3 it is a loss term and not here).

    * ppo / a2c: GAE(gamma, lambda) over the critic's ``values`` (N, R); returns = A + V.
    * reinforce: reward-to-go G_t (discount gamma) minus ``baseline`` (N,) per response.
    * rloo / grpo: the whole response is one action; its return is compared with the other
      ``group_size - 1`` samples of its prompt (RLOO: score - beta * summed k1, as in Ahmadian
      et al. 2024) or standardised within the group (GRPO: the score alone, Shao et al. 2024
      eq. 3; ``group_std_scale=False`` only centres it, Dr. GRPO), and every token gets it.

    ``whiten`` normalises the advantages over all response tokens of the batch; for the
    group methods only the scale changes (their group baseline already centres them, and
    shifting the mean could flip the sign of a near-zero advantage).  The trainer turns it off
    for GRPO by default, whose group std already scales them.  ``reduce`` (data-parallel runs:
    a sum over the processes) makes the whitening statistics those of every process's rows, so
    two processes with half the rollout each whiten exactly as one process with all of it.
    Everything else is per response or per prompt group, and a prompt's k samples stay on one
    process.
    """
    if algorithm in CRITIC:
        if values is None:
            raise ValueError(f"{algorithm} needs critic values")
        adv, returns = gae(token_rewards, values, mask, gamma, lam)
        base = None
    elif algorithm == "reinforce":
        returns_to_go = discounted_returns(token_rewards, mask, gamma)
        base = baseline if baseline is not None else torch.zeros(mask.shape[0], device=mask.device)
        adv = (returns_to_go - base.unsqueeze(1)) * mask
        returns = None
    elif algorithm in ("rloo", "grpo"):
        totals = sequence_returns(token_rewards, mask)
        seq_adv = (rloo_advantages(totals, group_size) if algorithm == "rloo"
                   else grpo_advantages(totals, group_size, scale=group_std_scale))
        base = totals - seq_adv if algorithm == "rloo" else None
        adv = seq_adv.unsqueeze(1) * mask
        returns = None
    else:
        raise ValueError(f"unknown algorithm {algorithm!r}")
    if whiten and algorithm in ("rloo", "grpo"):
        adv = adv * torch.rsqrt(masked_var(adv, mask, reduce=reduce) + 1e-8)
    elif whiten:
        adv = masked_whiten(adv, mask, reduce=reduce)
    return Advantages(adv, returns, base)


# --------------------------------------------------------------------------- update


@dataclass
class UpdateSettings:
    algorithm: str
    epochs: int
    num_minibatches: int
    grad_accum: int
    clip_range: float
    clip_range_value: float
    entropy_coef: float
    target_kl: float | None
    temperature: float
    precision: str
    max_grad_norm: float | None
    value_max_grad_norm: float | None
    ptx_coef: float = 0.0
    fuse_first_pass: bool = True
    """Reuse the scoring forwards as the first minibatch's when that is the whole rollout (:func:`first_pass`)."""
    kl_loss: str | None = None
    """k2 or k3: the KL penalty is a loss term beta * aggregate(k(logp, ref_logp)); None: it is in the reward."""
    aggregation: str = "token_mean"
    """How per-token losses are reduced (:func:`kilter.losses.ppo.aggregate`)."""
    normaliser: float | None = None
    """The constant of aggregation='constant' (the generation budget, max_new_tokens)."""
    vf_coef: float = 0.1
    """With a :class:`TrunkValueHead` critic: the value loss's weight in the policy's one backward."""


class PtxStream:
    """Demonstration batches for PPO-ptx, in an order fixed by (seed, position) for exact resume."""

    def __init__(self, examples: list[dict], batch_size: int, seed: int, pad_id: int, rank: int = 0,
                 world: int = 1) -> None:
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.rank, self.world = rank, world  # data-parallel: rank r takes every world-th row of the shared order
        self.position = 0
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._orders = {epoch: torch.randperm(len(self.examples), generator=gen).tolist()}
        return self._orders[epoch]

    def next_batch(self, device) -> dict[str, torch.Tensor]:
        from kilter.data.collate import pad_batch

        rows = []
        for _ in range(self.batch_size):
            epoch, offset = divmod(self.position * self.world + self.rank, len(self.examples))
            rows.append(self.examples[self._order(epoch)[offset]])
            self.position += 1
        batch = pad_batch(rows, self.pad_id, keys=("input_ids", "labels"))
        return {k: v.to(device) for k, v in batch.items()}


def _minibatch_order(n: int, seed: int, iteration: int, epoch: int) -> torch.Tensor:
    # A pure function of (seed, iteration, epoch): a resumed run shuffles exactly like an uninterrupted one.
    gen = torch.Generator().manual_seed((seed * 1_000_003 + iteration) * 1009 + epoch)
    return torch.randperm(n, generator=gen)


@contextlib.contextmanager
def _training(*models) -> Iterator[None]:
    # Dropout is off in every model, so train() changes no number; it only lets gradient
    # checkpointing (active in training mode only) do its work.
    live = [mod for mod in models if mod is not None]
    for mod in live:
        mod.train()
    try:
        yield
    finally:
        for mod in live:
            mod.eval()


# --------------------------------------------------------------------------- the fused first pass


@dataclass
class FirstPass:
    """The update's first micro-batch, run forward with grad before the rollout is scored.

    ``logp``/``entropy``/``values`` are (N, R') live outputs on ``sub`` (rows in ``rows``
    order, columns trimmed) that the first gradient step backpropagates through (``entropy``
    only with an entropy bonus, ``values`` only with a critic);
    ``old_logp``/``old_entropy``/``old_values`` are the same numbers detached, as (N, R)
    tensors in the batch's own row order with 0 on padding -- what the no-grad scoring
    forwards (:func:`kilter.rollout.scoring.batched_logprobs`, ``batched_values``) return.
    """

    rows: torch.Tensor
    sub: RolloutBatch
    logp: torch.Tensor
    entropy: torch.Tensor | None
    values: torch.Tensor | None
    old_logp: torch.Tensor
    old_entropy: torch.Tensor
    old_values: torch.Tensor | None


def fuses_first_pass(s: UpdateSettings) -> bool:
    """True when epoch 0's first (and only) minibatch is the whole rollout in one micro-batch."""
    return s.fuse_first_pass and s.num_minibatches == 1 and s.grad_accum == 1


def _scatter(n: int, width: int, rows: torch.Tensor, part: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(n', R') rows of ``part`` (masked, detached) -> (n, width) in batch order, 0 elsewhere."""
    out = torch.zeros(n, width, device=part.device)
    out[rows, :part.shape[1]] = part.detach().float() * mask
    return out


def first_pass(policy, value_model, batch: RolloutBatch, s: UpdateSettings, *, seed: int,
               iteration: int) -> FirstPass:
    """Forward the policy (and the critic) with grad on the whole rollout, as the update's first step would.

    The micro-batch is the one :func:`run_update` builds for epoch 0 (same shuffle, same
    trimming), and the forwards are :func:`token_logprobs` / :func:`token_values` at the
    update's temperature and precision, in training mode: exactly what the step computes.
    Since the parameters have not moved and dropout is off, the detached outputs are the
    rollout's old log-probs, entropy and values, and the first step's ratio is exactly 1
    (as in TRL's GRPO/RLOO, where old = current.detach() for a single pass).  Both graphs
    stay alive until that step, so peak memory holds the policy's and the critic's
    activations at once (the unfused update frees the first before building the second).
    """
    if not fuses_first_pass(s):
        raise ValueError("first_pass needs num_minibatches == 1, grad_accum == 1 and fuse_first_pass")
    n, width = batch.response_mask.shape
    rows = _minibatch_order(n, seed, iteration, 0).to(batch.input_ids.device)
    sub = batch.select(rows)
    mask = sub.response_mask
    with _training(policy, value_model):
        if on_trunk(value_model):  # one forward: log-probs and the head's values
            logp, entropy, values = token_scores(policy, sub, s.temperature, s.precision, with_entropy=True,
                                                 value_head=value_model)
        else:
            logp, entropy = token_logprobs(policy, sub, s.temperature, s.precision, with_entropy=True)
            values = token_values(value_model, sub, s.precision) if value_model is not None else None
    return FirstPass(
        rows=rows, sub=sub, logp=logp, entropy=entropy if s.entropy_coef > 0 else None, values=values,
        old_logp=_scatter(n, width, rows, logp, mask), old_entropy=_scatter(n, width, rows, entropy, mask),
        old_values=_scatter(n, width, rows, values, mask) if values is not None else None)


# --------------------------------------------------------------------------- the update


def run_update(policy, value_model, policy_opt, value_opt, batch: RolloutBatch, old_logp: torch.Tensor,
               adv: Advantages, old_values: torch.Tensor | None, s: UpdateSettings, *, seed: int, iteration: int,
               ptx: PtxStream | None = None, first: FirstPass | None = None, ref_logp: torch.Tensor | None = None,
               beta: float = 0.0, ranks: Ranks | None = None) -> dict[str, float]:
    """Epochs over shuffled minibatches of the rollout; returns the iteration's update metrics.

    Each minibatch is split into ``grad_accum`` micro-batches whose token-mean losses are
    weighted by their share of the minibatch's response tokens, so the step equals one on the
    whole minibatch.  With ``target_kl`` set, a minibatch whose approximate KL to the
    sampling policy already exceeds it is not applied and the update stops (early stopping,
    as in Stable-Baselines3's PPO).  ``first`` (from :func:`first_pass` on this batch, before
    any step) replaces the forwards of epoch 0's minibatch; ``old_logp``/``old_values`` are
    then its detached outputs.  With ``s.kl_loss`` (k2/k3), ``beta`` times the KL loss term
    against ``ref_logp`` (N, R) is added to every step's policy loss.

    ``ranks`` (data-parallel runs): this process holds its share of the rollout.  Each
    micro-batch's loss is weighted by its share of the *global* minibatch divided by the number
    of processes, so the gradients averaged over the processes (by :meth:`Ranks.sync_gradients`,
    or by FSDP's reduce-scatter) equal one process's gradient on the whole minibatch; the
    early-stopping KL is the processes' mean, so they all stop at the same step.
    """
    if s.kl_loss is not None and ref_logp is None:
        raise ValueError("a KL loss term needs the reference log-probs")
    if first is not None and not fuses_first_pass(s):
        raise ValueError("a FirstPass is only usable when the first minibatch is the whole rollout")
    sums: dict[str, float] = {}

    def add(key: str, value: float, weight: float = 1.0) -> None:
        sums[key] = sums.get(key, 0.0) + value * weight

    with _training(policy, value_model):
        stopped, steps, count, tokens_seen = _epochs(policy, value_model, policy_opt, value_opt, batch, old_logp, adv,
                                                     old_values, s, seed, iteration, ptx, add, first, ref_logp, beta,
                                                     ranks)
    out = {k: v / max(count, 1) for k, v in sums.items()}
    out["ppo/optimizer_steps"] = float(steps)
    out["ppo/early_stopped"] = float(stopped)
    out["ppo/epochs"] = steps / s.num_minibatches
    out["_train_tokens"] = tokens_seen
    return out


def _micro_step(policy, value_model, sub: RolloutBatch, rows: torch.Tensor, old_logp: torch.Tensor,
                adv: Advantages, old_values: torch.Tensor | None, s: UpdateSettings, weight: float,
                live: FirstPass | None = None, ref_logp: torch.Tensor | None = None,
                beta: float = 0.0, value_weight: float | None = None) -> dict[str, float]:
    """Forward and backward of one micro-batch (policy losses scaled by ``weight``, the critic's
    token-mean loss by ``value_weight``, its share of the minibatch's tokens); returns its stats.

    With ``live`` (the fused first pass on exactly this micro-batch) its forward outputs are used.
    With a :class:`TrunkValueHead` critic the values come from the policy's own forward and
    ``s.vf_coef`` x the value loss joins the policy loss in one backward.
    """
    cols = sub.response_mask.shape[1]
    mask = sub.response_mask
    trunk = on_trunk(value_model)
    trunk_values = None
    if live is not None:
        logp, entropy = live.logp, live.entropy
        trunk_values = live.values if trunk else None
    elif trunk:
        logp, entropy, trunk_values = token_scores(policy, sub, s.temperature, s.precision,
                                                   with_entropy=s.entropy_coef > 0, value_head=value_model)
    else:
        logp, entropy = token_logprobs(policy, sub, s.temperature, s.precision, with_entropy=s.entropy_coef > 0)
    sub_adv, sub_old = adv.advantages[rows, :cols], old_logp[rows, :cols]
    stats: dict[str, float] = {}
    if s.algorithm in CLIPPED:
        loss, pstats = ppo_policy_loss(logp, sub_old, sub_adv, mask, s.clip_range, s.aggregation, s.normaliser)
        stats["policy/clipfrac"], stats["policy/approx_kl"] = float(pstats["clipfrac"]), float(pstats["approx_kl"])
    else:
        loss = pg_loss(logp, sub_adv, mask, s.aggregation, s.normaliser)
        with torch.no_grad():
            log_ratio = (logp - sub_old) * mask
            stats["policy/approx_kl"] = float(masked_mean(torch.expm1(log_ratio) - log_ratio, mask))
        stats["policy/clipfrac"] = 0.0
    stats["loss/policy"] = float(loss.detach())
    if s.kl_loss is not None and ref_logp is not None:
        kl_term = kl_penalty_loss(logp, ref_logp[rows, :cols], mask, s.kl_loss, s.aggregation, s.normaliser)
        loss = loss + beta * kl_term
        stats["loss/kl"] = float(kl_term.detach())
    if entropy is not None:
        ent = aggregate(entropy, mask, s.aggregation, s.normaliser)  # reduced like the policy loss
        loss = loss - s.entropy_coef * ent
        stats["loss/entropy"] = float(ent.detach())
    total = loss * weight
    if not trunk:  # a separate critic: its own forward and backward below
        total.backward()
    if value_model is not None and adv.returns is not None and old_values is not None:
        if trunk_values is not None:
            values = trunk_values
        elif live is not None and live.values is not None:
            values = live.values
        else:
            values = token_values(value_model, sub, s.precision)
        # a2c takes one unclipped step: an infinite clip range is the plain squared error.
        clip_v = s.clip_range_value if s.algorithm == "ppo" else math.inf
        v_loss, v_stats = ppo_value_loss(values, old_values[rows, :cols], adv.returns[rows, :cols], mask, clip_v)
        v_scaled = v_loss * (weight if value_weight is None else value_weight)
        if trunk:
            total = total + s.vf_coef * v_scaled
        else:
            v_scaled.backward()
        stats["loss/value"], stats["value/clipfrac"] = float(v_loss.detach()), float(v_stats["clipfrac"])
    if trunk:  # one backward through the shared forward: policy loss + vf_coef x value loss
        total.backward()
    return stats


def _ptx_step(policy, ptx: PtxStream, s: UpdateSettings, device: torch.device) -> float:
    """Add ``ptx_coef`` x the SFT loss of one demonstration batch to the gradients (InstructGPT eq. 2)."""
    demo = ptx.next_batch(device)
    with autocast(s.precision, device.type):
        logits = policy(input_ids=demo["input_ids"], attention_mask=demo["attention_mask"], use_cache=False).logits
    lm_loss, _ = causal_lm_loss(logits, demo["labels"])
    (s.ptx_coef * lm_loss).backward()
    return float(lm_loss.detach())


def _epochs(policy, value_model, policy_opt, value_opt, batch, old_logp, adv, old_values, s: UpdateSettings,
            seed: int, iteration: int, ptx, add, first: FirstPass | None = None, ref_logp: torch.Tensor | None = None,
            beta: float = 0.0, ranks: Ranks | None = None) -> tuple[bool, int, int, float]:
    n = len(batch)
    mb_size = n // s.num_minibatches
    micro_size = mb_size // s.grad_accum
    epochs = s.epochs if s.algorithm in CLIPPED else 1
    count = 0
    tokens_seen = 0.0
    for epoch in range(epochs):
        order = _minibatch_order(n, seed, iteration, epoch)
        for m in range(s.num_minibatches):
            rows = order[m * mb_size:(m + 1) * mb_size]
            mb_mask = batch.response_mask[rows]
            mb_tokens = float(mb_mask.sum())
            mb_rows = int((mb_mask.sum(-1) > 0).sum()) if s.aggregation == "sequence_mean" else len(rows)
            if ranks is not None and ranks.enabled:  # the global minibatch's counts, per process
                both = ranks.sum(torch.tensor([mb_tokens, float(mb_rows)], dtype=torch.float64,
                                              device=batch.input_ids.device)) / ranks.world
                mb_tokens, mb_rows = float(both[0]), float(both[1])
            mb_stats: dict[str, float] = {}
            for k in range(s.grad_accum):
                micro_rows = rows[k * micro_size:(k + 1) * micro_size]
                live = first if epoch == 0 and m == 0 and k == 0 else None
                if live is not None and not torch.equal(live.rows.cpu(), micro_rows.cpu()):
                    raise ValueError("the FirstPass was built for another iteration or seed")
                sub = live.sub if live is not None else batch.select(micro_rows)
                weight = aggregation_weight(sub.response_mask, mb_rows, mb_tokens, s.aggregation)
                tokens_seen += float(sub.attention_mask.sum())
                for key, value in _micro_step(policy, value_model, sub, micro_rows, old_logp, adv, old_values, s,
                                              weight, live, ref_logp, beta,
                                              float(sub.response_mask.sum()) / max(mb_tokens, 1.0)).items():
                    mb_stats[key] = mb_stats.get(key, 0.0) + value * weight
            if ptx is not None and s.ptx_coef > 0:
                mb_stats["loss/ptx"] = _ptx_step(policy, ptx, s, batch.input_ids.device)
            if ranks is not None and s.target_kl is not None:
                mb_stats["policy/approx_kl"] = ranks.mean(mb_stats["policy/approx_kl"])
            if s.target_kl is not None and mb_stats["policy/approx_kl"] > s.target_kl:
                policy_opt.zero_grad(set_to_none=True)
                if value_opt is not None:
                    value_opt.zero_grad(set_to_none=True)
                return True, count, count, tokens_seen
            if ranks is not None:
                ranks.sync_gradients(policy)
                ranks.sync_gradients(value_model if value_opt is not None or on_trunk(value_model) else None)
            # a trunk head is trained by the policy's optimizer and clipped with the policy's weights
            clipped = [*policy.parameters(), *(value_model.parameters() if on_trunk(value_model) else ())]
            mb_stats["optim/grad_norm"] = clip_and_norm(clipped, s.max_grad_norm)
            policy_opt.step()
            policy_opt.zero_grad(set_to_none=True)
            if value_opt is not None and value_model is not None:
                mb_stats["optim/value_grad_norm"] = clip_and_norm(value_model.parameters(),
                                                                         s.value_max_grad_norm)
                value_opt.step()
                value_opt.zero_grad(set_to_none=True)
            for key, value in mb_stats.items():
                add(key, value)
            count += 1
    return False, count, count, tokens_seen
