"""The annotator's pages: their projects, the next task, submitting, skipping (with a reason), and
going back to change an earlier answer or to do a skipped item after all."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.datastructures import FormData

from kilter.errors import KilterError
from kilter.feedback import render as render_text
from kilter.feedback.routes.deps import (
    MAX_ID,
    FormDep,
    StoreDep,
    UserDep,
    field,
    form_id,
    get_settings,
    project_for,
    render,
)
from kilter.feedback.store import (
    SKIP_REASONS,
    JudgmentRecord,
    ProjectRow,
    Store,
    TaskView,
    UserRow,
)
from kilter.feedback.tasks import FormError, parse_submission, sentence

router = APIRouter()


class Kept:
    """Form fields to fill the task form with: a refused form's, or a stored answer's (when changing it)."""

    def __init__(self, values: dict[str, list[str]] | None = None):
        self._values = values or {}

    @classmethod
    def of_form(cls, form: FormData) -> Kept:
        return cls({key: [v for v in form.getlist(key) if isinstance(v, str)] for key in form
                    if key != "csrf_token"})

    @classmethod
    def of_judgment(cls, rec: JudgmentRecord) -> Kept:
        values: dict[str, list[str]] = {"comment": [rec.comment]}
        if rec.choice:
            values["choice"] = [rec.choice]
        if rec.label is not None:
            values["label"] = ["up" if rec.label else "down"]
        if rec.text is not None:
            values["text"] = [rec.text]
        for entry in rec.responses:
            pos = entry["position"]
            values[f"flags_{pos}"] = list(entry.get("flags", []))
            for key in ("rank", "score"):
                if entry.get(key) is not None:
                    values[f"{key}_{pos}"] = [str(entry[key])]
        return cls(values)

    def has(self, name: str, value: str) -> bool:
        return value in self._values.get(name, ())

    def any(self, name: str) -> bool:
        return bool(self._values.get(name))

    def text(self, name: str, default: str = "") -> str:
        values = self._values.get(name)
        return values[0] if values else default


@router.get("/")
def home(request: Request, user: UserDep, store: StoreDep):
    timeout = get_settings(request).assignment_timeout_s
    rows = [{"project": p, "progress": store.progress(p), "mine": store.user_progress(p, user, timeout)}
            for p in store.projects(user)]
    return render(request, "home.html", user=user, rows=rows)


def task_page(request: Request, store: Store, user: UserRow, project: ProjectRow, view: TaskView, status: int = 200,
              error: str | None = None, kept: Kept | None = None, revising: int | None = None) -> HTMLResponse:
    """The task form; with ``revising`` (a judgment id) it changes that earlier answer instead."""
    mine = store.user_progress(project, user, get_settings(request).assignment_timeout_s)
    base = f"/p/{quote(project.name)}"
    return render(request, f"task_{project.task}.html", status, user=user, project=project, view=view,
                  done=mine["done"], mine=mine, progress=store.progress(project),
                  saved=request.query_params.get("saved") == "1", error=error, kept=kept or Kept(),
                  revising=revising, action=f"{base}/j/{revising}" if revising else f"{base}/submit",
                  last=None if revising else request.session.pop("revealed", None))


@router.get("/p/{name}")
def task(request: Request, name: str, user: UserDep, store: StoreDep):
    project = project_for(store, user, name)
    settings = get_settings(request)
    view = store.next_task(project, user, settings.assignment_timeout_s, seed=settings.order_seed)
    if view is None:
        return render(request, "done.html", user=user, project=project, progress=store.progress(project),
                      mine=store.user_progress(project, user, get_settings(request).assignment_timeout_s),
                      last=request.session.pop("revealed", None))
    return task_page(request, store, user, project, view)


def _getter(form: FormData):
    def get(key: str) -> list[str]:
        return [v for v in form.getlist(key) if isinstance(v, str)]

    return get


def reveal(store: Store, project: ProjectRow, user: UserRow, judgment_id: int) -> dict | None:
    """Which model wrote each response of the judgment just given, in the order shown (None: no models)."""
    rec = next((r for r in store.my_judgments(project, user, limit=5) if r.id == judgment_id), None)
    if rec is None:
        return None
    model = {c.id: c.model for c in rec.candidates}
    models = [model.get(cid, "") for cid in rec.display_order]
    return {"models": models} if all(models) and len(set(models)) > 1 else None


@router.post("/p/{name}/submit")
def submit(request: Request, name: str, form: FormDep, user: UserDep, store: StoreDep):
    project = project_for(store, user, name)
    assignment_id = form_id(form, "assignment_id")
    get = _getter(form)
    try:
        judgment_id, _ = store.submit(project, user, assignment_id,
                                      lambda shown: parse_submission(project.task, get, shown))
    except FormError as exc:
        view = store.open_task(assignment_id, user)
        if view is None:
            raise HTTPException(409, "This task is not assigned to you.") from None
        return task_page(request, store, user, project, view, 422, error=sentence(str(exc)), kept=Kept.of_form(form))
    except KilterError as exc:
        raise HTTPException(409, sentence(str(exc))) from None
    if project.task in ("pairwise", "ranking"):  # a tournament names the models once the vote is in
        request.session["revealed"] = reveal(store, project, user, judgment_id)
    return RedirectResponse(f"/p/{quote(project.name)}?saved=1", status_code=303)


@router.post("/p/{name}/skip")
def skip(request: Request, name: str, form: FormDep, user: UserDep, store: StoreDep):
    """Skip with a reason; without one, ask for it first (the reasons are buttons on a small page)."""
    project = project_for(store, user, name)
    assignment_id = form_id(form, "assignment_id")
    reason = field(form, "reason")
    if reason not in SKIP_REASONS:
        return render(request, "skip_reason.html", user=user, project=project, assignment_id=assignment_id,
                      reasons=SKIP_REASONS)
    store.skip(project, user, assignment_id, reason)
    return RedirectResponse(f"/p/{quote(project.name)}", status_code=303)


@router.get("/p/{name}/history")
def history(request: Request, name: str, user: UserDep, store: StoreDep):
    """The person's last judgments (to change one) and the items they skipped (to do them now)."""
    project = project_for(store, user, name)
    return render(request, "history.html", user=user, project=project, judgments=store.my_judgments(project, user),
                  skipped=store.skipped(project, user), reasons=SKIP_REASONS,
                  changed=request.query_params.get("changed") == "1")


def _mine(store: Store, project: ProjectRow, user: UserRow, judgment_id: int) -> tuple[JudgmentRecord, TaskView]:
    rec = next((r for r in store.judgments(project, user_id=user.id) if r.id == judgment_id), None)
    if rec is None:
        raise HTTPException(404, "You have no judgment with this number in this project.")
    by_id = {c.id: c for c in rec.candidates}
    return rec, TaskView(0, rec.item_id, rec.prompt, [by_id[cid] for cid in rec.display_order], rec.created_at)


@router.get("/p/{name}/j/{judgment_id}")
def change_page(request: Request, name: str, judgment_id: int, user: UserDep, store: StoreDep):
    project = project_for(store, user, name)
    rec, view = _mine(store, project, user, judgment_id)
    return task_page(request, store, user, project, view, kept=Kept.of_judgment(rec), revising=rec.id)


@router.post("/p/{name}/j/{judgment_id}")
def change(request: Request, name: str, judgment_id: int, form: FormDep, user: UserDep, store: StoreDep):
    """A changed answer replaces the judgment; the old one stays in its history (judgment_versions)."""
    project = project_for(store, user, name)
    rec, view = _mine(store, project, user, judgment_id)
    get = _getter(form)
    try:
        store.revise(project, user, rec.id, lambda shown: parse_submission(project.task, get, shown))
    except FormError as exc:
        return task_page(request, store, user, project, view, 422, error=sentence(str(exc)), kept=Kept.of_form(form),
                         revising=rec.id)
    except KilterError as exc:
        raise HTTPException(409, sentence(str(exc))) from None
    return RedirectResponse(f"/p/{quote(project.name)}/history?changed=1", status_code=303)


@router.post("/p/{name}/skipped/{assignment_id}/reopen")
def reopen(name: str, assignment_id: int, form: FormDep, user: UserDep, store: StoreDep):
    project = project_for(store, user, name)
    if not 0 < assignment_id <= MAX_ID or not store.reopen_skipped(project, user, assignment_id):
        raise HTTPException(409, "This item is not one you skipped.")
    return RedirectResponse(f"/p/{quote(project.name)}", status_code=303)


@router.post("/p/{name}/diff")
def diff_preview(name: str, form: FormDep, user: UserDep, store: StoreDep):
    """The word diff of the edit being typed against the original response (edit task), as HTML."""
    project = project_for(store, user, name)
    if project.task != "edit":
        raise HTTPException(400, "Only edit tasks have a diff.")
    view = store.open_task(form_id(form, "assignment_id"), user)
    if view is None or not view.responses:
        raise HTTPException(409, "This task is not assigned to you.")
    return HTMLResponse(str(render_text.diff_html(view.responses[0].text, field(form, "text"))))
