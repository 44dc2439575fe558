"""Control tests render MuJoCo off-screen (EGL) and need no display."""

import os

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
