"""The JSON API under ``/api/v1``: projects, import, progress, judgments and export for scripts.

Authorisation is the pages': annotators see the projects they are members of, and only admins
create projects, import, export and read judgments. A script authenticates with
``Authorization: Bearer TOKEN`` (``kilter users token NAME``); a logged-in browser may use its
session cookie instead, and then a call that changes data must carry the session's CSRF token
in ``X-CSRF-Token``, as forms do. Errors are ``{"error": "..."}`` with the HTTP status.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse

from kilter.errors import KilterError
from kilter.feedback import analysis, export, security
from kilter.feedback.importer import parse_row
from kilter.feedback.routes.deps import (
    StoreDep,
    get_settings,
    get_store,
    project_for,
    session_user,
)
from kilter.feedback.store import ProjectRow, Store, UserRow

router = APIRouter(prefix="/api/v1")

MAX_BODY = 64 * 1024 * 1024  # an import larger than this should come from `kilter import`
MAX_PAGE = 1000


def api_user(request: Request) -> UserRow:
    store = get_store(request)
    header = request.headers.get("authorization", "")
    if header[:7].lower() == "bearer ":
        user = store.api_token_user(header[7:].strip())
        if user is None:
            raise HTTPException(401, "unknown or revoked API token")
        return user
    user = session_user(request)
    if user is None:
        raise HTTPException(401, "log in, or send Authorization: Bearer TOKEN (kilter users token NAME)")
    if request.method not in ("GET", "HEAD") and not security.same_token(
            request.headers.get("x-csrf-token"), request.session.get("csrf")):
        raise HTTPException(403, "with a session cookie, a call that changes data needs the X-CSRF-Token header")
    return user


def api_admin(user: Annotated[UserRow, Depends(api_user)]) -> UserRow:
    if not user.is_admin:
        raise HTTPException(403, "only administrators may do this")
    return user


ApiUser = Annotated[UserRow, Depends(api_user)]
ApiAdmin = Annotated[UserRow, Depends(api_admin)]


def _project(store: Store, user: UserRow, name: str) -> ProjectRow:
    try:
        return project_for(store, user, name)
    except HTTPException as exc:  # the page wording, minus the trailing full stop
        raise HTTPException(exc.status_code, str(exc.detail).rstrip(".")) from None


def _project_json(store: Store, project: ProjectRow) -> dict[str, Any]:
    progress = store.progress(project)
    return {"name": project.name, "title": project.title, "task": project.task, "overlap": project.overlap,
            "gold_fraction": project.gold_fraction, "items": progress.items, "gold_items": progress.gold_items,
            "complete_items": progress.complete_items, "judgments": progress.judgments,
            "open_assignments": progress.open_assignments, "skipped": progress.skipped}


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


async def _json_body(request: Request) -> Any:
    body = await request.body()
    if len(body) > MAX_BODY:
        raise HTTPException(413, f"the body is larger than {MAX_BODY // 2**20} MiB; use `kilter import` for big files")
    try:
        return json.loads(body, parse_constant=_no_constant)
    except ValueError as exc:  # JSONDecodeError, bad UTF-8, NaN
        raise HTTPException(400, f"the body is not valid JSON ({exc})") from None


@router.get("/projects")
def projects(user: ApiUser, store: StoreDep):
    return {"projects": [_project_json(store, p) for p in store.projects(user)]}


@router.post("/projects", status_code=201)
async def create_project(request: Request, user: ApiAdmin, store: StoreDep):
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise HTTPException(400, 'expected an object like {"name": "arena", "task": "pairwise"}')
    known = {"name", "task", "overlap", "title", "instructions", "gold_fraction"}
    if unknown := sorted(set(body) - known):
        raise HTTPException(400, f"unknown field {unknown[0]!r}; known fields: {', '.join(sorted(known))}")
    kinds = {"name": str, "task": str, "overlap": int, "title": str, "instructions": str, "gold_fraction": (int, float)}
    for key, value in body.items():
        if isinstance(value, bool) or not isinstance(value, kinds[key]):
            raise HTTPException(400, f"field {key!r}: wrong type {type(value).__name__}")
    try:
        project = store.create_project(body.get("name", ""), body.get("task", ""), body.get("overlap", 1),
                                       body.get("title", ""), body.get("instructions", ""),
                                       float(body.get("gold_fraction", 0.0)))
    except KilterError as exc:
        raise HTTPException(409 if "already exists" in str(exc) else 400, str(exc)) from None
    return _project_json(store, project)


@router.get("/projects/{name}")
def progress(request: Request, name: str, user: ApiUser, store: StoreDep):
    """The project's progress, per annotator, and the caller's own share."""
    project = _project(store, user, name)
    out = _project_json(store, project)
    out["per_annotator"] = store.progress(project).per_user
    out["you"] = store.user_progress(project, user, get_settings(request).assignment_timeout_s)
    return out


@router.post("/projects/{name}/items")
async def import_items(request: Request, name: str, user: ApiAdmin, store: StoreDep):
    """Add prompts and responses: ``{"rows": [...]}``, each row in the import format (all or nothing)."""
    project = _project(store, user, name)
    body = await _json_body(request)
    rows = body.get("rows") if isinstance(body, dict) else None
    if not isinstance(rows, list) or not rows:
        raise HTTPException(400, 'expected {"rows": [{"prompt": ..., "responses": [...]}, ...]}')
    try:
        parsed = [parse_row(row, f"row {i}") for i, row in enumerate(rows, start=1)]
        counts = store.import_prompts(project.name, parsed)
    except KilterError as exc:
        raise HTTPException(422, str(exc)) from None
    return {"project": project.name, **counts}


def _records(store: Store, project: ProjectRow, exclude_flagged: bool, include_gold: bool):
    records = store.judgments(project)
    if exclude_flagged:
        records = analysis.without_users(records, analysis.quality(records, project.task).flagged)
    if not include_gold:
        records = [r for r in records if not r.is_gold]
    return records


@router.get("/projects/{name}/export")
def export_records(name: str, user: ApiAdmin, store: StoreDep, kind: str = "", aggregate: str = "each",
                   min_judgments: int = 1, exclude_flagged: bool = False, include_gold: bool = True):
    """Training records of one kind (default: the task's main kind), each one a trainer accepts."""
    project = _project(store, user, name)
    kind = kind or export.DEFAULT_KIND[project.task]
    problems: list[str] = []
    try:
        rows = export.build(_records(store, project, exclude_flagged, include_gold), project.task, kind, aggregate,
                            max(1, min_judgments), project=project.name, problems=problems)
    except KilterError as exc:
        raise HTTPException(400, str(exc)) from None
    return {"project": project.name, "kind": kind, "aggregate": aggregate, "records": rows, "left_out": problems}


@router.post("/projects/{name}/export")
async def export_to_datasets(request: Request, name: str, user: ApiAdmin, store: StoreDep):
    """Write every kind the task supports to ``<datasets_dir>/<project>/<kind>.jsonl`` on the server,
    where the trainers of the online loop read them. Options as for GET, in a JSON body."""
    settings = get_settings(request)
    if not settings.datasets_dir:
        raise HTTPException(409, "the server has no datasets folder; start it with --datasets_dir DIR")
    project = _project(store, user, name)
    body = await _json_body(request) if await request.body() else {}
    if not isinstance(body, dict):
        raise HTTPException(400, "expected an object of export options")
    aggregate = body.get("aggregate", "each")
    min_judgments = body.get("min_judgments", 1)
    if not isinstance(min_judgments, int) or isinstance(min_judgments, bool):
        raise HTTPException(400, "field 'min_judgments': expected an integer")
    records = _records(store, project, bool(body.get("exclude_flagged", False)), bool(body.get("include_gold", True)))
    folder = Path(settings.datasets_dir) / project.name
    written = {}
    try:
        for kind in export.KINDS_FOR_TASK[project.task]:
            problems: list[str] = []
            rows = export.build(records, project.task, kind, aggregate, max(1, min_judgments), project=project.name,
                                problems=problems)
            export.write(rows, folder / f"{kind}.jsonl")
            written[kind] = {"path": str(folder / f"{kind}.jsonl"), "records": len(rows), "left_out": len(problems)}
    except KilterError as exc:
        raise HTTPException(400, str(exc)) from None
    return {"project": project.name, "files": written}


@router.get("/projects/{name}/judgments")
def judgments(name: str, user: ApiAdmin, store: StoreDep, after: int = 0, limit: int = 200):
    """Raw judgments with an id above ``after``, oldest first: poll with ``after=next_after`` to follow a project."""
    project = _project(store, user, name)
    limit = min(max(1, limit), MAX_PAGE)
    rows = [export.raw_record(r, project.name) for r in sorted(store.judgments(project), key=lambda r: r.id)
            if r.id > after][:limit]
    return JSONResponse({"project": project.name, "judgments": rows,
                         "next_after": rows[-1]["judgment_id"] if rows else after})
