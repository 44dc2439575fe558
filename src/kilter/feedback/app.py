"""The feedback web app: server-rendered pages (FastAPI + Jinja2), no front-end build step.

``create_app(settings)`` builds everything -- engine, session key, templates -- puts it on
``app.state`` and includes the routers of :mod:`kilter.feedback.routes`, whose dependencies read
it back from ``request.app.state``. Importing this module has no side effects, so tests can run
many apps side by side.

Security model (see docs/feedback.md):

* every page except login and invite links needs a session (a signed cookie holding the user
  id, a per-user epoch that is bumped to log a user out everywhere, and a CSRF token);
* every POST carries the session's CSRF token in a hidden field; requests without it get 403;
* wrong passwords are counted per (username, client address) in the database: after
  ``login_max_failures`` within ``login_window_s`` further attempts get 429;
* annotators see only projects they are members of and never the admin pages (403);
* model outputs are plain text rendered through Jinja's autoescaping, and a
  Content-Security-Policy allows scripts only from ``/static``, so an output containing
  ``<script>`` is shown, not run.
"""

from __future__ import annotations

import threading
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.sessions import SessionMiddleware
from starlette.staticfiles import StaticFiles

from kilter.feedback import render as render_text
from kilter.feedback import security
from kilter.feedback.routes import admin, annotate, api, auth, loop_status, review
from kilter.feedback.routes.deps import LoginRequired, render
from kilter.feedback.settings import ServeConfig
from kilter.feedback.store import Store
from kilter.feedback.tasks import (
    FLAGS,
    PAIRWISE_CHOICES,
    SCORE_RANGE,
    TASK_TITLES,
    answer_summary,
    letter,
)

HERE = Path(__file__).resolve().parent

# media-src data: is for the "compare two clips" task, whose WebM/MP4 clips are embedded as data: URIs
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; media-src data:; "
       "connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


def add_security_headers(headers: MutableHeaders, *, static: bool = False, hsts: bool = False) -> None:
    headers["Content-Security-Policy"] = CSP
    headers["X-Content-Type-Options"] = "nosniff"
    headers["X-Frame-Options"] = "DENY"
    headers["Referrer-Policy"] = "no-referrer"  # invite tokens live in URLs
    headers["Cross-Origin-Opener-Policy"] = "same-origin"
    if not static:
        headers["Cache-Control"] = "no-store"
    if hsts:
        headers["Strict-Transport-Security"] = "max-age=31536000"


class SecurityHeaders:
    """Pure ASGI middleware adding CSP and friends to every response."""

    def __init__(self, app, hsts: bool = False):
        self.app = app
        self.hsts = hsts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        static = scope["path"].startswith("/static/")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                add_security_headers(MutableHeaders(scope=message), static=static, hsts=self.hsts)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _pct(pair: tuple[int, int]) -> str:
    return f"{100 * pair[0] / pair[1]:.0f}%" if pair[1] else "–"


def templates() -> Environment:
    env = Environment(loader=FileSystemLoader(str(HERE / "templates")), autoescape=True, auto_reload=False,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.globals.update(letter=letter, pct=_pct, flags=FLAGS, choices=PAIRWISE_CHOICES, score_range=SCORE_RANGE,
                       task_titles=TASK_TITLES, answer_summary=answer_summary)
    env.filters.update(markdown=render_text.markdown, plain=render_text.plain)
    env.globals.update(diff_html=render_text.diff_html)
    return env


TITLES = {400: "Bad request", 403: "Not allowed", 404: "Not found", 405: "Method not allowed", 409: "Conflict",
          422: "Bad request", 429: "Slow down", 500: "Something went wrong", 503: "Busy"}


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/")


async def _login_required(request: Request, exc: LoginRequired):
    if _wants_json(request):
        return JSONResponse({"error": "log in or send Authorization: Bearer TOKEN"}, status_code=401)
    return RedirectResponse(f"/login?next={quote(exc.next_path)}", status_code=303)


async def _http_error(request: Request, exc: StarletteHTTPException):
    """Every HTTP error, the router's own 404 and 405 included, as the app's page (JSON under /api/)."""
    if _wants_json(request):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)
    message = exc.detail
    if exc.status_code == 404 and message == "Not Found":
        message = "There is no page at this address."
    elif exc.status_code == 405:
        message = f"This address does not take {request.method} requests."
    return render(request, "error.html", exc.status_code, title=TITLES.get(exc.status_code, "Error"), message=message)


async def _bad_parameters(request: Request, exc: RequestValidationError):
    problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg', 'invalid')}"
                         for e in exc.errors())
    if _wants_json(request):
        return JSONResponse({"error": problems}, status_code=422)
    return render(request, "error.html", 422, title=TITLES[422], message=f"The request has a bad parameter ({problems}).")


async def _server_error(request: Request, exc: Exception):
    """Last resort for a bug: the app's page with the security headers, never a bare traceback.

    Starlette runs this outside every middleware (the session and the headers included), so the
    page is rendered without a session and the headers are added here.
    """
    settings = request.app.state.settings
    if _wants_json(request):
        response = JSONResponse({"error": "internal error"}, status_code=500)
    else:
        html = request.app.state.templates.get_template("error.html").render(
            request=request, user=None, csrf="", title=TITLES[500],
            message="The server hit a problem and did not finish your request. Try again; if it keeps happening, tell your admin.")
        response = HTMLResponse(html, status_code=500)
    add_security_headers(response.headers, hsts=settings.secure_cookies)
    return response


@asynccontextmanager
async def _lifespan(app: FastAPI):
    yield
    app.state.store.close()


def create_app(settings: ServeConfig | None = None, store: Store | None = None) -> FastAPI:
    """Build the app. ``store`` may be passed to share one engine with the caller (tests)."""
    settings = settings or ServeConfig()
    store = store or Store(settings.db)
    if settings.migrate:
        store.migrate()
    secret = settings.secret_key or store.secret("session_key", lambda: security.new_token(48))

    app = FastAPI(title="Kilter feedback", docs_url=None, redoc_url=None, openapi_url=None, lifespan=_lifespan)
    app.state.store = store
    app.state.settings = settings
    app.state.templates = templates()
    app.state.password_check_slots = threading.BoundedSemaphore(settings.password_check_slots)
    app.add_middleware(SessionMiddleware, secret_key=secret, session_cookie="kilter_session",
                       max_age=settings.session_max_age_s, same_site="lax", https_only=settings.secure_cookies)
    app.add_middleware(SecurityHeaders, hsts=settings.secure_cookies)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.add_exception_handler(LoginRequired, _login_required)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _bad_parameters)
    app.add_exception_handler(500, _server_error)
    for module in (auth, annotate, admin, api, review, loop_status):
        app.include_router(module.router)

    return app
