"""Admin pages: projects with progress, agreement and flagged annotators, leaderboard, users, export."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import RedirectResponse, Response

from kilter.errors import KilterError
from kilter.feedback import analysis, export
from kilter.feedback.routes.deps import (
    AdminDep,
    FormDep,
    StoreDep,
    field,
    get_settings,
    get_store,
    render,
)
from kilter.feedback.store import ProjectRow, Store, UserRow
from kilter.feedback.tasks import sentence

router = APIRouter(prefix="/admin")


def project_or_404(store: Store, name: str) -> ProjectRow:
    try:
        return store.project(name)
    except KilterError:
        raise HTTPException(404, f"There is no project named {name!r}.") from None


def admin_page(request: Request, user: UserRow, status: int = 200, **extra):
    store = get_store(request)
    rows = [{"project": p, "progress": store.progress(p), "members": len(store.members(p.id))}
            for p in store.projects()]
    flash = request.session.pop("flash", None) or {}  # the result of the POST that redirected here
    extra.setdefault("notice", flash.get("notice"))
    extra.setdefault("link", flash.get("link"))
    extra.setdefault("error", None)
    return render(request, "admin.html", status, user=user, rows=rows, users=store.users(), **extra)


def invite_url(request: Request, token: str) -> str:
    return str(request.base_url).rstrip("/") + f"/invite/{token}"


def done(request: Request, notice: str, link: str | None = None) -> RedirectResponse:
    """Post/redirect/get: a reload of the result page shows it again instead of repeating the POST."""
    request.session["flash"] = {"notice": notice, "link": link}
    return RedirectResponse("/admin", status_code=303)


@router.get("")
def admin(request: Request, user: AdminDep):
    return admin_page(request, user)


@router.post("/users")
def create_user(request: Request, form: FormDep, user: AdminDep, store: StoreDep):
    username, role, password = field(form, "username"), field(form, "role"), field(form, "password")
    projects = [p for p in form.getlist("projects") if isinstance(p, str) and p]
    try:
        created, token = store.create_user(username, role or "annotator", password or None,
                                           invite_hours=get_settings(request).invite_hours, projects=projects)
    except KilterError as exc:
        return admin_page(request, user, 422, error=sentence(str(exc)))
    if token is None:
        return done(request, f"Created {created.username}; they log in with the password you set.")
    return done(request, f"Created {created.username}. Send them this invite link (it works once):",
                invite_url(request, token))


@router.post("/users/{username}/invite")
def reinvite(request: Request, username: str, form: FormDep, user: AdminDep, store: StoreDep):
    try:
        token = store.new_invite(username, get_settings(request).invite_hours)
    except KilterError as exc:
        return admin_page(request, user, 409, error=sentence(str(exc)))
    return done(request, f"New invite link for {username} (the old one no longer works):", invite_url(request, token))


@router.post("/users/{username}/active")
def set_active(request: Request, username: str, form: FormDep,
               user: AdminDep, store: StoreDep):
    active = field(form, "active") == "1"
    if not active and username.lower() == user.username.lower():
        return admin_page(request, user, 422, error="You cannot deactivate yourself.")
    try:
        store.set_active(username, active)
    except KilterError as exc:
        raise HTTPException(404, str(exc)) from None
    return RedirectResponse("/admin", status_code=303)


@router.get("/p/{name}")
def project_page(request: Request, name: str, user: AdminDep, store: StoreDep):
    project = project_or_404(store, name)
    records = store.judgments(project)
    report = analysis.quality(records, project.task)
    board = analysis.leaderboard_report(records, exclude=report.flagged,
                                        n_bootstrap=get_settings(request).leaderboard_bootstrap) \
        if project.task in ("pairwise", "ranking") else None
    members = store.members(project.id)
    others = [u.username for u in store.users() if u.username not in members and u.active]
    return render(request, "admin_project.html", user=user, project=project, progress=store.progress(project),
                  report=report, board=board, members=members, others=others,
                  kinds=export.KINDS_FOR_TASK[project.task], aggregations=export.AGGREGATIONS)


@router.post("/p/{name}/members")
def add_member(request: Request, name: str, form: FormDep,
               user: AdminDep, store: StoreDep):
    project = project_or_404(store, name)
    try:
        store.add_member(project.name, field(form, "username"))
    except KilterError as exc:
        raise HTTPException(404, str(exc)) from None
    return RedirectResponse(f"/admin/p/{quote(project.name)}", status_code=303)


@router.get("/p/{name}/export")
def download(name: str, user: AdminDep, store: StoreDep, kind: str = "", aggregate: str = "each",
             min_judgments: int = 1, exclude_flagged: bool = False):
    project = project_or_404(store, name)
    kind = kind or export.DEFAULT_KIND[project.task]
    records = store.judgments(project)
    if exclude_flagged:
        records = analysis.without_users(records, analysis.quality(records, project.task).flagged)
    try:
        rows = export.build(records, project.task, kind, aggregate, min_judgments, project=project.name)
    except KilterError as exc:
        raise HTTPException(404, str(exc)) from None
    filename = f"{project.name}-{kind}.jsonl"
    return Response(export.to_jsonl(rows), media_type="application/x-ndjson",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})
