"""Dependencies shared by the routers: everything comes from ``request.app.state``, set by ``create_app``.

``app.state`` holds ``store`` (:class:`~kilter.feedback.store.Store`), ``settings``
(:class:`~kilter.feedback.settings.ServeConfig`) and ``templates`` (the Jinja2 environment), so a
view never closes over the factory's locals and any number of apps can live side by side.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment
from starlette.datastructures import FormData

from kilter.feedback import security
from kilter.feedback.settings import ServeConfig
from kilter.feedback.store import ProjectRow, Store, UserRow


class LoginRequired(Exception):
    """Raised by :func:`require_user`; the app answers with a redirect to the login page."""

    def __init__(self, next_path: str = "/"):
        self.next_path = next_path


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_settings(request: Request) -> ServeConfig:
    return request.app.state.settings


def csrf_token(request: Request) -> str:
    token = request.session.get("csrf")
    if not token:
        token = request.session["csrf"] = security.new_token()
    return token


def session_user(request: Request) -> UserRow | None:
    """The logged-in user, or None (and the cookie is emptied) when the session ended, expired or was revoked."""
    sid = request.session.get("sid")
    if not isinstance(sid, str):
        return None
    user = get_store(request).session_user(sid)
    if user is None:
        request.session.clear()
    return user


def render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    env: Environment = request.app.state.templates
    context.setdefault("user", session_user(request))
    html = env.get_template(template).render(request=request, csrf=csrf_token(request), **context)
    return HTMLResponse(html, status_code=status)


def require_user(request: Request) -> UserRow:
    user = session_user(request)
    if user is None:
        # after logging in, a POST cannot be repeated: go back to the page the form was on
        path = request.url.path
        raise LoginRequired(path if request.method in ("GET", "HEAD") else path.rsplit("/", 1)[0] or "/")
    return user


MAX_ID = 2**63 - 1  # the largest id a database integer column holds


def form_id(form: FormData, name: str) -> int:
    """A positive integer id from a form field; 400 (never a database overflow) when it is not one."""
    value = field(form, name)
    if not value.isdigit() or not 0 < int(value) <= MAX_ID:
        raise HTTPException(400, f"The form has no valid {name.replace('_', ' ')}. Reload the page and try again.")
    return int(value)


def require_admin(user: Annotated[UserRow, Depends(require_user)]) -> UserRow:
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


def field(form: FormData, name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


def project_for(store: Store, user: UserRow, name: str) -> ProjectRow:
    """The project ``name`` if ``user`` may work on it: 404 when there is none, 403 when not a member."""
    project, allowed = store.project_access(name, user)
    if project is None:
        raise HTTPException(404, f"There is no project named {name!r}.")
    if not allowed:
        raise HTTPException(403, "You are not a member of this project.")
    return project


# Parameter types for the views: ``def view(user: UserDep, store: StoreDep, form: FormDep)``.
StoreDep = Annotated[Store, Depends(get_store)]
UserDep = Annotated[UserRow, Depends(require_user)]
AdminDep = Annotated[UserRow, Depends(require_admin)]
FormDep = Annotated[FormData, Depends(checked_form)]
