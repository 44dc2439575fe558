"""Kahneman-Tversky optimisation on thumbs up / thumbs down (``kilter kto``).

KTO (Ethayarajh et al. 2024) learns from unpaired binary feedback -- the cheapest label
people give: each record is {prompt, completion, label}.  With r = log pi(y|x) - log
pi_ref(y|x), a desirable response is pushed to r above a reference point z0 and an
undesirable one below it (eq. 8; :func:`kilter.losses.kto_loss`).

**Reference point.**  z0 estimates KL(pi || pi_ref) on *mismatched* pairs, as in the paper:
every training example gets a fixed partner completion from another prompt (chosen once
from the seed), and z0 = max(0, mean over the step's examples of log pi(y'|x) - log
pi_ref(y'|x)), computed without gradient.  Under data parallelism the sum and count are
all-reduced, so z0 is the mean over the whole global batch, the same on every rank.
Fixing the partners lets the reference side of z0 be precomputed with everything else.
``reference_point: zero`` drops the estimate (z0 = 0) and saves one forward per step.

**Weights.**  The paper advises choosing lambda_D, lambda_U so that
lambda_D * n_D / (lambda_U * n_U) lies in [1, 4/3].  By default (both weights null) the
minority class gets weight n_majority / n_minority and the majority 1, which makes the
ratio exactly 1; set either weight to override (the other then defaults to 1).
"""

from __future__ import annotations

import math
import random
import sys
import time
from typing import ClassVar, Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm

from kilter.data.collate import pad_batch, shard_indices
from kilter.data.preferences import split_eval
from kilter.data.sources import load_records
from kilter.data.tokenize import encode_prompt_completion
from kilter.distributed import DistInfo, all_reduce_sum, barrier
from kilter.errors import ConfigError, DataError
from kilter.losses import kto_loss
from kilter.models.lora import count_parameters
from kilter.models.reference import Reference, cached_sequence_logps, sequence_logps
from kilter.rewards.base import load_function
from kilter.training.args import DataArgs, PreferenceArgs
from kilter.training.batching import accumulation_context, epoch_batches, micro_batches
from kilter.training.checkpoint import resume_from, save_checkpoint, save_final
from kilter.training.optim import clip_and_norm, make_optimizer, make_scheduler
from kilter.training.parallel import gathered, wrap_model
from kilter.training.policy import load_policy
from kilter.training.samples import sample_prompts, sample_report
from kilter.training.setup import launch, open_run_dir, prepare


class KTOData(DataArgs):
    """Where the thumbs-up/down records come from and how they are cut and batched."""

    help_overrides: ClassVar[dict[str, str]] = {
        "format": "Layout of the files: auto (judged from the first row), kilter, ultrafeedback, hh, shp; comparisons are unpaired (chosen = desirable, rejected = undesirable).",
        "max_length": "Maximum tokens of prompt + completion (the prompt is cut first, from the left).",
        "group_by_length": "Batch examples of similar length together to cut padding.",
    }
    """--help for the shared data fields, in this trainer's terms."""

    train: str = "runs/labels/thumbs.jsonl"
    """Rating records {prompt, completion, label: true|false}: .jsonl/.json/.csv/.parquet or a save_to_disk folder."""
    eval: str | None = None
    """Held-out ratings for eval metrics (null: hold out eval_fraction of the training prompts, or none)."""
    eval_fraction: float = Field(0.0, ge=0, lt=1)
    """Without data.eval, hold out this fraction of the training prompts (all their ratings) for evaluation."""
    max_eval_examples: int = Field(512, gt=0)
    """Evaluate on at most this many held-out ratings."""


class KTOConfig(PreferenceArgs):
    """Kahneman-Tversky optimisation on unpaired thumbs-up / thumbs-down feedback."""

    help_overrides: ClassVar[dict[str, str]] = {
        "seed": "Seed for data order, mismatched partners, the eval split and sampling.",
    }
    """--help for the shared fields, in this trainer's terms."""

    output_dir: str = "runs/kto"
    """Run directory (config.yaml, metrics.jsonl, ref_logps.pt, checkpoints/, final/)."""
    data: KTOData = KTOData()
    """Training and evaluation ratings."""
    desirable_weight: float | None = Field(None, gt=0)
    """lambda_D, weight of thumbs-up losses (null with undesirable_weight null: balance the classes by their counts)."""
    undesirable_weight: float | None = Field(None, gt=0)
    """lambda_U, weight of thumbs-down losses (null with desirable_weight null: balance the classes by their counts)."""
    reference_point: Literal["batch_kl", "zero"] = "batch_kl"
    """z0: batch KL estimate on mismatched prompt/completion pairs (the paper), or 0."""


# --------------------------------------------------------------------------- data


def class_weights(n_desirable: int, n_undesirable: int, desirable: float | None = None,
                  undesirable: float | None = None) -> tuple[float, float]:
    """(lambda_D, lambda_U): the given ones, or by default w_D * n_D == w_U * n_U.

    E.g. 300 up, 100 down -> (1.0, 3.0); 100 up, 300 down -> (3.0, 1.0).  With one class
    absent there is nothing to balance: (1.0, 1.0).
    """
    if desirable is not None or undesirable is not None:
        return (desirable if desirable is not None else 1.0, undesirable if undesirable is not None else 1.0)
    if n_desirable == 0 or n_undesirable == 0:
        return 1.0, 1.0
    if n_desirable >= n_undesirable:
        return 1.0, n_desirable / n_undesirable
    return n_undesirable / n_desirable, 1.0


def mismatched_partners(prompts: list, seed: int) -> list[int]:
    """For each example, the index of another example whose completion it borrows for z0.

    A seeded cycle through the examples, skipping ahead past examples with the same prompt
    (when every example shares one prompt, the neighbour is used anyway).
    """
    from kilter.data.preferences import prompt_key

    n = len(prompts)
    keys = [prompt_key(p) for p in prompts]
    order = list(range(n))
    random.Random(f"kilter-kto-partners-{seed}").shuffle(order)
    partner = [0] * n
    for k, i in enumerate(order):
        choice = order[(k + 1) % n]
        for step in range(1, min(n, 64)):
            j = order[(k + step) % n]
            if keys[j] != keys[i]:
                choice = j
                break
        partner[i] = choice
    return partner


def encode_ratings(tokenizer, rows: list[dict], max_length: int, seed: int) -> list[dict]:
    """Matched example, mismatched (partner's completion) example and label for each rating."""
    partners = mismatched_partners([r["prompt"] for r in rows], seed)
    out = []
    for row, j in zip(rows, partners):
        out.append({
            "matched": encode_prompt_completion(tokenizer, row["prompt"], row["completion"], max_length),
            "mismatched": encode_prompt_completion(tokenizer, row["prompt"], rows[j]["completion"], max_length),
            "label": bool(row["label"]),
        })
    return out


def _batch(examples: list[dict], side: str, pad_id: int) -> dict[str, torch.Tensor]:
    return pad_batch([e[side] for e in examples], pad_id, keys=("input_ids", "labels"))


def _reduce(t: torch.Tensor, info: DistInfo, device: str) -> torch.Tensor:
    return all_reduce_sum(t.to(device) if info.enabled else t, info).cpu()


def reward_auc(rewards: torch.Tensor, labels: torch.Tensor) -> float:
    """P(reward of a random desirable example > that of a random undesirable one), ties 1/2.

    rewards: (N,); labels: (N,) bool.  0.5 is chance (e.g. all rewards equal); nan without
    both classes.  Worked: rewards [3, 1, 2], labels [T, F, F] -> 1.0; [1, 3, 2] -> 0.0.
    """
    up, down = rewards[labels.bool()], rewards[~labels.bool()]
    if up.numel() == 0 or down.numel() == 0:
        return float("nan")
    diff = up.unsqueeze(1) - down.unsqueeze(0)
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


# --------------------------------------------------------------------------- one pass


def _kl_sums(model, reference: Reference | None, examples: list[dict], idx: list[int],
             ref_kl: torch.Tensor | None, cfg: KTOConfig, pad_id: int, device, chunk: int) -> torch.Tensor:
    """(sum of log pi - log pi_ref over the mismatched examples idx, their count), no gradient."""
    total = torch.zeros(2, dtype=torch.float64)
    if cfg.reference_point == "zero":
        return total
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(idx), chunk):
            part = idx[start:start + chunk]
            batch = _batch([examples[i] for i in part], "mismatched", pad_id)
            policy = sequence_logps(model, batch, cfg.precision, device)
            ref = ref_kl[torch.tensor(part)].to(device) if ref_kl is not None else \
                reference.sequence_logps(batch, cfg.precision, device)
            total += torch.tensor([float((policy - ref).sum()), float(len(part))], dtype=torch.float64)
    if was_training:
        model.train()
    return total


def _z0(sums: torch.Tensor) -> torch.Tensor:
    return torch.tensor(max(0.0, float(sums[0] / sums[1])) if sums[1] > 0 else 0.0)


# Stats summed across micro-batches and ranks: loss, then per class (reward sum, logps sum, count).
_N_STATS = 7


def _stats(losses, rewards, policy, labels) -> torch.Tensor:
    up = labels.bool()
    values = [losses.detach().sum(), rewards[up].sum(), policy.detach()[up].sum(), up.sum(),
              rewards[~up].sum(), policy.detach()[~up].sum(), (~up).sum()]
    return torch.stack([torch.as_tensor(v).double().cpu() for v in values])


def _metrics(sums: torch.Tensor, n: float, prefix: str, loss_key: str) -> dict[str, float]:
    loss, r_up, lp_up, n_up, r_down, lp_down, n_down = sums.tolist()
    out = {prefix + loss_key: loss / max(n, 1.0)}
    if n_up:
        out[prefix + "rewards/desirable"] = r_up / n_up
        out[prefix + "logps/desirable"] = lp_up / n_up
    if n_down:
        out[prefix + "rewards/undesirable"] = r_down / n_down
        out[prefix + "logps/undesirable"] = lp_down / n_down
    if n_up and n_down:
        out[prefix + "rewards/margin"] = r_up / n_up - r_down / n_down
    return out


@torch.no_grad()
def evaluate(model, reference: Reference | None, examples: list[dict], ref_logps: torch.Tensor | None,
             ref_kl: torch.Tensor | None, cfg: KTOConfig, weights: tuple[float, float], pad_id: int,
             info: DistInfo) -> dict[str, float]:
    """Loss, class rewards and margin, reward AUC and z0 on held-out ratings (eval/* keys)."""
    was_training = model.training
    model.eval()
    mine = list(range(info.rank, len(examples), info.world_size))
    z0 = _z0(_reduce(_kl_sums(model, reference, examples, mine, ref_kl, cfg, pad_id, info.device,
                              cfg.batch_size), info, info.device))
    sums = torch.zeros(_N_STATS, dtype=torch.float64)
    all_rewards = torch.zeros(len(examples), dtype=torch.float64)
    for start in range(0, len(mine), cfg.batch_size):
        idx = mine[start:start + cfg.batch_size]
        part = [examples[i] for i in idx]
        batch = _batch(part, "matched", pad_id)
        labels = torch.tensor([e["label"] for e in part], device=info.device)
        policy = sequence_logps(model, batch, cfg.precision, info.device)
        ref = ref_logps[torch.tensor(idx)].to(info.device) if ref_logps is not None else \
            reference.sequence_logps(batch, cfg.precision, info.device)
        losses, rewards = kto_loss(policy, ref, labels, z0.to(info.device), cfg.beta, *weights)
        sums += _stats(losses, rewards, policy, labels)
        all_rewards[torch.tensor(idx)] = rewards.double().cpu()
    if was_training:
        model.train()
    sums = _reduce(sums, info, info.device)
    all_rewards = _reduce(all_rewards, info, info.device)
    metrics = _metrics(sums, float(len(examples)), "eval/", "loss")
    labels = torch.tensor([e["label"] for e in examples])
    metrics["eval/rewards/auc"] = reward_auc(all_rewards, labels)
    metrics["eval/kl/ref"] = float(z0)
    return metrics


# --------------------------------------------------------------------------- training


def run(cfg: KTOConfig) -> int:
    return launch(_train, cfg, "kto")


def _log(info: DistInfo, message: str) -> None:
    if info.is_main:
        print(f"kilter kto: {message}", file=sys.stderr if message.startswith(("skipped", "warning")) else sys.stdout)


def _load(spec: str, data: KTOData, split: str | None = None) -> list[dict]:
    """Rating records; ``split`` is data.split for data.train only (data.eval names its own, ``DIR:split``)."""
    records = load_records(spec, "rating", skip_invalid=data.skip_invalid, split=split, format=data.format)
    if records.n_skipped:
        print(f"kilter kto: skipped {records.n_skipped} invalid rows in {spec} (first: {records.first_error})",
              file=sys.stderr)
    return list(records.rows)


def _train(cfg: KTOConfig, info: DistInfo) -> int:
    existing = prepare(cfg, info)  # threads, precision, seed, fast paths; refuses to overwrite checkpoints
    device = info.device

    train_rows = _load(cfg.data.train, cfg.data, cfg.data.split)
    if cfg.data.eval:
        eval_rows = _load(cfg.data.eval, cfg.data)
    else:
        train_rows, eval_rows = split_eval(train_rows, cfg.data.eval_fraction, cfg.seed)
    eval_rows = eval_rows[: cfg.data.max_eval_examples]
    if not train_rows:
        raise DataError(f"{cfg.data.train}: no training ratings left after holding out eval prompts")
    n_up = sum(r["label"] for r in train_rows)
    n_down = len(train_rows) - n_up
    weights = class_weights(n_up, n_down, cfg.desirable_weight, cfg.undesirable_weight)
    ratio = weights[0] * n_up / (weights[1] * n_down) if n_down else math.inf
    if n_up == 0 or n_down == 0:
        _log(info, f"warning: the training data has {n_up} thumbs-up and {n_down} thumbs-down ratings; "
                   "KTO learns best from both")
    elif not 1.0 <= ratio <= 4 / 3:
        _log(info, f"warning: lambda_D n_D / (lambda_U n_U) = {ratio:.3g}, outside the paper's advised [1, 4/3]")
    reward_fn = None
    if cfg.samples.reward_fn:
        reward_fn = load_function(cfg.samples.reward_fn)
    prompts = sample_prompts(cfg.samples.prompts, eval_rows or train_rows, cfg.samples.n)

    run_dir = open_run_dir(cfg, info)

    tokenizer, model, reference = load_policy(cfg, info)
    pad_id = tokenizer.pad_token_id
    train = encode_ratings(tokenizer, train_rows, cfg.data.max_length, cfg.seed)
    held_out = encode_ratings(tokenizer, eval_rows, cfg.data.max_length, cfg.seed + 1) if eval_rows else []

    tables: dict[str, torch.Tensor | None] = {"train": None, "train_kl": None, "eval": None, "eval_kl": None}
    if cfg.reference == "precompute":
        for name, examples, side in (("train", train, "matched"), ("train_kl", train, "mismatched"),
                                     ("eval", held_out, "matched"), ("eval_kl", held_out, "mismatched")):
            if not examples or (side == "mismatched" and cfg.reference_point == "zero"):
                continue
            tables[name], _ = cached_sequence_logps(run_dir.path, name, reference, [e[side] for e in examples],
                                                    pad_id, cfg.batch_size, cfg.precision, device, info)
        _log(info, f"reference log-probs cached in {run_dir.path / 'ref_logps.pt'}")
        reference.release()
        reference = None

    global_batch = cfg.batch_size * cfg.grad_accum * info.world_size
    steps_per_epoch = len(train) // global_batch
    if steps_per_epoch == 0:
        raise ConfigError(f"data.train has {len(train)} ratings, fewer than one global batch of {global_batch} "
                          "(batch_size x grad_accum x processes); lower batch_size")
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    lengths = [len(e["matched"]["input_ids"]) for e in train]

    ddp_model = wrap_model(model, model, cfg, info)  # ddp or fsdp
    optimizer = make_optimizer(model, cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim, total_steps)
    start_step = 0
    if cfg.resume and existing is not None:
        start_step = resume_from(existing, run_dir, model, optimizer, scheduler)
        _log(info, f"resumed from {existing} at step {start_step}/{total_steps}")
    run_dir.write_config(cfg)

    trainable, total_params = count_parameters(model)
    _log(info, f"{len(train)} ratings ({n_up} up, {n_down} down; weights lambda_D={weights[0]:.3g}, "
               f"lambda_U={weights[1]:.3g}), {len(held_out)} held out, {total_steps} steps, global batch "
               f"{global_batch}, z0 {cfg.reference_point}, reference {cfg.reference}, "
               f"{trainable / 1e6:.2f}M of {total_params / 1e6:.2f}M parameters trainable, device {device}")

    def run_eval() -> dict[str, float]:
        with gathered(model):
            return evaluate(model, reference, held_out, tables["eval"], tables["eval_kl"], cfg, weights, pad_id,
                            info)

    if start_step == 0 and held_out:
        run_dir.log(0, run_eval())
    with gathered(model):
        if start_step == 0 and prompts and info.is_main:
            table, metrics = sample_report(model, tokenizer, prompts, cfg.samples, cfg.seed, reward_fn)
            run_dir.log(0, metrics)
            print("samples before training:\n" + table)


    batches_cache: dict[int, list[list[int]]] = {}
    progress = tqdm(total=total_steps, initial=start_step, desc="kto", disable=not info.is_main, dynamic_ncols=True)
    window = torch.zeros(_N_STATS, dtype=torch.float64)
    window_examples, window_kl, window_steps, window_start = 0.0, 0.0, 0, time.perf_counter()
    last: dict[str, float] = {}
    for step in range(start_step, total_steps):
        epoch, position = divmod(step, steps_per_epoch)
        if epoch not in batches_cache:
            batches_cache.clear()
            batches_cache[epoch] = epoch_batches(lengths, global_batch, cfg.seed, epoch, cfg.data.group_by_length)
        mine = shard_indices(batches_cache[epoch][position], info.rank, info.world_size)
        # z0 for the whole global batch first: it must be one number for every micro-batch and rank.
        z0 = _z0(_reduce(_kl_sums(model, reference, train, mine, tables["train_kl"], cfg, pad_id, device,
                                  cfg.batch_size), info, device)).to(device)
        step_sums = torch.zeros(_N_STATS, dtype=torch.float64)
        micro = micro_batches(mine, cfg.grad_accum)
        for k, idx in enumerate(micro):
            part = [train[i] for i in idx]
            batch = _batch(part, "matched", pad_id)
            labels = torch.tensor([e["label"] for e in part], device=device)
            if tables["train"] is not None:
                ref = tables["train"][torch.tensor(idx)].to(device)
            else:
                ref = reference.sequence_logps(batch, cfg.precision, device)
            ctx = accumulation_context(ddp_model, info, last=k == len(micro) - 1)
            with ctx:
                policy = sequence_logps(ddp_model, batch, cfg.precision, device)
                losses, rewards = kto_loss(policy, ref, labels, z0, cfg.beta, *weights)
                # DDP averages gradients over ranks; the world_size factor turns that into a sum.
                (losses.sum() * info.world_size / global_batch).backward()
            step_sums += _stats(losses, rewards, policy, labels)
        grad_norm = clip_and_norm(model.parameters(), cfg.optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        window += _reduce(step_sums, info, device)
        window_examples += global_batch
        window_kl += float(z0)
        window_steps += 1
        progress.update(1)
        done = step + 1
        if done % cfg.log_every == 0 or done == total_steps:
            elapsed = max(time.perf_counter() - window_start, 1e-9)
            last = _metrics(window, window_examples, "", "loss/kto")
            last.update({"kl/ref": window_kl / window_steps, "optim/lr": scheduler.get_last_lr()[0],
                         "optim/grad_norm": grad_norm, "perf/samples_per_s": window_examples / elapsed,
                         "progress/epoch": done / steps_per_epoch})
            run_dir.log(done, last)
            progress.set_postfix(loss=f"{last['loss/kto']:.3f}", z0=f"{last['kl/ref']:.3f}")
            window.zero_()
            window_examples, window_kl, window_steps, window_start = 0.0, 0.0, 0, time.perf_counter()
        if held_out and (done % cfg.eval_every == 0 or done == total_steps):
            metrics = run_eval()
            run_dir.log(done, metrics)
            last.update(metrics)
        if done % cfg.save_every == 0 or done == total_steps:
            save_checkpoint(run_dir, done, model, tokenizer, optimizer, scheduler, cfg.keep_checkpoints, "kto")
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
        shown = ("loss/kto", "rewards/margin", "eval/loss", "eval/rewards/margin", "eval/rewards/auc",
                 "samples/reward_greedy")
        summary = ", ".join(f"{k}={last[k]:.4g}" for k in shown if k in last)
        print(f"kilter kto: done ({summary}); model in {run_dir.final}")
    run_dir.close()
    return 0


__all__ = ["KTOConfig", "KTOData", "run", "evaluate", "class_weights", "mismatched_partners", "encode_ratings",
           "reward_auc"]
