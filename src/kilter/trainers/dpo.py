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

import math
import sys
import time
from typing import ClassVar, Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm

from kilter.data.collate import pad_batch, shard_indices
from kilter.data.preferences import split_eval
from kilter.data.sources import load_records
from kilter.data.tokenize import encode_pair
from kilter.distributed import DistInfo, all_reduce_sum, barrier
from kilter.errors import ConfigError, DataError
from kilter.losses import dpo_loss, pairwise_accuracy, ranking_pairs
from kilter.models import packed
from kilter.models.lora import count_parameters
from kilter.models.reference import Reference, cached_sequence_logps, sequence_logps
from kilter.rewards.base import load_function
from kilter.training.args import DataArgs, PreferenceArgs
from kilter.training.batching import accumulation_context, epoch_batches, micro_batches
from kilter.training.checkpoint import resume_from, save_checkpoint, save_final
from kilter.training.optim import clip_and_norm, make_optimizer, make_scheduler
from kilter.training.parallel import gathered, wrap_model
from kilter.training.policy import load_policy
from kilter.training.samples import SampleSection, sample_prompts, sample_report
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


# --------------------------------------------------------------------------- shared trainer pieces


# --------------------------------------------------------------------------- statistics

# Sums reduced across ranks once per step; the order fixes the layout of the stats tensor.
_STAT_KEYS = ("loss", "chosen", "rejected", "accuracy", "margin", "logps_chosen", "logps_rejected")


def pair_stats(losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected) -> torch.Tensor:
    """Per-batch sums of the logged quantities, float64 on the CPU, in ``_STAT_KEYS`` order."""
    n = losses.numel()
    acc = pairwise_accuracy(chosen_rewards, rejected_rewards) * n
    values = [losses.detach().sum(), chosen_rewards.sum(), rejected_rewards.sum(), acc,
              (chosen_rewards - rejected_rewards).sum(), policy_chosen.detach().sum(), policy_rejected.detach().sum()]
    return torch.stack([v.double().cpu() for v in values])


def stats_to_metrics(sums: torch.Tensor, count: float, prefix: str, loss_key: str) -> dict[str, float]:
    mean = (sums / max(count, 1.0)).tolist()
    names = {"loss": loss_key, "chosen": "rewards/chosen", "rejected": "rewards/rejected",
             "accuracy": "rewards/accuracy", "margin": "rewards/margin", "logps_chosen": "logps/chosen",
             "logps_rejected": "logps/rejected"}
    return {prefix + names[k]: v for k, v in zip(_STAT_KEYS, mean)}


def _reduce(t: torch.Tensor, info: DistInfo, device: str) -> torch.Tensor:
    # NCCL reduces only device tensors; gloo (CPU) takes them where they are.
    return all_reduce_sum(t.to(device) if info.enabled else t, info).cpu()


@torch.no_grad()
def evaluate(model, reference: Reference | None, encoded: list[dict], ref_logps: torch.Tensor | None,
             cfg: DPOConfig, pad_id: int, info: DistInfo) -> dict[str, float]:
    """Loss, implicit-reward accuracy/margin and log-probs on held-out pairs (eval/* keys)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(_STAT_KEYS), dtype=torch.float64)
    mine = list(range(info.rank, len(encoded), info.world_size))
    for start in range(0, len(mine), cfg.batch_size):
        idx = mine[start:start + cfg.batch_size]
        batch = pair_batch([encoded[i] for i in idx], pad_id)
        policy = sequence_logps(model, batch, cfg.precision, info.device, cfg.averages_logps)
        ref = _reference_values(reference, batch, ref_logps, idx, cfg, info.device)
        n = len(idx)
        losses, cr, rr = dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], cfg.beta, cfg.loss_type,
                                  cfg.label_smoothing)
        sums += pair_stats(losses, cr, rr, policy[:n], policy[n:])
    if was_training:
        model.train()
    sums = _reduce(sums, info, info.device)
    return stats_to_metrics(sums, float(len(encoded)), "eval/", "loss")


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
    prompts = sample_prompts(cfg.samples.prompts, eval_rows or train_rows, cfg.samples.n)

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

    global_batch = cfg.batch_size * cfg.grad_accum * info.world_size
    steps_per_epoch = len(train) // global_batch
    if steps_per_epoch == 0:
        raise ConfigError(f"data.train has {len(train)} pairs, fewer than one global batch of {global_batch} "
                          "(batch_size x grad_accum x processes); lower batch_size")
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    lengths = [max(len(e["chosen"]["input_ids"]), len(e["rejected"]["input_ids"])) for e in train]

    fast_model = None
    if cfg.data.padding_free:
        wrapper, packed_ok = packed.fast_causal_lm(model, device)
        fast_model = wrapper if packed_ok else None
        if fast_model is None or (reference is not None and not reference.enable_packing(device)):
            fast_model = None
    ddp_model = wrap_model(fast_model if fast_model is not None else model, model, cfg, info)  # ddp or fsdp
    optimizer = make_optimizer(model, cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim, total_steps)
    start_step = 0
    if cfg.resume and existing is not None:
        start_step = resume_from(existing, run_dir, model, optimizer, scheduler)
        _log(info, f"resumed from {existing} at step {start_step}/{total_steps}")
    run_dir.write_config(cfg)

    trainable, total_params = count_parameters(model)
    _log(info, f"{len(train)} pairs ({len(held_out)} held out), {total_steps} steps, global batch {global_batch} "
               f"pairs, {cfg.loss_type} loss, beta {cfg.beta}, reference {cfg.reference}"
               f"{' (adapter disabled)' if cfg.lora.enabled and cfg.ref_model is None else ''}, "
               f"{trainable / 1e6:.2f}M of {total_params / 1e6:.2f}M parameters trainable, device {device}")
    if start_step == 0:
        if held_out:
            with gathered(model):
                run_dir.log(0, evaluate(model, reference, held_out, ref_eval, cfg, pad_id, info))
    with gathered(model):
        if start_step == 0 and prompts and info.is_main:
            table, metrics = sample_report(model, tokenizer, prompts, cfg.samples, cfg.seed, reward_fn)
            run_dir.log(0, metrics)
            print("samples before training:\n" + table)


    batches_cache: dict[int, list[list[int]]] = {}
    progress = tqdm(total=total_steps, initial=start_step, desc="dpo", disable=not info.is_main, dynamic_ncols=True)
    window = torch.zeros(len(_STAT_KEYS), dtype=torch.float64)
    window_pairs, window_tokens, window_start = 0.0, 0.0, time.perf_counter()
    last: dict[str, float] = {}
    for step in range(start_step, total_steps):
        epoch, position = divmod(step, steps_per_epoch)
        if epoch not in batches_cache:
            batches_cache.clear()
            batches_cache[epoch] = epoch_batches(lengths, global_batch, cfg.seed, epoch, cfg.data.group_by_length)
        mine = shard_indices(batches_cache[epoch][position], info.rank, info.world_size)
        step_sums = torch.zeros(len(_STAT_KEYS), dtype=torch.float64)
        tokens = 0.0
        micro = micro_batches(mine, cfg.grad_accum)
        for k, idx in enumerate(micro):
            if fast_model is not None:
                batch = flat_examples([train[i] for i in idx])
                tokens += float(sum(len(r["input_ids"]) for r in batch))
            else:
                batch = pair_batch([train[i] for i in idx], pad_id)
                tokens += float(batch["attention_mask"].sum())
            ref = _reference_values(reference, batch, ref_train, idx, cfg, device, pad_id)
            ctx = accumulation_context(ddp_model, info, last=k == len(micro) - 1)
            with ctx:
                if fast_model is not None:
                    policy = _pair_order(packed.packed_sequence_logps(ddp_model, batch, pad_id, cfg.data.max_length,
                                                                      cfg.precision, device, cfg.averages_logps,
                                                                      group_size=2))
                else:
                    policy = sequence_logps(ddp_model, batch, cfg.precision, device, cfg.averages_logps)
                n = len(idx)
                losses, cr, rr = dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], cfg.beta, cfg.loss_type,
                                          cfg.label_smoothing)
                # DDP averages gradients over ranks; the world_size factor turns that into a sum.
                (losses.sum() * info.world_size / global_batch).backward()
            step_sums += pair_stats(losses, cr, rr, policy[:n], policy[n:])
        grad_norm = clip_and_norm(model.parameters(), cfg.optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        window += _reduce(step_sums, info, device)
        window_pairs += global_batch
        window_tokens += tokens * info.world_size
        progress.update(1)
        done = step + 1
        if done % cfg.log_every == 0 or done == total_steps:
            elapsed = max(time.perf_counter() - window_start, 1e-9)
            last = stats_to_metrics(window, window_pairs, "", "loss/dpo")
            last.update({"optim/lr": scheduler.get_last_lr()[0], "optim/grad_norm": grad_norm,
                         "perf/pairs_per_s": window_pairs / elapsed, "perf/tokens_per_s": window_tokens / elapsed,
                         "progress/epoch": done / steps_per_epoch})
            run_dir.log(done, last)
            progress.set_postfix(loss=f"{last['loss/dpo']:.3f}", acc=f"{last['rewards/accuracy']:.2f}")
            window.zero_()
            window_pairs, window_tokens, window_start = 0.0, 0.0, time.perf_counter()
        if held_out and (done % cfg.eval_every == 0 or done == total_steps):
            with gathered(model):
                metrics = evaluate(model, reference, held_out, ref_eval, cfg, pad_id, info)
            run_dir.log(done, metrics)
            last.update(metrics)
        if done % cfg.save_every == 0 or done == total_steps:
            save_checkpoint(run_dir, done, model, tokenizer, optimizer, scheduler, cfg.keep_checkpoints, "dpo")
    progress.close()

    save_final(run_dir, model, tokenizer, cfg.lora.merge_on_save)
    barrier(info)
    with gathered(model):
        if info.is_main and prompts:
            table, metrics = sample_report(model, tokenizer, prompts, cfg.samples, cfg.seed, reward_fn)
            run_dir.log(total_steps, metrics)
            last.update(metrics)
            print("samples after training:\n" + table)
    if info.is_main:
        shown = ("loss/dpo", "rewards/accuracy", "eval/loss", "eval/rewards/accuracy", "eval/rewards/margin",
                 "samples/reward_greedy")
        summary = ", ".join(f"{k}={last[k]:.4g}" for k in shown if k in last)
        print(f"kilter dpo: done ({summary}); model in {run_dir.final}")
    run_dir.close()
    return 0


__all__ = ["DPOConfig", "DPOData", "SampleSection", "run", "evaluate", "ranking_to_pairs", "load_pairs",
           "encode_pairs", "pair_batch", "flat_examples", "epoch_batches", "micro_batches", "load_policy",
           "sample_prompts", "sample_report", "save_checkpoint"]
