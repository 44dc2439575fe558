"""Login with a password, logout, invite links, and the liveness probe."""

from __future__ import annotations

from contextlib import contextmanager
from urllib.parse import urlsplit

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Match

from kilter.feedback import security
from kilter.feedback.routes.deps import (
    FormDep,
    StoreDep,
    field,
    get_settings,
    get_store,
    render,
    session_user,
)
from kilter.feedback.store import UserRow
from kilter.feedback.tasks import sentence

router = APIRouter()


def safe_next(path: str | None, request: Request | None = None) -> str:
    """Only same-site paths (``//evil.example`` and ``/\\evil`` would leave the site) of pages a GET
    can open: ``next=/p/x/submit`` would land on a 405 after logging in."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    if request is not None:
        scope = {"type": "http", "method": "GET", "path": urlsplit(path).path, "root_path": ""}
        if not any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            return "/"
    return path


def start_session(request: Request, user: UserRow) -> None:
    """A fresh server-side session (no fixation across the login boundary) with an absolute lifetime."""
    sid = get_store(request).start_session(user.id, get_settings(request).session_max_age_s)
    request.session.clear()
    request.session.update(sid=sid, csrf=security.new_token())


def client_address(request: Request) -> str:
    return request.client.host if request.client else "?"


@contextmanager
def password_check_slot(request: Request):
    """One of the few Argon2 checks allowed at once: each costs 64 MiB, so a login flood must queue."""
    slots = request.app.state.password_check_slots
    if not slots.acquire(timeout=get_settings(request).password_check_wait_s):
        raise HTTPException(503, "The server is busy checking other logins. Try again in a moment.")
    try:
        yield
    finally:
        slots.release()


@router.api_route("/healthz", methods=["GET", "HEAD"])
def healthz():
    return JSONResponse({"ok": True})


@router.get("/favicon.ico", include_in_schema=False)
def favicon():
    return Response(status_code=204)


@router.get("/login")
def login_page(request: Request, next: str = "/"):
    if session_user(request) is not None:
        return RedirectResponse(safe_next(next, request), status_code=303)
    return render(request, "login.html", user=None, next=safe_next(next, request), error=None, username="")


@router.post("/login")
def login_submit(request: Request, form: FormDep, store: StoreDep):
    settings = get_settings(request)
    username, password, next_path = field(form, "username").strip(), field(form, "password"), safe_next(field(form, "next"), request)
    client = client_address(request)
    user_key = f"{username.lower()}|{client}"

    def again(status: int, error: str) -> HTMLResponse:
        return render(request, "login.html", status, user=None, next=next_path, error=error, username=username)

    if not username or not password:
        return again(401, "Wrong username or password.")
    attempt = store.take_login_attempt({user_key: settings.login_max_failures,
                                        f"address|{client}": settings.login_max_attempts_per_address},
                                       settings.login_window_s)
    if attempt is None:
        return again(429, "Too many failed attempts. Wait a minute and try again.")
    with password_check_slot(request):
        user = store.check_password(username, password)
    if user is None:
        return again(401, "Wrong username or password.")
    store.login_succeeded(attempt, user_key)
    start_session(request, user)
    return RedirectResponse(next_path, status_code=303)


@router.post("/logout")
def logout(request: Request, form: FormDep, store: StoreDep):
    sid = request.session.get("sid")
    if isinstance(sid, str):
        store.end_session(sid)  # a copy of the cookie stops working too
    request.session.clear()
    return RedirectResponse("/login", status_code=303)


INVALID_INVITE = "This invite link is not valid or has expired. Ask your project admin for a new one."


@router.get("/invite/{token}")
def invite_page(request: Request, token: str, store: StoreDep):
    user = store.user_by_invite(token)
    if user is None:
        raise HTTPException(404, INVALID_INVITE)
    return render(request, "invite.html", user=None, invited=user, token=token, error=None)


@router.post("/invite/{token}")
def invite_submit(request: Request, token: str, form: FormDep, store: StoreDep):
    invited = store.user_by_invite(token)
    if invited is None:
        raise HTTPException(404, INVALID_INVITE)
    password = field(form, "password")
    problem = security.password_problem(password) if password else None
    if problem is None and password != field(form, "password2"):
        problem = "the two passwords differ"
    if problem:
        return render(request, "invite.html", 422, user=None, invited=invited, token=token, error=sentence(problem))
    with password_check_slot(request):
        user = store.redeem_invite(token, password or None)
    if user is None:  # used up by a concurrent request
        raise HTTPException(404, INVALID_INVITE)
    start_session(request, user)
    return RedirectResponse("/", status_code=303)
