"""``kilter control``: RL from preferences on a control task (Christiano et al. 2017).

One loop, read top to bottom::

    collect segments with a random policy
    for round in 0 .. rounds-1:
        ask for the labels due by the end of the round (the schedule asks more early)
          — pairs chosen by ensemble disagreement (active) or at random, answered by the
            synthetic labeler (true reward + noise) or by people in the web app
        train the reward-model ensemble on every label so far, standardise its output
        train the agent (stable-baselines3 PPO / A2C / SAC) for steps_per_round steps on
          the learned reward; the wrapper logs the true reward, which the agent never sees
        evaluate on the real task (true return), log, checkpoint

``reward_source=env`` runs the same loop on the true reward (no labels): the baseline with
the same algorithm and step budget.  Every round starts from environments reset with seeds
derived from (seed, round), so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import json
import random
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
from pydantic import Field
from stable_baselines3 import A2C, PPO, SAC
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.vec_env import DummyVecEnv

from kilter.config import BaseConfig
from kilter.control.envs import EnvConfig, is_image_obs, make_env, render_fps, resolve_id
from kilter.control.human import ClipConfig, HumanLabeler
from kilter.control.labelers import MU, LabelerConfig, SyntheticLabeler
from kilter.control.queries import (
    QueryConfig,
    as_pair_batch,
    labels_due,
    select_queries,
)
from kilter.control.reward_model import PairBatch, RewardEnsemble, RewardModelConfig
from kilter.control.segments import Segment, SegmentCollector
from kilter.control.wrapper import LearnedRewardVecEnv
from kilter.distributed import resolve_device
from kilter.errors import ConfigError
from kilter.runs import RunDir, atomic_write_text

ALGOS: dict[str, type[BaseAlgorithm]] = {"ppo": PPO, "a2c": A2C, "sac": SAC}


class AgentConfig(BaseConfig):
    """The stable-baselines3 agent; a null field keeps stable-baselines3's default."""

    algo: Literal["ppo", "a2c", "sac"] = "ppo"
    """Algorithm (sac needs a continuous action space)."""
    learning_rate: float | None = Field(None, gt=0.0)
    """Learning rate (constant)."""
    n_steps: int | None = Field(None, gt=0)
    """PPO/A2C: steps per environment per rollout."""
    batch_size: int | None = Field(None, gt=0)
    """PPO/SAC: minibatch size."""
    n_epochs: int | None = Field(None, gt=0)
    """PPO: passes over each rollout."""
    gamma: float | None = Field(None, gt=0.0, le=1.0)
    """Discount factor."""
    gae_lambda: float | None = Field(None, ge=0.0, le=1.0)
    """PPO/A2C: GAE lambda."""
    ent_coef: float | None = Field(None, ge=0.0)
    """PPO/A2C: entropy bonus (SAC tunes its own)."""
    net_arch: list[int] = Field(default_factory=lambda: [64, 64])
    """Hidden layer widths of the policy and value networks."""
    extra: dict[str, Any] = Field(default_factory=dict)
    """Any other keyword arguments of the stable-baselines3 class (e.g. {clip_range: 0.1, learning_starts: 1000})."""
    device: str = "cpu"
    """Torch device of the agent (small MLP policies run fastest on the CPU)."""


class ControlConfig(BaseConfig):
    """RL from human preferences on a gymnasium task: learned reward, SB3 agent, synthetic or human labels."""

    output_dir: str = "runs/control"
    """Run folder: config.yaml, metrics.jsonl, checkpoints/, final/, queries/ (clips for people)."""
    seed: int = 0
    """Seeds the environments, the agent, the reward models and the query choice."""
    reward_source: Literal["learned", "env"] = "learned"
    """learned: the agent trains on the preference reward model; env: on the true reward (the baseline)."""
    total_timesteps: int = Field(50_000, gt=0)
    """Agent environment steps over the whole run (the initial random-policy segments are extra)."""
    rounds: int = Field(10, gt=0)
    """Rounds: each asks for labels, retrains the ensemble, then trains the agent total_timesteps/rounds steps."""
    normalize_reward: bool = True
    """Standardise the learned reward with running statistics before the agent sees it."""
    initial_random_steps: int | None = Field(None, ge=0)
    """Random-policy steps before round 0 for the first queries (null: 2 segments per initial label, <= pool)."""
    eval_episodes: int = Field(10, ge=0)
    """Episodes of the real task (no fixed horizon, true reward) to measure the agent after each eval_every rounds."""
    eval_every: int = Field(1, gt=0)
    """Rounds between evaluations (the last round is always evaluated)."""
    save_every: int = Field(1, gt=0)
    """Rounds between checkpoints (the last round is always saved)."""
    keep_checkpoints: int = Field(2, gt=0)
    """How many recent checkpoints to keep."""
    resume: bool = False
    """Continue from the last checkpoint in output_dir."""
    stop_after_round: int | None = Field(None, gt=0)
    """Stop (checkpointed) after this many rounds, e.g. to hand out a batch of clips; resume=true continues."""
    tensorboard: bool = False
    """Also write TensorBoard event files."""
    torch_threads: int = Field(1, gt=0)
    """CPU threads for torch: the agent's and reward model's small networks run fastest on one."""
    env: EnvConfig = EnvConfig()
    agent: AgentConfig = AgentConfig()
    reward: RewardModelConfig = RewardModelConfig()
    queries: QueryConfig = QueryConfig()
    labeler: LabelerConfig = LabelerConfig()
    clips: ClipConfig = ClipConfig()

    @property
    def steps_per_round(self) -> int:
        return self.total_timesteps // self.rounds


# --------------------------------------------------------------------------- set-up


def _make_venv(cfg: ControlConfig, record_frames: bool) -> DummyVecEnv:
    render_mode = "rgb_array" if record_frames else None
    make_env(cfg.env, render_mode=render_mode)  # fail early, with a one-line error, on a bad id or missing extra
    return DummyVecEnv([lambda: make_env(cfg.env, render_mode=render_mode) for _ in range(cfg.env.n_envs)])


def _make_agent(cfg: ControlConfig, venv) -> BaseAlgorithm:
    a = cfg.agent
    cls = ALGOS[a.algo]
    if a.algo == "sac" and not isinstance(venv.action_space, gym.spaces.Box):
        raise ConfigError(f"agent.algo=sac needs continuous actions; {cfg.env.id} has {venv.action_space}")
    allowed = {
        "ppo": {"learning_rate", "n_steps", "batch_size", "n_epochs", "gamma", "gae_lambda", "ent_coef"},
        "a2c": {"learning_rate", "n_steps", "gamma", "gae_lambda", "ent_coef"},
        "sac": {"learning_rate", "batch_size", "gamma"},
    }[a.algo]
    kwargs = {k: getattr(a, k) for k in allowed if getattr(a, k) is not None}
    for k in {"n_steps", "batch_size", "n_epochs", "gae_lambda", "ent_coef"} - allowed:
        if getattr(a, k) is not None:
            raise ConfigError(f"agent.{k} does not apply to agent.algo={a.algo}")
    kwargs.update(a.extra)
    policy = "CnnPolicy" if is_image_obs(venv.observation_space) else "MlpPolicy"
    policy_kwargs = {"net_arch": list(a.net_arch)}
    if policy == "CnnPolicy":
        policy_kwargs = {"normalize_images": True}
    try:
        return cls(policy, venv, seed=cfg.seed, verbose=0, device=a.device, policy_kwargs=policy_kwargs, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"agent.extra: {exc}") from None


def _rollout_multiple(cfg: ControlConfig) -> int:
    if cfg.agent.algo in ("ppo", "a2c"):
        n_steps = cfg.agent.n_steps or (2048 if cfg.agent.algo == "ppo" else 5)
        return n_steps * cfg.env.n_envs
    return cfg.env.n_envs


def _check(cfg: ControlConfig) -> None:
    resolve_id(cfg.env.id)
    resolve_device(cfg.agent.device, key="agent.device")
    unit = _rollout_multiple(cfg)
    if cfg.steps_per_round % unit:
        raise ConfigError(
            f"total_timesteps/rounds = {cfg.steps_per_round} must be a multiple of agent.n_steps * env.n_envs = {unit}"
            " (so every round ends at a rollout boundary)"
        )
    if cfg.reward_source == "learned" and cfg.queries.total_labels < 1:
        raise ConfigError("queries.total_labels must be at least 1 with reward_source=learned")


def _labeler(cfg: ControlConfig, run: RunDir, fps: int):
    if cfg.labeler.kind == "human":
        return HumanLabeler(run.path / "queries", cfg.labeler, cfg.clips, fps)
    return SyntheticLabeler(cfg.labeler)


# --------------------------------------------------------------------------- evaluation


def evaluate_true_return(agent: BaseAlgorithm, cfg: ControlConfig, episodes: int, seed: int) -> float:
    """Mean true return of the deterministic policy on the real task (own episode ends, true reward)."""
    env = make_env(cfg.env, training=False)
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        done, total = False, 0.0
        while not done:
            action, _ = agent.predict(obs, deterministic=True)
            obs, r, terminated, truncated, _ = env.step(action)
            total += float(r)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return float(np.mean(returns)) if returns else float("nan")


# --------------------------------------------------------------------------- state


class _Labels:
    """Every answered pair so far (the dataset the ensemble trains on), can't-tell answers counted but not kept."""

    def __init__(self) -> None:
        self.batches: list[PairBatch] = []
        self.answers: dict[str, int] = {"left": 0, "right": 0, "equal": 0, "cant_tell": 0}
        self.asked = 0

    def add(self, segments: list[Segment], pairs: np.ndarray, answers: list[str]) -> None:
        self.asked += len(answers)
        for a in answers:
            self.answers[a] += 1
        keep = [i for i, a in enumerate(answers) if MU[a] is not None]
        if keep:
            mu = np.asarray([MU[answers[i]] for i in keep], dtype=np.float32)
            self.batches.append(as_pair_batch(segments, pairs[keep], mu))

    def data(self) -> PairBatch | None:
        if not self.batches:
            return None
        if len(self.batches) > 1:
            b = self.batches
            self.batches = [
                PairBatch(
                    *(np.concatenate([getattr(x, f) for x in b]) for f in ("obs_1", "acts_1", "obs_2", "acts_2", "mu"))
                )
            ]
        return self.batches[0]


def _rng_state(rng: np.random.Generator) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "rng": rng.bit_generator.state,
    }


def _set_rng_state(state: dict, rng: np.random.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    rng.bit_generator.state = state["rng"]


def _save(
    path: Path,
    agent: BaseAlgorithm,
    ensemble: RewardEnsemble | None,
    venv: LearnedRewardVecEnv,
    collector: SegmentCollector,
    labels: _Labels,
    rng: np.random.Generator,
    trainer_state: dict,
) -> None:
    agent.save(path / "agent.zip")
    if hasattr(agent, "replay_buffer") and agent.replay_buffer is not None:
        agent.save_replay_buffer(path / "replay_buffer.pkl")
    torch.save(
        {
            "ensemble": ensemble.full_state() if ensemble is not None else None,
            "labels": labels.data(),
            "answers": labels.answers,
            "asked": labels.asked,
            "pool": list(collector.pool),
            "n_segments": collector.n_made,
            "rms": (venv.rms.mean, venv.rms.var, venv.rms.count),
            "rng": _rng_state(rng),
        },
        path / "control_state.pt",
    )
    atomic_write_text(path / "trainer_state.json", json.dumps(trainer_state, indent=2))


def _save_final(path: Path, agent: BaseAlgorithm, ensemble: RewardEnsemble | None, cfg: ControlConfig) -> None:
    agent.save(path / "agent.zip")
    if ensemble is not None:
        torch.save(ensemble.state_dict(), path / "reward_model.pt")
    (path / "reward_model.json").write_text(json.dumps({"env": cfg.env.id, **cfg.reward.model_dump()}, indent=2))


# --------------------------------------------------------------------------- the loop


def train(cfg: ControlConfig) -> dict[str, float]:
    _check(cfg)
    run = RunDir(cfg.output_dir, tensorboard=cfg.tensorboard)
    learned = cfg.reward_source == "learned"
    record_frames = learned and (cfg.labeler.kind == "human" or cfg.clips.keep_frames)
    torch.set_num_threads(cfg.torch_threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    base = _make_venv(cfg, record_frames)
    collector = SegmentCollector(cfg.env.n_envs, cfg.queries.segment_length, cfg.queries.pool_size, cfg.clips.downscale)
    ensemble = RewardEnsemble(base.observation_space, base.action_space, cfg.reward) if learned else None
    venv = LearnedRewardVecEnv(
        base,
        ensemble.reward if ensemble is not None else None,
        collector if learned else None,
        record_frames,
        cfg.normalize_reward,
    )
    agent = _make_agent(cfg, venv)
    labels = _Labels()
    labeler = _labeler(cfg, run, render_fps(base.envs[0])) if learned else None

    start_round = 0
    random_steps = 0
    ckpt = run.latest_checkpoint() if cfg.resume else None
    if cfg.resume and ckpt is None:
        print(f"kilter control: resume=true but no checkpoint in {run.checkpoints}; starting fresh", file=sys.stderr)
    if ckpt is not None:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        start_round = state["round"] + 1
        agent = ALGOS[cfg.agent.algo].load(ckpt / "agent.zip", env=venv, device=cfg.agent.device)
        if (ckpt / "replay_buffer.pkl").exists():
            agent.load_replay_buffer(ckpt / "replay_buffer.pkl")
        saved = torch.load(ckpt / "control_state.pt", weights_only=False)  # our own file, written by _save
        if ensemble is not None:
            ensemble.load_full_state(saved["ensemble"])
        if saved["labels"] is not None:
            labels.batches = [saved["labels"]]
        labels.answers, labels.asked = saved["answers"], saved["asked"]
        collector.pool.extend(saved["pool"])
        collector.n_made = saved["n_segments"]
        venv.rms.mean, venv.rms.var, venv.rms.count = saved["rms"]
        _set_rng_state(saved["rng"], rng)
        run.truncate_metrics(agent.num_timesteps)
        print(f"kilter control: resumed from {ckpt} (round {start_round} of {cfg.rounds})", file=sys.stderr)
    else:
        run.replace_metrics = True  # a fresh start: rows of a run killed before its first checkpoint go
        run.write_config(cfg)
        if learned:
            n_random = cfg.initial_random_steps
            if n_random is None:
                first = labels_due(cfg.steps_per_round, cfg.total_timesteps, cfg.queries)
                want = min(cfg.queries.pool_size, 2 * first + 2)
                n_random = -(-want * cfg.queries.segment_length // cfg.env.n_envs) * cfg.env.n_envs
            _random_rollout(venv, n_random, cfg.seed)
            random_steps = n_random

    summary: dict[str, float] = {}
    for rnd in range(start_round, cfg.rounds):
        t0 = time.time()
        metrics: dict[str, float] = {"round": rnd}
        if rnd == 0 and learned:
            metrics["env/random_steps"] = random_steps  # warm-up for the first queries, outside the agent's budget
        if learned:
            due = labels_due((rnd + 1) * cfg.steps_per_round, cfg.total_timesteps, cfg.queries)
            segments = list(collector.pool)
            pairs, scores = select_queries(
                segments, due - labels.asked, cfg.queries, ensemble if labels.batches else None, rng
            )
            if len(pairs):
                answers = labeler.label([(segments[i], segments[j]) for i, j in pairs], rng)
                labels.add(segments, pairs, answers)
                metrics["queries/disagreement"] = float(np.mean(scores))
            metrics.update(
                {
                    "labels/total": labels.asked,
                    "labels/new": len(pairs),
                    **{f"labels/{k}": v for k, v in labels.answers.items()},
                }
            )
            data = labels.data()
            if data is not None and len(pairs):
                metrics.update(ensemble.train_round(data, rng))
                obs = np.concatenate([s.obs for s in segments])
                acts = np.concatenate([s.acts for s in segments])
                ensemble.fit_output_scale(obs, acts)
                venv.reward_model_changed()

        # every round starts from freshly seeded environments, so a resumed run repeats this one
        venv.seed(cfg.seed * 100_003 + rnd)
        agent._last_obs = None  # makes learn() reset the environments (SB3 private attribute)
        venv.reset_stats()
        agent.learn(cfg.steps_per_round, reset_num_timesteps=False, progress_bar=False)
        if venv.episode_true:
            metrics["reward/true"] = float(np.mean(venv.episode_true))
        metrics["reward/true_per_step"] = venv.true_sum / max(venv.n_steps, 1)
        if learned:
            metrics["reward/learned"] = venv.learned_sum / max(venv.n_steps, 1)
        last = rnd == cfg.rounds - 1 or (cfg.stop_after_round is not None and rnd + 1 >= cfg.stop_after_round)
        if cfg.eval_episodes and ((rnd + 1) % cfg.eval_every == 0 or last):
            metrics["eval/true_return"] = evaluate_true_return(
                agent, cfg, cfg.eval_episodes, seed=10_000 + cfg.seed * 1000
            )
        metrics["perf/round_s"] = round(time.time() - t0, 2)
        run.log(agent.num_timesteps, metrics)
        summary = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        _print_round(rnd, cfg.rounds, agent.num_timesteps, metrics)
        if (rnd + 1) % cfg.save_every == 0 or last:
            trainer_state = {"round": rnd, "num_timesteps": agent.num_timesteps, "labels": labels.asked}
            run.save_checkpoint(
                agent.num_timesteps,
                partial(
                    _save,
                    agent=agent,
                    ensemble=ensemble,
                    venv=venv,
                    collector=collector,
                    labels=labels,
                    rng=rng,
                    trainer_state=trainer_state,
                ),
                keep=cfg.keep_checkpoints,
            )
        if last and rnd < cfg.rounds - 1:
            print(
                f"kilter control: stopped after round {rnd + 1} (stop_after_round); resume=true continues",
                file=sys.stderr,
            )
            run.close()
            return summary

    run.save_final(lambda p: _save_final(p, agent, ensemble, cfg))
    run.close()
    return summary


def _random_rollout(venv: LearnedRewardVecEnv, steps: int, seed: int) -> None:
    """Segments of a uniformly random policy for the first queries (before the reward model exists)."""
    venv.seed(seed)
    venv.action_space.seed(seed)
    venv.reset()
    reward_fn, venv.reward_fn = venv.reward_fn, None  # the untrained model's reward is not needed
    for _ in range(steps // venv.num_envs):
        venv.step(np.stack([venv.action_space.sample() for _ in range(venv.num_envs)]))
    venv.reward_fn = reward_fn


def _print_round(rnd: int, rounds: int, steps: int, m: dict) -> None:
    parts = [f"round {rnd + 1}/{rounds}", f"steps {steps}"]
    for key in ("labels/total", "rm/acc_val", "reward/true", "eval/true_return"):
        if key in m:
            value = m[key]
            parts.append(f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}")
    print("  ".join(parts), file=sys.stderr)


def run(cfg: ControlConfig) -> int:
    train(cfg)
    return 0
