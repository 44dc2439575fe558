"""The agent's view of the task: a VecEnv wrapper that swaps the true reward for the learned one.

The wrapper keeps the observation each action was taken in, so the reward of a step is
r̂(s_t, a_t); it standardises r̂ with running statistics (reset whenever the reward model
changes, since old statistics describe a different function) and feeds every step to the
:class:`~kilter.control.segments.SegmentCollector`.  The true reward goes to ``stats`` only
(metrics ``reward/true``): the agent never sees it.  ``reward_fn=None`` (reward_source=env) passes the true
reward through instead — the true-reward baseline with the same algorithm and step budget.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper

from kilter.control.segments import SegmentCollector

RewardFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


class LearnedRewardVecEnv(VecEnvWrapper):
    def __init__(
        self,
        venv: VecEnv,
        reward_fn: RewardFn | None,
        collector: SegmentCollector | None,
        record_frames: bool = False,
        normalize: bool = True,
        clip: float = 10.0,
    ):
        super().__init__(venv)
        self.reward_fn = reward_fn  # None: pass the true reward through
        self.collector = collector
        self.record_frames = record_frames
        self.normalize = normalize
        self.clip = clip
        self.rms = RunningMeanStd(shape=())
        self._last_obs: np.ndarray | None = None
        self._actions: np.ndarray | None = None
        self._frames = None
        self.reset_stats()

    def reset_stats(self) -> None:
        self.episode_true: list[float] = []
        self.learned_sum = 0.0
        self.true_sum = 0.0
        self.n_steps = 0

    def reward_model_changed(self) -> None:
        self.rms = RunningMeanStd(shape=())

    def reset(self) -> np.ndarray:
        self._last_obs = self.venv.reset()
        if self.collector is not None:
            self.collector.reset_streams()
        return self._last_obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions)
        # the frame of s_t, taken before the action moves the environment on
        self._frames = self.venv.get_images() if self.record_frames else None
        self.venv.step_async(actions)

    def step_wait(self):
        obs, true_r, dones, infos = self.venv.step_wait()
        assert self._last_obs is not None and self._actions is not None, "reset() before step()"
        prev_obs, acts = self._last_obs, self._actions
        if self.collector is not None:
            self.collector.add(prev_obs, acts, true_r, dones, self._frames)
        for info in infos:
            if "episode_true" in info:
                self.episode_true.append(float(info["episode_true"]))
        self.true_sum += float(np.sum(true_r))
        self.n_steps += len(true_r)
        if self.reward_fn is None:
            reward = np.asarray(true_r, dtype=np.float32)
        else:
            learned = self.reward_fn(prev_obs, acts)
            self.learned_sum += float(np.sum(learned))
            reward = learned
            if self.normalize:
                self.rms.update(learned.astype(np.float64))
                reward = np.clip((learned - self.rms.mean) / np.sqrt(self.rms.var + 1e-8), -self.clip, self.clip)
            reward = reward.astype(np.float32)
            for info, r in zip(infos, true_r, strict=True):
                info["true_reward"] = float(r)
        self._last_obs = obs
        return obs, reward, dones, infos
