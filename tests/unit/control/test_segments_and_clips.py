"""Cutting step streams into segments, and segments into looping clips."""

import io
import sys

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from kilter.control.clips import encode_clip, segment_frames, write_clip
from kilter.control.envs import EnvConfig, make_env
from kilter.control.segments import Segment, SegmentCollector
from kilter.errors import ConfigError


def test_segments_never_span_an_episode_end_and_the_pool_keeps_the_latest():
    col = SegmentCollector(n_envs=2, length=3, pool_size=4)
    for t in range(10):
        obs = np.array([[t, 0.0], [t, 1.0]], dtype=np.float32)
        dones = np.array([t == 4, False])  # env 0's episode ends after step 4
        col.add(obs, np.array([0, 1]), np.array([1.0, 2.0]), dones)
    # env 0: steps 0-2 (cut), 3-4 dropped at the reset, 5-7 (cut), 8-9 open; env 1: 0-2, 3-5, 6-8
    assert col.n_made == 5
    assert len(col.pool) == 4
    for s in col.pool:
        assert s.length == 3 and s.obs.shape == (3, 2)
        t = s.obs[:, 0]
        assert (np.diff(t) == 1).all()
        if s.obs[0, 1] == 0.0:
            assert not (t.min() <= 4 < t.max())  # env 0 never crosses its reset after step 4
    assert sorted(s.uid for s in col.pool) == [1, 2, 3, 4]


def test_clip_of_a_rendered_cartpole_segment_loops():
    env = make_env(EnvConfig(id="cartpole"), render_mode="rgb_array")
    env.reset(seed=0)
    frames = []
    for _ in range(8):
        frames.append(env.render()[::4, ::4])
        env.step(env.action_space.sample())
    seg = Segment(
        obs=np.zeros((8, 4), np.float32), acts=np.zeros(8, np.int64), true_rewards=np.ones(8), frames=np.stack(frames)
    )
    for fmt in ("gif", "webp"):
        data = encode_clip(segment_frames(seg), fps=25, fmt=fmt)
        img = Image.open(io.BytesIO(data))
        assert img.info.get("loop") == 0  # loops forever
        assert img.size == (frames[0].shape[1], frames[0].shape[0])
        if fmt == "webp":
            assert 2 <= img.n_frames <= 8 and img.is_animated  # WebP merges repeated frames as well
            continue
        # GIF merges identical consecutive frames, but the clip still lasts 8 frames at 25 fps
        total_ms = 0
        for i in range(img.n_frames):
            img.seek(i)
            total_ms += img.info["duration"]
        assert total_ms == 8 * 40


def test_pixel_observations_make_a_clip_without_rendering(tmp_path):
    obs = np.random.default_rng(0).integers(0, 255, size=(5, 4, 84, 84), dtype=np.uint8)
    seg = Segment(obs=obs, acts=np.zeros(5, np.int64), true_rewards=np.zeros(5))
    path = write_clip(tmp_path / "x.gif", seg, fps=10)
    img = Image.open(path)
    assert img.n_frames == 5 and img.size == (84, 84)


@pytest.mark.parametrize(("fmt", "codec"), [("webm", "vp9"), ("mp4", "h264")])
def test_video_clip_keeps_every_frame_and_the_duration(fmt, codec):
    """WebM/VP9 and MP4/H.264 through imageio-ffmpeg's own ffmpeg: T frames at fps last T / fps seconds."""
    pytest.importorskip("imageio_ffmpeg", reason="video clips need imageio-ffmpeg (the control extra)")
    env = make_env(EnvConfig(id="cartpole"), render_mode="rgb_array")
    env.reset(seed=0)
    frames = []
    for _ in range(10):
        frames.append(env.render()[::4, ::4][:-1, :-1])  # 99 x 149: odd, padded to even for 4:2:0 chroma
        env.step(env.action_space.sample())
    env.close()
    frames = np.stack(frames)
    data = encode_clip(frames, fps=25, fmt=fmt)
    meta = iio.immeta(data, extension=f".{fmt}", plugin="FFMPEG")
    assert meta["codec"] == codec and meta["fps"] == 25.0
    assert meta["duration"] == pytest.approx(10 / 25, abs=0.02)
    decoded = iio.imread(data, extension=f".{fmt}", plugin="FFMPEG", index=None)
    assert decoded.shape == (10, 100, 150, 3)
    # the picture survives lossy coding: the cart and pole are where they were
    err = np.abs(decoded[:, :99, :149].astype(int) - frames.astype(int)).mean()
    assert err < 6.0


def test_video_clip_without_imageio_ffmpeg_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match="clips.format=webm needs the imageio-ffmpeg package"):
        encode_clip(np.zeros((2, 4, 4, 3), np.uint8), fps=10, fmt="webm")
    encode_clip(np.zeros((2, 4, 4, 3), np.uint8), fps=10, fmt="gif")  # animations need nothing extra
