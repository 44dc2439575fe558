"""Environments by id: classic control, MuJoCo and Atari construct and render; fixed-length episodes."""

import numpy as np
import pytest

from kilter.control.envs import EnvConfig, FixedHorizon, is_image_obs, make_env, render_fps, resolve_id
from kilter.errors import ConfigError


def test_unknown_id_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="unknown environment 'NoSuchEnv-v0'") as err:
        make_env(EnvConfig(id="NoSuchEnv-v0"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["cartpole", "pendulum", "mountaincar", "acrobot"])
def test_classic_control_renders_frames(name):
    env = make_env(EnvConfig(id=name), render_mode="rgb_array")
    env.reset(seed=0)
    env.step(env.action_space.sample())
    frame = env.render()
    assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[-1] == 3
    assert render_fps(env) > 0
    env.close()


@pytest.mark.parametrize("name", ["hopper", "halfcheetah", "swimmer"])
def test_mujoco_constructs_and_renders(name):
    pytest.importorskip("mujoco", reason="MuJoCo presets need `pip install mujoco`")
    env = make_env(EnvConfig(id=name), render_mode="rgb_array")
    obs, _ = env.reset(seed=0)
    assert obs.ndim == 1 and not is_image_obs(env.observation_space)
    env.step(env.action_space.sample())
    frame = env.render()
    assert frame.shape[-1] == 3 and frame.std() > 0  # an actual picture, not a blank buffer
    env.close()


@pytest.mark.parametrize("name", ["pong", "breakout", "enduro"])
def test_atari_constructs_with_pixel_observations(name):
    pytest.importorskip("ale_py", reason="Atari presets need `pip install ale-py`")
    pytest.importorskip("cv2", reason="Atari preprocessing needs opencv-python-headless")
    env = make_env(EnvConfig(id=name), render_mode="rgb_array")
    obs, _ = env.reset(seed=0)
    assert obs.shape == (4, 84, 84) and obs.dtype == np.uint8
    assert is_image_obs(env.observation_space)
    env.step(env.action_space.sample())
    assert env.render().shape == (210, 160, 3)
    env.close()


def test_gymnasium_ids_resolve_too():
    assert resolve_id("CartPole-v1") == ("CartPole-v1", "classic")
    assert resolve_id("Hopper-v5")[1] == "mujoco"


def test_fixed_horizon_hides_termination_and_marks_failures():
    cfg = EnvConfig(id="cartpole", fixed_horizon=60, termination_penalty=-10.0)
    env = make_env(cfg)
    assert isinstance(env, FixedHorizon)
    env.reset(seed=0)
    rewards, inner_returns, steps = [], [], 0
    while True:
        # always pushing right topples the pole in ~10 steps, so 60 steps hold several falls
        _, r, terminated, truncated, info = env.step(1)
        steps += 1
        rewards.append(r)
        if "episode_true" in info:
            inner_returns.append(info["episode_true"])
        assert not terminated
        if truncated:
            break
    assert steps == 60
    falls = sum(1 for r in rewards if r < 0)
    assert falls >= 3 and all(r in (1.0, -9.0) for r in rewards)
    # true returns of underlying episodes: plain CartPole scores (no penalty), including the cut-off last one
    assert len(inner_returns) == falls + 1 and sum(inner_returns) == 60
    assert make_env(cfg, training=False).__class__.__name__ == "TrueEpisodeReturn"


def test_atari_fire_serves_after_every_lost_life():
    """Breakout serves only on FIRE: with atari_fire a policy that never fires still plays out its 5 lives."""
    pytest.importorskip("ale_py", reason="Atari presets need `pip install ale-py`")
    pytest.importorskip("cv2", reason="Atari preprocessing needs opencv-python-headless")
    lives_seen = []
    for fire in (True, False):
        env = make_env(EnvConfig(id="breakout", atari_fire=fire, max_episode_steps=4000), training=False)
        env.reset(seed=0)
        done, steps = False, 0
        while not done:
            _, _, terminated, truncated, info = env.step(0)  # NOOP only
            done, steps = terminated or truncated, steps + 1
        lives_seen.append((terminated, info["lives"], steps))
        env.close()
    assert lives_seen[0][:2] == (True, 0) and lives_seen[0][2] < 300  # game over: every ball was served and missed
    assert lives_seen[1][:2] == (False, 5)  # without FIRE the ball never comes: the time limit ends it
    with pytest.raises(ConfigError, match="no FIRE action"):
        make_env(EnvConfig(id="ALE/Freeway-v5", atari_fire=True))
