"""Setup and bookkeeping for ``kilter ppo``: models, prompt order, evaluation, sample tables.

The policy, the frozen reference pi_0 and the critic are built here:

* the **policy** is the starting model (dropout off), optionally with LoRA adapters and the
  lowest N blocks frozen;
* the **reference** is :class:`kilter.models.reference.Reference`: ``ref_model`` when given
  (a separate frozen model: continuing an earlier RL run stays anchored to the SFT model);
  otherwise with LoRA the policy itself with the adapter disabled (no second copy), else a
  frozen deep copy taken before any update;
* the **critic** (ppo, a2c) starts from the reward model (InstructGPT) -- or, when the reward
  has no model or ``value.model=policy``, from the policy's backbone with a new scalar head;
  ``value.model=shared`` and ``trunk`` build no second model (:mod:`kilter.models.value`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from kilter.distributed import DistInfo
from kilter.errors import ConfigError, DataError, KilterError
from kilter.models.lora import apply_lora, enable_gradient_checkpointing, is_peft
from kilter.models.reference import Reference
from kilter.models.saving import load_trainable_weights, save_model
from kilter.rewards.base import RewardPipeline, prompt_text
from kilter.rollout.generate import SamplingParams, generate_ids
from kilter.rollout.scoring import RolloutBatch, assemble, batched_logprobs
from kilter.runs import atomic_write_text
from kilter.training.checkpoint import (
    barrier_if_sharded,
    check_layout,
    load_sharded,
    savable_model,
    save_sharded,
    sharded_layout,
)
from kilter.training.display import format_sample_table
from kilter.training.parallel import Ranks, wrap_model
from kilter.training.state import (
    load_training_state,
    read_trainer_state,
    rng_state,
    save_training_state,
    set_rng_state,
    write_trainer_state,
)


@dataclass
class Models:
    tokenizer: object
    policy: torch.nn.Module
    reference: Reference
    value: torch.nn.Module | None
    policy_path: str
    value_source: str | None
    reference_label: str = "frozen copy"


def freeze_lower_layers(model, n: int) -> int:
    """Freeze the lowest ``n`` transformer blocks (and the input embeddings unless they are tied
    to the output layer, which must keep learning).  Returns the number of frozen tensors."""
    if n == 0:
        return 0
    base = model.get_base_model() if is_peft(model) else model
    backbone = getattr(base, base.base_model_prefix, base)
    layers = getattr(backbone, "layers", None)
    if layers is None:
        layers = getattr(backbone, "h", None)
    if layers is None:
        raise KilterError(f"freeze_layers: cannot find the transformer blocks of {type(base).__name__}")
    if n > len(layers):
        raise ConfigError(f"freeze_layers={n} but the model has only {len(layers)} blocks")
    frozen = list(layers[:n])
    embeddings = base.get_input_embeddings()
    output = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if output is None or output.weight is not embeddings.weight:
        frozen.append(embeddings)
    count = 0
    for module in frozen:
        for param in module.parameters():
            if param.requires_grad:
                param.requires_grad_(False)
                count += 1
    return count


def _same_vocabulary(a, b) -> bool:
    return len(a) == len(b) and a.get_vocab() == b.get_vocab()


def build_value(cfg, reward: RewardPipeline, tokenizer, device: str, policy=None) -> tuple[torch.nn.Module, str]:
    from kilter.models.loading import load_tokenizer
    from kilter.models.reward import build_value_model, load_reward_backbone, resolve_reward_dir

    source = cfg.value.model or reward.first_model_path() or "policy"
    if source == "shared":  # LoRA: the policy's frozen base, the critic's own adapter and head (models/value.py)
        from kilter.models.value import SharedBaseCritic

        return SharedBaseCritic(policy).to(device).eval(), "policy's frozen base + own LoRA adapter and head"
    if source == "trunk":  # a head on the policy's own hidden states, trained through the policy (models/value.py)
        from kilter.models.value import TrunkValueHead

        return (TrunkValueHead(policy).to(device).eval(),
                f"value head on the policy's trunk (vf_coef={cfg.value.vf_coef}, one forward and backward)")
    if source == "policy":
        backbone = load_reward_backbone(cfg.model, tokenizer)
        with torch.no_grad():  # a new head starts at V = 0 everywhere
            backbone.score.weight.zero_()
        model = build_value_model(backbone)
        label = "policy backbone + new head"
    else:
        folder = resolve_reward_dir(source)
        member = folder
        if (folder / "ensemble.json").is_file():
            member = folder / json.loads((folder / "ensemble.json").read_text())["members"][0]
        if not _same_vocabulary(load_tokenizer(str(member)), tokenizer):
            raise ConfigError(f"value.model {source} uses a different tokenizer than the policy; "
                              "set value.model=policy")
        model = build_value_model(source, tokenizer)
        label = f"reward model {source}"
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora, task_type="SEQ_CLS")
    freeze_lower_layers(model, cfg.freeze_layers)
    if getattr(cfg, "gradient_checkpointing", False):
        enable_gradient_checkpointing(model)
    model.to(device)
    model.eval()  # dropout is off anyway; train() only during the update (for gradient checkpointing)
    return model, label


def build_models(cfg, reward: RewardPipeline, device: str) -> Models:
    from kilter.models import load_causal_lm, load_tokenizer
    from kilter.models.loading import check_positions, resolve_model_path

    tokenizer = load_tokenizer(cfg.model)
    # a prompt plus its response must fit the positions the model learned (GPT-2, OPT): one line at load
    policy = load_causal_lm(cfg.model, tokenizer)
    check_positions(policy, cfg.data.max_prompt_length + cfg.rollout.max_new_tokens, cfg.model,
                    "data.max_prompt_length + rollout.max_new_tokens")
    if cfg.lora.enabled:
        policy = apply_lora(policy, cfg.lora)
    policy.to(device)
    policy.eval()
    ref_path = getattr(cfg, "ref_model", None)
    if ref_path and resolve_model_path(ref_path) != resolve_model_path(cfg.model):
        if not _same_vocabulary(load_tokenizer(ref_path), tokenizer):
            raise ConfigError(f"ref_model {ref_path} uses a different tokenizer than model {cfg.model}; the KL "
                              "penalty compares log-probs of the same tokens, so both need one vocabulary")
        ref = load_causal_lm(ref_path, tokenizer).to(device)
        reference = Reference(policy, model=ref)
        label = f"ref_model {ref_path}"
    else:
        reference = Reference(policy)  # a frozen copy now, before any update (or the adapter-disabled policy)
        label = "adapter-disabled policy" if reference.shares_policy else "frozen copy of the starting policy"
    freeze_lower_layers(policy, cfg.freeze_layers)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    value, value_label = (None, None)
    if cfg.algorithm in ("ppo", "a2c"):
        value, value_label = build_value(cfg, reward, tokenizer, device, policy)
    return Models(tokenizer, policy, reference, value, resolve_model_path(cfg.model), value_label, label)


# --------------------------------------------------------------------------- data parallel


def check_data_parallel(cfg, world: int) -> None:
    """Refuse (one line) a config that cannot be split over ``world`` processes, before anything is written."""
    if world <= 1:
        return
    if cfg.rollout.batch_size % world:
        raise ConfigError(f"rollout.batch_size={cfg.rollout.batch_size} prompts per iteration do not divide over "
                          f"{world} processes: use a multiple of {world} (each process samples its share)")
    local = cfg.rollout_size // world
    per_step = cfg.update.num_minibatches * cfg.update.grad_accum
    if local % per_step:
        raise ConfigError(f"each of the {world} processes holds {local} responses per iteration, which "
                          f"update.num_minibatches x update.grad_accum = {per_step} does not divide; "
                          "change rollout.batch_size or the update's split")
    if cfg.parallel == "fsdp" and cfg.value.model in ("shared", "trunk") and cfg.algorithm in ("ppo", "a2c"):
        raise ConfigError(f"value.model={cfg.value.model} runs the critic on the policy's own modules, which "
                          "parallel=fsdp would shard twice; use parallel=ddp, or value.model=policy for a critic "
                          "of its own")
    if cfg.rollout.engine != "hf":
        raise ConfigError(f"rollout.engine={cfg.rollout.engine} under torchrun is not supported: each process "
                          "samples its share with its own policy (rollout.engine=hf); docs/distributed.md")


def distribute(m: Models, cfg, info, ranks: Ranks) -> None:
    """Ready the models of a data-parallel run, in place (before the optimizers are built).

    The fast-path checks run first, on every process alike (:func:`kilter.rollout.scoring.prepare_fast_paths`).
    fsdp: the policy and the critic are sharded (``fully_shard`` per decoder block); so is a
    separate frozen reference copy (forward only: each block's full weights exist only while it
    computes); with LoRA the reference is the adapter-disabled policy, sharded with it.  Reward
    models stay whole on each process, or on ``reward.device``.  ddp: every process holds
    everything; rank 0's weights are copied to the others (LoRA and value-head initialisation) and
    gradients are averaged by :class:`Ranks`.
    """
    if not info.enabled:
        return
    from kilter.models.value import TrunkValueHead
    from kilter.rollout.scoring import prepare_fast_paths

    trunk = isinstance(m.value, TrunkValueHead)  # scored by the policy's own forward: no fast path of its own
    policy_root, value_root = prepare_fast_paths(m.policy, None if trunk else m.value)
    reference = m.reference.model  # None with LoRA: the adapter-disabled policy
    reference_root = prepare_fast_paths(reference)[0] if reference is not None else None
    if ranks.sharded:
        # the FSDP root is the module the scoring forwards call (the padding-free wrapper): its
        # forward hooks settle the backward of the groups outside the decoder blocks
        wrap_model(policy_root, m.policy, cfg, info)
        if m.value is not None:
            wrap_model(value_root, m.value, cfg, info)
        if reference is not None:
            wrap_model(reference_root, reference, cfg, info, frozen=True)
        m.reference_label += f", sharded over {info.world_size} processes"
    else:
        ranks.broadcast_module(m.policy)
        ranks.broadcast_module(m.value)


def seed_rank(seed: int, ranks: Ranks) -> None:
    """Each process its own sampling stream (rank 0 keeps the one-process stream of ``seed``)."""
    if ranks.info.rank > 0:
        torch.manual_seed(seed + 1_000_003 * ranks.info.rank)


def gathered_models(m: Models):
    """Inside: the full weights of the sharded policy and reference on every process (a collective),
    for work that one process does alone (rank 0's evaluation) or a different number of times."""
    import contextlib

    from kilter.training.parallel import gathered

    stack = contextlib.ExitStack()
    stack.enter_context(gathered(m.policy))
    if m.reference.model is not None:
        stack.enter_context(gathered(m.reference.model))
    return stack


def local_rows(rows: list, ranks: Ranks) -> list:
    """This process's contiguous share of an iteration's prompts (rank order = the one-process order)."""
    share = len(rows) // ranks.world
    return rows[ranks.info.rank * share:(ranks.info.rank + 1) * share]


def mean_metrics(metrics: dict[str, float], ranks: Ranks, summed: tuple[str, ...] = ()) -> dict[str, float]:
    """Every process's metrics as one row: means over the (equal) shares, ``summed`` keys added up."""
    if not ranks.enabled:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=ranks.info.device)
    total = ranks.sum(values).cpu().tolist()
    return {k: (v if k in summed else v / ranks.world) for k, v in zip(keys, total)}


# --------------------------------------------------------------------------- data


class PromptStream:
    """Training prompts in epochs of a seeded shuffle; iteration i's batch is a pure function of i."""

    def __init__(self, cfg, tokenizer) -> None:
        from kilter.data.sources import load_records
        from kilter.data.tokenize import encode_prompt

        records = load_records(cfg.data.prompts, "prompt", skip_invalid=cfg.data.skip_invalid,
                               task_seed=cfg.data.task_seed)
        if not records.rows:
            raise DataError(f"{cfg.data.prompts}: no prompts")
        if records.n_skipped:
            print(f"kilter ppo: skipped {records.n_skipped} invalid rows in {cfg.data.prompts} "
                  f"(first: {records.first_error})", file=sys.stderr)
        self.rows = [{"prompt": r["prompt"], "ids": encode_prompt(tokenizer, r["prompt"], cfg.data.max_prompt_length)}
                     for r in records.rows]
        self.batch_size = cfg.rollout.batch_size
        self.seed = cfg.seed
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.rows), generator=gen).tolist()}
        return self._orders[epoch]

    def batch(self, iteration: int) -> list[dict]:
        out = []
        for position in range(iteration * self.batch_size, (iteration + 1) * self.batch_size):
            epoch, offset = divmod(position, len(self.rows))
            out.append(self.rows[self._order(epoch)[offset]])
        return out


def load_eval_prompts(cfg, tokenizer) -> list[dict]:
    from kilter.data.sources import load_records, resolve_eval_spec
    from kilter.data.tokenize import encode_prompt

    spec, why = resolve_eval_spec(cfg.data.prompts, cfg.data.eval_prompts, {"builtin:prompts": "builtin:prompts_eval"})
    print(f"kilter ppo: eval prompts: {why}")
    if not spec:
        return []
    records = load_records(spec, "prompt", skip_invalid=cfg.data.skip_invalid, task_seed=cfg.data.task_seed)
    return [{"prompt": r["prompt"], "ids": encode_prompt(tokenizer, r["prompt"], cfg.data.max_prompt_length)}
            for r in records.rows[: cfg.data.n_eval]]


def gold_function(cfg):
    """The built-in task's hidden gold judgment when it applies, else None."""
    use = cfg.data.gold if cfg.data.gold is not None else cfg.data.prompts.startswith("builtin:")
    if not use:
        return None
    from kilter.data.task import gold_scores

    return gold_scores


def build_ptx(cfg, tokenizer, rank: int = 0, world: int = 1):
    if not cfg.ptx.data or cfg.ptx.coef <= 0:
        return None
    from kilter.data.sources import load_records
    from kilter.data.tokenize import encode_sft_records
    from kilter.trainers.ppo_update import PtxStream

    records = load_records(cfg.ptx.data, "demonstration", task_seed=cfg.data.task_seed)
    examples = encode_sft_records(tokenizer, records.rows, cfg.ptx.max_length)
    if not examples:
        raise DataError(f"{cfg.ptx.data}: no demonstrations for ptx")
    return PtxStream(examples, cfg.ptx.batch_size, cfg.seed, tokenizer.pad_token_id, rank=rank, world=world)


# --------------------------------------------------------------------------- scoring helpers


@torch.no_grad()
def reference_logprobs(reference: Reference, batch: RolloutBatch, temperature: float, batch_size: int,
                       precision: str = "fp32") -> torch.Tensor:
    """(N, R) log pi_0(token) of every response token at the sampling temperature, 0 on padding.

    The policy's batched forward (:func:`batched_logprobs`: the LM head on response columns
    only) in the policy's ``precision``: scored the same way as the policy, the KL is exactly 0
    before the first update (a fp32 reference beside a bf16-autocast policy would not be).
    """
    # Leaving peft's disable_adapter() sets requires_grad on every adapter weight, which would
    # unfreeze the adapters of the blocks frozen by freeze_layers (their gradients then count in
    # the clipped norm, are never zeroed, and break gradient checkpointing of a pending graph).
    shared = list(reference.policy.parameters()) if reference.shares_policy else []
    flags = [param.requires_grad for param in shared]
    try:
        with reference._as_model() as model:  # the frozen copy, or the adapter-disabled policy
            logp, _ = batched_logprobs(model, batch, temperature, batch_size, precision)
    finally:
        for param, flag in zip(shared, flags):
            param.requires_grad_(flag)
    return logp


def reinforce_baseline(cfg, m: Models, reward: RewardPipeline, moving_average, rows: list[dict],
                       token_rewards: torch.Tensor, mask: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(N,) baseline per response for REINFORCE.

    moving_average: the running mean of past returns (0 on the first iteration: never the
    batch's own rewards, which would bias the gradient); greedy: the shaped reward of the greedy response to the same prompt
    (self-critical training, Rennie et al. 2017) -- it depends only on the prompt, not on
    the sampled response, so the gradient stays unbiased.
    """
    n = mask.shape[0]
    if cfg.baseline.kind == "moving_average":
        value = moving_average.current()
        return torch.full((n,), value, device=mask.device)
    greedy_params = SamplingParams(max_new_tokens=params.max_new_tokens, do_sample=False,
                                   stop_strings=params.stop_strings)
    gen = generate_ids(m.policy, m.tokenizer, [r["ids"] for r in rows], greedy_params,
                       batch_size=cfg.rollout.generation_batch_size)
    scored = reward([r["prompt"] for r in rows], gen.texts, gen.finished, update_stats=False)
    return scored.total.to(mask.device).repeat_interleave(cfg.rollout.samples_per_prompt)


class Evaluator:
    """Samples on held-out prompts under a fixed seed (without touching the training RNG).

    It samples from the policy's own distribution at the training temperature, *without* top-p /
    top-k truncation, so ``eval/kl`` (the mean summed log pi - log pi_0) is an unbiased estimate of
    KL(pi || pi_0) whatever the rollout settings.
    """

    def __init__(self, cfg, m: Models, reward: RewardPipeline, gold_fn, rows: list[dict], params: SamplingParams,
                 engine=None):
        self.cfg, self.m, self.reward, self.gold_fn, self.rows = cfg, m, reward, gold_fn, rows
        self.engine = engine  # the rollout engine (synced with the policy), or None: the policy itself
        self.params = SamplingParams(max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                                     top_p=1.0, top_k=0, do_sample=True, stop_strings=params.stop_strings)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.rows:
            return {}
        device = next(self.m.policy.parameters()).device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.cfg.seed + 7_777)
            ids = [r["ids"] for r in self.rows]
            gen = (self.engine.generate(ids, self.params) if self.engine is not None else
                   generate_ids(self.m.policy, self.m.tokenizer, ids, self.params,
                                batch_size=self.cfg.rollout.generation_batch_size))
        batch = assemble([r["ids"] for r in self.rows], gen.response_ids, self.m.tokenizer.pad_token_id, device)
        fb = self.cfg.rollout.forward_batch_size
        logp, _ = batched_logprobs(self.m.policy, batch, self.params.temperature, fb, self.cfg.precision)
        ref = reference_logprobs(self.m.reference, batch, self.params.temperature, fb, self.cfg.precision)
        prompts = [r["prompt"] for r in self.rows]
        scored = self.reward(prompts, gen.texts, gen.finished, update_stats=False)
        out = {
            "eval/reward": float(scored.raw.mean()),
            "eval/kl": float(((logp - ref) * batch.response_mask).sum(1).mean()),
            "eval/length": float(batch.response_mask.sum(1).mean()),
        }
        if self.gold_fn is not None:
            golds = self.gold_fn([prompt_text(p) for p in prompts], gen.texts)
            out["eval/gold"] = sum(golds) / len(golds)
            agreement = self._agreement(prompts, gen.texts, scored.raw.tolist(), golds) if self.cfg.eval_agreement else None
            if agreement is not None:
                out["eval/agreement"] = agreement
        return out

    def _agreement(self, prompts: list, texts: list[str], rewards: list[float], golds: list[float]) -> float | None:
        """Share of (first, second) fresh samples per prompt that the reward model orders as gold does (gold ties left out)."""
        device = next(self.m.policy.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.cfg.seed + 7_778)
            second = generate_ids(self.m.policy, self.m.tokenizer, [r["ids"] for r in self.rows], self.params,
                                  batch_size=self.cfg.rollout.generation_batch_size)
        rewards2 = self.reward(prompts, second.texts, second.finished, update_stats=False).raw.tolist()
        golds2 = self.gold_fn([prompt_text(p) for p in prompts], second.texts)
        pairs = [(g1 - g2, r1 - r2) for g1, g2, r1, r2 in zip(golds, golds2, rewards, rewards2) if g1 != g2]
        return sum((dg > 0) == (dr > 0) for dg, dr in pairs) / len(pairs) if pairs else None


def show_samples(run_dir, iteration: int, prompts: list, texts: list[str], rewards: torch.Tensor,
                 golds: list[float] | None, n: int, group: int, write=print) -> None:
    """Print a table of the first ``n`` prompts' first samples and append them to samples.jsonl."""
    picks = list(range(0, len(texts), group))[:n]
    rows = []
    for i in picks:
        row = {"prompt": prompt_text(prompts[i]), "response": texts[i], "reward": float(rewards[i])}
        if golds is not None:
            row["gold"] = float(golds[i])
        rows.append(row)
    columns = ["prompt", "response", "reward"] + (["gold"] if golds is not None else [])
    write(f"samples at iteration {iteration}:\n" + format_sample_table(rows, columns))
    with open(Path(run_dir.path) / "samples.jsonl", "a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps({"iteration": iteration, **row}, ensure_ascii=False) + "\n")


def truncate_samples(run_dir, iteration: int) -> None:
    """On resume, drop sample rows written after the checkpoint (as for metrics.jsonl); a last line
    cut short by a kill goes too.  ``iteration=-1``: drop them all (a fresh start)."""
    path = Path(run_dir.path) / "samples.jsonl"
    if not path.exists() or not run_dir.writer:
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the write a kill interrupted
        if isinstance(row, dict) and row.get("iteration", 0) <= iteration:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def save_final(path: Path, m: Models, cfg) -> None:
    save_model(m.policy, m.tokenizer, path, merge_lora=cfg.lora.merge_on_save)
    if m.value is not None and cfg.save_value_model:
        save_model(m.value, None, path / "value", merge_lora=True)


def write_final(run_dir, m: Models, cfg) -> None:
    """``final/`` as plain Hugging Face folders (every process calls this; under FSDP the weights are
    gathered on rank 0 first, which alone writes)."""
    value = savable_model(m.value) if m.value is not None and cfg.save_value_model else None
    plain = replace(m, policy=savable_model(m.policy), value=value)
    run_dir.save_final(lambda p: save_final(p, plain, cfg))
    barrier_if_sharded(m.policy)


@dataclass
class LoopState:
    """Everything a PPO checkpoint holds besides the config: the policy (and critic), the optimizers and
    schedules, the KL controller, the reward pipeline's running statistics, the moving-average baseline
    and the pretraining-mix stream's position."""

    models: Any
    optimizers: dict
    kl_ctl: Any
    reward: Any
    baseline: Any
    ptx: Any
    ranks: Ranks | None = None
    """Data-parallel runs: every process's RNG is kept (its own rollouts), and under FSDP the
    policy, the critic and their optimizers are saved as DCP shards."""

    def _sharded_models(self) -> dict:
        m = self.models
        models = {"policy": (m.policy, self.optimizers["policy_optimizer"])}
        if m.value is not None:
            models["value"] = (m.value, self.optimizers["value_optimizer"])
        return models

    def _schedulers(self) -> dict:
        return {k: v for k, v in self.optimizers.items() if k.endswith("_scheduler")}

    def save(self, run_dir, iteration: int, cfg) -> None:
        """Checkpoint ``iteration`` (every process calls this)."""
        m = self.models
        extra = {"kl": self.kl_ctl.state_dict(), "reward": self.reward.state_dict(),
                 "baseline": self.baseline.state_dict(),
                 "ptx_position": self.ptx.position if self.ptx is not None else 0}
        trainer_state = {"iteration": iteration, "trainer": "ppo", "algorithm": cfg.algorithm}
        if self.ranks is not None and self.ranks.enabled:
            extra["rank_rng"] = self.ranks.gather_objects(rng_state())  # each process samples its own rollouts
        if self.ranks is not None and self.ranks.sharded:
            def write_rest(path: Path) -> None:
                m.policy.config.save_pretrained(path)
                m.tokenizer.save_pretrained(path)
                save_training_state(path, self._schedulers(), extra)
                write_trainer_state(path, sharded_layout(iteration, "ppo", iteration=iteration, algorithm=cfg.algorithm))

            save_sharded(run_dir, iteration, self._sharded_models(), write_rest, cfg.keep_checkpoints)
            return

        def write(path: Path) -> None:
            save_model(m.policy, m.tokenizer, path, merge_lora=False)
            if m.value is not None:
                save_model(m.value, None, path / "value", merge_lora=False)
            save_training_state(path, self.optimizers, extra)
            write_trainer_state(path, trainer_state)

        run_dir.save_checkpoint(iteration, write, keep=cfg.keep_checkpoints)

    def resume(self, checkpoint: Path, run_dir) -> int:
        """Restore what :meth:`save` wrote; drop metrics and samples logged after it; returns its iteration."""
        m = self.models
        ranks = self.ranks or Ranks(DistInfo())
        if check_layout(checkpoint, ranks.sharded):
            load_sharded(checkpoint, self._sharded_models())
            extra = load_training_state(checkpoint, self._schedulers())
        else:
            load_trainable_weights(m.policy, checkpoint)
            if m.value is not None:
                load_trainable_weights(m.value, checkpoint / "value")
            extra = load_training_state(checkpoint, self.optimizers)
        saved_rng = extra.get("rank_rng") or [None]
        if len(saved_rng) == ranks.world:
            if saved_rng[0] is not None:
                set_rng_state(saved_rng[ranks.info.rank])
        elif ranks.info.is_main:
            print(f"kilter ppo: {checkpoint} was written by {len(saved_rng)} processes and resumes on {ranks.world}: "
                  "the weights and optimizer state are restored exactly, the rollouts from here on are not "
                  "those of an uninterrupted run", file=sys.stderr)
        if len(saved_rng) != ranks.world and ranks.enabled:  # the processes must not sample alike
            torch.manual_seed(int(read_trainer_state(checkpoint)["iteration"]) * 1_000_003 + ranks.info.rank)
        self.kl_ctl.load_state_dict(extra["kl"])
        self.reward.load_state_dict(extra["reward"])
        self.baseline.load_state_dict(extra["baseline"])
        if self.ptx is not None:
            self.ptx.position = extra["ptx_position"]
        start = read_trainer_state(checkpoint)["iteration"]
        run_dir.truncate_metrics(start)
        truncate_samples(run_dir, start)
        return start

