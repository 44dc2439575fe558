"""Segment clips for people: the frames of a segment written as a looping animation (imageio).

GIF and WebP loop in every browser's ``<img>`` without a video codec; mp4 needs the
``imageio-ffmpeg`` package.  Frames come from ``render_mode="rgb_array"`` (already
down-scaled by the collector); for pixel observations without frames, the last channel of
the observation stack is shown.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Literal

import imageio.v3 as iio
import numpy as np

from kilter.control.segments import Segment
from kilter.errors import ConfigError

ClipFormat = Literal["gif", "webp", "mp4"]
MIME = {"gif": "image/gif", "webp": "image/webp", "mp4": "video/mp4"}


def segment_frames(seg: Segment) -> np.ndarray:
    """(T, H, W, 3) uint8 frames of a segment; from its observations when they are pixels."""
    if seg.frames is not None:
        return seg.frames
    obs = seg.obs
    if obs.dtype == np.uint8 and obs.ndim == 4:  # (T, stack, H, W): show the newest frame of each stack
        grey = obs[:, -1]
        return np.repeat(grey[..., None], 3, axis=-1)
    raise ValueError("this segment has no frames: run with clips.keep_frames=true or labeler.kind=human")


def encode_clip(frames: np.ndarray, fps: float, fmt: ClipFormat = "gif") -> bytes:
    """Frames (T, H, W, 3) uint8 -> the bytes of a looping animation at ``fps``."""
    frames = np.asarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"expected frames of shape (T, H, W, 3), got {frames.shape}")
    fps = max(float(fps), 1.0)
    if fmt == "gif":
        # GIF frame times are in hundredths of a second; imageio's pillow plugin takes milliseconds
        return iio.imwrite("<bytes>", frames, extension=".gif", duration=1000.0 / fps, loop=0)
    if fmt == "webp":
        return iio.imwrite("<bytes>", frames, extension=".webp", duration=1000.0 / fps, loop=0)
    try:
        buf = io.BytesIO()
        iio.imwrite(buf, frames, extension=".mp4", plugin="pyav", fps=fps, codec="libx264")
        return buf.getvalue()
    except (ImportError, ModuleNotFoundError):
        raise ConfigError(
            "clips.format=mp4 needs the PyAV package (pip install av); gif and webp need nothing extra"
        ) from None


def write_clip(path: str | Path, seg: Segment, fps: float, fmt: ClipFormat = "gif") -> Path:
    path = Path(path)
    path.write_bytes(encode_clip(segment_frames(seg), fps, fmt))
    return path
