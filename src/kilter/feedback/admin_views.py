"""Admin pages: projects with progress, agreement and flagged annotators, leaderboard, users, export."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import quote

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import RedirectResponse, Response
from starlette.datastructures import FormData

from kilter.errors import KilterError
from kilter.feedback import analysis, export
from kilter.feedback.settings import ServeConfig
from kilter.feedback.store import ProjectRow, Store, UserRow
from kilter.feedback.tasks import sentence


def register(app: FastAPI, store: Store, settings: ServeConfig, *, render: Callable, require_admin: Callable,
             checked_form: Callable, field: Callable) -> None:
    def project_or_404(name: str) -> ProjectRow:
        try:
            return store.project(name)
        except KilterError:
            raise HTTPException(404, f"There is no project named {name!r}.") from None

    def admin_page(request: Request, user: UserRow, status: int = 200, **extra):
        rows = [{"project": p, "progress": store.progress(p), "members": len(store.members(p.id))}
                for p in store.projects()]
        extra.setdefault("notice", None)
        extra.setdefault("error", None)
        return render(request, "admin.html", status, user=user, rows=rows, users=store.users(), **extra)

    def invite_url(request: Request, token: str) -> str:
        return str(request.base_url).rstrip("/") + f"/invite/{token}"

    @app.get("/admin")
    def admin(request: Request, user: UserRow = Depends(require_admin)):
        return admin_page(request, user)

    @app.post("/admin/users")
    def create_user(request: Request, form: FormData = Depends(checked_form), user: UserRow = Depends(require_admin)):
        username, role, password = field(form, "username").strip(), field(form, "role"), field(form, "password")
        try:
            created, token = store.create_user(username, role or "annotator", password or None,
                                               invite_days=settings.invite_days)
            for project in form.getlist("projects"):
                if isinstance(project, str) and project:
                    store.add_member(project, created.username)
        except KilterError as exc:
            return admin_page(request, user, 422, error=sentence(str(exc)))
        return admin_page(request, user, notice=f"Created {created.username}. Send them this invite link:",
                          link=invite_url(request, token))

    @app.post("/admin/users/{username}/invite")
    def reinvite(request: Request, username: str, form: FormData = Depends(checked_form),
                 user: UserRow = Depends(require_admin)):
        try:
            token = store.new_invite(username, settings.invite_days)
        except KilterError as exc:
            raise HTTPException(404, str(exc)) from None
        return admin_page(request, user, notice=f"New invite link for {username} (the old one no longer works):",
                          link=invite_url(request, token))

    @app.post("/admin/users/{username}/active")
    def set_active(request: Request, username: str, form: FormData = Depends(checked_form),
                   user: UserRow = Depends(require_admin)):
        active = field(form, "active") == "1"
        if not active and username.lower() == user.username.lower():
            return admin_page(request, user, 422, error="You cannot deactivate yourself.")
        try:
            store.set_active(username, active)
        except KilterError as exc:
            raise HTTPException(404, str(exc)) from None
        return RedirectResponse("/admin", status_code=303)

    @app.get("/admin/p/{name}")
    def project_page(request: Request, name: str, user: UserRow = Depends(require_admin)):
        project = project_or_404(name)
        records = store.judgments(project)
        report = analysis.quality(records, project.task)
        board = analysis.model_leaderboard(analysis.without_users(records, report.flagged),
                                           n_bootstrap=settings.leaderboard_bootstrap) if project.task in ("pairwise", "ranking") else []
        members = store.members(project.id)
        others = [u.username for u in store.users() if u.username not in members and u.active]
        return render(request, "admin_project.html", user=user, project=project, progress=store.progress(project),
                      report=report, board=board, members=members, others=others,
                      kinds=export.KINDS_FOR_TASK[project.task], aggregations=export.AGGREGATIONS)

    @app.post("/admin/p/{name}/members")
    def add_member(request: Request, name: str, form: FormData = Depends(checked_form),
                   user: UserRow = Depends(require_admin)):
        project = project_or_404(name)
        try:
            store.add_member(project.name, field(form, "username"))
        except KilterError as exc:
            raise HTTPException(404, str(exc)) from None
        return RedirectResponse(f"/admin/p/{quote(project.name)}", status_code=303)

    @app.get("/admin/p/{name}/export")
    def download(name: str, kind: str = "", aggregate: str = "each", min_judgments: int = 1, exclude_flagged: bool = False,
                 user: UserRow = Depends(require_admin)):
        project = project_or_404(name)
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
