"""Phase 2: the reward model (``kilter rm``).

The model is the LM backbone with a scalar head (``AutoModelForSequenceClassification``,
num_labels=1; see :mod:`kilter.models.reward`).  Training data are *groups* (one prompt, its
responses, the labeled pairs among them; :mod:`kilter.data.preferences`): every response of
a batch is forwarded once, and the loss of a group is the mean over its pairs of the
Bradley-Terry term (Ouyang et al. 2022, eq. 1)::

    -log sigmoid(r_better - r_worse - margin),   margin = strength_margin_scale * strength

where ``strength`` in [0, 1] comes from a graded comparison ("slightly" 0.25 ... "much
better" 1.0) and is 0 when absent; ``strength_margin_scale=0`` disables margins (Llama 2,
Touvron et al. 2023, eq. 2).  Ties make no pair.  A batch's loss is the mean over its
groups; gradients are normalised by the number of groups in the whole optimizer step, across
gradient accumulation and data-parallel ranks, as in ``kilter sft``.

After training a bias is set so that the mean reward over a reference set is 0 (InstructGPT;
default reference: the training responses) and saved in the model's config.json.  With
``ensemble_size=N`` the run trains N members on bootstrap resamples of the training groups
with seeds seed, seed+1, ...; ``final/`` then holds ``ensemble.json`` and ``member-i/``.
``init_from`` starts from an earlier reward model, head included: the second stage of
preference-model pretraining (docs/reward-model.md).
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm

from kilter.data.collate import pad_batch
from kilter.data.preferences import (
    encode_groups,
    load_preference_groups,
    reference_pairs,
    reference_pairs_from_file,
    split_by_prompt,
)
from kilter.distributed import DistInfo, all_reduce_sum, barrier
from kilter.errors import ConfigError
from kilter.evaluation.calibration import calibration_report, calibration_sums
from kilter.evaluation.reward_pairs import ensemble_accuracy, pair_table
from kilter.losses import pairwise_accuracy, weighted_pair_loss
from kilter.models import load_tokenizer, packed
from kilter.models.lora import apply_lora, count_parameters, enable_gradient_checkpointing
from kilter.models.reward import (
    RewardModel,
    is_ensemble_dir,
    load_reward_backbone,
    resolve_reward_dir,
    save_reward_model,
    set_reward_bias,
    write_ensemble_manifest,
)
from kilter.models.reward_batches import chunks_of_rows, collate_groups, score_rows
from kilter.runs import RunDir, atomic_write_text, save_folder_atomically
from kilter.training.args import DataArgs, StepArgs
from kilter.training.batching import accumulation_context
from kilter.training.checkpoint import savable_model
from kilter.training.loop import MetricWindow, StepPlan, due, start_training
from kilter.training.parallel import gathered, wrap_model
from kilter.training.samples import default_sample_count
from kilter.training.setup import launch, open_run_dir, prepare
from kilter.training.state import set_seed

Kind = Literal["auto", "comparison", "ranking", "rating"]


class RMData(DataArgs):
    """Where the preference data comes from and how it is grouped and batched."""

    help_overrides: ClassVar[dict[str, str]] = {
        "max_length": "Maximum tokens of prompt + response (the prompt is cut from the left first).",
        "group_by_length": "Batch groups of similar length together to cut padding.",
    }
    """--help for the shared data fields, in this trainer's terms."""

    train: str | None = None
    """Training data (required): comparisons, rankings or thumbs ratings (.jsonl/.json/.csv/.parquet or a saved dataset)."""
    eval: str | None = None
    """Held-out preference data (null: hold out eval_fraction of the training prompts)."""
    kind: Kind = "auto"
    """Record kind of the files: comparison, ranking, rating (thumbs, paired within a prompt) or auto (from the first row)."""
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    """Fraction of training prompts held out for evaluation when data.eval is null (0: no evaluation)."""
    group_by_prompt: bool = True
    """Put comparisons that share a prompt into one group, so each response is forwarded once."""
    max_group_size: int = Field(16, ge=2)
    """Most distinct responses in one group; a prompt with more starts another group."""
    padding_free: bool = True
    """Train on packed rows (no padding; a group's responses share one copy of their prompt) with the score head only at each response's last token; checked once against the padded forward, off when the model does not support it."""
    max_eval_groups: int = Field(512, gt=0)
    """Evaluate on at most this many held-out groups."""


class RMConfig(StepArgs):
    """Train a reward model with the Bradley-Terry loss on comparisons, K-way rankings or thumbs."""

    help_overrides: ClassVar[dict[str, str]] = {
        "batch_size": "Groups (prompts with their responses) per micro-batch on each process.",
        "epochs": "Passes over the training groups (ignored when max_steps is set); InstructGPT used 1 to avoid overfitting.",
        "lora": "LoRA adapters (the score head stays fully trainable); final/ is always merged.",
        "resume": "Continue from the newest checkpoint(s) in output_dir; finished ensemble members are kept.",
        "seed": "Seed for head initialisation and data order; ensemble member i uses seed + i.",
    }
    """--help for the shared fields, in this trainer's terms."""

    model: str = "builtin:tiny"
    """Backbone to start from: an SFT run's final/, any HF causal-LM folder, a preset (smollm2-135m) or builtin:tiny."""
    init_from: str | None = None
    """Start from an earlier reward model (a kilter rm run directory or its final/), head included; replaces model."""
    output_dir: str = "runs/rm"
    """Run directory (config.yaml, metrics.jsonl, calibration.json, checkpoints/, final/)."""
    data: RMData = RMData()
    """Training and evaluation data."""
    strength_margin_scale: float = Field(1.0, ge=0)
    """margin = scale * strength for comparisons that carry a strength in [0, 1] (0: no margins)."""
    ensemble_size: int = Field(1, ge=1)
    """Train this many reward models; scoring returns their mean and standard deviation."""
    bootstrap: bool = True
    """Train each ensemble member on a bootstrap resample of the training groups (ensemble_size > 1 only)."""
    bias_reference: str = "train"
    """Responses whose mean reward the bias sets to 0: train, eval, none, or a data file (demonstrations, comparisons, ...)."""
    bias_pass: Literal["last_epoch", "full"] = "last_epoch"
    """How the mean of bias_reference=train is found: last_epoch: from the rewards the training forwards last gave each training response, corrected by rescoring bias_check_examples of them with the final model (no full extra pass); full: a separate pass of the final model over up to max_bias_examples responses (the exact mean of those). Other references always take the full pass."""
    bias_check_examples: int = Field(256, gt=0)
    """bias_pass=last_epoch: training responses rescored with the final model to correct the last epoch's rewards for the weights' drift (all of them when there are fewer)."""
    max_bias_examples: int = Field(4096, gt=0)
    """Use at most this many reference responses (a fixed random subset) for the full pass."""
    calibration_bins: int = Field(10, gt=1)
    """Bins of predicted P(chosen wins) in the calibration table (calibration.json, eval/ece)."""
    eval_batch_size: int = Field(64, gt=0)
    """Responses per forward pass when evaluating and computing the bias."""
    n_samples: int | None = Field(None, ge=0)
    """Held-out pairs shown with their rewards at the end (0: none; null: 4 on the built-in task's data, none on user data)."""


# --------------------------------------------------------------------------- evaluation


def _pair_stats(rewards: torch.Tensor, batch: dict) -> dict[str, float]:
    """Sums over a batch's labeled pairs and responses: wins (ties 1/2), pairs, reward gap, r, r^2, responses."""
    gap = rewards[batch["better"]] - rewards[batch["worse"]]
    return {"wins": float(pairwise_accuracy(gap, torch.zeros_like(gap))) * len(gap), "pairs": len(gap),
            "gap": float(gap.sum()), "r": float(rewards.sum()), "r2": float((rewards ** 2).sum()),
            "responses": len(rewards)}


def _pair_metrics(sums: dict[str, float], prefix: str, accuracy: str, margin: str) -> dict[str, float]:
    """Accuracy, margin, reward mean and std from :func:`_pair_stats` sums."""
    pairs, n = max(sums["pairs"], 1.0), max(sums["responses"], 1.0)
    mean = sums["r"] / n
    return {prefix + accuracy: sums["wins"] / pairs, prefix + margin: sums["gap"] / pairs,
            prefix + "reward_mean" if prefix else "reward/mean": mean,
            prefix + "reward_std" if prefix else "reward/std": math.sqrt(max(sums["r2"] / n - mean ** 2, 0.0))}


@torch.no_grad()
def evaluate(model, groups: list[dict], cfg: RMConfig, pad_id: int, device: str, info: DistInfo,
             bias: float = 0.0) -> tuple[dict[str, float], dict]:
    """eval/loss, eval/accuracy, eval/margin, eval/ece, eval/reward_mean, eval/reward_std + calibration table."""
    was_training = model.training
    model.eval()
    window = MetricWindow(info)
    window.add(loss=0.0, weight=0.0, **dict.fromkeys(("wins", "pairs", "gap", "r", "r2", "responses"), 0.0))
    calib = torch.zeros(3, cfg.calibration_bins, dtype=torch.float64)
    for chunk in chunks_of_rows(groups[info.rank::info.world_size], cfg.eval_batch_size):
        batch = collate_groups(chunk, pad_id, cfg.strength_margin_scale)
        rewards = score_rows(model, batch, cfg.precision, device).cpu() + bias
        loss_sum, weight_sum = weighted_pair_loss(rewards, batch["better"], batch["worse"], batch["pair_weight"],
                                                  batch["margin"])
        window.add(loss=loss_sum, weight=weight_sum, **_pair_stats(rewards, batch))
        calib += calibration_sums(torch.sigmoid(rewards[batch["better"]] - rewards[batch["worse"]]),
                                  cfg.calibration_bins)
    sums, calib = window.read()[0], all_reduce_sum(calib, info)
    if was_training:
        model.train()
    report = calibration_report(calib)
    metrics = {"eval/loss": sums["loss"] / max(sums["weight"], 1e-12),
               **_pair_metrics(sums, "eval/", "accuracy", "margin"), "eval/ece": report["ece"]}
    return metrics, report


@torch.no_grad()
def reference_mean(model, examples: list[dict], pad_id: int, cfg: RMConfig, device: str, info: DistInfo) -> float:
    """Mean raw reward (no bias) over encoded reference examples, shared by all ranks."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    mine = examples[info.rank::info.world_size]
    for start in range(0, len(mine), cfg.eval_batch_size):
        batch = pad_batch(mine[start:start + cfg.eval_batch_size], pad_id, keys=("input_ids",))
        rewards = score_rows(model, batch, cfg.precision, device).double().cpu()
        total += torch.tensor([float(rewards.sum()), len(rewards)], dtype=torch.float64)
    total = all_reduce_sum(total, info)
    if was_training:
        model.train()
    return float(total[0] / total[1].clamp(min=1))


def _bias_from_training(cfg: RMConfig) -> bool:
    return cfg.bias_reference == "train" and cfg.bias_pass == "last_epoch"


class LastPassRewards:
    """The latest raw reward the training forwards gave each distinct training response.

    Responses are told apart by their token ids, so one response in several groups counts once,
    as in :func:`kilter.data.preferences.reference_pairs`.
    """

    def __init__(self, train_enc: list[dict]):
        self.train_enc = train_enc
        self.ids: dict[tuple[int, ...], tuple[int, int]] = {}
        """token ids -> (group, example) of the first copy."""
        for j, group in enumerate(train_enc):
            for e, ex in enumerate(group["examples"]):
                self.ids.setdefault(tuple(ex["input_ids"]), (j, e))
        self.latest: dict[tuple[int, int], tuple[int, float]] = {}
        """(group, example) -> (step, raw reward) of the latest training forward."""

    def add(self, step: int, groups: list[int], rewards: torch.Tensor) -> None:
        """``rewards`` (N,): a :func:`collate_groups` batch of train_enc[groups] in row order."""
        values = rewards.detach().double().cpu().tolist()
        k = 0
        for j in groups:
            for ex in self.train_enc[j]["examples"]:
                self.latest[self.ids[tuple(ex["input_ids"])]] = (step, values[k])
                k += 1

    def merged(self, info: DistInfo) -> dict[tuple[int, int], float]:
        """Every rank's latest rewards, the newest step winning: the same dict on all ranks."""
        return {key: value for key, (_, value) in self.merged_steps(info).items()}

    def merged_steps(self, info: DistInfo) -> dict[tuple[int, int], tuple[int, float]]:
        """:meth:`merged` with the step of each reward (what a checkpoint keeps; a collective)."""
        parts = [self.latest]
        if info.enabled:
            import torch.distributed as dist

            parts = [None] * info.world_size
            dist.all_gather_object(parts, self.latest)
        out: dict[tuple[int, int], tuple[int, float]] = {}
        for part in parts:
            for key, (step, value) in part.items():
                if key not in out or step > out[key][0]:
                    out[key] = (step, value)
        return out


def drift_corrected_mean(last: dict, final: dict, unscored_mean: float | None = None, n_unscored: int = 0) -> float:
    """Mean of the final model's rewards over N responses, from the training forwards' ones.

    ``last`` maps each response the training forwards scored to its latest reward, ``final`` a
    random subset of those keys to the final model's reward; the responses never scored in
    training (``n_unscored`` of them, whose final rewards average ``unscored_mean``) are added
    as they are.  The subset's mean of ``final - last`` corrects the drift of the weights since
    each response was scored (a control variate): exact when the subset is all of ``last``.
    """
    n_last = len(last)
    total = 0.0
    if n_last:
        if not final:
            raise ValueError("drift_corrected_mean needs final rewards for a subset of the scored responses")
        drift = sum(final[k] - last[k] for k in final) / len(final)
        total = sum(last.values()) + n_last * drift
    if n_unscored:
        total += n_unscored * float(unscored_mean)
    return total / max(n_last + n_unscored, 1)


@torch.no_grad()
def last_pass_mean(model, tracker: LastPassRewards, groups, pad_id: int, cfg: RMConfig, device: str,
                   info: DistInfo, seed: int) -> tuple[float, dict[str, float]]:
    """(mean raw reward of the training responses of ``groups``, metrics): :func:`drift_corrected_mean`
    with ``bias_check_examples`` responses rescored, and the responses training never scored
    (a resume late in the run, max_steps short of an epoch) scored in full (at most max_bias_examples)."""
    last = tracker.merged(info)
    everything = sorted({tracker.ids[tuple(ex["input_ids"])] for j in set(groups)
                         for ex in tracker.train_enc[j]["examples"]})
    rng = random.Random(f"kilter-rm-bias-{seed}")
    scored = [k for k in everything if k in last]
    unscored = [k for k in everything if k not in last]
    check = scored if len(scored) <= cfg.bias_check_examples else rng.sample(scored, cfg.bias_check_examples)
    if len(unscored) > cfg.max_bias_examples:
        sampled = rng.sample(unscored, cfg.max_bias_examples)
    else:
        sampled = unscored
    keys = check + sampled
    mine = list(range(len(keys)))[info.rank::info.world_size]
    values = torch.zeros(len(keys), dtype=torch.float64)
    was_training = model.training
    model.eval()
    for start in range(0, len(mine), cfg.eval_batch_size):
        part = mine[start:start + cfg.eval_batch_size]
        rows = [{"input_ids": tracker.train_enc[j]["examples"][e]["input_ids"]} for j, e in (keys[i] for i in part)]
        batch = pad_batch(rows, pad_id, keys=("input_ids",))
        values[part] = score_rows(model, batch, cfg.precision, device).double().cpu()
    values = all_reduce_sum(values, info)
    if was_training:
        model.train()
    final = {k: float(v) for k, v in zip(check, values[:len(check)].tolist())}
    unscored_mean = float(values[len(check):].mean()) if sampled else None
    mean = drift_corrected_mean({k: last[k] for k in scored}, final, unscored_mean, len(unscored))
    drift = sum(final[k] - last[k] for k in final) / len(final) if final else 0.0
    return mean, {"reward/bias_drift": drift, "reward/bias_rescored": float(len(keys))}


# --------------------------------------------------------------------------- data


def _read_data(cfg: RMConfig, info: DistInfo):
    """(train groups, eval groups, bias reference pairs): read before any model or tokenizer is loaded."""
    d = cfg.data
    kwargs = dict(skip_invalid=d.skip_invalid, group_by_prompt=d.group_by_prompt, max_group_size=d.max_group_size,
                  format=d.format)
    # data.split is data.train's; data.eval names its own split (DIR:split)
    train = load_preference_groups(d.train, d.kind, split=d.split, **kwargs)
    if info.is_main:
        _report_data("train", train)
    train_groups, eval_groups = train.groups, []
    if d.eval:
        held = load_preference_groups(d.eval, d.kind, **kwargs)
        if info.is_main:
            _report_data("eval", held)
        eval_groups = held.groups
    elif d.eval_fraction > 0:
        train_groups, eval_groups = split_by_prompt(train.groups, d.eval_fraction, cfg.seed)
    eval_groups = eval_groups[: d.max_eval_groups]

    ref = cfg.bias_reference
    if ref == "train" and cfg.bias_pass == "last_epoch":
        pairs = []  # the mean comes from the training forwards (LastPassRewards)
    elif ref == "train":
        pairs = reference_pairs(train_groups)
    elif ref == "eval":
        if not eval_groups:
            raise ConfigError("bias_reference=eval needs evaluation data (data.eval or data.eval_fraction > 0)")
        pairs = reference_pairs(eval_groups)
    elif ref == "none":
        pairs = []
    else:
        pairs = reference_pairs_from_file(ref)
    if len(pairs) > cfg.max_bias_examples:
        pairs = random.Random(f"kilter-rm-bias-{cfg.seed}").sample(pairs, cfg.max_bias_examples)
    return train_groups, eval_groups, pairs


def _encode_data(cfg: RMConfig, tokenizer, train_groups, eval_groups, pairs):
    """(train groups, eval groups, encoded train, encoded eval, encoded reference examples)."""
    from kilter.data.tokenize import encode_prompt_completion

    d = cfg.data
    reference = [{"input_ids": encode_prompt_completion(tokenizer, p, r, d.max_length)["input_ids"]} for p, r in pairs]
    return (train_groups, eval_groups, encode_groups(tokenizer, train_groups, d.max_length),
            encode_groups(tokenizer, eval_groups, d.max_length), reference)


def _report_data(split: str, data) -> None:
    print(f"kilter rm: {split}: {data.n_records} {data.kind} records from {data.source} -> {len(data.groups)} groups, "
          f"{data.n_responses} responses, {data.n_pairs} pairs")
    if data.n_invalid:
        print(f"kilter rm: {split}: skipped {data.n_invalid} invalid rows (first: {data.first_error})", file=sys.stderr)
    if data.n_without_pairs:
        print(f"kilter rm: {split}: skipped {data.n_without_pairs} groups without a strict preference "
              "(all ties, or all thumbs alike)", file=sys.stderr)


def _start_points(cfg: RMConfig) -> list[str]:
    """The folder (or model spec) each member starts from."""
    if cfg.init_from is None:
        return [cfg.model] * cfg.ensemble_size
    folder = resolve_reward_dir(cfg.init_from)
    if not is_ensemble_dir(folder):
        return [str(folder)] * cfg.ensemble_size
    members = json.loads((folder / "ensemble.json").read_text())["members"]
    if len(members) != cfg.ensemble_size:
        raise ConfigError(f"init_from {cfg.init_from} is an ensemble of {len(members)} members but ensemble_size="
                          f"{cfg.ensemble_size}; match them or point init_from at one member folder")
    return [str(folder / m) for m in members]


# --------------------------------------------------------------------------- training


def run(cfg: RMConfig) -> int:
    return launch(_train_all, cfg, "rm")


def _train_all(cfg: RMConfig, info: DistInfo) -> int:
    if not cfg.data.train:
        raise ConfigError("data.train is required: a comparison, ranking or rating file (see `kilter label`)")
    if cfg.lora.enabled and not cfg.lora.merge_on_save:
        raise ConfigError("lora.merge_on_save=false is not supported by kilter rm: final/ must load as a plain "
                          "AutoModelForSequenceClassification")
    root = Path(cfg.output_dir)
    n = cfg.ensemble_size
    member_dirs = [root] if n == 1 else [root / f"member-{i}" for i in range(n)]
    finals = [root / "final"] if n == 1 else [root / "final" / f"member-{i}" for i in range(n)]
    prepare(cfg, info, member_dirs)  # threads, precision, fast paths; refuses to overwrite checkpoints
    starts = _start_points(cfg)

    read = _read_data(cfg, info)
    tokenizer = load_tokenizer(starts[0])
    train_groups, eval_groups, train_enc, eval_enc, reference = _encode_data(cfg, tokenizer, *read)
    if info.is_main:
        where = cfg.init_from or cfg.model
        bias_from = (f"{len(reference)} reference responses" if not _bias_from_training(cfg)
                     else "the last epoch's training rewards")
        print(f"kilter rm: {len(train_enc)} training groups, {len(eval_enc)} eval groups, bias from {bias_from}; "
              f"starting from {where}; {n} model(s)")

    for i in range(n):
        if n > 1 and cfg.resume and (finals[i] / "config.json").is_file():
            if info.is_main:
                print(f"kilter rm: member {i} already finished ({finals[i]}); skipping")
            continue
        _train_member(cfg, info, i, starts[i], member_dirs[i], finals[i], tokenizer, train_enc, eval_enc,
                      eval_groups, reference)

    if n > 1 and info.is_main:
        write_ensemble_manifest(root / "final", [f.name for f in finals],
                                {"seeds": [cfg.seed + i for i in range(n)], "bootstrap": cfg.bootstrap})
        root_dir = RunDir(root, writer=True, tensorboard=False)
        root_dir.write_config(cfg)
        metrics = ensemble_accuracy(root / "final", eval_groups, cfg.eval_batch_size, info.device) if eval_groups else {}
        if metrics:
            root_dir.log(0, metrics)
            print("kilter rm: ensemble " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        print(f"kilter rm: done; ensemble of {n} in {root / 'final'}")
        root_dir.close()
    barrier(info)
    return 0


def _train_member(cfg: RMConfig, info: DistInfo, member: int, start: str, path: Path, final: Path, tokenizer,
                  train_enc: list[dict], eval_enc: list[dict], eval_groups: list[dict],
                  reference: list[dict]) -> dict[str, float]:
    device = info.device
    seed = cfg.seed + member
    tag = "rm" if cfg.ensemble_size == 1 else f"rm[{member}]"
    set_seed(seed)
    # one folder per ensemble member
    run_dir = open_run_dir(cfg, info, path)
    existing = run_dir.latest_checkpoint() if cfg.resume else None

    model = load_reward_backbone(start, tokenizer, max_length=cfg.data.max_length)
    set_reward_bias(model, 0.0)  # training is shift-invariant; the bias is recomputed at the end
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora, task_type="SEQ_CLS")
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.to(device)
    model.train()

    order = list(range(len(train_enc)))
    if cfg.ensemble_size > 1 and cfg.bootstrap:
        rng = random.Random(f"kilter-rm-bootstrap-{cfg.seed}-{member}")
        order = [rng.randrange(len(train_enc)) for _ in order]
    lengths = [sum(len(e["input_ids"]) for e in train_enc[j]["examples"]) for j in order]
    fast = packed.fast_reward_model(model, device) if cfg.data.padding_free else None
    pack_capacity = cfg.data.max_length if fast is not None else None
    shared = fast is not None and fast.shares_prefix
    weight = fast.attention_weight if fast is not None else 0.0
    ddp_model = wrap_model(fast if fast is not None else model, model, cfg, info)  # ddp or fsdp
    plan = StepPlan(lengths, cfg, info, "groups", seed=seed)
    total_steps = plan.total_steps
    stepper, start_step = start_training(cfg, model, total_steps, run_dir, existing,
                                         lambda m: info.is_main and print(f"kilter {tag}: {m}"))
    if info.is_main:
        trainable, total_params = count_parameters(model)
        print(f"kilter {tag}: {len(order)} groups, {total_steps} steps, global batch {plan.global_batch} groups, "
              f"{trainable / 1e6:.2f}M of {total_params / 1e6:.2f}M parameters trainable, device {device}")

    pad_id = tokenizer.pad_token_id
    tracker = LastPassRewards(train_enc) if _bias_from_training(cfg) else None
    if tracker is not None:  # checkpoints keep the rewards seen so far, so a resumed run's bias is the same
        tracker.latest = dict(stepper.restored.get("bias_rewards", {}))
        stepper.state = lambda: {"bias_rewards": tracker.merged_steps(info)}
    progress = tqdm(total=total_steps, initial=start_step, desc=tag, disable=not info.is_main, dynamic_ncols=True)
    window = MetricWindow(info)
    last: dict[str, float] = {}
    for step in range(start_step, total_steps):
        # 1. this step's groups in micro-batches (padded, packed, or packed with shared prompts)
        parts = [[order[p] for p in idx] for idx in plan.micro_batches(step)]
        micro = [collate_groups([train_enc[j] for j in part], pad_id, cfg.strength_margin_scale, pack_capacity,
                                shared, weight)
                 for part in parts]
        # 2. the step's loss is sum(w * l) / sum(w) over all its micro-batches and processes
        local_weight = sum(float(b["pair_weight"].sum()) for b in micro)
        global_weight = float(all_reduce_sum(torch.tensor(local_weight, dtype=torch.float64), info))
        for k, batch in enumerate(micro):
            with accumulation_context(ddp_model, info, last=k == len(micro) - 1):
                rewards = score_rows(ddp_model, batch, cfg.precision, device)
                if tracker is not None:
                    tracker.add(step, parts[k], rewards)
                loss_sum, _ = weighted_pair_loss(rewards, batch["better"].to(device), batch["worse"].to(device),
                                                 batch["pair_weight"].to(device), batch["margin"].to(device))
                # DDP averages gradients over ranks; the world_size factor turns that into a sum.
                (loss_sum * info.world_size / max(global_weight, 1e-12)).backward()
            tokens = batch["n_tokens"] if "n_tokens" in batch else batch["attention_mask"].sum()
            window.add(loss=loss_sum.detach().double(), tokens=tokens,
                       **_pair_stats(rewards.detach().float().cpu(), batch))
        window.add(weight=local_weight)
        # 3. the update
        grad_norm = stepper.step()
        progress.update(1)
        done = step + 1
        # 4. log, evaluate, checkpoint
        if due(done, cfg.log_every, total_steps):
            sums, elapsed = window.read()
            last = {"loss/rm": sums["loss"] / max(sums["weight"], 1e-12),
                    **_pair_metrics(sums, "", "train/accuracy", "train/margin"), "optim/lr": stepper.lr,
                    "optim/grad_norm": grad_norm, "perf/pairs_per_s": sums["pairs"] / elapsed,
                    "perf/samples_per_s": sums["responses"] / elapsed, "perf/tokens_per_s": sums["tokens"] / elapsed,
                    "progress/epoch": plan.epoch(done)}
            run_dir.log(done, last)
            progress.set_postfix(loss=f"{last['loss/rm']:.3f}", acc=f"{last['train/accuracy']:.2f}")
        if eval_enc and done % cfg.eval_every == 0 and done < total_steps:  # the last one follows the bias
            with gathered(model):
                metrics, _ = evaluate(model, eval_enc, cfg, pad_id, device, info)
            run_dir.log(done, metrics)
            last.update(metrics)
        stepper.save_if_due(run_dir, done, total_steps, cfg, tokenizer, "rm")
    progress.close()

    # Zero-mean bias over the reference responses (InstructGPT): r' = r - mean(r_ref).
    summary: dict[str, float] = {}
    with gathered(model):
        if tracker is not None:
            raw_mean, extra = last_pass_mean(model, tracker, range(len(train_enc)), pad_id, cfg, device, info, seed)
            set_reward_bias(model, -raw_mean)
            summary = {"reward/reference_raw_mean": raw_mean, "reward/bias": -raw_mean, **extra}
        elif reference:
            raw_mean = reference_mean(model, reference, pad_id, cfg, device, info)
            set_reward_bias(model, -raw_mean)
            summary = {"reward/reference_raw_mean": raw_mean, "reward/bias": -raw_mean}
        if eval_enc:
            metrics, report = evaluate(model, eval_enc, cfg, pad_id, device, info,
                                       bias=summary.get("reward/bias", 0.0))
            summary.update(metrics)
            if info.is_main:
                atomic_write_text(run_dir.path / "calibration.json", json.dumps(report, indent=2) + "\n")
    run_dir.log(total_steps, summary)
    plain = savable_model(model)  # under FSDP: the gathered weights, on rank 0
    if info.is_main:
        save_folder_atomically(final, lambda p: save_reward_model(plain, tokenizer, p))
        shown_pairs = default_sample_count(cfg.n_samples, cfg.data.train)
        if shown_pairs and eval_groups:
            scorer = RewardModel(plain, tokenizer, max_length=cfg.data.max_length)
            print(f"held-out pairs ({tag}):\n" + pair_table(scorer, eval_groups[:shown_pairs]))
        shown = {**{k: v for k, v in last.items() if k.startswith("loss")}, **summary}
        print(f"kilter {tag}: done (" + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()) + f"); model in {final}")
    barrier(info)
    run_dir.close()
    return summary


__all__ = ["RMConfig", "RMData", "run", "evaluate"]
