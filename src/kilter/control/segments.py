"""Trajectory segments: the unit a labeler compares (Christiano et al. 2017 use 1-2 s clips).

A :class:`Segment` holds ``T`` consecutive steps of one environment: the observation *before*
each action, the action, the true reward (hidden from the agent; only the synthetic labeler and
the metrics read it) and, when clips are wanted, the rendered frame of each observation.
:class:`SegmentCollector` cuts the stream of a vectorised environment into such segments and
keeps the most recent ones in a pool that queries are drawn from.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Segment:
    """``T`` steps of one environment, never crossing an episode boundary."""

    obs: np.ndarray  # (T, *obs_shape)
    acts: np.ndarray  # (T, *act_shape)
    true_rewards: np.ndarray  # (T,)
    frames: np.ndarray | None = None  # (T, H, W, 3) uint8, or None when no clips are rendered
    uid: int = -1  # position in the stream of segments of a run (stable across a resume)

    @property
    def length(self) -> int:
        return len(self.true_rewards)

    @property
    def true_return(self) -> float:
        return float(self.true_rewards.sum())


def stack_segments(segments: Sequence[Segment]) -> tuple[np.ndarray, np.ndarray]:
    """(P, T, *obs_shape), (P, T, *act_shape) arrays of equal-length segments."""
    return np.stack([s.obs for s in segments]), np.stack([s.acts for s in segments])


@dataclass
class _Open:
    obs: list = field(default_factory=list)
    acts: list = field(default_factory=list)
    rewards: list = field(default_factory=list)
    frames: list = field(default_factory=list)


class SegmentCollector:
    """Cut ``n_envs`` parallel step streams into segments of ``length`` steps; keep the last ``pool_size``.

    Call :meth:`add` once per vectorised step with the observations the actions were taken in.
    A stream is cut when it reaches ``length`` steps or its episode ends (a shorter remainder is
    dropped, so a segment never spans a reset).
    """

    def __init__(self, n_envs: int, length: int, pool_size: int, frame_downscale: int = 2):
        if length < 1 or pool_size < 2:
            raise ValueError("segment length must be >= 1 and the pool must hold at least 2 segments")
        self.length = length
        self.frame_downscale = max(1, frame_downscale)
        self.pool: deque[Segment] = deque(maxlen=pool_size)
        self._open = [_Open() for _ in range(n_envs)]
        self.n_made = 0

    def add(
        self,
        obs: np.ndarray,
        acts: np.ndarray,
        true_rewards: np.ndarray,
        dones: np.ndarray,
        frames: Sequence[np.ndarray] | None = None,
    ) -> None:
        for i, stream in enumerate(self._open):
            stream.obs.append(np.array(obs[i], copy=True))
            stream.acts.append(np.array(acts[i], copy=True))
            stream.rewards.append(float(true_rewards[i]))
            if frames is not None:
                k = self.frame_downscale
                stream.frames.append(np.ascontiguousarray(frames[i][::k, ::k]))
            if len(stream.rewards) == self.length:
                self.pool.append(
                    Segment(
                        obs=np.stack(stream.obs),
                        acts=np.stack(stream.acts),
                        true_rewards=np.asarray(stream.rewards, dtype=np.float64),
                        frames=np.stack(stream.frames) if stream.frames else None,
                        uid=self.n_made,
                    )
                )
                self.n_made += 1
                self._open[i] = stream = _Open()
            if dones[i]:
                self._open[i] = _Open()

    def reset_streams(self) -> None:
        """Forget half-built segments (the environments were reset)."""
        self._open = [_Open() for _ in self._open]
