"""Admin pages: projects (create, settings, import, members), progress, agreement and flagged
annotators, leaderboard, judgments with filters and search, users, export, and the audit log of
every admin action."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import RedirectResponse, Response
from starlette.datastructures import UploadFile

from kilter.errors import KilterError
from kilter.feedback import analysis, export
from kilter.feedback.importer import parse_jsonl
from kilter.feedback.models import TASKS
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
    return render(request, "admin.html", status, user=user, rows=rows, users=store.users(), tasks=TASKS,
                  loop_dir=get_settings(request).loop_dir, **extra)


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
    store.audit(user, "user.create", created.username, {"role": created.role, "projects": projects})
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
    store.audit(user, "user.invite", username)
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
    store.audit(user, "user.activate" if active else "user.deactivate", username)
    return RedirectResponse("/admin", status_code=303)


@router.get("/p/{name}")
def project_page(request: Request, name: str, user: AdminDep, store: StoreDep, category: str = ""):
    return project_view(request, user, store, project_or_404(store, name), category=category)


def project_view(request: Request, user: UserRow, store: Store, project: ProjectRow, status: int = 200,
                 error: str | None = None, category: str = ""):
    records = store.judgments(project)
    categories = sorted({r.category for r in records if r.category})
    report = analysis.quality(records, project.task)
    board = analysis.leaderboard_report(records, exclude=report.flagged, category=category or None,
                                        n_bootstrap=get_settings(request).leaderboard_bootstrap) \
        if project.task in ("pairwise", "ranking") else None
    members = store.members(project.id)
    others = [u.username for u in store.users() if u.username not in members and u.active]
    flash = request.session.pop("flash", None) or {}
    return render(request, "admin_project.html", status, user=user, project=project, progress=store.progress(project),
                  report=report, board=board, members=members, others=others,
                  kinds=export.KINDS_FOR_TASK[project.task], aggregations=export.AGGREGATIONS, error=error,
                  notice=flash.get("notice"), tasks=TASKS, categories=categories, category=category)


@router.post("/p/{name}/members")
def add_member(request: Request, name: str, form: FormDep,
               user: AdminDep, store: StoreDep):
    project = project_or_404(store, name)
    try:
        store.add_member(project.name, field(form, "username"))
    except KilterError as exc:
        raise HTTPException(404, str(exc)) from None
    store.audit(user, "project.member.add", project.name, {"username": field(form, "username")})
    return RedirectResponse(f"/admin/p/{quote(project.name)}", status_code=303)


@router.post("/p/{name}/members/remove")
def remove_member(request: Request, name: str, form: FormDep, user: AdminDep, store: StoreDep):
    project = project_or_404(store, name)
    try:
        store.remove_member(project.name, field(form, "username"))
    except KilterError as exc:
        raise HTTPException(404, str(exc)) from None
    store.audit(user, "project.member.remove", project.name, {"username": field(form, "username")})
    return RedirectResponse(f"/admin/p/{quote(project.name)}", status_code=303)


def _number(form, name: str, kind: type, default):
    value = field(form, name).strip()
    if not value:
        return default
    try:
        return kind(value)
    except ValueError:
        raise KilterError(f"{name.replace('_', ' ')} must be a number, got {value!r}") from None


@router.post("/projects")
def create_project(request: Request, form: FormDep, user: AdminDep, store: StoreDep):
    try:
        project = store.create_project(field(form, "name"), field(form, "task"), _number(form, "overlap", int, 1),
                                       field(form, "title").strip(), field(form, "instructions"),
                                       _number(form, "gold_fraction", float, 0.0))
    except KilterError as exc:
        return admin_page(request, user, 422, error=sentence(str(exc)))
    store.audit(user, "project.create", project.name, {"task": project.task, "overlap": project.overlap})
    return RedirectResponse(f"/admin/p/{quote(project.name)}", status_code=303)


@router.post("/p/{name}/settings")
def project_settings(request: Request, name: str, form: FormDep, user: AdminDep, store: StoreDep):
    project = project_or_404(store, name)
    try:
        changed = store.update_project(project.name, title=field(form, "title").strip(),
                                       instructions=field(form, "instructions"),
                                       overlap=_number(form, "overlap", int, project.overlap),
                                       gold_fraction=_number(form, "gold_fraction", float, project.gold_fraction))
    except KilterError as exc:
        return project_view(request, user, store, project, 422, error=sentence(str(exc)))
    diff = {k: [getattr(project, k), getattr(changed, k)] for k in ("title", "overlap", "gold_fraction", "instructions")
            if getattr(project, k) != getattr(changed, k)}
    store.audit(user, "project.settings", project.name, diff)
    request.session["flash"] = {"notice": "Settings saved." if diff else "Nothing changed.", "link": None}
    return RedirectResponse(f"/admin/p/{quote(project.name)}", status_code=303)


MAX_UPLOAD = 64 * 1024 * 1024


@router.post("/p/{name}/import")
async def import_file(request: Request, name: str, form: FormDep, user: AdminDep, store: StoreDep):
    """Import an uploaded JSONL file (the ``kilter import`` format), all or nothing."""
    project = project_or_404(store, name)
    upload = form.get("file")
    if not isinstance(upload, UploadFile) or not upload.filename:
        return project_view(request, user, store, project, 422, error="Choose a JSONL file to import.")
    data = await upload.read(MAX_UPLOAD + 1)
    if len(data) > MAX_UPLOAD:
        return project_view(request, user, store, project, 413,
                            error=f"The file is larger than {MAX_UPLOAD // 2**20} MiB; use kilter import.")
    try:
        rows = parse_jsonl(data.splitlines(keepends=True), upload.filename)
        counts = store.import_prompts(project.name, rows)
    except KilterError as exc:
        return project_view(request, user, store, project, 422, error=sentence(str(exc)))
    store.audit(user, "project.import", project.name, {"file": upload.filename, **counts})
    request.session["flash"] = {"notice": f"Imported {counts['prompts']} prompts, {counts['candidates']} responses -> "
                                          f"{counts['items']} items ({counts['gold_items']} gold) from {upload.filename}.",
                                "link": None}
    return RedirectResponse(f"/admin/p/{quote(project.name)}", status_code=303)


REVIEW_FILTERS = ("any", "unreviewed", "accept", "reject")


@router.get("/p/{name}/judgments")
def judgments(request: Request, name: str, user: AdminDep, store: StoreDep, annotator: str = "", q: str = "",
              review: str = "any", category: str = "", changed: bool = False, page: int = 1):
    """Every judgment, newest first, filtered by annotator, review, category, changed answers and text."""
    project = project_or_404(store, name)
    if review not in REVIEW_FILTERS:
        raise HTTPException(400, f"review must be one of {', '.join(REVIEW_FILTERS)}.")
    records = store.judgments(project)
    annotators = sorted({r.user for r in records})
    categories = sorted({r.category for r in records if r.category})
    needle = q.strip().lower()

    def keep(r) -> bool:
        if annotator and r.user != annotator:
            return False
        if category and r.category != category:
            return False
        if review == "unreviewed" and r.review is not None or review in ("accept", "reject") and r.review != review:
            return False
        if changed and r.version < 2:
            return False
        if needle:
            haystack = " ".join([r.prompt, r.comment, r.text or "", *(c.text for c in r.candidates)]).lower()
            return needle in haystack
        return True

    found = [r for r in reversed(records) if keep(r)]
    per_page = 50
    pages = max(1, -(-len(found) // per_page))
    page = min(max(1, page), pages)
    return render(request, "admin_judgments.html", user=user, project=project, records=found[(page - 1) * per_page:page * per_page],
                  total=len(found), page=page, pages=pages, annotators=annotators, categories=categories,
                  filters={"annotator": annotator, "q": q, "review": review, "category": category, "changed": changed},
                  review_filters=REVIEW_FILTERS)


@router.get("/audit")
def audit_log(request: Request, user: AdminDep, store: StoreDep):
    return render(request, "admin_audit.html", user=user, entries=store.audit_log())


@router.get("/p/{name}/export")
def download(name: str, user: AdminDep, store: StoreDep, kind: str = "", aggregate: str = "each",
             min_judgments: int = 1, exclude_flagged: bool = False, include_rejected: bool = False):
    project = project_or_404(store, name)
    kind = kind or export.DEFAULT_KIND[project.task]
    records = store.judgments(project)
    if exclude_flagged:
        records = analysis.without_users(records, analysis.quality(records, project.task).flagged)
    try:
        rows = export.build(records, project.task, kind, aggregate, min_judgments, project=project.name,
                            include_rejected=include_rejected)
    except KilterError as exc:
        raise HTTPException(404, str(exc)) from None
    store.audit(user, "project.export", project.name, {"kind": kind, "aggregate": aggregate, "records": len(rows)})
    filename = f"{project.name}-{kind}.jsonl"
    return Response(export.to_jsonl(rows), media_type="application/x-ndjson",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})
