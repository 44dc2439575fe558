"""Phase 3: RL fine-tuning against a reward under a KL penalty to pi_0 (``kilter ppo``).

One iteration = sample responses for a batch of prompts -> score them (reward sources,
reference log-probs, critic values) -> per-token rewards ``-beta * KL_t`` plus the sequence
reward on the last token (Ziegler et al. 2019; Ouyang et al. 2022, eq. 2) -> advantages ->
an update.  ``algorithm`` picks the estimator:

* ``ppo``: GAE over a learned critic, clipped surrogate and clipped value loss, several
  epochs over shuffled minibatches (Schulman et al. 2017; InstructGPT);
* ``a2c``: the same critic and GAE, one pass, no clipping (DeepMind's Sparrow/Gopher-Cite);
* ``reinforce``: reward-to-go minus a moving-average or greedy-decode baseline (Williams
  1992; self-critical sequence training, Rennie et al. 2017);
* ``rloo`` / ``grpo``: k samples per prompt, the others' mean (RLOO, Ahmadian et al. 2024) or
  the group's mean and std (GRPO, Shao et al. 2024) as baseline; no critic.

The math lives in :mod:`kilter.ops` and :mod:`kilter.losses`; the update epochs in
:mod:`kilter.trainers.ppo_update`; setup helpers in :mod:`kilter.trainers.ppo_setup`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import Field
from tqdm.auto import tqdm

from kilter.config import BaseConfig
from kilter.distributed import DistInfo
from kilter.errors import ConfigError
from kilter.evaluation.overoptimization import OveroptimisationMonitor
from kilter.losses.ppo import Aggregation
from kilter.models.lora import LoraSection, count_parameters
from kilter.models.saving import load_trainable_weights, save_model
from kilter.ops import AdaptiveKLController, FixedKLController, explained_variance, kl_estimate
from kilter.ops.kl import kl_gradient_follows, kl_placement
from kilter.ops.masked import masked_mean
from kilter.rewards.base import RewardConfig, build_reward, prompt_text
from kilter.rollout.engine import make_engine
from kilter.rollout.generate import SamplingParams
from kilter.rollout.scoring import assemble, batched_logprobs, batched_values
from kilter.runs import RunDir, read_metrics
from kilter.trainers import ppo_setup
from kilter.trainers.ppo_update import (
    CRITIC,
    MovingAverageBaseline,
    UpdateSettings,
    compute_advantages,
    first_pass,
    fuses_first_pass,
    run_update,
    shaped_rewards,
)
from kilter.training.args import RunArgs
from kilter.training.optim import OptimConfig, make_optimizer, make_scheduler
from kilter.training.setup import launch, open_run_dir, prepare
from kilter.training.state import (
    load_training_state,
    read_trainer_state,
    save_training_state,
    write_trainer_state,
)

Algorithm = Literal["ppo", "a2c", "reinforce", "rloo", "grpo"]


class PPOData(BaseConfig):
    """Prompts to learn on and to evaluate with."""

    prompts: str = "builtin:prompts"
    """Training prompts: a file of {prompt} records (or {messages}), a saved dataset, or builtin:prompts."""
    eval_prompts: str | None = "auto"
    """Held-out prompts for the periodic evaluation: a file, null (none), or auto (builtin:prompts_eval with builtin:prompts, none with your own prompts)."""
    n_eval: int = Field(64, gt=0)
    """Evaluate on at most this many held-out prompts."""
    max_prompt_length: int = Field(128, gt=0)
    """Prompts are cut from the left to this many tokens."""
    skip_invalid: bool = False
    """Skip malformed prompt rows instead of stopping at the first."""
    task_seed: int = 0
    """Seed of the built-in task's generated data (builtin: sources only)."""
    gold: bool | None = None
    """Log reward/gold with the built-in task's hidden gold judgment (null: when the prompts are builtin:)."""


class RolloutSection(BaseConfig):
    """How responses are sampled."""

    batch_size: int = Field(64, gt=0)
    """Prompts per iteration."""
    samples_per_prompt: int = Field(1, gt=0)
    """Responses per prompt (k); rloo and grpo need at least 2."""
    max_new_tokens: int = Field(48, gt=0)
    """Length limit of a response in tokens."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature; log-probs for training and the KL are computed at this temperature."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling threshold (1: off); < 1 makes the update off-policy (a start-up WARNING says so)."""
    top_k: int = Field(0, ge=0)
    """Sample among the k most likely tokens (0: off); like top_p, off-policy for the update."""
    stop_strings: list[str] | None = None
    """Also end a response at any of these strings (EOS always ends it)."""
    engine: Literal["hf", "vllm"] = "hf"
    """Generation backend: hf (transformers generate, default) or vllm (optional, CUDA, full fine-tuning only)."""
    generation_batch_size: int = Field(64, gt=0)
    """Prompts per generate call."""
    forward_batch_size: int = Field(64, gt=0)
    """Rows per no-grad forward pass when scoring a rollout."""


class KLSection(BaseConfig):
    """The penalty that keeps the policy near the reference pi_0."""

    beta: float = Field(0.05, ge=0)
    """KL coefficient (the starting value when adaptive)."""
    estimator: Literal["k1", "k2", "k3"] | None = None
    """k1 = log pi - log pi_0 in the reward (InstructGPT); k2 = 0.5 (log r)^2 or k3 = r - 1 - log r as a loss term beta * k (GRPO eq. 3); null: k3 for grpo, else k1."""
    adaptive: bool = False
    """Adapt beta so the KL per response tracks target (Ziegler et al. 2019)."""
    target: float = Field(6.0, gt=0)
    """Adaptive controller: target KL per response (nats)."""
    horizon: int = Field(10000, gt=0)
    """Adaptive controller: horizon in responses."""


class UpdateSection(BaseConfig):
    """The optimisation of one rollout batch."""

    epochs: int = Field(4, gt=0)
    """Passes over each rollout batch (ppo, rloo, grpo; a2c and reinforce take one)."""
    num_minibatches: int = Field(4, gt=0)
    """Minibatches (optimizer steps) per pass; must divide batch_size x samples_per_prompt."""
    grad_accum: int = Field(1, gt=0)
    """Micro-batches per minibatch (memory); must divide the minibatch size."""
    clip_range: float = Field(0.2, gt=0)
    """PPO ratio clip epsilon."""
    clip_range_value: float = Field(0.2, gt=0)
    """Value clip: one update moves a value at most this far from its rollout value."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount per token."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE lambda."""
    whiten_advantages: bool | None = None
    """Normalise advantages over the batch (rloo/grpo: scale only); null: on, except for grpo (its group std already scales them)."""
    group_std_scale: bool = True
    """grpo: divide by the group's reward std (Shao et al. 2024); false: only subtract the group mean (Dr. GRPO)."""
    loss_aggregation: Aggregation = "token_mean"
    """Per-token loss reduction: token_mean (over the batch's tokens), sequence_mean (GRPO: per response, then over responses) or constant (Dr. GRPO: token sum / (responses x max_new_tokens))."""
    entropy_coef: float = Field(0.0, ge=0)
    """Entropy bonus coefficient."""
    target_kl: float | None = Field(None, gt=0)
    """Stop the iteration's update early once a minibatch's approximate KL to the sampling policy exceeds this."""
    fuse_first_pass: bool = True
    """With num_minibatches=1 and grad_accum=1: take old log-probs and values from the first step's forward (one pass less)."""


class BaselineSection(BaseConfig):
    """Baseline of algorithm=reinforce."""

    kind: Literal["moving_average", "greedy", "none"] = "moving_average"
    """moving_average of past returns, greedy (reward of the greedy response to the same prompt), or none."""
    decay: float = Field(0.9, ge=0, lt=1)
    """Moving-average decay per iteration."""


class ValueSection(BaseConfig):
    """The critic of ppo and a2c."""

    model: str | None = None
    """Critic start: a reward-model folder, policy (its backbone + new head), or null (the reward's model or policy)."""
    optim: OptimConfig = OptimConfig(lr=1e-4, warmup_ratio=0.0, schedule="constant")
    """Critic optimizer."""


class PtxSection(BaseConfig):
    """PPO-ptx: mix a supervised loss on demonstrations into every step (InstructGPT eq. 2)."""

    data: str | None = None
    """Demonstrations ({prompt, completion}) or texts, e.g. builtin:sft (null: off)."""
    coef: float = Field(0.0, ge=0)
    """Weight of the supervised loss (gamma in InstructGPT)."""
    batch_size: int = Field(16, gt=0)
    """Demonstrations per optimizer step."""
    max_length: int = Field(256, gt=1)
    """Token limit per demonstration."""


class PPOConfig(RunArgs):
    """RL fine-tuning of a policy against a reward with a KL penalty to the starting model."""

    model: str = "runs/sft/final"
    """Policy to start from (usually kilter sft's final/); also the frozen reference pi_0 unless ref_model is set."""
    ref_model: str | None = None
    """Reference pi_0 of the KL penalty when it is not the starting policy (e.g. the SFT model when continuing an earlier RL run); same tokenizer required."""
    output_dir: str = "runs/ppo"
    """Run directory (config.yaml, metrics.jsonl, samples.jsonl, checkpoints/, final/)."""
    algorithm: Algorithm = "ppo"
    """ppo, a2c, reinforce, rloo or grpo."""
    iterations: int = Field(100, gt=0)
    """Rollout + update cycles."""
    data: PPOData = PPOData()
    """Prompts."""
    rollout: RolloutSection = RolloutSection()
    """Sampling."""
    reward: RewardConfig = RewardConfig()
    """Reward sources and shaping."""
    kl: KLSection = KLSection()
    """KL penalty to the reference."""
    update: UpdateSection = UpdateSection()
    """Loss and update schedule."""
    baseline: BaselineSection = BaselineSection()
    """Baseline for algorithm=reinforce."""
    value: ValueSection = ValueSection()
    """Critic (ppo, a2c)."""
    ptx: PtxSection = PtxSection()
    """Supervised loss mixed into the update."""
    optim: OptimConfig = OptimConfig(lr=1e-5, warmup_ratio=0.0, schedule="constant")
    """Policy optimizer; the schedule advances once per iteration."""
    lora: LoraSection = LoraSection()
    """LoRA adapters for the policy (and the critic); the reference is then the adapter-disabled policy."""
    freeze_layers: int = Field(0, ge=0)
    """Freeze the embeddings and the lowest N transformer blocks of the policy and critic."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (policy and critic) to save memory."""
    seed: int = 0
    """Seed for prompt order, sampling and minibatch shuffling."""
    log_every: int = Field(1, gt=0)
    """Log metrics every N iterations."""
    sample_every: int = Field(10, gt=0)
    """Print a table of rollout samples every N iterations (also appended to samples.jsonl)."""
    n_samples: int = Field(4, ge=0)
    """Rows in that table."""
    eval_every: int = Field(25, gt=0)
    """Evaluate on held-out prompts every N iterations (and before and after training)."""
    save_every: int = Field(50, gt=0)
    """Write a checkpoint every N iterations (and at the end)."""
    save_value_model: bool = True
    """Also write the critic to final/value/."""
    eval_agreement: bool = False
    """At each evaluation, sample a second response per held-out prompt and log eval/agreement: the share of
    pairs the reward model orders as the gold judge does (needs a gold judge; doubles the evaluation's sampling)."""
    early_stop: bool = False
    """Stop when the proxy (eval/reward) rose while the truth (eval/agreement, else eval/gold) fell at
    early_stop_patience evaluations in a row (reward over-optimisation); the policy at the stop is saved."""
    early_stop_patience: int = Field(2, ge=1)
    """Diverging evaluations in a row that stop the run (early_stop=true)."""

    @property
    def kl_estimator(self) -> str:
        """The KL estimator in use: kl.estimator, or k3 for grpo (Shao et al. 2024) and k1 otherwise."""
        return self.kl.estimator or ("k3" if self.algorithm == "grpo" else "k1")

    @property
    def whitens(self) -> bool:
        """Whether advantages are whitened: update.whiten_advantages, or on for every algorithm but grpo."""
        w = self.update.whiten_advantages
        return w if w is not None else self.algorithm != "grpo"

    @property
    def truncates_sampling(self) -> bool:
        return self.rollout.top_p < 1 or self.rollout.top_k > 0

    @property
    def rollout_size(self) -> int:
        """Responses per iteration: batch_size x samples_per_prompt."""
        return self.rollout.batch_size * self.rollout.samples_per_prompt

    def sampling(self) -> SamplingParams:
        r = self.rollout
        return SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                              top_k=r.top_k, do_sample=True, stop_strings=r.stop_strings)


def check_config(cfg: PPOConfig) -> None:
    """Cross-field checks, each failing with one line naming the keys involved."""
    n = cfg.rollout_size
    if n % cfg.update.num_minibatches:
        raise ConfigError(f"update.num_minibatches={cfg.update.num_minibatches} does not divide the rollout batch "
                          f"of {n} responses (rollout.batch_size x rollout.samples_per_prompt)")
    minibatch = n // cfg.update.num_minibatches
    if minibatch % cfg.update.grad_accum:
        raise ConfigError(f"update.grad_accum={cfg.update.grad_accum} does not divide the minibatch of {minibatch} "
                          "responses (rollout batch / update.num_minibatches)")
    if cfg.algorithm in ("rloo", "grpo") and cfg.rollout.samples_per_prompt < 2:
        raise ConfigError(f"algorithm={cfg.algorithm} compares samples of the same prompt: set "
                          "rollout.samples_per_prompt >= 2")
    if not cfg.reward.all_sources():
        raise ConfigError("no reward source: set reward.model (a reward model folder), reward.function "
                          "('module:function', 'file.py:function' or builtin:gold) or reward.sources")
    if cfg.algorithm == "grpo" and kl_placement(cfg.kl_estimator) == "reward":
        raise ConfigError("algorithm=grpo standardises rewards within each group, which would rescale a KL "
                          "penalty in the reward: use kl.estimator=k3 (GRPO's loss term) or k2")
    if cfg.lora.enabled and cfg.lora.dropout > 0:
        raise ConfigError("lora.dropout must be 0 for RL: dropout makes the policy's log-probs random")
    if cfg.ptx.coef > 0 and not cfg.ptx.data:
        raise ConfigError("ptx.coef > 0 needs ptx.data (demonstrations, e.g. builtin:sft)")


# --------------------------------------------------------------------------- training


def run(cfg: PPOConfig) -> int:
    check_config(cfg)
    return launch(_train, cfg, "ppo", single_process=True)


def _train(cfg: PPOConfig, info: DistInfo) -> int:
    existing = prepare(cfg, info)  # threads, precision, seed, fast paths; refuses to overwrite checkpoints
    device = info.device
    reward = build_reward(cfg.reward, device=device)  # a bad reward source fails before anything is written
    m = ppo_setup.build_models(cfg, reward, device)  # and so does a bad model or ref_model
    run_dir = open_run_dir(cfg, info)
    tok = m.tokenizer
    prompts = ppo_setup.PromptStream(cfg, tok)
    eval_prompts = ppo_setup.load_eval_prompts(cfg, tok)
    gold_fn = ppo_setup.gold_function(cfg)
    ptx = ppo_setup.build_ptx(cfg, tok)
    engine = make_engine(cfg.rollout.engine, m.policy, tok, model_path=m.policy_path,
                         batch_size=cfg.rollout.generation_batch_size, seed=cfg.seed)
    kl_ctl = (AdaptiveKLController(cfg.kl.beta, cfg.kl.target, cfg.kl.horizon) if cfg.kl.adaptive
              else FixedKLController(cfg.kl.beta))
    ma_baseline = MovingAverageBaseline(cfg.baseline.decay)

    policy_opt = make_optimizer(m.policy, cfg.optim)
    policy_sched = make_scheduler(policy_opt, cfg.optim, cfg.iterations)
    value_opt = value_sched = None
    if m.value is not None:
        value_opt = make_optimizer(m.value, cfg.value.optim)
        value_sched = make_scheduler(value_opt, cfg.value.optim, cfg.iterations)
    optimizers = {"policy_optimizer": policy_opt, "policy_scheduler": policy_sched}
    if value_opt is not None:
        optimizers.update(value_optimizer=value_opt, value_scheduler=value_sched)

    start = 0
    if cfg.resume and existing is not None:
        load_trainable_weights(m.policy, existing)
        if m.value is not None:
            load_trainable_weights(m.value, existing / "value")
        extra = load_training_state(existing, optimizers)
        kl_ctl.load_state_dict(extra["kl"])
        reward.load_state_dict(extra["reward"])
        ma_baseline.load_state_dict(extra["baseline"])
        if ptx is not None:
            ptx.position = extra["ptx_position"]
        start = read_trainer_state(existing)["iteration"]
        run_dir.truncate_metrics(start)
        ppo_setup.truncate_samples(run_dir, start)
        engine.sync_weights(m.policy)
        print(f"kilter ppo: resumed from {existing} at iteration {start}/{cfg.iterations}")
    run_dir.write_config(cfg)

    trainable, total = count_parameters(m.policy)
    print(f"kilter ppo: algorithm {cfg.algorithm}, {cfg.iterations} iterations x {cfg.rollout_size} responses, "
          f"{trainable / 1e6:.2f}M of {total / 1e6:.2f}M policy parameters trainable, "
          f"reference: {m.reference_label}, "
          f"critic: {m.value_source or 'none'}, device {device}")
    estimator = cfg.kl_estimator
    kl_in_reward = kl_placement(estimator) == "reward"
    print(f"kilter ppo: KL penalty {estimator} {'in the reward' if kl_in_reward else 'as a loss term'} "
          f"(its gradient follows {kl_gradient_follows(estimator)}), loss aggregation {cfg.update.loss_aggregation}, "
          f"advantages {'whitened' if cfg.whitens else 'not whitened'}")
    if cfg.truncates_sampling:
        print(f"kilter ppo: WARNING: rollout.top_p={cfg.rollout.top_p} / top_k={cfg.rollout.top_k} truncate sampling, "
              "but the update scores tokens under the full softmax: it is off-policy and the training kl/ref is "
              "biased; eval/kl samples without truncation and stays unbiased (see docs/ppo.md)")
    settings = UpdateSettings(
        algorithm=cfg.algorithm, epochs=cfg.update.epochs, num_minibatches=cfg.update.num_minibatches,
        grad_accum=cfg.update.grad_accum, clip_range=cfg.update.clip_range,
        clip_range_value=cfg.update.clip_range_value, entropy_coef=cfg.update.entropy_coef,
        target_kl=cfg.update.target_kl, temperature=cfg.rollout.temperature, precision=cfg.precision,
        max_grad_norm=cfg.optim.max_grad_norm, value_max_grad_norm=cfg.value.optim.max_grad_norm,
        ptx_coef=cfg.ptx.coef, fuse_first_pass=cfg.update.fuse_first_pass,
        kl_loss=None if kl_in_reward else estimator, aggregation=cfg.update.loss_aggregation,
        normaliser=float(cfg.rollout.max_new_tokens))
    critic = m.value if cfg.algorithm in CRITIC else None
    params = cfg.sampling()
    ev = ppo_setup.Evaluator(cfg, m, reward, gold_fn, eval_prompts, params)
    monitor = OveroptimisationMonitor(cfg.early_stop_patience)
    for row in read_metrics(run_dir.path):  # a resumed run remembers the evaluations before its checkpoint
        _overoptimised(monitor, row)
    if start == 0 and eval_prompts:
        eval_metrics = ev.evaluate()
        run_dir.log(0, eval_metrics)
        _overoptimised(monitor, eval_metrics)

    progress = tqdm(total=cfg.iterations, initial=start, desc=f"kilter {cfg.algorithm}", dynamic_ncols=True)
    last: dict[str, float] = {}
    for it in range(start, cfg.iterations):
        t0 = time.perf_counter()
        rows = prompts.batch(it)
        k = cfg.rollout.samples_per_prompt
        row_prompts = [r["prompt"] for r in rows for _ in range(k)]
        row_ids = [r["ids"] for r in rows for _ in range(k)]
        gen = engine.generate(row_ids, params)
        t_gen = time.perf_counter() - t0
        batch = assemble(row_ids, gen.response_ids, tok.pad_token_id, device)
        mask = batch.response_mask
        fb = cfg.rollout.forward_batch_size
        first, t_first = None, 0.0
        if fuses_first_pass(settings):
            # The update's first step is one forward over the whole rollout: run it now, with grad,
            # and read the old log-probs, entropy and values off it instead of separate no-grad passes.
            t_first = time.perf_counter()
            first = first_pass(m.policy, critic, batch, settings, seed=cfg.seed, iteration=it)
            old_logp, entropy, values = first.old_logp, first.old_entropy, first.old_values
            t_first = time.perf_counter() - t_first
        else:
            old_logp, entropy = batched_logprobs(m.policy, batch, params.temperature, fb, cfg.precision,
                                                 with_entropy=True)
            values = batched_values(critic, batch, fb, cfg.precision) if critic is not None else None
        ref_logp = ppo_setup.reference_logprobs(m.reference, batch, params.temperature, fb, cfg.precision)
        scored = reward(row_prompts, gen.texts, gen.finished)
        scores = scored.total.to(device)
        kl = kl_estimate(old_logp, ref_logp, estimator) * mask
        beta = kl_ctl.beta
        # k1 enters the reward (Ouyang et al. 2022, eq. 2); k2/k3 are a loss term in run_update instead.
        token_rewards = shaped_rewards(scores, kl, mask, beta, estimator)
        baseline = None
        if cfg.algorithm == "reinforce" and cfg.baseline.kind != "none":
            baseline = ppo_setup.reinforce_baseline(cfg, m, reward, ma_baseline, rows, token_rewards, mask, params)
        adv = compute_advantages(cfg.algorithm, token_rewards, mask, values=values, gamma=cfg.update.gamma,
                                 lam=cfg.update.lam, group_size=k, baseline=baseline,
                                 whiten=cfg.whitens, group_std_scale=cfg.update.group_std_scale)
        if cfg.algorithm == "reinforce":
            ma_baseline.update(float(token_rewards.sum(1).mean()))
        t_score = time.perf_counter()
        stats = run_update(m.policy, critic, policy_opt, value_opt, batch, old_logp, adv, values, settings,
                           seed=cfg.seed, iteration=it, ptx=ptx, first=first, ref_logp=ref_logp, beta=beta)
        del first  # frees the fused pass's outputs
        # the fused forward is part of the training work, as it would be without fusion
        t_train = time.perf_counter() - t_score + t_first
        policy_sched.step()
        if value_sched is not None:
            value_sched.step()
        seq_kl = kl.sum(1)
        kl_ctl.update(float(seq_kl.mean()), cfg.rollout_size)
        engine.sync_weights(m.policy)

        done = it + 1
        golds = gold_fn([prompt_text(p) for p in row_prompts], gen.texts) if gold_fn else None
        metrics = {
            "reward/total": float(scored.total.mean()),
            "reward/raw": float(scored.raw.mean()),
            **{f"reward/{name}": float(v.mean()) for name, v in scored.components.items()},
            "kl/ref": float(seq_kl.mean()),
            "kl/ref_k1": float(((old_logp - ref_logp) * mask).sum(1).mean()),
            "kl/beta": beta,
            "kl/per_token": float(masked_mean(kl, mask)),
            "policy/entropy": float(masked_mean(entropy, mask)),
            "response/length": float(mask.sum(1).mean()),
            "response/finished": sum(gen.finished) / len(gen.finished),
            "advantage/mean": float(masked_mean(adv.advantages, mask)),
            "optim/lr": policy_sched.get_last_lr()[0],
            "perf/rollout_tokens_per_s": float(mask.sum()) / max(t_gen, 1e-9),
            "perf/train_tokens_per_s": stats.pop("_train_tokens") / max(t_train, 1e-9),
            "perf/iteration_s": time.perf_counter() - t0,
            **stats,
        }
        if golds is not None:
            metrics["reward/gold"] = sum(golds) / len(golds)
        if values is not None and adv.returns is not None:
            metrics["value/explained_variance"] = explained_variance(values, adv.returns, mask)
            metrics["value/mean"] = float(masked_mean(values, mask))
        if done % cfg.log_every == 0 or done == cfg.iterations:
            run_dir.log(done, metrics)
        last.update(metrics)
        progress.update(1)
        progress.set_postfix(reward=f"{metrics['reward/total']:.3f}", kl=f"{metrics['kl/ref']:.2f}",
                             **({"gold": f"{metrics['reward/gold']:.3f}"} if golds is not None else {}))
        if cfg.n_samples and (done % cfg.sample_every == 0 or done == cfg.iterations or done == 1):
            ppo_setup.show_samples(run_dir, done, row_prompts, gen.texts, scored.total, golds, cfg.n_samples, k,
                                   write=tqdm.write)
        stop = None
        if eval_prompts and (done % cfg.eval_every == 0 or done == cfg.iterations):
            eval_metrics = ev.evaluate()
            stop = _overoptimised(monitor, eval_metrics)
            if stop and cfg.early_stop:
                eval_metrics["early_stop/iteration"] = done
            run_dir.log(done, eval_metrics)
            last.update(eval_metrics)
        if done % cfg.save_every == 0 or done == cfg.iterations or (stop and cfg.early_stop):
            _save_checkpoint(run_dir, done, m, optimizers, kl_ctl, reward, ma_baseline, ptx, cfg)
        if stop:
            tqdm.write(f"WARNING kilter {cfg.algorithm}: iteration {done}: {stop}"
                       + ("; stopping (early_stop=true)" if cfg.early_stop else ""), file=sys.stderr)
            if cfg.early_stop:
                break
    progress.close()

    run_dir.save_final(lambda p: ppo_setup.save_final(p, m, cfg))
    keys = ("reward/total", "reward/gold", "kl/ref", "eval/gold", "eval/reward", "eval/kl")
    summary = ", ".join(f"{k}={last[k]:.4g}" for k in keys if k in last)
    print(f"kilter ppo: done ({summary}); policy in {run_dir.final}")
    run_dir.close()
    return 0


def _overoptimised(monitor: OveroptimisationMonitor, row: dict) -> str | None:
    """Feed one evaluation row to the monitor; a one-line reason when it calls for a stop."""
    if "eval/reward" not in row:
        return None
    truth = "eval/agreement" if row.get("eval/agreement") is not None else "eval/gold"
    if row.get(truth) is None:
        return None
    if monitor.update(row["eval/reward"], row[truth]):
        return (f"the proxy reward rose while {truth} fell at {monitor.patience} evaluations in a row "
                "(reward over-optimisation)")
    return None


def _save_checkpoint(run_dir: RunDir, iteration: int, m, optimizers: dict, kl_ctl, reward, baseline, ptx,
                     cfg: PPOConfig) -> None:
    def write(path: Path) -> None:
        save_model(m.policy, m.tokenizer, path, merge_lora=False)
        if m.value is not None:
            save_model(m.value, None, path / "value", merge_lora=False)
        extra = {"kl": kl_ctl.state_dict(), "reward": reward.state_dict(), "baseline": baseline.state_dict(),
                 "ptx_position": ptx.position if ptx is not None else 0}
        save_training_state(path, optimizers, extra)
        write_trainer_state(path, {"iteration": iteration, "trainer": "ppo", "algorithm": cfg.algorithm})

    run_dir.save_checkpoint(iteration, write, keep=cfg.keep_checkpoints)


__all__ = ["PPOConfig", "check_config", "run"]
