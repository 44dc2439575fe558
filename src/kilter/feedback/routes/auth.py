"""Login with a password, logout, invite links, and the liveness probe."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from kilter.feedback import security
from kilter.feedback.routes.deps import (
    FormDep,
    StoreDep,
    field,
    get_settings,
    render,
    session_user,
)
from kilter.feedback.store import UserRow
from kilter.feedback.tasks import sentence

router = APIRouter()


def safe_next(path: str | None) -> str:
    """Only same-site paths: ``//evil.example`` and ``/\\evil`` would leave the site."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    return path


def start_session(request: Request, user: UserRow) -> None:
    request.session.clear()  # a fresh session: no fixation across the login boundary
    request.session.update(uid=user.id, ep=user.session_epoch, csrf=security.new_token())


@router.get("/healthz")
def healthz():
    return JSONResponse({"ok": True})


@router.get("/favicon.ico", include_in_schema=False)
def favicon():
    return Response(status_code=204)


@router.get("/login")
def login_page(request: Request, next: str = "/"):
    if session_user(request) is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return render(request, "login.html", user=None, next=safe_next(next), error=None, username="")


@router.post("/login")
def login_submit(request: Request, form: FormDep, store: StoreDep):
    settings = get_settings(request)
    username, password, next_path = field(form, "username").strip(), field(form, "password"), safe_next(field(form, "next"))
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
    start_session(request, user)
    return RedirectResponse(next_path, status_code=303)


@router.post("/logout")
def logout(request: Request, form: FormDep):
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
    user = store.user_by_invite(token)
    if user is None:
        raise HTTPException(404, INVALID_INVITE)
    password = field(form, "password")
    if password:
        problem = security.password_problem(password)
        if problem is None and password != field(form, "password2"):
            problem = "the two passwords differ"
        if problem:
            return render(request, "invite.html", 422, user=None, invited=user, token=token, error=sentence(problem))
        store.set_password(user.username, password)
        user = store.get_user(user.id)
    start_session(request, user)
    return RedirectResponse("/", status_code=303)
