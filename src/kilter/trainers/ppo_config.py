"""The configuration of ``kilter ppo``: its sections, defaults and cross-field checks."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kilter.config import BaseConfig
from kilter.errors import ConfigError
from kilter.losses.ppo import Aggregation
from kilter.models.lora import LoraSection
from kilter.ops.kl import kl_placement
from kilter.rewards.base import RewardConfig
from kilter.rollout.engine import EngineOptions
from kilter.rollout.generate import SamplingParams
from kilter.training.args import RunArgs
from kilter.training.optim import OptimConfig

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


class RolloutSection(EngineOptions):
    """How responses are sampled (engine: hf, vllm or vllm-server; docs/rollout.md)."""

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
    """Critic start: a reward-model folder, policy (its backbone + new head), shared (LoRA only: the policy's frozen base with the critic's own adapter and head, no second model), trunk (a value head on the policy's own hidden states: one forward and backward for both, the value loss trains the policy's weights too, scaled by vf_coef), or null (the reward's model or policy)."""
    optim: OptimConfig = OptimConfig(lr=1e-4, warmup_ratio=0.0, schedule="constant")
    """Critic optimizer (with model=trunk only its lr counts: the head is a parameter group of the policy's optimizer, on the policy's schedule and max_grad_norm)."""
    vf_coef: float = Field(0.1, ge=0)
    """model=trunk: weight of the value loss beside the policy loss in their one backward (TRL's old default 0.1; other critics train apart and ignore it)."""


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
    cfg.rollout.check_available()
    if cfg.lora.enabled and cfg.lora.dropout > 0:
        raise ConfigError("lora.dropout must be 0 for RL: dropout makes the policy's log-probs random")
    if cfg.ptx.coef > 0 and not cfg.ptx.data:
        raise ConfigError("ptx.coef > 0 needs ptx.data (demonstrations, e.g. builtin:sft)")
