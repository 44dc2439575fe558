"""Context distillation (``kilter distill``): a student learns without a context what a teacher does with it.

Askell et al. 2021 (sec. 3.4) and Bai et al. 2022 condition a model on a long prompt (an HHH
prompt with example dialogues), then fine-tune the model *without* the prompt to match the
prompted model's next-token distributions: the behaviour moves into the weights and the prompt's
tokens are no longer paid for at every call.  Here the teacher is ``teacher_model`` (null: the
student's starting weights) shown ``context`` before each prompt; the student is ``model`` shown the
prompt alone; both score the same continuations -- sampled from the teacher once before training
(``data.continuations=sample``) or given as demonstrations (``data``).

One optimizer step: B continuations are forwarded through the student (prompt + continuation) and
compared at every continuation token with the teacher's distribution (context + prompt +
continuation), precomputed once into ``teacher_topk.pt`` (``teacher=precompute``) or computed every
step (``online``); the per-token KL of :func:`kilter.losses.distill.distill_kl` (forward or reverse,
over the teacher's top_k tokens) is summed over the step and divided by its number of continuation
tokens, across gradient-accumulation micro-batches and data-parallel ranks, as ``kilter sft`` does.

With LoRA and no ``teacher_model`` the teacher is the student with its adapter disabled, so only
one copy of the weights is held.  Full fine-tuning without ``teacher_model`` keeps a frozen copy of
the starting weights only while it is needed (an online teacher, or evaluation); with
``teacher=precompute`` and ``eval_every`` beyond the run it is freed after precomputing.

Evaluation (held-out prompts, before training, every ``eval_every`` steps and at the end): responses
sampled from the student without the context (temperature 1) are scored by the gold function
(``eval/gold/student``) and by KL(student || teacher-with-context) = E_y[log q(y | x) - log p(y | c, x)]
(``eval/kl/student_teacher``, nats per response, the sequence-level k1 estimator of ``kilter eval``);
before training also the teacher's own responses with the context (``eval/gold/teacher``).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import sys
from typing import Literal

import torch
from pydantic import Field

from kilter.config import BaseConfig
from kilter.data.collate import pad_batch
from kilter.data.context import context_tokens, load_context, with_context
from kilter.data.formats import DataFormat
from kilter.data.sources import load_records
from kilter.data.tokenize import IGNORE_INDEX, encode_prompt
from kilter.distributed import DistInfo, all_reduce_sum, barrier
from kilter.evaluation.evaluate import mean_and_stderr
from kilter.losses.distill import KLDirection, teacher_topk, token_kls
from kilter.models.logprobs import per_token_logps
from kilter.models.lora import describe_parameters
from kilter.models.packed import fast_causal_lm
from kilter.models.reference import Reference
from kilter.models.teacher import cached_teacher_topk, completion_logits, gather_rows
from kilter.rewards.base import call_function, load_function
from kilter.rollout.generate import SamplingParams, generate_ids
from kilter.runs import atomic_write_file
from kilter.training.args import StepArgs
from kilter.training.batching import accumulation_context
from kilter.training.loop import MetricWindow, StepPlan, due, finish, start_training
from kilter.training.parallel import gathered, wrap_model
from kilter.training.policy import load_policy
from kilter.training.setup import launch, open_run_dir, prepare

# --------------------------------------------------------------------------- config


class DistillData(BaseConfig):
    """Prompts, the continuations the KL is measured on, and the held-out prompts."""

    train: str = "builtin:prompts"
    """Training prompts {prompt} (continuations=sample) or demonstrations {prompt, completion} (continuations=data): a file, a save_to_disk folder, or builtin:prompts / builtin:sft."""
    continuations: Literal["sample", "data"] = "sample"
    """sample: continuations sampled once from the teacher with the context (cached in teacher_samples.pt); data: the completions of data.train."""
    samples_per_prompt: int = Field(4, gt=0)
    """Teacher continuations sampled per training prompt (continuations=sample)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the teacher's continuations."""
    max_new_tokens: int = Field(48, gt=0)
    """Length limit of a continuation in tokens (sampled, or given ones cut to it)."""
    max_prompt_length: int = Field(256, gt=0)
    """Prompts longer than this many tokens are cut from the left (the teacher's context is never cut)."""
    max_train_prompts: int | None = Field(None, gt=0)
    """Use the first N training prompts (null: all)."""
    eval: str | None = "auto"
    """Held-out prompts for the gold and KL evaluation: a prompt file, null (none), or auto (builtin:prompts_eval for builtin: data, else none)."""
    max_eval_prompts: int = Field(64, gt=0)
    """Evaluate on at most this many held-out prompts."""
    eval_samples: int = Field(2, gt=0)
    """Responses sampled per held-out prompt at each evaluation."""
    format: DataFormat = "auto"
    """Layout of the files: auto (judged from the first row), kilter, alpaca, sharegpt, ... (docs/data.md)."""
    split: str | None = None
    """Split of a saved DatasetDict (default train)."""
    skip_invalid: bool = False
    """Skip malformed rows (counted and reported) instead of stopping at the first."""
    task_seed: int = 0
    """Seed of the built-in task's generated data (builtin: sources only)."""


class DistillConfig(StepArgs):
    """Context distillation: train a student without a context to match a teacher that sees it (token-level KL)."""

    model: str = "runs/sft/final"
    """Student to train (usually the SFT model): a folder, a preset (smollm2-135m), builtin:tiny, or a hub id when online."""
    teacher_model: str | None = None
    """Teacher (null: the student's starting weights; with LoRA, the student with its adapter disabled, no second copy)."""
    context: str | None = None
    """Context the teacher sees before every prompt, prepended verbatim to text prompts, as a system message to conversations (or use context_file)."""
    context_file: str | None = None
    """File holding the context: text (.txt, .md, ...), or .json with a string or a list of {role, content} messages prepended to conversational prompts."""
    output_dir: str = "runs/distill"
    """Run directory (config.yaml, metrics.jsonl, teacher_samples.pt, teacher_topk.pt, checkpoints/, final/)."""
    data: DistillData = DistillData()
    """Training prompts or demonstrations, and held-out prompts."""
    kl: KLDirection = "forward"
    """forward: KL(teacher || student), mass-covering (Askell et al. 2021, Hinton et al. 2015); reverse: KL(student || teacher), mode-seeking."""
    top_k: int | None = Field(64, gt=0)
    """Keep the teacher's k most likely tokens per position, renormalised, and compare the student over the same k (docs/distill.md); null: the whole vocabulary."""
    teacher: Literal["precompute", "online"] = "precompute"
    """precompute: teacher distributions in one pass before training, cached in the run directory; online: every step."""
    reward_fn: str | None = None
    """Gold function 'module:function' or 'file.py:function', f(prompts, responses) -> floats, for eval/gold (null: the built-in task's gold for builtin: prompts)."""
    batch_size: int = Field(16, gt=0)
    """Continuations per micro-batch on each process."""

    @property
    def ref_model(self) -> str | None:
        """The frozen model training compares with (kilter.training.policy.load_policy's name for the teacher)."""
        return self.teacher_model


# --------------------------------------------------------------------------- examples


def _example(prompt_ids: list[int], continuation: list[int]) -> dict:
    return {"input_ids": prompt_ids + continuation, "labels": [IGNORE_INDEX] * len(prompt_ids) + continuation}


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, separators=(",", ":"), default=str).encode()).hexdigest()


# --------------------------------------------------------------------------- evaluation


def _gold_fn(cfg: DistillConfig, eval_spec: str | None):
    if cfg.reward_fn:
        return load_function(cfg.reward_fn)
    if eval_spec and eval_spec.startswith("builtin:"):
        from kilter.data.task import gold_scores

        return gold_scores
    return None


@torch.no_grad()
def evaluate(model, teacher: Reference, tokenizer, prompts: list, teacher_prompts: list, cfg: DistillConfig,
             gold, device: str, teacher_limit: int, with_teacher: bool = False) -> dict[str, float]:
    """Gold and KL(student || teacher-with-context) of student samples on held-out prompts (eval/* keys)."""
    n = cfg.data.eval_samples
    params = SamplingParams(max_new_tokens=cfg.data.max_new_tokens, temperature=1.0)
    student_ids = [encode_prompt(tokenizer, p, cfg.data.max_prompt_length) for p in prompts for _ in range(n)]
    teacher_ids = [encode_prompt(tokenizer, p, teacher_limit) for p in teacher_prompts for _ in range(n)]
    repeated = [p for p in prompts for _ in range(n)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        gen = generate_ids(model, tokenizer, student_ids, params, batch_size=cfg.batch_size)
    metrics: dict[str, float] = {}
    was_training = model.training
    model.eval()
    diffs, tokens = [], 0
    for start in range(0, len(repeated), cfg.batch_size):
        rows = range(start, min(start + cfg.batch_size, len(repeated)))
        response = [gen.response_ids[i] for i in rows]
        s_batch = pad_batch([_example(student_ids[i], r) for i, r in zip(rows, response)], tokenizer.pad_token_id,
                            keys=("input_ids", "labels"))
        t_batch = pad_batch([_example(teacher_ids[i], r) for i, r in zip(rows, response)], tokenizer.pad_token_id,
                            keys=("input_ids", "labels"))
        mask_s, mask_t = s_batch["labels"] != IGNORE_INDEX, t_batch["labels"] != IGNORE_INDEX
        s = per_token_logps(model, s_batch["input_ids"].to(device), s_batch["attention_mask"].to(device),
                            mask_s.to(device)).sum(-1)
        t = teacher.per_token_logps(t_batch["input_ids"].to(device), t_batch["attention_mask"].to(device),
                                    mask_t.to(device)).sum(-1)
        diffs.extend((s - t).tolist())
        tokens += sum(len(r) for r in response)
    if was_training:
        model.train()
    metrics["eval/kl/student_teacher"], metrics["eval/kl/student_teacher_stderr"] = mean_and_stderr(diffs)
    metrics["eval/kl/student_teacher_per_token"] = sum(diffs) / max(tokens, 1)
    metrics["eval/length/student"] = tokens / len(diffs)
    if gold is not None:
        scores = call_function(gold, repeated, gen.texts)
        metrics["eval/gold/student"], metrics["eval/gold/student_stderr"] = mean_and_stderr(scores)
    if with_teacher:
        with teacher.frozen() as t_model, torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            t_gen = generate_ids(t_model, tokenizer, teacher_ids, params, batch_size=cfg.batch_size)
        metrics["eval/length/teacher"] = sum(map(len, t_gen.response_ids)) / len(t_gen.response_ids)
        if gold is not None:
            scores = call_function(gold, repeated, t_gen.texts)
            metrics["eval/gold/teacher"], metrics["eval/gold/teacher_stderr"] = mean_and_stderr(scores)
    return metrics


# --------------------------------------------------------------------------- training


def run(cfg: DistillConfig) -> int:
    return launch(_train, cfg, "distill")


def _log(info: DistInfo, message: str) -> None:
    if info.is_main:
        print(f"kilter distill: {message}", file=sys.stderr if message.startswith("skipped") else sys.stdout)


def _teacher_samples(run_dir, teacher: Reference, tokenizer, teacher_ids: list[list[int]], cfg: DistillConfig,
                     info: DistInfo) -> tuple[list[list[int]], bool]:
    """Continuations sampled from the teacher once (main process), stored in teacher_samples.pt."""
    path = run_dir.path / "teacher_samples.pt"
    d = cfg.data
    key = _digest(teacher.fingerprint(), teacher_ids, d.samples_per_prompt, d.temperature, d.max_new_tokens, cfg.seed)
    hit = False
    if info.is_main:
        blob = {}
        if path.is_file():
            try:
                blob = torch.load(path, weights_only=True)
            except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):  # damaged: sample again
                blob = {}
        hit = isinstance(blob, dict) and blob.get("key") == key
        if not hit:
            repeated = [ids for ids in teacher_ids for _ in range(d.samples_per_prompt)]
            params = SamplingParams(max_new_tokens=d.max_new_tokens, temperature=d.temperature)
            with teacher.frozen() as model, torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                gen = generate_ids(model, tokenizer, repeated, params, batch_size=max(cfg.batch_size, 64))
            blob = {"key": key, "responses": gen.response_ids}
            atomic_write_file(path, lambda tmp: torch.save(blob, tmp))
    barrier(info)
    if not info.is_main:
        blob = torch.load(path, weights_only=True)
    return blob["responses"], hit


def _train(cfg: DistillConfig, info: DistInfo) -> int:
    existing = prepare(cfg, info)  # threads, precision, seed, fast paths; refuses to overwrite checkpoints
    device = info.device
    d = cfg.data

    # Context and data first: a bad file should fail before a large model is loaded.
    context = load_context(cfg.context, cfg.context_file)
    kind = "prompt" if d.continuations == "sample" else "demonstration"
    records = load_records(d.train, kind, skip_invalid=d.skip_invalid, split=d.split, task_seed=d.task_seed,
                           format=d.format)
    if records.n_skipped:
        _log(info, f"skipped {records.n_skipped} invalid rows in {d.train}")
    rows = records.rows[: d.max_train_prompts] if d.max_train_prompts else records.rows
    eval_spec = ("builtin:prompts_eval" if d.train.startswith("builtin:") else None) if d.eval == "auto" else d.eval
    eval_prompts = [r["prompt"] for r in load_records(eval_spec, "prompt", task_seed=d.task_seed).rows
                    [: d.max_eval_prompts]] if eval_spec else []
    teacher_prompts = [with_context(context, r["prompt"]) for r in rows]
    eval_teacher_prompts = [with_context(context, p) for p in eval_prompts]
    gold = _gold_fn(cfg, eval_spec)

    run_dir = open_run_dir(cfg, info)
    tokenizer, model, teacher = load_policy(cfg, info)  # the teacher is cfg.ref_model (teacher_model)
    pad_id = tokenizer.pad_token_id
    limit = d.max_prompt_length + context_tokens(tokenizer, context)
    student_ids = [encode_prompt(tokenizer, r["prompt"], d.max_prompt_length) for r in rows]
    teacher_ids = [encode_prompt(tokenizer, p, limit) for p in teacher_prompts]

    if d.continuations == "sample":
        continuations, hit = _teacher_samples(run_dir, teacher, tokenizer, teacher_ids, cfg, info)
        owner = [i for i in range(len(rows)) for _ in range(d.samples_per_prompt)]
        _log(info, f"{len(continuations)} teacher continuations {'loaded from' if hit else 'sampled into'} "
                   f"{run_dir.path / 'teacher_samples.pt'}")
    else:
        eos = tokenizer.eos_token_id
        texts = [r["completion"] if isinstance(r["completion"], str) else r["completion"][-1]["content"] for r in rows]
        full = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
        continuations, owner = [c[: d.max_new_tokens] for c in full], list(range(len(rows)))
    keep = [j for j, c in enumerate(continuations) if c]  # an empty continuation has no token to compare
    students = [_example(student_ids[owner[j]], continuations[j]) for j in keep]
    teachers = [_example(teacher_ids[owner[j]], continuations[j]) for j in keep]

    table = None
    if cfg.teacher == "precompute":
        table, hit = cached_teacher_topk(run_dir.path, "train", teacher, teachers, pad_id, 2 * cfg.batch_size,
                                         cfg.top_k, cfg.precision, device, info)
        _log(info, f"teacher distributions of {int(table['offsets'][-1])} tokens (top_k {cfg.top_k}, mean kept "
                   f"mass {float(table['mass'].mean()):.4f}) {'loaded from' if hit else 'written to'} "
                   f"{run_dir.path / 'teacher_topk.pt'}")
    shared = teacher.shares_policy
    if table is not None and not eval_prompts:
        teacher.release()  # a separate frozen copy is no longer needed

    loss_model, _ = fast_causal_lm(model, device, packing=False)
    ddp_model = wrap_model(loss_model if loss_model is not None else model, model, cfg, info)  # ddp or fsdp
    plan = StepPlan([len(e["input_ids"]) for e in students], cfg, info, "continuations", by_length=True)
    total_steps = plan.total_steps
    stepper, start_step = start_training(cfg, model, total_steps, run_dir, existing, lambda m: _log(info, m))

    _log(info, f"{len(students)} continuations of {len(rows)} prompts ({d.continuations}), {total_steps} steps, "
               f"global batch {plan.global_batch}, {cfg.kl} KL, top_k {cfg.top_k}, teacher {cfg.teacher}"
               f"{' (the adapter-disabled student)' if shared else ''}, {describe_parameters(model)}, device {device}")

    def run_eval(step: int, with_teacher: bool = False) -> dict[str, float]:
        metrics = {}
        with gathered(model):
            if eval_prompts and info.is_main:
                metrics = evaluate(model, teacher, tokenizer, eval_prompts, eval_teacher_prompts, cfg, gold, device,
                                   limit, with_teacher)
                run_dir.log(step, metrics)
        barrier(info)
        return metrics

    if start_step == 0:
        before = run_eval(0, with_teacher=True)
        if before:
            _log(info, "before: " + ", ".join(f"{k}={v:.4g}" for k, v in before.items()))


    window = MetricWindow(info)
    last: dict[str, float] = {}
    for step in range(start_step, total_steps):
        # 1. this step's continuations; the loss is a mean over all their tokens, on every process
        micro = plan.micro_batches(step)
        local_tokens = sum(len(continuations[keep[i]]) for i in plan.indices(step))
        global_tokens = float(all_reduce_sum(local_tokens, info))
        for k, idx in enumerate(micro):
            # 2. the teacher's (top-k) distributions: the precomputed table, or a frozen forward with the context
            batch = pad_batch([students[i] for i in idx], pad_id, keys=("input_ids", "labels"))
            if table is not None:
                t_logps, t_index, mass = gather_rows(table, idx)
            else:
                t_batch = pad_batch([teachers[i] for i in idx], pad_id, keys=("input_ids", "labels"))
                with torch.no_grad(), teacher.frozen() as t_model:
                    t_logps, t_index, mass = teacher_topk(completion_logits(t_model, t_batch, cfg.precision, device),
                                                          cfg.top_k)
            t_logps, t_index = t_logps.to(device), None if t_index is None else t_index.to(device)
            # 3. the student's logits without the context, the token-level KL
            with accumulation_context(ddp_model, info, last=k == len(micro) - 1):
                logits = completion_logits(model if loss_model is not None else ddp_model, batch, cfg.precision,
                                           device, loss_model=ddp_model if loss_model is not None else None)
                forward, reverse = token_kls(logits, t_logps, t_index)
                losses = forward if cfg.kl == "forward" else reverse
                # DDP averages gradients over ranks; the world_size factor turns that into a sum.
                (losses.sum() * info.world_size / max(global_tokens, 1.0)).backward()
            window.add(loss=losses.detach().sum(), forward=forward.detach().sum(), reverse=reverse.detach().sum(),
                       mass=mass.double().sum(), tokens=losses.numel())
        # 4. the update
        grad_norm = stepper.step()
        done = step + 1
        # 5. log, evaluate, checkpoint
        if due(done, cfg.log_every, total_steps):
            sums, elapsed = window.read()
            n = max(sums["tokens"], 1.0)
            last = {"loss/distill": sums["loss"] / n, "kl/teacher_student": sums["forward"] / n,
                    "kl/student_teacher": sums["reverse"] / n, "teacher/topk_mass": sums["mass"] / n,
                    "optim/lr": stepper.lr, "optim/grad_norm": grad_norm,
                    "perf/tokens_per_s": sums["tokens"] / elapsed, "progress/epoch": plan.epoch(done)}
            run_dir.log(done, last)
            _log(info, f"step {done}/{total_steps} loss/distill={last['loss/distill']:.4f}")
        if due(done, cfg.eval_every, total_steps):
            last.update(run_eval(done))
        stepper.save_if_due(run_dir, done, total_steps, cfg, tokenizer, "distill")

    return finish(run_dir, info, "distill", model, tokenizer, cfg.lora.merge_on_save, last,
                  ("loss/distill", "kl/teacher_student", "eval/kl/student_teacher", "eval/gold/student"))


__all__ = ["DistillConfig", "DistillData", "run", "evaluate"]
