"""The loop's typed configuration: LoopConfig and its reward / policy sections."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from kilter.commands.crowd import CrowdSection, crowd_members
from kilter.config import BaseConfig
from kilter.data.sources import parse_builtin
from kilter.errors import ConfigError
from kilter.rollout.engine import EngineOptions


class RewardSection(BaseConfig):
    """How the reward model is refreshed each round."""

    warm_start: bool = True
    """Start from the previous round's reward model (head included); false: from the SFT backbone every round."""
    old_data_weight: float = Field(1.0, ge=0, le=1)
    """Weight of earlier rounds' judgments: round r' of round r is subsampled to old_data_weight ** (r - r') (1: all)."""
    epochs: float = Field(3.0, gt=0)
    """Passes over the training comparisons."""
    lr: float = Field(1e-3, gt=0)
    """Learning rate."""
    batch_size: int = Field(8, gt=0)
    """Prompts (each with its pair) per reward-model batch."""
    ensemble_size: int = Field(1, ge=1)
    """Reward models trained together; selection=active needs at least 2 (their disagreement picks the pairs)."""


class PolicySection(EngineOptions):
    """How the policy is updated each round (engine: the RL rollouts' and the evaluation's sampler)."""

    algorithm: Literal["ppo", "rloo", "grpo", "dpo"] = "ppo"
    """ppo, rloo or grpo against the round's reward model, or dpo directly on the round's pairs (online DPO)."""
    iterations: int = Field(10, gt=0)
    """RL iterations per round (ppo, rloo, grpo)."""
    batch_size: int = Field(32, gt=0)
    """Prompts per RL iteration."""
    samples_per_prompt: int = Field(1, gt=0)
    """Responses per prompt in an RL rollout (rloo and grpo need at least 2)."""
    lr: float = Field(3e-4, gt=0)
    """Policy (and critic) learning rate."""
    kl_beta: float = Field(0.05, ge=0)
    """KL penalty coefficient to the SFT model (pi_0), every round."""
    eval_every: int | None = Field(None, gt=0)
    """Evaluate the RL run every N iterations on held-out prompts: proxy, gold, KL and the RM's agreement with gold
    on fresh sample pairs (null: at the start and the end only)."""
    early_stop: bool = False
    """Stop a round's RL run inside itself when its proxy rose while the held-out agreement fell at `patience`
    evaluations in a row (kilter ppo early_stop=true; set eval_every for it to see something)."""
    patience: int = Field(2, ge=1)
    """Diverging evaluations in a row that stop the RL run (early_stop)."""
    dpo_beta: float = Field(0.1, gt=0)
    """DPO's beta (its implicit KL strength to the SFT model)."""
    dpo_epochs: float = Field(2.0, gt=0)
    """Passes over the round's pairs (dpo)."""


class LoopConfig(BaseConfig):
    """Rounds of sample -> people (or a simulated crowd) judge -> reward model -> policy update -> eval."""

    output_dir: str = "runs/loop"
    """Run directory: state.json, metrics.jsonl, sft/, round-N/ (samples, data, rm/, policy/, eval/)."""
    sft_model: str | None = None
    """pi_0 and the first sampler (an SFT run's final/); null: train the built-in tiny SFT model first (sft/)."""
    sft_steps: int = Field(150, gt=0)
    """Steps of the built-in SFT run when sft_model is null."""
    rounds: int = Field(3, gt=0)
    """Rounds of the loop."""
    prompts: str = "builtin:prompts"
    """Prompts the policy answers for people and learns on (a {prompt} JSONL file, builtin:prompts, or
    builtin:prompts@template: the built-in task split by prompt phrasing, so every product is seen in training)."""
    prompts_per_round: int = Field(32, gt=0)
    """Prompts (hence pairs, unless selection=all) published per round."""
    k: int = Field(2, ge=2, le=16)
    """Responses the current policy samples per prompt."""
    snapshots: int = Field(0, ge=0)
    """Also let this many earlier policies answer each prompt once (a tournament; items pair different models)."""
    selection: Literal["all", "random", "active", "information"] = "all"
    """Which pairs to publish: every pair of a prompt's responses, one random pair per prompt, the pair the reward
    ensemble disagrees on most (active: std of the members' reward gaps), or the pair with the largest expected
    information gain (information: BALD mutual information of the members' Bradley-Terry probabilities)."""
    pool_factor: int = Field(3, ge=1)
    """random and active choose prompts_per_round prompts out of pool_factor times as many."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature for the published responses."""
    max_new_tokens: int = Field(40, gt=0)
    """Longest response, in tokens (sampling, RL and evaluation)."""
    mode: Literal["simulated", "people", "both"] = "simulated"
    """Who judges: the simulated crowd through the app's pages, people in `kilter serve`, or both (crowd_share)."""
    crowd_share: float = Field(0.5, ge=0, le=1)
    """mode=both: the share of each round's quota the simulated crowd judges (rounded up); people judge the rest."""
    db: str | None = None
    """Feedback database (a SQLite path or a database URL; null: output_dir/feedback.db)."""
    project: str = "loop"
    """Projects are named PROJECT-r1, PROJECT-r2, ..."""
    members: list[str] = []
    """Existing accounts (people) added to every round's project (people and both modes)."""
    quota: int | None = Field(None, gt=0)
    """Judgments to wait for per round (null: every item of the round once, gold items not counted)."""
    overlap: int = Field(1, ge=1)
    """People who judge each item."""
    gold_items: int = Field(4, ge=0)
    """Extra items per round whose right answer is known (the built-in task's gold), for annotator quality."""
    gold_fraction: float = Field(0.15, ge=0, le=1)
    """Share of an annotator's tasks that are gold items."""
    heldout_fraction: float = Field(0.2, ge=0, lt=1)
    """Share of each round's comparisons held out of reward-model training: the round's RM is scored on them
    (held-out human agreement and calibration; 0: none)."""
    exclude_flagged: bool = True
    """Leave out the judgments of annotators the app flags (low gold accuracy or peer agreement)."""
    crowd: CrowdSection = CrowdSection()
    """The simulated annotators (simulated and both modes)."""
    poll_s: float = Field(5.0, gt=0)
    """Seconds between progress checks while people work."""
    reward: RewardSection = RewardSection()
    """Reward-model refresh."""
    policy: PolicySection = PolicySection()
    """Policy update."""
    eval_prompts: int = Field(32, gt=0)
    """Held-out prompts for each round's evaluation (builtin:prompts_eval, on the split of builtin prompts)."""
    early_stop: bool = False
    """Stop the loop when the proxy reward rises while gold or held-out agreement falls (over-optimisation)."""
    seed: int = 0
    """Seed of every stage (round r uses seed + r where a stage needs its own)."""
    resume: bool = False
    """Continue the loop in output_dir from its state.json."""
    fresh: bool = False
    """Delete output_dir (and the database, when it is the default one inside it) and start again."""
    threads: int | None = Field(1, gt=0)
    """torch CPU threads (null: torch's default); one is fastest for the tiny model."""

    @property
    def task_split(self) -> str:
        """The built-in task's split the loop works on: the one ``prompts`` names (product for your own prompts)."""
        return parse_builtin(self.prompts)[1] if self.prompts.startswith("builtin:") else "product"

    @property
    def db_url(self) -> str:
        return self.db or str(Path(self.output_dir) / "feedback.db")


def check_config(cfg: LoopConfig) -> None:
    """Combinations the field types cannot refuse on their own."""
    if cfg.selection in ("active", "information") and cfg.reward.ensemble_size < 2:
        raise ConfigError(f"selection={cfg.selection} needs reward.ensemble_size >= 2 (the ensemble's disagreement "
                          "picks pairs)")
    if cfg.policy.algorithm in ("rloo", "grpo") and cfg.policy.samples_per_prompt < 2:
        raise ConfigError(f"policy.algorithm={cfg.policy.algorithm} needs policy.samples_per_prompt >= 2")
    if cfg.crowd.trolls > cfg.crowd.size or cfg.crowd.noise_max < cfg.crowd.noise_min:
        crowd_members(cfg.crowd)  # raises the one-line error
    if cfg.resume and cfg.fresh:
        raise ConfigError("resume=true and fresh=true contradict each other; pass one")
