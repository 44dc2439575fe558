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
from typing import ClassVar, Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm

from kilter.data.collate import pad_batch
from kilter.data.preferences import split_eval
from kilter.data.sources import load_records
from kilter.data.tokenize import encode_prompt_completion
from kilter.distributed import DistInfo, all_reduce_sum
from kilter.errors import DataError
from kilter.losses import kto_loss, kto_reference_point
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
from kilter.training.samples import log_samples, sample_prompts
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
    padding_free: bool = True
    """Pack each micro-batch into rows (no padding) with logits only on completions; checked once against the padded forward, off when the model does not support it."""


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


class _LogProbs:
    """Response log-probs of the matched or mismatched side of some ratings: under the policy (the
    model, or ``fast``, its padding-free wrapper, which packs rows; or a DDP wrapper of either passed
    as ``module``) or under the reference (precomputed ``table`` rows, or a frozen forward)."""

    def __init__(self, model, fast, reference: Reference | None, cfg: KTOConfig, pad_id: int, device) -> None:
        self.model, self.fast, self.reference = model, fast, reference
        self.cfg, self.pad_id, self.device = cfg, pad_id, device

    @property
    def packed(self) -> bool:
        return self.fast is not None

    def policy(self, part: list[dict], side: str, module=None) -> torch.Tensor:
        if self.packed:
            return logprobs.packed_sequence_logps(module or self.fast, [e[side] for e in part], self.pad_id,
                                                self.cfg.data.max_length, self.cfg.precision, self.device)
        return sequence_logps(module or self.model, _batch(part, side, self.pad_id), self.cfg.precision,
                              self.device)

    def ref(self, table: torch.Tensor | None, idx: list[int], part: list[dict], side: str) -> torch.Tensor:
        if table is not None:
            return table[torch.tensor(idx)].to(self.device)
        if self.packed:
            return self.reference.packed_sequence_logps([e[side] for e in part], self.pad_id,
                                                        self.cfg.data.max_length, self.cfg.precision, self.device)
        return self.reference.sequence_logps(_batch(part, side, self.pad_id), self.cfg.precision, self.device)


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


def _reference_point(logps: _LogProbs, examples: list[dict], idx: list[int], ref_kl: torch.Tensor | None,
                     info: DistInfo, chunk: int) -> torch.Tensor:
    """z0 of the examples ``idx`` of every process: the clamped mean of log pi - log pi_ref over their
    mismatched completions (kilter.losses.kto_reference_point), no gradient; 0 with reference_point=zero."""
    total = torch.zeros(2, dtype=torch.float64)
    if logps.cfg.reference_point != "zero":
        model = logps.model
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for start in range(0, len(idx), chunk):
                part_idx = idx[start:start + chunk]
                part = [examples[i] for i in part_idx]
                gap = logps.policy(part, "mismatched") - logps.ref(ref_kl, part_idx, part, "mismatched")
                total += torch.tensor([float(gap.sum()), float(len(part))], dtype=torch.float64)
        if was_training:
            model.train()
    kl_sum, count = all_reduce_sum(total, info).tolist()
    return kto_reference_point(kl_sum, count)


_NAMES = ("loss", "r_up", "lp_up", "n_up", "r_down", "lp_down", "n_down")
"""Per-batch sums: loss, then per class (reward sum, log-prob sum, count)."""


def _stats(losses, rewards, policy, labels) -> dict[str, torch.Tensor]:
    up = labels.bool()
    values = [losses.detach().sum(), rewards[up].sum(), policy.detach()[up].sum(), up.sum(),
              rewards[~up].sum(), policy.detach()[~up].sum(), (~up).sum()]
    return dict(zip(_NAMES, values))


def _metrics(sums: dict[str, float], prefix: str, loss_key: str) -> dict[str, float]:
    n_up, n_down = sums["n_up"], sums["n_down"]
    out = {prefix + loss_key: sums["loss"] / max(n_up + n_down, 1.0)}
    if n_up:
        out[prefix + "rewards/desirable"] = sums["r_up"] / n_up
        out[prefix + "logps/desirable"] = sums["lp_up"] / n_up
    if n_down:
        out[prefix + "rewards/undesirable"] = sums["r_down"] / n_down
        out[prefix + "logps/undesirable"] = sums["lp_down"] / n_down
    if n_up and n_down:
        out[prefix + "rewards/margin"] = sums["r_up"] / n_up - sums["r_down"] / n_down
    return out


@torch.no_grad()
def evaluate(logps: _LogProbs, examples: list[dict], ref_logps: torch.Tensor | None,
             ref_kl: torch.Tensor | None, weights: tuple[float, float], info: DistInfo) -> dict[str, float]:
    """Loss, class rewards and margin, reward AUC and z0 on held-out ratings (eval/* keys)."""
    cfg, device, model = logps.cfg, logps.device, logps.model
    was_training = model.training
    model.eval()
    mine = list(range(info.rank, len(examples), info.world_size))
    z0 = _reference_point(logps, examples, mine, ref_kl, info, cfg.batch_size)
    window = MetricWindow(info)
    window.add(**dict.fromkeys(_NAMES, 0.0))  # every rank adds the same names, even with no examples
    all_rewards = torch.zeros(len(examples), dtype=torch.float64)
    for start in range(0, len(mine), cfg.batch_size):
        idx = mine[start:start + cfg.batch_size]
        part = [examples[i] for i in idx]
        labels = torch.tensor([e["label"] for e in part], device=device)
        policy = logps.policy(part, "matched")
        losses, rewards = kto_loss(policy, logps.ref(ref_logps, idx, part, "matched"), labels, z0.to(device),
                                   cfg.beta, *weights)
        window.add(**_stats(losses, rewards, policy, labels))
        all_rewards[torch.tensor(idx)] = rewards.double().cpu()
    if was_training:
        model.train()
    metrics = _metrics(window.read()[0], "eval/", "loss")
    labels = torch.tensor([e["label"] for e in examples])
    metrics["eval/rewards/auc"] = reward_auc(all_reduce_sum(all_rewards, info), labels)
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
    prompts = sample_prompts(cfg.samples.prompts, eval_rows or train_rows, cfg.samples.count(cfg.data.train))

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

    # Padding-free rows with completion-only logits when the policy (and an online reference) allow.
    fast = None
    if cfg.data.padding_free:
        wrapper, packed_ok = packed.fast_causal_lm(model, device)
        if packed_ok and (reference is None or reference.enable_packing(device)):
            fast = wrapper
    ddp_model = wrap_model(fast if fast is not None else model, model, cfg, info)  # ddp or fsdp
    logps = _LogProbs(model, fast, reference, cfg, pad_id, device)

    def run_eval() -> dict[str, float]:
        with gathered(model):
            return evaluate(logps, held_out, tables["eval"], tables["eval_kl"], weights, info)

    plan = StepPlan([len(e["matched"]["input_ids"]) for e in train], cfg, info, "ratings")
    total_steps = plan.total_steps
    stepper, start_step = start_training(cfg, model, total_steps, run_dir, existing, lambda m: _log(info, m))

    _log(info, f"{len(train)} ratings ({n_up} up, {n_down} down; weights lambda_D={weights[0]:.3g}, "
               f"lambda_U={weights[1]:.3g}), {len(held_out)} held out, {total_steps} steps, global batch "
               f"{plan.global_batch}, z0 {cfg.reference_point}, reference {cfg.reference}, "
               f"{describe_parameters(model)}, device {device}")

    if start_step == 0 and held_out:
        run_dir.log(0, run_eval())
    with gathered(model):
        if start_step == 0 and info.is_main:
            log_samples(run_dir, 0, "before", model, tokenizer, prompts, cfg.samples, cfg.seed, reward_fn)

    progress = tqdm(total=total_steps, initial=start_step, desc="kto", disable=not info.is_main, dynamic_ncols=True)
    window = MetricWindow(info)
    last: dict[str, float] = {}
    for step in range(start_step, total_steps):
        # 1. z0 for the whole global batch first: one number for every micro-batch and process
        z0 = _reference_point(logps, train, plan.indices(step), tables["train_kl"], info, cfg.batch_size).to(device)
        # 2. per micro-batch: policy and reference log-probs of the rated completions, the KTO loss
        micro = plan.micro_batches(step)
        for k, idx in enumerate(micro):
            part = [train[i] for i in idx]
            labels = torch.tensor([e["label"] for e in part], device=device)
            ref = logps.ref(tables["train"], idx, part, "matched")
            with accumulation_context(ddp_model, info, last=k == len(micro) - 1):
                policy = logps.policy(part, "matched", module=ddp_model)
                losses, rewards = kto_loss(policy, ref, labels, z0, cfg.beta, *weights)
                # DDP averages gradients over ranks; the world_size factor turns that into a sum.
                (losses.sum() * info.world_size / plan.global_batch).backward()
            window.add(**_stats(losses, rewards, policy, labels))
        window.add(z0=z0 / info.world_size, steps=1.0 / info.world_size)  # one z0 per step, on every process
        # 3. the update
        grad_norm = stepper.step()
        progress.update(1)
        done = step + 1
        # 4. log, evaluate, checkpoint
        if due(done, cfg.log_every, total_steps):
            sums, elapsed = window.read()
            last = _metrics(sums, "", "loss/kto")
            last.update({"kl/ref": sums["z0"] / sums["steps"], "optim/lr": stepper.lr, "optim/grad_norm": grad_norm,
                         "perf/samples_per_s": (sums["n_up"] + sums["n_down"]) / elapsed,
                         "progress/epoch": plan.epoch(done)})
            run_dir.log(done, last)
            progress.set_postfix(loss=f"{last['loss/kto']:.3f}", z0=f"{last['kl/ref']:.3f}")
        stepper.end_of_step(run_dir, done, total_steps, cfg, tokenizer, "kto", last,
                            evaluate=run_eval if held_out else None)
    progress.close()

    return finish(run_dir, info, "kto", model, tokenizer, cfg.lora.merge_on_save, last,
                  ("loss/kto", "rewards/margin", "eval/loss", "eval/rewards/margin", "eval/rewards/auc",
                   "samples/reward_greedy"),
                  samples=(total_steps, prompts, cfg.samples, cfg.seed, reward_fn))


__all__ = ["KTOConfig", "KTOData", "run", "evaluate", "class_weights", "mismatched_partners", "encode_ratings",
           "reward_auc"]
