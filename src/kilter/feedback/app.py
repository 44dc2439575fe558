"""The feedback web app: server-rendered pages (FastAPI + Jinja2), no front-end build step.

``create_app(settings)`` builds everything -- engine, session key, templates -- so importing this
module has no side effects and tests can run many apps side by side.

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

from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.datastructures import FormData, MutableHeaders
from starlette.middleware.sessions import SessionMiddleware
from starlette.staticfiles import StaticFiles

from kilter.errors import KilterError
from kilter.feedback import security
from kilter.feedback.settings import ServeConfig
from kilter.feedback.store import ProjectRow, Store, UserRow
from kilter.feedback.tasks import (
    FLAGS,
    PAIRWISE_CHOICES,
    SCORE_RANGE,
    TASK_TITLES,
    FormError,
    letter,
    parse_submission,
    sentence,
)

HERE = Path(__file__).resolve().parent

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


class LoginRequired(Exception):
    def __init__(self, next_path: str = "/"):
        self.next_path = next_path


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
                headers = MutableHeaders(scope=message)
                headers["Content-Security-Policy"] = CSP
                headers["X-Content-Type-Options"] = "nosniff"
                headers["X-Frame-Options"] = "DENY"
                headers["Referrer-Policy"] = "no-referrer"  # invite tokens live in URLs
                headers["Cross-Origin-Opener-Policy"] = "same-origin"
                if not static:
                    headers["Cache-Control"] = "no-store"
                if self.hsts:
                    headers["Strict-Transport-Security"] = "max-age=31536000"
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _safe_next(path: str | None) -> str:
    """Only same-site paths: ``//evil.example`` and ``/\\evil`` would leave the site."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    return path


def _pct(pair: tuple[int, int]) -> str:
    return f"{100 * pair[0] / pair[1]:.0f}%" if pair[1] else "–"


def create_app(settings: ServeConfig | None = None, store: Store | None = None) -> FastAPI:
    """Build the app. ``store`` may be passed to share one engine with the caller (tests)."""
    settings = settings or ServeConfig()
    store = store or Store(settings.db)
    if settings.migrate:
        store.migrate()
    secret = settings.secret_key or store.secret("session_key", lambda: security.new_token(48))
    env = Environment(loader=FileSystemLoader(str(HERE / "templates")), autoescape=True, auto_reload=False,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.globals.update(letter=letter, pct=_pct, flags=FLAGS, choices=PAIRWISE_CHOICES, score_range=SCORE_RANGE,
                       task_titles=TASK_TITLES)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        store.close()

    app = FastAPI(title="Kilter feedback", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.store = store
    app.state.settings = settings
    app.add_middleware(SessionMiddleware, secret_key=secret, session_cookie="kilter_session",
                       max_age=settings.session_max_age_s, same_site="lax", https_only=settings.secure_cookies)
    app.add_middleware(SecurityHeaders, hsts=settings.secure_cookies)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    # ------------------------------------------------------------------ helpers

    def csrf_token(request: Request) -> str:
        token = request.session.get("csrf")
        if not token:
            token = request.session["csrf"] = security.new_token()
        return token

    def session_user(request: Request) -> UserRow | None:
        uid = request.session.get("uid")
        if uid is None:
            return None
        user = store.get_user(uid)
        if user is None or not user.active or user.session_epoch != request.session.get("ep"):
            request.session.clear()
            return None
        return user

    def render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        context.setdefault("user", session_user(request))
        html = env.get_template(template).render(request=request, csrf=csrf_token(request), **context)
        return HTMLResponse(html, status_code=status)

    def require_user(request: Request) -> UserRow:
        user = session_user(request)
        if user is None:
            raise LoginRequired(request.url.path)
        return user

    def require_admin(user: UserRow = Depends(require_user)) -> UserRow:
        if not user.is_admin:
            raise HTTPException(403, "This page is for administrators.")
        return user

    async def checked_form(request: Request) -> FormData:
        """The POSTed form, after checking its CSRF token against the session's."""
        form = await request.form()
        token = form.get("csrf_token")
        if not security.same_token(token if isinstance(token, str) else None, request.session.get("csrf")):
            raise HTTPException(403, "The form has expired or did not come from this site. Reload the page and try again.")
        return form

    def project_for(user: UserRow, name: str) -> ProjectRow:
        project, allowed = store.project_access(name, user)
        if project is None:
            raise HTTPException(404, f"There is no project named {name!r}.")
        if not allowed:
            raise HTTPException(403, "You are not a member of this project.")
        return project

    def login(request: Request, user: UserRow) -> None:
        request.session.clear()  # a fresh session: no fixation across the login boundary
        request.session.update(uid=user.id, ep=user.session_epoch, csrf=security.new_token())

    def field(form: FormData, name: str) -> str:
        value = form.get(name)
        return value if isinstance(value, str) else ""

    # ------------------------------------------------------------------ errors

    @app.exception_handler(LoginRequired)
    async def _login_required(request: Request, exc: LoginRequired):
        return RedirectResponse(f"/login?next={quote(exc.next_path)}", status_code=303)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        titles = {403: "Not allowed", 404: "Not found", 405: "Method not allowed", 409: "Conflict", 429: "Slow down"}
        return render(request, "error.html", exc.status_code, title=titles.get(exc.status_code, "Error"),
                      message=exc.detail)

    # ------------------------------------------------------------------ login

    @app.get("/healthz")
    def healthz():
        return JSONResponse({"ok": True})

    @app.get("/login")
    def login_page(request: Request, next: str = "/"):
        if session_user(request) is not None:
            return RedirectResponse(_safe_next(next), status_code=303)
        return render(request, "login.html", user=None, next=_safe_next(next), error=None, username="")

    @app.post("/login")
    def login_submit(request: Request, form: FormData = Depends(checked_form)):
        username, password, next_path = field(form, "username").strip(), field(form, "password"), _safe_next(field(form, "next"))
        client = request.client.host if request.client else "?"
        key = f"{username.lower()}|{client}"

        def again(status: int, error: str) -> HTMLResponse:
            return render(request, "login.html", status, user=None, next=next_path, error=error, username=username)

        if store.login_failures(key, settings.login_window_s) >= settings.login_max_failures:
            return again(429, "Too many failed attempts. Wait a minute and try again.")
        user = store.check_password(username, password) if username and password else None
        if user is None:
            store.add_login_failure(key, settings.login_window_s)
            return again(401, "Wrong username or password.")
        store.clear_login_failures(key)
        login(request, user)
        return RedirectResponse(next_path, status_code=303)

    @app.post("/logout")
    def logout(request: Request, form: FormData = Depends(checked_form)):
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    @app.get("/invite/{token}")
    def invite_page(request: Request, token: str):
        user = store.user_by_invite(token)
        if user is None:
            raise HTTPException(404, "This invite link is not valid or has expired. Ask your project admin for a new one.")
        return render(request, "invite.html", user=None, invited=user, token=token, error=None)

    @app.post("/invite/{token}")
    def invite_submit(request: Request, token: str, form: FormData = Depends(checked_form)):
        user = store.user_by_invite(token)
        if user is None:
            raise HTTPException(404, "This invite link is not valid or has expired. Ask your project admin for a new one.")
        password = field(form, "password")
        if password:
            problem = security.password_problem(password)
            if problem is None and password != field(form, "password2"):
                problem = "the two passwords differ"
            if problem:
                return render(request, "invite.html", 422, user=None, invited=user, token=token, error=sentence(problem))
            store.set_password(user.username, password)
            user = store.get_user(user.id)
        login(request, user)
        return RedirectResponse("/", status_code=303)

    # ------------------------------------------------------------------ annotators

    @app.get("/")
    def home(request: Request, user: UserRow = Depends(require_user)):
        rows = []
        for project in store.projects(user):
            progress = store.progress(project)
            rows.append({"project": project, "progress": progress, "mine": progress.per_user.get(user.username, 0)})
        return render(request, "home.html", user=user, rows=rows)

    def task_page(request: Request, user: UserRow, project: ProjectRow, view, status: int = 200,
                  error: str | None = None, values: dict[str, str] | None = None) -> HTMLResponse:
        return render(request, f"task_{project.task}.html", status, user=user, project=project, view=view,
                      done=store.done_count(project.id, user.id), saved=request.query_params.get("saved") == "1",
                      error=error, values=values or {})

    @app.get("/p/{name}")
    def task(request: Request, name: str, user: UserRow = Depends(require_user)):
        project = project_for(user, name)
        view = store.next_task(project, user, settings.assignment_timeout_s)
        if view is None:
            return render(request, "done.html", user=user, project=project, done=store.done_count(project.id, user.id))
        return task_page(request, user, project, view)

    @app.post("/p/{name}/submit")
    def submit(request: Request, name: str, form: FormData = Depends(checked_form), user: UserRow = Depends(require_user)):
        project = project_for(user, name)
        try:
            assignment_id = int(field(form, "assignment_id"))
        except ValueError:
            raise HTTPException(400, "The form has no task id.") from None

        def get(key: str) -> list[str]:
            return [v for v in form.getlist(key) if isinstance(v, str)]

        try:
            store.submit(project, user, assignment_id, lambda shown: parse_submission(project.task, get, shown))
        except FormError as exc:
            view = store.open_task(assignment_id, user)
            if view is None:
                raise HTTPException(409, "This task is not assigned to you.") from None
            values = {"text": field(form, "text"), "comment": field(form, "comment")}
            return task_page(request, user, project, view, 422, error=sentence(str(exc)), values=values)
        except KilterError as exc:
            raise HTTPException(409, sentence(str(exc))) from None
        return RedirectResponse(f"/p/{quote(project.name)}?saved=1", status_code=303)

    @app.post("/p/{name}/skip")
    def skip(request: Request, name: str, form: FormData = Depends(checked_form), user: UserRow = Depends(require_user)):
        project = project_for(user, name)
        try:
            store.skip(project, user, int(field(form, "assignment_id")))
        except ValueError:
            raise HTTPException(400, "The form has no task id.") from None
        return RedirectResponse(f"/p/{quote(project.name)}", status_code=303)

    # ------------------------------------------------------------------ admin

    from kilter.feedback import admin_views  # noqa: E402  (kept apart to keep this file short)

    admin_views.register(app, store, settings, render=render, require_admin=require_admin,
                         checked_form=checked_form, field=field)

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return Response(status_code=204)

    return app
