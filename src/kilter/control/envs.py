"""Environments through gymnasium: classic control, MuJoCo (``mujoco``) and Atari (``ale-py``).

:func:`make_env` builds one environment from an :class:`EnvConfig`; unknown ids and missing
extras are one-line :class:`~kilter.errors.ConfigError` messages.  Frames for clips come from
``render_mode="rgb_array"``.

Fixed-length episodes (``fixed_horizon``): Christiano et al. 2017 remove early termination,
because an episode that ends when the agent fails tells the agent about the task without any
label (a positive learned reward alone would teach "survive").  With ``fixed_horizon=N`` the
underlying episode is restarted internally when it ends, the agent sees one continuous
episode of N steps, and the *true* reward of that step gets ``termination_penalty`` added so
that the synthetic labeler can see the failure.  The true return reported in metrics is the
plain sum of the environment's rewards per underlying episode (``info["episode_true"]``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import gymnasium as gym
import numpy as np
from pydantic import Field

from kilter.config import BaseConfig
from kilter.errors import ConfigError

Family = Literal["classic", "mujoco", "atari"]

# short name -> (gymnasium id, family).  Any other registered gymnasium id also works.
PRESETS: dict[str, tuple[str, Family]] = {
    "cartpole": ("CartPole-v1", "classic"),
    "pendulum": ("Pendulum-v1", "classic"),
    "mountaincar": ("MountainCar-v0", "classic"),
    "mountaincar-continuous": ("MountainCarContinuous-v0", "classic"),
    "acrobot": ("Acrobot-v1", "classic"),
    "hopper": ("Hopper-v5", "mujoco"),
    "halfcheetah": ("HalfCheetah-v5", "mujoco"),
    "swimmer": ("Swimmer-v5", "mujoco"),
    "pong": ("ALE/Pong-v5", "atari"),
    "breakout": ("ALE/Breakout-v5", "atari"),
    "enduro": ("ALE/Enduro-v5", "atari"),
    "corridor": ("kilter/Corridor-v0", "classic"),
}
_EXTRAS = {
    "classic": "pip install 'gymnasium[classic-control]' (pygame, for rendering)",
    "mujoco": "pip install mujoco (and set MUJOCO_GL=egl or osmesa on a machine without a display)",
    "atari": "pip install ale-py opencv-python-headless (ale-py ships the ROMs)",
}


class EnvConfig(BaseConfig):
    """Which environment, how many copies, and how episodes end."""

    id: str = "cartpole"
    """A preset (cartpole pendulum mountaincar acrobot hopper halfcheetah swimmer pong ...) or a gymnasium id."""
    n_envs: int = Field(4, gt=0)
    """Parallel copies of the environment the agent collects from (a DummyVecEnv in one process)."""
    fixed_horizon: int | None = Field(None, gt=0)
    """Steps per training episode, early termination removed (restart inside the episode); null: the env's own ends."""
    termination_penalty: float = 0.0
    """Added to the true reward where the underlying episode ended (fixed_horizon only), for the labeler."""
    max_episode_steps: int | None = Field(None, gt=0)
    """Override the environment's time limit (null: the registered one)."""
    atari_frame_skip: int = Field(4, gt=0)
    """Atari only: emulator frames per agent step (AtariPreprocessing: 84x84 grey, 4 stacked frames)."""
    atari_fire: bool = False
    """Atari only: press FIRE after a reset and after every lost life (Breakout serves only on FIRE)."""


class Corridor(gym.Env):
    """A trivial task for TAMER tests and demos: walk right along ``size`` cells to the goal.

    Observation: one-hot position; actions 0 = left, 1 = right; reward -1 per step until the
    goal (the last cell) is reached.  ``optimal_value`` is the exact V*(s) = -(steps to the goal).
    """

    metadata: ClassVar[dict] = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(self, size: int = 8, render_mode: str | None = None):
        self.size = size
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(size,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.pos = 0

    def _obs(self) -> np.ndarray:
        obs = np.zeros(self.size, dtype=np.float32)
        obs[self.pos] = 1.0
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.pos = 0
        return self._obs(), {}

    def step(self, action):
        self.pos = int(np.clip(self.pos + (1 if int(action) == 1 else -1), 0, self.size - 1))
        return self._obs(), -1.0, self.pos == self.size - 1, False, {}

    def optimal_value(self, obs: np.ndarray) -> float:
        return -float(self.size - 1 - int(np.argmax(obs)))

    def render(self) -> np.ndarray:
        cell = 24
        img = np.full((cell, cell * self.size, 3), 235, dtype=np.uint8)
        img[:, (self.size - 1) * cell :] = (120, 200, 120)  # the goal
        img[4:-4, self.pos * cell + 4 : (self.pos + 1) * cell - 4] = (60, 90, 200)  # the agent
        return img


if "kilter/Corridor-v0" not in gym.registry:
    gym.register("kilter/Corridor-v0", entry_point=Corridor, max_episode_steps=50)


def resolve_id(name: str) -> tuple[str, Family]:
    """A preset name or gymnasium id -> (gymnasium id, family); ConfigError when unknown."""
    if name.lower() in PRESETS:
        return PRESETS[name.lower()]
    for gym_id, family in PRESETS.values():
        if name == gym_id:
            return gym_id, family
    if name.startswith("ALE/"):
        return name, "atari"
    _register_atari()
    if name in gym.registry:
        spec = gym.registry[name]
        entry = str(spec.entry_point)
        return name, "mujoco" if "mujoco" in entry else "atari" if "ale_py" in entry else "classic"
    raise ConfigError(
        f"unknown environment {name!r}: expected a preset ({', '.join(PRESETS)}) or a registered gymnasium id"
    )


def _register_atari() -> bool:
    try:
        import ale_py
    except ImportError:
        return False
    gym.register_envs(ale_py)
    return True


class FixedHorizon(gym.Wrapper):
    """Episodes of exactly ``horizon`` steps; the underlying episode restarts when it ends.

    ``info["episode_true"]`` carries the true (undiscounted, unpenalised) return of each
    underlying episode that ended on this step, so metrics can report the real task score.
    """

    def __init__(self, env: gym.Env, horizon: int, termination_penalty: float = 0.0):
        super().__init__(env)
        self.horizon = horizon
        self.termination_penalty = termination_penalty
        self._t = 0
        self._inner_return = 0.0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self._t = 0
        self._inner_return = 0.0
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._t += 1
        self._inner_return += float(reward)
        info = dict(info)
        at_horizon = self._t >= self.horizon
        if terminated or truncated:
            if terminated:
                reward = float(reward) + self.termination_penalty
            obs, _ = self.env.reset()
        if terminated or truncated or at_horizon:
            # an underlying episode cut by the horizon counts too: a policy that never fails still has a score
            info["episode_true"] = self._inner_return
            self._inner_return = 0.0
        return obs, reward, False, at_horizon, info


class FireOnLifeLoss(gym.Wrapper):
    """Press FIRE (one agent step) after a reset and after every lost life, in games that serve on FIRE.

    Without it a deterministic policy that never picks FIRE in Breakout waits for the serve until the
    time limit.  The FIRE step's reward counts (added to the next returned step's), so true returns
    stay exact; an episode that ends on the FIRE step is returned as ended.
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        meanings = env.unwrapped.get_action_meanings()
        if "FIRE" not in meanings:
            raise ConfigError(f"env.atari_fire=true, but {env.spec.id if env.spec else env} has no FIRE action")
        self.fire = meanings.index("FIRE")
        self._lives = 0

    def _lives_now(self) -> int:
        return int(self.env.unwrapped.ale.lives())

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        obs, _, terminated, truncated, info = self.env.step(self.fire)
        if terminated or truncated:
            obs, info = self.env.reset(**kwargs)
        self._lives = self._lives_now()
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        lives = self._lives_now()
        if not (terminated or truncated) and lives < self._lives:
            obs, fire_reward, terminated, truncated, info = self.env.step(self.fire)
            reward = float(reward) + float(fire_reward)
        self._lives = lives
        return obs, reward, terminated, truncated, info


class TrueEpisodeReturn(gym.Wrapper):
    """Without a fixed horizon: put the episode's true return into ``info["episode_true"]`` at its end."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self._return = 0.0

    def reset(self, **kwargs):
        self._return = 0.0
        return self.env.reset(**kwargs)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._return += float(reward)
        if terminated or truncated:
            info = dict(info)
            info["episode_true"] = self._return
        return obs, reward, terminated, truncated, info


def make_env(cfg: EnvConfig, render_mode: str | None = None, training: bool = True) -> gym.Env:
    """One environment as configured; ``training=False`` skips the fixed horizon (evaluation on the real task)."""
    gym_id, family = resolve_id(cfg.id)
    if family == "atari" and not _register_atari():
        raise ConfigError(f"environment {cfg.id!r} needs ale-py: {_EXTRAS['atari']}")
    kwargs: dict[str, Any] = {}
    if render_mode is not None:
        kwargs["render_mode"] = render_mode
    if cfg.max_episode_steps is not None:
        kwargs["max_episode_steps"] = cfg.max_episode_steps
    if family == "atari":
        kwargs["frameskip"] = 1  # AtariPreprocessing does the skipping (and max-pools frames)
    try:
        env = gym.make(gym_id, **kwargs)
    except gym.error.DependencyNotInstalled as exc:
        raise ConfigError(f"environment {cfg.id!r} needs an extra package: {_EXTRAS[family]} ({exc})") from None
    except gym.error.Error as exc:
        raise ConfigError(f"environment {cfg.id!r} could not be made: {exc}") from None
    if family == "atari":
        try:
            env = gym.wrappers.AtariPreprocessing(
                env, frame_skip=cfg.atari_frame_skip, screen_size=84, grayscale_obs=True
            )
        except gym.error.DependencyNotInstalled:
            raise ConfigError(
                f"environment {cfg.id!r} needs OpenCV for frame preprocessing: pip install opencv-python-headless"
            ) from None
        env = gym.wrappers.FrameStackObservation(env, 4)
        if cfg.atari_fire:
            env = FireOnLifeLoss(env)
    if training and cfg.fixed_horizon is not None:
        return FixedHorizon(env, cfg.fixed_horizon, cfg.termination_penalty)
    return TrueEpisodeReturn(env)


def is_image_obs(space: gym.Space) -> bool:
    """Pixel observations (uint8, at least 2-D) get the CNN reward model."""
    return isinstance(space, gym.spaces.Box) and space.dtype == np.uint8 and len(space.shape) >= 2


def render_fps(env: gym.Env) -> int:
    """Frames per second of one agent step, for clips (Atari: the emulator rate over the frame skip)."""
    fps = int(env.metadata.get("render_fps") or 30)
    inner = env
    while isinstance(inner, gym.Wrapper):
        if isinstance(inner, gym.wrappers.AtariPreprocessing):
            return max(1, fps // inner.frame_skip)
        inner = inner.env
    return fps
