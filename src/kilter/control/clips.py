"""Segment clips for people: the frames of a segment written as a looping animation or video (imageio).

* ``gif`` and ``webp``: animations that loop in every browser's ``<img>``, no video codec;
* ``webm`` (VP9) and ``mp4`` (H.264): real videos, encoded by the ffmpeg binary that the
  ``imageio-ffmpeg`` wheel ships (nothing is downloaded at run time); the web app plays them in
  ``<video autoplay loop muted playsinline>``.  WebM/VP9 is the safe choice: every Chromium
  build decodes it, while H.264 is missing from some Chromium builds without proprietary codecs.

Frames come from ``render_mode="rgb_array"`` (already down-scaled by the collector); for pixel
observations without frames, the last channel of the observation stack is shown.  Videos get
their height and width padded to even numbers (4:2:0 chroma needs them), with edge pixels.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

import imageio.v3 as iio
import numpy as np

from kilter.control.segments import Segment
from kilter.errors import ConfigError

ClipFormat = Literal["gif", "webp", "webm", "mp4"]
MIME = {"gif": "image/gif", "webp": "image/webp", "webm": "video/webm", "mp4": "video/mp4"}
VIDEO_FORMATS = ("webm", "mp4")
# ffmpeg encoder and its settings: constant quality, fast (clips are 1-2 s of small frames)
_VIDEO = {
    "webm": ("libvpx-vp9", ["-b:v", "0", "-crf", "30", "-deadline", "realtime", "-cpu-used", "8", "-row-mt", "0"]),
    "mp4": ("libx264", ["-crf", "23", "-preset", "veryfast", "-movflags", "+faststart"]),
}


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
    if fmt not in _VIDEO:
        raise ConfigError(f"clips.format={fmt!r}: expected one of gif, webp, webm, mp4")
    return _encode_video(frames, fps, fmt)


def _even(frames: np.ndarray) -> np.ndarray:
    """Pad height and width to even numbers by repeating the last row / column."""
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames


def require_encoder(fmt: ClipFormat) -> None:
    """ConfigError (one line, what to install) when clips in ``fmt`` cannot be written here."""
    if fmt not in VIDEO_FORMATS:
        return
    try:
        import imageio_ffmpeg  # the ffmpeg binary that imageio's FFMPEG plugin runs, shipped in its wheel

        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        raise ConfigError(
            f"clips.format={fmt} needs the imageio-ffmpeg package (pip install imageio-ffmpeg, or the control "
            "extra); clips.format=gif or webp needs nothing extra"
        ) from None


def _encode_video(frames: np.ndarray, fps: float, fmt: str) -> bytes:
    require_encoder(fmt)
    codec, params = _VIDEO[fmt]
    with tempfile.TemporaryDirectory(prefix="kilter-clip-") as tmp:
        path = Path(tmp) / f"clip.{fmt}"
        # macro_block_size=1: no resizing (the frames are already even); yuv420p: what browsers decode
        iio.imwrite(
            path,
            _even(frames),
            plugin="FFMPEG",
            fps=fps,
            codec=codec,
            pixelformat="yuv420p",
            macro_block_size=1,
            output_params=params,
            ffmpeg_log_level="error",
        )
        return path.read_bytes()


def write_clip(path: str | Path, seg: Segment, fps: float, fmt: ClipFormat = "gif") -> Path:
    path = Path(path)
    path.write_bytes(encode_clip(segment_frames(seg), fps, fmt))
    return path
