"""Phase 1: supervised fine-tuning on demonstrations (``kilter sft``).

The loss is next-token cross-entropy on completion tokens only (prompt tokens are masked
with -100).  Gradients are normalised by the number of completion tokens in the whole
optimizer step, across gradient-accumulation micro-batches and data-parallel ranks, so
``torchrun`` with 2 processes x batch B follows the same trajectory as 1 process x 2B.
"""

from __future__ import annotations

import math
import random
import sys
from typing import ClassVar, Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm

from kilter.data.collate import pack_examples, pad_batch
from kilter.data.sources import load_train_eval
from kilter.data.tokenize import IGNORE_INDEX, encode_sft_records
from kilter.distributed import DistInfo, all_reduce_sum
from kilter.errors import KilterError
from kilter.losses import causal_lm_loss, sft_loss
from kilter.models import load_causal_lm, load_tokenizer
from kilter.models.lora import apply_lora, count_parameters, enable_gradient_checkpointing
from kilter.models.packed import fast_causal_lm, pack_micro_batch
from kilter.models.precision import autocast
from kilter.rollout.generate import SamplingParams, generate_texts
from kilter.training.args import DataArgs, StepArgs
from kilter.training.batching import accumulation_context
from kilter.training.display import format_sample_table
from kilter.training.loop import MetricWindow, StepPlan, due, finish, start_training
from kilter.training.parallel import gathered, wrap_model
from kilter.training.samples import default_sample_count
from kilter.training.setup import launch, open_run_dir, prepare


class SFTData(DataArgs):
    """Where the demonstrations come from and how they are batched."""

    help_overrides: ClassVar[dict[str, str]] = {
        "format": "Layout of the files: auto (judged from the first row), kilter, ultrafeedback, alpaca, sharegpt (docs/data.md).",
        "split": "Split of a saved DatasetDict given as data.train (default train); data.eval=DIR:split picks its own.",
        "max_length": "Maximum tokens per example (prompt cut from the left first, then the completion).",
        "group_by_length": "Batch examples of similar length together to cut padding.",
    }
    """--help for the shared data fields, in this trainer's terms."""

    train: str = "builtin:sft"
    """Training data: a .jsonl/.json/.csv/.parquet file, a save_to_disk folder, or builtin:sft."""
    eval: str | None = "auto"
    """Held-out data for eval loss, perplexity and the before/after samples: a file, DIR:split, null (none), or auto (builtin:sft_eval for builtin:sft, else eval_fraction of data.train held out)."""
    eval_fraction: float = Field(0.05, ge=0, lt=1)
    """With data.eval=auto and your own data.train, hold out this fraction of it for evaluation (0: none)."""
    kind: Literal["demonstration", "text"] = "demonstration"
    """Record kind: demonstration ({prompt, completion} or {messages}) or text ({text}, all tokens learned)."""
    train_on: Literal["all_assistant", "last"] = "all_assistant"
    """Multi-turn conversations: learn every assistant turn (all_assistant) or only the last one (last)."""
    packing: bool = False
    """Pack several examples into each row of max_length tokens (no padding; see docs for attention)."""
    padding_free: bool = True
    """Pack each micro-batch's examples into rows with per-example attention, so no compute goes to padding (checked against the padded forward; off when the model does not support it or with packing)."""
    max_eval_examples: int = Field(256, gt=0)
    """Evaluate on at most this many held-out examples."""
    task_seed: int = 0
    """Seed of the built-in task's generated data (builtin: sources only)."""


class SFTConfig(StepArgs):
    """Supervised fine-tuning: learn to produce the demonstrated completion for each prompt."""

    model: str = "builtin:tiny"
    """Model to start from: a Hugging Face folder, a preset (smollm2-135m), builtin:tiny, or a hub id when online."""
    output_dir: str = "runs/sft"
    """Run directory (config.yaml, metrics.jsonl, checkpoints/, final/)."""
    data: SFTData = SFTData()
    """Training and evaluation data."""
    batch_size: int = Field(32, gt=0)
    """Examples per micro-batch on each process."""
    n_samples: int | None = Field(None, ge=0)
    """Held-out prompts to sample before and after training (0: none; null: 4 on the built-in task, none on user data, where the generations cost minutes on a real model)."""
    sample_max_new_tokens: int = Field(48, gt=0)
    """Length limit of those samples."""

    @property
    def sample_count(self) -> int:
        return default_sample_count(self.n_samples, self.data.train)


# --------------------------------------------------------------------------- data


def _load(cfg: SFTConfig, info: DistInfo):
    """(train records, eval records or None, where eval comes from); read before any model is loaded."""
    d = cfg.data
    train, held, eval_from = load_train_eval(d.train, d.eval, d.kind, eval_fraction=d.eval_fraction, seed=cfg.seed,
                                             builtin_eval={"builtin:sft": "builtin:sft_eval"},
                                             skip_invalid=d.skip_invalid, split=d.split, task_seed=d.task_seed,
                                             format=d.format)
    for records in (train, held):
        if records is not None and records.n_skipped and info.is_main:
            print(f"kilter sft: skipped {records.n_skipped} invalid rows in {records.source} "
                  f"(first: {records.first_error})", file=sys.stderr)
    return train, held, eval_from


def _forward_sum(model, batch: dict[str, torch.Tensor], precision: str, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion-token loss and token count of one padded batch."""
    inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"].to(device)
    with autocast(precision, device):
        logits = model(**inputs, use_cache=False).logits
    mean, n_tokens = causal_lm_loss(logits, batch["labels"].to(device))
    return mean * n_tokens, n_tokens


def _forward_sum_fast(loss_model, batch: dict[str, torch.Tensor], precision: str, device: str
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_forward_sum` through :class:`CompletionLogits`: the LM head runs only at
    positions that predict a labelled token; padded or packed (no attention mask) batches."""
    labels = batch["labels"].to(device)
    targets = labels[:, 1:]
    select = targets != IGNORE_INDEX
    mask = batch.get("attention_mask")
    position_ids = batch.get("position_ids")
    with autocast(precision, device):
        logits = loss_model(batch["input_ids"].to(device), None if mask is None else mask.to(device),
                            None if position_ids is None else position_ids.to(device), select)
    mean, n_tokens = sft_loss(logits, targets[select])
    return mean * n_tokens, n_tokens


def _batch_tokens(batch: dict[str, torch.Tensor]) -> float:
    """Real (non-padding) tokens of a padded or packed batch."""
    if "n_tokens" in batch:
        return float(batch["n_tokens"])
    return float(batch["attention_mask"].sum())


@torch.no_grad()
def evaluate(model, examples: list[dict], pad_id: int, batch_size: int, precision: str, device: str,
             info: DistInfo, loss_model=None, pack_capacity: int | None = None) -> dict[str, float]:
    """eval/loss and eval/perplexity; ``loss_model``/``pack_capacity`` select the fast paths of training."""
    was_training = model.training
    model.eval()
    total, tokens = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    mine = examples[info.rank::info.world_size]
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        batch = pack_micro_batch(chunk, pad_id, pack_capacity) if pack_capacity else pad_batch(chunk, pad_id)
        if loss_model is not None:
            loss_sum, n = _forward_sum_fast(loss_model, batch, precision, device)
        else:
            loss_sum, n = _forward_sum(model, batch, precision, device)
        total += loss_sum.double().cpu()
        tokens += n.double().cpu()
    total, tokens = all_reduce_sum(total, info), all_reduce_sum(tokens, info)
    if was_training:
        model.train()
    loss = float(total / tokens.clamp(min=1))
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}


def sample_table(model, tokenizer, prompts: list, max_new_tokens: int, seed: int, score_fn=None) -> str:
    """Greedy samples for a few prompts, as a text table (with the gold score when available)."""
    params = SamplingParams(max_new_tokens=max_new_tokens, do_sample=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        gen = generate_texts(model, tokenizer, prompts, params)
    rows = [{"prompt": p if isinstance(p, str) else p[-1]["content"], "response": t} for p, t in zip(prompts, gen.texts)]
    columns = ["prompt", "response"]
    if score_fn is not None:
        for row, score in zip(rows, score_fn([r["prompt"] for r in rows], gen.texts)):
            row["gold"] = float(score)
        columns.append("gold")
    return format_sample_table(rows, columns)


def builtin_gold(spec: str):
    if spec.startswith("builtin:"):
        from kilter.data.task import gold_scores

        return gold_scores
    return None


# --------------------------------------------------------------------------- training


def run(cfg: SFTConfig) -> int:
    return launch(_train, cfg, "sft")


def _train(cfg: SFTConfig, info: DistInfo) -> int:
    existing = prepare(cfg, info)  # threads, precision, seed, fast paths; refuses to overwrite checkpoints
    device = info.device
    run_dir = open_run_dir(cfg, info)

    train_records, eval_records, eval_from = _load(cfg, info)
    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, tokenizer, max_length=cfg.data.max_length)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.to(device)
    model.train()
    # Completion-only logits always when the model allows; padding-free rows unless the user packs.
    loss_model, packed_ok = fast_causal_lm(model, device, packing=cfg.data.padding_free and not cfg.data.packing)
    pack_capacity = cfg.data.max_length if packed_ok else None
    weight = loss_model.attention_weight if loss_model is not None else 0.0

    examples = encode_sft_records(tokenizer, train_records.rows, cfg.data.max_length, cfg.data.train_on)
    if cfg.data.packing:
        order = list(range(len(examples)))
        random.Random(cfg.seed).shuffle(order)
        examples = pack_examples([examples[i] for i in order], cfg.data.max_length)
    eval_examples: list[dict] = []
    eval_prompts: list = []
    if eval_records is not None:
        eval_examples = encode_sft_records(tokenizer, eval_records.rows[: cfg.data.max_eval_examples],
                                           cfg.data.max_length, cfg.data.train_on)
        if cfg.data.kind == "demonstration":
            eval_prompts = [r["prompt"] for r in eval_records.rows[: cfg.sample_count]]

    ddp_model = wrap_model(loss_model if loss_model is not None else model, model, cfg, info)  # ddp or fsdp
    plan = StepPlan([len(e["input_ids"]) for e in examples], cfg, info, "examples")
    total_steps = plan.total_steps
    stepper, start_step = start_training(cfg, model, total_steps, run_dir, existing,
                                         lambda m: info.is_main and print(f"kilter sft: {m}"))

    trainable, total_params = count_parameters(model)
    gold = builtin_gold(eval_records.source) if eval_records is not None else None
    if info.is_main:
        print(f"kilter sft: {len(examples)} examples, {total_steps} steps, global batch {plan.global_batch}, "
              f"{trainable / 1e6:.2f}M of {total_params / 1e6:.2f}M parameters trainable, device {device}, "
              f"padding-free rows {'on' if packed_ok else 'off'}, "
              f"completion-only logits {'on' if loss_model is not None else 'off'}")
        print(f"kilter sft: eval and samples: {eval_from}")
    with gathered(model):
        if info.is_main and eval_prompts and start_step == 0:
            print("samples before training:\n" + sample_table(model, tokenizer, eval_prompts,
                                                              cfg.sample_max_new_tokens, cfg.seed, gold))

    def run_eval() -> dict[str, float]:
        with gathered(model):
            return evaluate(model, eval_examples, tokenizer.pad_token_id, cfg.batch_size, cfg.precision, device, info,
                            loss_model=loss_model, pack_capacity=pack_capacity)

    progress = tqdm(total=total_steps, initial=start_step, desc="sft", disable=not info.is_main, dynamic_ncols=True)
    window = MetricWindow(info)
    last_metrics: dict[str, float] = {}
    for step in range(start_step, total_steps):
        # 1. this step's examples in micro-batches: padding-free packed rows or padded ones
        micro = [pack_micro_batch([examples[i] for i in idx], tokenizer.pad_token_id, pack_capacity,
                                  attention_weight=weight) if pack_capacity
                 else pad_batch([examples[i] for i in idx], tokenizer.pad_token_id) for idx in plan.micro_batches(step)]
        # 2. the loss is a mean over every target token of the step, on every process
        local_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
        global_tokens = float(all_reduce_sum(local_tokens, info))
        for k, batch in enumerate(micro):
            with accumulation_context(ddp_model, info, last=k == len(micro) - 1):
                if loss_model is not None:
                    loss_sum, _ = _forward_sum_fast(ddp_model, batch, cfg.precision, device)
                else:
                    loss_sum, _ = _forward_sum(ddp_model, batch, cfg.precision, device)
                # DDP averages gradients over ranks; the world_size factor turns that into a sum.
                (loss_sum * info.world_size / max(global_tokens, 1.0)).backward()
            window.add(loss=loss_sum.detach().double(), tokens=_batch_tokens(batch))
        window.add(targets=local_tokens, examples=len(plan.indices(step)))  # rows, when data.packing
        # 3. the update
        grad_norm = stepper.step()
        progress.update(1)
        done = step + 1
        # 4. log, evaluate, checkpoint
        if due(done, cfg.log_every, total_steps):
            sums, elapsed = window.read()
            last_metrics = {"loss/sft": sums["loss"] / max(sums["targets"], 1.0), "optim/lr": stepper.lr,
                            "optim/grad_norm": grad_norm, "perf/tokens_per_s": sums["tokens"] / elapsed,
                            "perf/samples_per_s": sums["examples"] / elapsed, "progress/epoch": plan.epoch(done)}
            run_dir.log(done, last_metrics)
            progress.set_postfix(loss=f"{last_metrics['loss/sft']:.3f}", tok_s=f"{sums['tokens'] / elapsed:.0f}")
        stepper.end_of_step(run_dir, done, total_steps, cfg, tokenizer, "sft", last_metrics,
                            evaluate=run_eval if eval_examples else None)
    progress.close()

    def samples_after() -> dict[str, float]:
        if eval_prompts:
            print("samples after training:\n" + sample_table(model, tokenizer, eval_prompts,
                                                             cfg.sample_max_new_tokens, cfg.seed, gold))
        return {}

    shown = tuple(k for k in last_metrics if k.startswith(("loss", "eval")))
    return finish(run_dir, info, "sft", model, tokenizer, cfg.lora.merge_on_save, last_metrics, shown,
                  after=samples_after)


__all__ = ["SFTConfig", "SFTData", "run", "evaluate", "sample_table", "KilterError"]
