"""Direct preference optimisation on comparisons or rankings (``kilter dpo``).

DPO (Rafailov et al. 2023) skips the reward model: the policy's log-ratio to a frozen
reference, beta * log(pi / pi_ref), is an implicit reward, and a Bradley-Terry loss on
that reward is minimised directly on the labeled pairs.  The same loop runs IPO
(``loss_type=ipo``, Azar et al. 2023) and conservative DPO (``label_smoothing`` > 0).

One optimizer step: the chosen and rejected responses of B pairs are forwarded as one
batch of 2B rows; their summed response log-probs under the policy and the reference
(precomputed once into ``ref_logps.pt``, or computed on the fly) give the per-pair losses.
Losses are summed over the whole step and divided by the number of pairs in it, across
gradient-accumulation micro-batches and data-parallel ranks, as in ``kilter sft``.

K-way rankings become pairs: every non-tied pair (``ranking_pairs: all``) or the best
response against each worse one (``best_vs_rest``).  The comparisons' optional
``strength`` is not used by the loss.
"""

from __future__ import annotations

import sys
from typing import ClassVar, Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm

from kilter.data.collate import pad_batch
from kilter.data.preferences import split_eval
from kilter.data.sources import load_records
from kilter.data.tokenize import encode_pair
from kilter.distributed import DistInfo
from kilter.errors import ConfigError, DataError
from kilter.losses import dpo_loss, pairwise_accuracy, ranking_pairs
from kilter.models import logprobs, packed
from kilter.models.logprobs import sequence_logps
from kilter.models.lora import describe_parameters
from kilter.models.reference import Reference, cached_sequence_logps
from kilter.rewards.base import load_function
from kilter.training.args import DataArgs, PreferenceArgs
from kilter.training.batching import accumulation_context
from kilter.training.loop import MetricWindow, StepPlan, due, finish, start_training
from kilter.training.parallel import gathered, wrap_model
from kilter.training.policy import load_policy
from kilter.training.samples import SampleSection, log_samples, sample_prompts
from kilter.training.setup import launch, open_run_dir, prepare

# --------------------------------------------------------------------------- config


class DPOData(DataArgs):
    """Where the preference pairs come from and how they are cut and batched."""

    help_overrides: ClassVar[dict[str, str]] = {
        "group_by_length": "Batch pairs of similar length together to cut padding.",
    }
    """--help for the shared data fields, in this trainer's terms."""

    train: str = "runs/labels/comparisons.jsonl"
    """Comparisons {prompt, chosen, rejected} or rankings {prompt, responses, ranks}: .jsonl/.json/.csv/.parquet or a save_to_disk folder."""
    eval: str | None = None
    """Held-out pairs for eval metrics (null: hold out eval_fraction of the training prompts, or none)."""
    kind: Literal["auto", "comparison", "ranking"] = "auto"
    """Record kind of the files (auto: judged from the first row's fields)."""
    ranking_pairs: Literal["all", "best_vs_rest"] = "all"
    """How a ranking becomes pairs: every non-tied pair, or the best response against each worse one."""
    eval_fraction: float = Field(0.0, ge=0, lt=1)
    """Without data.eval, hold out this fraction of the training prompts (all their pairs) for evaluation."""
    padding_free: bool = True
    """Pack each micro-batch into rows (no padding; chosen and rejected share one copy of their prompt) with logits only on responses; checked once against the padded forward, off when the model does not support it."""
    max_eval_pairs: int = Field(512, gt=0)
    """Evaluate on at most this many held-out pairs."""


class DPOConfig(PreferenceArgs):
    """Direct preference optimisation (sigmoid DPO, IPO, conservative DPO) on labeled pairs."""

    help_overrides: ClassVar[dict[str, str]] = {
        "batch_size": "Pairs per micro-batch on each process (each pair is two rows).",
        "epochs": "Passes over the training pairs (ignored when max_steps is set).",
        "seed": "Seed for data order, the eval split and sampling.",
    }
    """--help for the shared fields, in this trainer's terms."""

    output_dir: str = "runs/dpo"
    """Run directory (config.yaml, metrics.jsonl, ref_logps.pt, checkpoints/, final/)."""
    data: DPOData = DPOData()
    """Training and evaluation pairs."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: DPO (Rafailov et al. 2023); ipo: squared loss to the margin 1/(2 beta) (Azar et al. 2023)."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """Conservative DPO: assumed probability that a label is flipped (sigmoid loss only)."""
    average_logps: bool | None = None
    """Per-token mean instead of summed response log-probs; null: mean for ipo (the IPO paper's experiments, as TRL), sum for sigmoid."""

    @property
    def averages_logps(self) -> bool:
        """average_logps, or its default: per-token means for ipo, sums for sigmoid."""
        return self.average_logps if self.average_logps is not None else self.loss_type == "ipo"


# --------------------------------------------------------------------------- pairs


def ranking_to_pairs(record: dict, mode: str = "all") -> list[dict]:
    """Comparison records from one ranking {prompt, responses, ranks} (rank 1 best, ties give no pair).

    ``all``: every non-tied pair (C(K, 2) without ties); ``best_vs_rest``: each best-ranked
    response against every worse one (K - 1 without ties).
    """
    ranks, responses = record["ranks"], record["responses"]
    if mode == "all":
        index_pairs = ranking_pairs(ranks)
    elif mode == "best_vs_rest":
        best = min(ranks)
        index_pairs = [(i, j) for i in range(len(ranks)) if ranks[i] == best
                       for j in range(len(ranks)) if ranks[j] > best]
    else:
        raise ConfigError(f"data.ranking_pairs must be 'all' or 'best_vs_rest', got {mode!r}")
    return [{"prompt": record["prompt"], "chosen": responses[i], "rejected": responses[j]} for i, j in index_pairs]


def load_pairs(spec: str, data: DPOData, split: str | None = None) -> tuple[list[dict], int]:
    """Comparison records from a comparison or ranking source; returns (pairs, rows skipped).

    ``split`` is data.split for data.train only; data.eval names its own (``DIR:split``).
    """
    from kilter.data.preferences import detect_kind

    kind = (detect_kind(spec, split, allowed=("comparison", "ranking"), format=data.format)
            if data.kind == "auto" else data.kind)
    records = load_records(spec, kind, skip_invalid=data.skip_invalid, split=split, format=data.format)
    if kind == "comparison":
        return list(records.rows), records.n_skipped
    pairs = [p for r in records.rows for p in ranking_to_pairs(r, data.ranking_pairs)]
    if not pairs:
        raise DataError(f"{spec}: none of its {len(records.rows)} rankings yields a pair (all ranks tie)")
    return pairs, records.n_skipped


def encode_pairs(tokenizer, pairs: list[dict], max_length: int) -> list[dict]:
    """``{"chosen": example, "rejected": example}`` per pair, with identical prompt ids."""
    return [encode_pair(tokenizer, p["prompt"], p["chosen"], p["rejected"], max_length) for p in pairs]


def pair_batch(encoded: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """One padded batch of 2B rows: the B chosen responses, then the B rejected ones."""
    rows = [e["chosen"] for e in encoded] + [e["rejected"] for e in encoded]
    return pad_batch(rows, pad_id, keys=("input_ids", "labels"))


def flat_examples(encoded: list[dict]) -> list[dict]:
    """[chosen_0, rejected_0, chosen_1, ...] for precomputing and packed rows; reshape results to (N, 2)."""
    return [e[side] for e in encoded for side in ("chosen", "rejected")]


# --------------------------------------------------------------------------- statistics

_NAMES = {"loss": "loss", "chosen": "rewards/chosen", "rejected": "rewards/rejected", "accuracy": "rewards/accuracy",
          "margin": "rewards/margin", "logps_chosen": "logps/chosen", "logps_rejected": "logps/rejected"}
"""Metric names of the per-pair statistics (``loss`` is renamed by the caller: loss/dpo, eval/loss)."""


def pair_stats(losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected) -> dict[str, float]:
    """Per-batch sums of the logged per-pair quantities (keys of ``_NAMES``)."""
    n = losses.numel()
    return {"loss": losses.detach().sum(), "chosen": chosen_rewards.sum(), "rejected": rejected_rewards.sum(),
            "accuracy": pairwise_accuracy(chosen_rewards, rejected_rewards) * n,
            "margin": (chosen_rewards - rejected_rewards).sum(), "logps_chosen": policy_chosen.detach().sum(),
            "logps_rejected": policy_rejected.detach().sum()}


def stats_to_metrics(sums: dict[str, float], prefix: str, loss_key: str) -> dict[str, float]:
    """Means per pair of the summed statistics (``sums["pairs"]`` pairs), named for metrics.jsonl."""
    count = max(sums["pairs"], 1.0)
    return {prefix + (loss_key if k == "loss" else name): sums[k] / count for k, name in _NAMES.items()}


@torch.no_grad()
def evaluate(model, reference: Reference | None, encoded: list[dict], ref_logps: torch.Tensor | None,
             cfg: DPOConfig, pad_id: int, info: DistInfo) -> dict[str, float]:
    """Loss, implicit-reward accuracy/margin and log-probs on held-out pairs (eval/* keys)."""
    was_training = model.training
    model.eval()
    window = MetricWindow(info)
    window.add(pairs=0.0, **dict.fromkeys(_NAMES, 0.0))  # every rank adds the same names, even with no pairs
    mine = list(range(info.rank, len(encoded), info.world_size))
    for start in range(0, len(mine), cfg.batch_size):
        idx = mine[start:start + cfg.batch_size]
        batch = pair_batch([encoded[i] for i in idx], pad_id)
        policy = sequence_logps(model, batch, cfg.precision, info.device, cfg.averages_logps)
        ref = _reference_values(reference, batch, ref_logps, idx, cfg, info.device)
        n = len(idx)
        losses, cr, rr = dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], cfg.beta, cfg.loss_type,
                                  cfg.label_smoothing)
        window.add(pairs=n, **pair_stats(losses, cr, rr, policy[:n], policy[n:]))
    if was_training:
        model.train()
    return stats_to_metrics(window.read()[0], "eval/", "loss")


def _pair_order(interleaved: torch.Tensor) -> torch.Tensor:
    """[c0, r0, c1, r1, ...] -> [c0, c1, ..., r0, r1, ...] (the order of :func:`pair_batch`)."""
    return torch.cat([interleaved[0::2], interleaved[1::2]])


def _reference_values(reference: Reference | None, batch, ref_logps: torch.Tensor | None, idx: list[int],
                      cfg: DPOConfig, device, pad_id: int = 0) -> torch.Tensor:
    """(2B,) reference log-probs in pair_batch order: from the precomputed table or a forward pass
    (``batch`` is a padded batch, or the interleaved examples of :func:`flat_examples` for packed rows)."""
    if ref_logps is not None:
        table = ref_logps[torch.tensor(idx)]  # (B, 2): chosen, rejected
        return torch.cat([table[:, 0], table[:, 1]]).to(device)
    if isinstance(batch, list):
        return _pair_order(reference.packed_sequence_logps(batch, pad_id, cfg.data.max_length, cfg.precision,
                                                           device, cfg.averages_logps, group_size=2))
    return reference.sequence_logps(batch, cfg.precision, device, cfg.averages_logps)


# --------------------------------------------------------------------------- training


def run(cfg: DPOConfig) -> int:
    return launch(_train, cfg, "dpo")


def _log(info: DistInfo, message: str) -> None:
    if info.is_main:
        print(f"kilter dpo: {message}", file=sys.stderr if message.startswith("skipped") else sys.stdout)


def _train(cfg: DPOConfig, info: DistInfo) -> int:
    if cfg.loss_type == "ipo" and cfg.label_smoothing > 0:
        raise ConfigError("label_smoothing applies only to loss_type=sigmoid (conservative DPO), not ipo")
    existing = prepare(cfg, info)  # threads, precision, seed, fast paths; refuses to overwrite checkpoints
    device = info.device

    # Data first: a bad file should fail before a large model is loaded.
    train_rows, skipped = load_pairs(cfg.data.train, cfg.data, cfg.data.split)
    if skipped:
        _log(info, f"skipped {skipped} invalid rows in {cfg.data.train}")
    if cfg.data.eval:
        eval_rows, skipped = load_pairs(cfg.data.eval, cfg.data)
        if skipped:
            _log(info, f"skipped {skipped} invalid rows in {cfg.data.eval}")
    else:
        train_rows, eval_rows = split_eval(train_rows, cfg.data.eval_fraction, cfg.seed)
    eval_rows = eval_rows[: cfg.data.max_eval_pairs]
    reward_fn = None
    if cfg.samples.reward_fn:
        reward_fn = load_function(cfg.samples.reward_fn)
    prompts = sample_prompts(cfg.samples.prompts, eval_rows or train_rows, cfg.samples.count(cfg.data.train))

    run_dir = open_run_dir(cfg, info)

    tokenizer, model, reference = load_policy(cfg, info)
    pad_id = tokenizer.pad_token_id
    train = encode_pairs(tokenizer, train_rows, cfg.data.max_length)
    held_out = encode_pairs(tokenizer, eval_rows, cfg.data.max_length)

    ref_train = ref_eval = None
    if cfg.reference == "precompute":
        batch = 2 * cfg.batch_size
        ref_train, hit = cached_sequence_logps(run_dir.path, "train", reference, flat_examples(train), pad_id,
                                               batch, cfg.precision, device, info, cfg.averages_logps)
        ref_train = ref_train.view(-1, 2)
        _log(info, f"reference log-probs of {len(train)} training pairs {'loaded from' if hit else 'written to'} "
                   f"{run_dir.path / 'ref_logps.pt'}")
        if held_out:
            ref_eval, _ = cached_sequence_logps(run_dir.path, "eval", reference, flat_examples(held_out), pad_id,
                                                batch, cfg.precision, device, info, cfg.averages_logps)
            ref_eval = ref_eval.view(-1, 2)
        reference.release()  # a separate frozen copy is no longer needed
        reference = None

    fast_model = None
    if cfg.data.padding_free:
        wrapper, packed_ok = packed.fast_causal_lm(model, device)
        fast_model = wrapper if packed_ok else None
        if fast_model is None or (reference is not None and not reference.enable_packing(device)):
            fast_model = None
    ddp_model = wrap_model(fast_model if fast_model is not None else model, model, cfg, info)  # ddp or fsdp

    lengths = [max(len(e["chosen"]["input_ids"]), len(e["rejected"]["input_ids"])) for e in train]
    plan = StepPlan(lengths, cfg, info, "pairs")
    total_steps = plan.total_steps
    stepper, start_step = start_training(cfg, model, total_steps, run_dir, existing, lambda m: _log(info, m))

    _log(info, f"{len(train)} pairs ({len(held_out)} held out), {total_steps} steps, global batch "
               f"{plan.global_batch} pairs, {cfg.loss_type} loss, beta {cfg.beta}, reference {cfg.reference}"
               f"{' (adapter disabled)' if cfg.lora.enabled and cfg.ref_model is None else ''}, "
               f"{describe_parameters(model)}, device {device}")
    def run_eval() -> dict[str, float]:
        with gathered(model):
            return evaluate(model, reference, held_out, ref_eval, cfg, pad_id, info)

    if start_step == 0 and held_out:
        run_dir.log(0, run_eval())
    with gathered(model):
        if start_step == 0 and info.is_main:
            log_samples(run_dir, 0, "before", model, tokenizer, prompts, cfg.samples, cfg.seed, reward_fn)

    progress = tqdm(total=total_steps, initial=start_step, desc="dpo", disable=not info.is_main, dynamic_ncols=True)
    window = MetricWindow(info)
    last: dict[str, float] = {}
    for step in range(start_step, total_steps):
        # 1. this step's pairs, in micro-batches: padded rows, or packed rows sharing each pair's prompt
        micro = plan.micro_batches(step)
        for k, idx in enumerate(micro):
            if fast_model is not None:
                batch = flat_examples([train[i] for i in idx])
                window.add(tokens=sum(len(r["input_ids"]) for r in batch))
            else:
                batch = pair_batch([train[i] for i in idx], pad_id)
                window.add(tokens=batch["attention_mask"].sum())
            # 2. reference log-probs (precomputed table or a frozen forward), policy log-probs, DPO loss
            ref = _reference_values(reference, batch, ref_train, idx, cfg, device, pad_id)
            with accumulation_context(ddp_model, info, last=k == len(micro) - 1):
                if fast_model is not None:
                    policy = _pair_order(logprobs.packed_sequence_logps(ddp_model, batch, pad_id, cfg.data.max_length,
                                                                      cfg.precision, device, cfg.averages_logps,
                                                                      group_size=2))
                else:
                    policy = sequence_logps(ddp_model, batch, cfg.precision, device, cfg.averages_logps)
                n = len(idx)
                losses, cr, rr = dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], cfg.beta, cfg.loss_type,
                                          cfg.label_smoothing)
                # DDP averages gradients over ranks; the world_size factor turns that into a sum.
                (losses.sum() * info.world_size / plan.global_batch).backward()
            window.add(pairs=n, **pair_stats(losses, cr, rr, policy[:n], policy[n:]))
        # 3. the update
        grad_norm = stepper.step()
        progress.update(1)
        done = step + 1
        # 4. log, evaluate, checkpoint
        if due(done, cfg.log_every, total_steps):
            sums, elapsed = window.read()
            last = stats_to_metrics(sums, "", "loss/dpo")
            last.update({"optim/lr": stepper.lr, "optim/grad_norm": grad_norm,
                         "perf/pairs_per_s": sums["pairs"] / elapsed, "perf/tokens_per_s": sums["tokens"] / elapsed,
                         "progress/epoch": plan.epoch(done)})
            run_dir.log(done, last)
            progress.set_postfix(loss=f"{last['loss/dpo']:.3f}", acc=f"{last['rewards/accuracy']:.2f}")
        stepper.end_of_step(run_dir, done, total_steps, cfg, tokenizer, "dpo", last,
                            evaluate=run_eval if held_out else None)
    progress.close()

    return finish(run_dir, info, "dpo", model, tokenizer, cfg.lora.merge_on_save, last,
                  ("loss/dpo", "rewards/accuracy", "eval/loss", "eval/rewards/accuracy", "eval/rewards/margin",
                   "samples/reward_greedy"),
                  samples=(total_steps, prompts, cfg.samples, cfg.seed, reward_fn))


__all__ = ["DPOConfig", "DPOData", "SampleSection", "run", "evaluate", "ranking_to_pairs", "load_pairs",
           "encode_pairs", "pair_batch", "flat_examples"]
