"""TAMER: an agent shaped by a person's +/- key presses (Knox & Stone 2009, "Interactively shaping agents").

The trainer watches the agent act and now and then presses "good" (+1) or "bad" (-1).  TAMER
learns a model Ĥ(s, a) of that human reinforcement and acts greedily on it, a = argmax_a Ĥ(s, a)
(people judge the action's long-term worth themselves, so no discounting is needed).

Credit assignment: a press at time t_h refers to something seen a moment earlier.  With the
human's delay distributed as f(d) (here uniform on [min_delay_s, max_delay_s], as in the paper),
the step that was on screen from t_start to t_end gets credit

    c = ∫ f(d) dd over d ∈ [t_h - t_end, t_h - t_start]

and the press updates Ĥ by gradient descent on Σ c · (h - Ĥ(s, a))² / 2 over the credited steps.

:class:`SimulatedTrainer` stands in for a person in tests: it sees each transition, computes the
one-step advantage of the true reward δ = r + γ V(s') - V(s) with a value function of the task
(exact for the built-in corridor), and presses +1 when the action kept δ within ``margin`` of the
best (≈ 0 for an optimal action) and -1 otherwise — ``delay_steps`` later, so credit assignment is
needed.  :func:`run_tamer` is the loop; with ``trainer=human`` the web page of ``kilter tamer-live``
(the feedback app) plays the environment live and sends key presses in.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
from pydantic import Field
from torch import nn

from kilter.config import BaseConfig
from kilter.control.envs import EnvConfig, make_env
from kilter.errors import ConfigError
from kilter.runs import RunDir


class TamerConfig(BaseConfig):
    """TAMER on a discrete-action gymnasium task, trained by a simulated or a human trainer."""

    output_dir: str = "runs/tamer"
    """Run folder: config.yaml, metrics.jsonl, final/ (the Ĥ model)."""
    seed: int = 0
    """Seeds the environment, Ĥ's initialisation and the simulated trainer."""
    env: EnvConfig = EnvConfig(id="corridor", n_envs=1)
    episodes: int = Field(30, gt=0)
    """Training episodes."""
    step_s: float = Field(0.25, gt=0.0)
    """Seconds each step stays on screen (real time when a person trains, simulated time otherwise)."""
    min_delay_s: float = Field(0.2, ge=0.0)
    """Shortest human reaction delay credited (Knox & Stone: 0.2 s)."""
    max_delay_s: float = Field(4.0, gt=0.0)
    """Longest human reaction delay credited (Knox & Stone: 4 s)."""
    lr: float = Field(0.05, gt=0.0)
    """Step size of Ĥ's gradient descent per key press."""
    hidden: int = Field(32, ge=0)
    """Hidden width of Ĥ (0: linear in the observation, as in the paper)."""
    epsilon: float = Field(0.0, ge=0.0, le=1.0)
    """Chance of a random action (TAMER is greedy: 0)."""
    trainer: Literal["simulated", "human"] = "simulated"
    """simulated: presses from the true reward's advantage; human: key presses from the live page."""
    delay_steps: int = Field(2, ge=0)
    """Simulated trainer: presses this many steps after the action it judges."""
    feedback_prob: float = Field(1.0, gt=0.0, le=1.0)
    """Simulated trainer: chance of pressing at all after a step (people press now and then)."""
    error_rate: float = Field(0.0, ge=0.0, le=0.5)
    """Simulated trainer: chance a press has the wrong sign."""
    margin: float = Field(0.5, ge=0.0)
    """Simulated trainer: δ >= -margin counts as a good action."""
    critic: str | None = None
    """Simulated trainer without an exact V: an SB3 PPO/A2C agent.zip trained on the true reward (critic = V)."""
    gamma: float = Field(1.0, gt=0.0, le=1.0)
    """Simulated trainer: discount of δ = r + γ V(s') - V(s)."""


# --------------------------------------------------------------------------- credit assignment


def uniform_delay_credit(t_start: float, t_end: float, t_feedback: float, lo: float, hi: float) -> float:
    """Probability that a press at ``t_feedback`` refers to a step on screen during [t_start, t_end].

    The delay d = t_feedback - t (t the moment the trainer reacted to) is uniform on [lo, hi].
    """
    d_lo, d_hi = max(t_feedback - t_end, lo), min(t_feedback - t_start, hi)
    return max(d_hi - d_lo, 0.0) / (hi - lo)


@dataclass
class _Shown:
    obs: np.ndarray
    action: int
    t_start: float
    t_end: float


class CreditWindow:
    """The recent steps that a press could refer to, with the time each was on screen."""

    def __init__(self, min_delay_s: float, max_delay_s: float):
        if max_delay_s <= min_delay_s:
            raise ConfigError(f"max_delay_s ({max_delay_s}) must be larger than min_delay_s ({min_delay_s})")
        self.lo, self.hi = min_delay_s, max_delay_s
        self.steps: deque[_Shown] = deque()

    def add(self, obs: np.ndarray, action: int, t_start: float, t_end: float) -> None:
        self.steps.append(_Shown(np.asarray(obs, dtype=np.float32), int(action), t_start, t_end))

    def credits(self, t_feedback: float) -> list[tuple[np.ndarray, int, float]]:
        """(obs, action, credit > 0) of every step the press can refer to; forgets steps too old to matter."""
        while self.steps and t_feedback - self.steps[0].t_end > self.hi:
            self.steps.popleft()
        out = []
        for s in self.steps:
            c = uniform_delay_credit(s.t_start, s.t_end, t_feedback, self.lo, self.hi)
            if c > 0:
                out.append((s.obs, s.action, c))
        return out

    def clear(self) -> None:
        self.steps.clear()


# --------------------------------------------------------------------------- the agent


class HumanRewardModel(nn.Module):
    """Ĥ(s, ·): one output per discrete action."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: int):
        super().__init__()
        if hidden:
            self.net = nn.Sequential(nn.Linear(obs_dim, hidden), nn.Tanh(), nn.Linear(hidden, n_actions))
        else:
            self.net = nn.Linear(obs_dim, n_actions)
        # Ĥ starts with no opinion (0 for every action): the first actions are ties broken at random
        last = self.net[-1] if isinstance(self.net, nn.Sequential) else self.net
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs.reshape(obs.shape[0], -1).float())


class TamerAgent:
    def __init__(self, obs_space: gym.Space, act_space: gym.Space, cfg: TamerConfig):
        if not isinstance(act_space, gym.spaces.Discrete):
            raise ConfigError(
                f"TAMER picks argmax_a Ĥ(s, a), so it needs discrete actions; {cfg.env.id} has {act_space}"
            )
        self.n_actions = int(act_space.n)
        self.model = HumanRewardModel(int(np.prod(obs_space.shape)), self.n_actions, cfg.hidden)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr)
        self.window = CreditWindow(cfg.min_delay_s, cfg.max_delay_s)
        self.epsilon = cfg.epsilon
        self.updates = 0

    @torch.no_grad()
    def h_values(self, obs: np.ndarray) -> np.ndarray:
        return self.model(torch.as_tensor(np.asarray(obs, dtype=np.float32))[None])[0].numpy()

    def act(self, obs: np.ndarray, rng: np.random.Generator) -> int:
        if self.epsilon and rng.random() < self.epsilon:
            return int(rng.integers(self.n_actions))
        h = self.h_values(obs)
        best = np.flatnonzero(h == h.max())
        return int(rng.choice(best))  # ties (an untrained Ĥ) broken at random

    def feedback(self, h: float, t_feedback: float) -> float:
        """A press (+1 / -1) at ``t_feedback``: one gradient step on the credited squared error; returns the loss."""
        credited = self.window.credits(t_feedback)
        if not credited:
            return 0.0
        obs = torch.as_tensor(np.stack([o for o, _, _ in credited]))
        acts = torch.as_tensor([a for _, a, _ in credited])
        credit = torch.as_tensor([c for _, _, c in credited], dtype=torch.float32)
        pred = self.model(obs).gather(1, acts[:, None]).squeeze(1)
        loss = (credit * (h - pred) ** 2).sum() / 2
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.updates += 1
        return float(loss.detach())


# --------------------------------------------------------------------------- the simulated trainer


ValueFn = Callable[[np.ndarray], float]


class SimulatedTrainer:
    """Presses from the sign of the true reward's one-step advantage δ = r + γ V(s') - V(s), ``delay_steps`` late."""

    def __init__(self, value_fn: ValueFn, cfg: TamerConfig, rng: np.random.Generator):
        self.value_fn, self.cfg, self.rng = value_fn, cfg, rng
        self.queue: deque[tuple[int, float]] = deque()  # (step index due, +1/-1)

    def judge(self, obs, reward: float, next_obs, terminated: bool) -> float:
        v_next = 0.0 if terminated else self.value_fn(next_obs)
        delta = reward + self.cfg.gamma * v_next - self.value_fn(obs)
        return 1.0 if delta >= -self.cfg.margin else -1.0

    def observe(self, step: int, obs, reward: float, next_obs, terminated: bool) -> None:
        if self.rng.random() >= self.cfg.feedback_prob:
            return
        h = self.judge(obs, reward, next_obs, terminated)
        if self.cfg.error_rate and self.rng.random() < self.cfg.error_rate:
            h = -h
        self.queue.append((step + self.cfg.delay_steps, h))

    def due(self, step: int) -> list[float]:
        out = []
        while self.queue and self.queue[0][0] <= step:
            out.append(self.queue.popleft()[1])
        return out


def value_function(cfg: TamerConfig) -> ValueFn:
    """V(s) of the task under a good policy: exact for the corridor, else the critic of a true-reward agent."""
    if cfg.critic is None:
        env = make_env(cfg.env, training=False)
        base = env.unwrapped
        if hasattr(base, "optimal_value"):
            return base.optimal_value
        raise ConfigError(
            f"the simulated trainer needs a value function for {cfg.env.id}: set critic=<agent.zip of a "
            "`kilter control reward_source=env` run>"
        )
    path = Path(cfg.critic)
    if not path.is_file():
        raise ConfigError(f"critic: file not found: {path}")
    from stable_baselines3 import A2C, PPO

    for cls in (PPO, A2C):
        try:
            agent = cls.load(path, device="cpu")
            break
        except (KeyError, ValueError):
            continue
    else:
        raise ConfigError(f"critic: {path} is not a stable-baselines3 PPO or A2C agent")

    def v(obs: np.ndarray) -> float:
        with torch.no_grad():
            t, _ = agent.policy.obs_to_tensor(np.asarray(obs))
            return float(agent.policy.predict_values(t)[0, 0])

    return v


# --------------------------------------------------------------------------- the loop


def run_tamer(
    cfg: TamerConfig,
    presses: Callable[[float], list[tuple[float, float]]] | None = None,
    on_frame: Callable[[np.ndarray], None] | None = None,
) -> dict[str, float]:
    """Train TAMER for ``cfg.episodes`` episodes; return the last metrics.

    ``presses(now)`` (human trainer) returns the (time.monotonic() of the press, ±1) key presses since the last call;
    ``on_frame(frame)`` receives each rendered frame for the live page.  Without them the
    simulated trainer presses in simulated time (``step_s`` per step).
    """
    if cfg.trainer == "human" and presses is None:
        raise ConfigError("trainer=human needs the live page: run `kilter tamer-live` (the feedback app)")
    run = RunDir(cfg.output_dir, tensorboard=False)
    run.write_config(cfg)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    env = make_env(cfg.env, render_mode="rgb_array" if on_frame else None, training=False)
    agent = TamerAgent(env.observation_space, env.action_space, cfg)
    trainer = SimulatedTrainer(value_function(cfg), cfg, rng) if cfg.trainer == "simulated" else None
    clock = _Clock(cfg.step_s, real=cfg.trainer == "human")
    metrics: dict[str, float] = {}
    step = 0
    for episode in range(cfg.episodes):
        obs, _ = env.reset(seed=cfg.seed * 1000 + episode)
        agent.window.clear()
        done, ret, length, n_presses, positive = False, 0.0, 0, 0, 0
        while not done:
            if on_frame is not None:
                on_frame(env.render())
            action = agent.act(obs, rng)
            t0 = clock.now()
            next_obs, r, terminated, truncated, _ = env.step(action)
            clock.tick()
            agent.window.add(obs, action, t0, clock.now())
            if trainer is not None:
                trainer.observe(step, obs, float(r), next_obs, terminated)
                for h in trainer.due(step):
                    agent.feedback(h, clock.now())
                    n_presses += 1
                    positive += h > 0
            else:
                for t_press, h in presses(clock.now()):
                    agent.feedback(h, clock.since_start(t_press))
                    n_presses += 1
                    positive += h > 0
            ret += float(r)
            length += 1
            step += 1
            obs = next_obs
            done = terminated or truncated
        if trainer is not None:  # presses still on their way refer to this episode: deliver them before the reset
            while trainer.queue:
                clock.tick()
                for h in trainer.due(trainer.queue[0][0]):
                    agent.feedback(h, clock.now())
                    n_presses += 1
                    positive += h > 0
        metrics = {
            "episode": episode,
            "reward/true": ret,
            "episode/length": length,
            "feedback/presses": n_presses,
            "feedback/positive": positive,
            "feedback/updates": agent.updates,
        }
        run.log(step, metrics)
        print(f"episode {episode + 1}/{cfg.episodes}  true return {ret:.3g}  presses {n_presses}", file=sys.stderr)
    run.save_final(lambda p: torch.save(agent.model.state_dict(), p / "h_model.pt"))
    run.close()
    env.close()
    return metrics


class _Clock:
    """Seconds since the start: simulated (step_s per step) for the simulated trainer, the wall clock for people."""

    def __init__(self, step_s: float, real: bool):
        self._time, self.step_s, self.real = time, step_s, real
        self._t = 0.0
        self._start = time.monotonic()
        self._next = self._start

    def now(self) -> float:
        return self._time.monotonic() - self._start if self.real else self._t

    def since_start(self, t_monotonic: float) -> float:
        return t_monotonic - self._start

    def tick(self) -> None:
        if self.real:  # hold each step on screen for step_s, so a person can react to it
            self._next += self.step_s
            self._time.sleep(max(0.0, self._next - self._time.monotonic()))
        else:
            self._t += self.step_s


def run(cfg: TamerConfig) -> int:
    run_tamer(cfg)
    return 0
