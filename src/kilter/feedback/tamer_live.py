"""``kilter tamer-live``: train TAMER with a person — a page plays the environment live and takes key presses.

A small app of its own (``create_tamer_app(cfg)``), separate from the labeling app: one trainer,
on this machine (it binds 127.0.0.1 unless told otherwise).  The TAMER loop
(:func:`kilter.control.tamer.run_tamer`) runs in a background thread holding each step on screen
for ``tamer.step_s`` seconds; the page shows the newest frame and sends ``+`` / ``-`` presses,
each stamped on arrival with the server's clock, which the credit window turns into credit for
the steps shown 0.2-4 s before.  Presses are JSON POSTs, so another site cannot forge them
without a CORS preflight this app never answers.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from jinja2 import Environment, FileSystemLoader
from pydantic import Field
from starlette.staticfiles import StaticFiles

from kilter.config import BaseConfig
from kilter.control.tamer import TamerConfig, run_tamer

HERE = Path(__file__).resolve().parent
CSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'"


class TamerLiveConfig(BaseConfig):
    """Serve the live TAMER page and train on the presses of the person watching it."""

    host: str = "127.0.0.1"
    """Interface to listen on (the trainer's own machine by default)."""
    port: int = Field(8765, gt=0, lt=65536)
    """Port of the page."""
    tamer: TamerConfig = TamerConfig(trainer="human", step_s=0.4)


class LiveSession:
    """What the page and the training thread share: the newest frame, the presses not yet used, progress."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._frame: bytes | None = None
        self._presses: list[tuple[float, float]] = []
        self.pressed = 0
        self.used = 0  # presses handed to the training loop
        self.done = False
        self.error: str | None = None
        self.metrics: dict = {}

    def set_frame(self, frame: np.ndarray) -> None:
        png = iio.imwrite("<bytes>", np.asarray(frame, dtype=np.uint8), extension=".png")
        with self._lock:
            self._frame = png

    def frame(self) -> bytes | None:
        with self._lock:
            return self._frame

    def press(self, h: float) -> None:
        with self._lock:
            self._presses.append((time.monotonic(), h))
            self.pressed += 1

    def take(self, _now: float) -> list[tuple[float, float]]:
        with self._lock:
            out, self._presses = self._presses, []
            self.used += len(out)
        return out


def create_tamer_app(cfg: TamerLiveConfig, session: LiveSession | None = None) -> FastAPI:
    session = session or LiveSession()
    tamer_cfg = cfg.tamer.model_copy(update={"trainer": "human"})
    templates = Environment(loader=FileSystemLoader(str(HERE / "templates")), autoescape=True)

    def train() -> None:
        try:
            session.metrics = run_tamer(tamer_cfg, presses=session.take, on_frame=session.set_frame)
        finally:
            session.done = True

    async def lifespan(_app):
        threading.Thread(target=train, name="tamer", daemon=True).start()
        yield

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @app.middleware("http")
    async def headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.get("/")
    def page():
        return HTMLResponse(
            templates.get_template("tamer_live.html").render(
                env=tamer_cfg.env.id, step_s=tamer_cfg.step_s, episodes=tamer_cfg.episodes
            )
        )

    @app.get("/frame")
    def frame():
        png = session.frame()
        if png is None:
            raise HTTPException(404, "no frame yet")
        return Response(png, media_type="image/png")

    @app.post("/press")
    async def press(request: Request):
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise HTTPException(415, "send JSON")
        body = await request.json()
        h = body.get("h") if isinstance(body, dict) else None
        if h not in (1, -1):
            raise HTTPException(422, "h must be 1 or -1")
        session.press(float(h))
        return status()

    @app.get("/status")
    def status():
        return JSONResponse(
            {
                "presses": session.pressed,
                "used": session.used,
                "done": session.done,
                **{k: v for k, v in session.metrics.items() if isinstance(v, (int, float))},
            }
        )

    app.state.session = session
    return app


def run(cfg: TamerLiveConfig) -> int:
    import uvicorn

    app = create_tamer_app(cfg)
    print(f"TAMER live page on http://{cfg.host}:{cfg.port} (press + or - while the agent acts)", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    return 0
