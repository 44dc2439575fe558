"""The annotator's pages: their projects, the next task, submitting and skipping it."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.datastructures import FormData

from kilter.errors import KilterError
from kilter.feedback.routes.deps import (
    FormDep,
    StoreDep,
    UserDep,
    form_id,
    get_settings,
    project_for,
    render,
)
from kilter.feedback.store import ProjectRow, Store, TaskView, UserRow
from kilter.feedback.tasks import FormError, parse_submission, sentence

router = APIRouter()


class Kept:
    """The fields of a refused form, so the page shown again keeps every choice, rank, flag and text."""

    def __init__(self, form: FormData | None = None):
        self._values: dict[str, list[str]] = {}
        for key in (form.keys() if form is not None else ()):
            if key != "csrf_token":
                self._values[key] = [v for v in form.getlist(key) if isinstance(v, str)]

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
              error: str | None = None, kept: Kept | None = None) -> HTMLResponse:
    mine = store.user_progress(project, user, get_settings(request).assignment_timeout_s)
    return render(request, f"task_{project.task}.html", status, user=user, project=project, view=view,
                  done=mine["done"], mine=mine, progress=store.progress(project),
                  saved=request.query_params.get("saved") == "1", error=error, kept=kept or Kept())


@router.get("/p/{name}")
def task(request: Request, name: str, user: UserDep, store: StoreDep):
    project = project_for(store, user, name)
    view = store.next_task(project, user, get_settings(request).assignment_timeout_s)
    if view is None:
        return render(request, "done.html", user=user, project=project, progress=store.progress(project),
                      mine=store.user_progress(project, user, get_settings(request).assignment_timeout_s))
    return task_page(request, store, user, project, view)


@router.post("/p/{name}/submit")
def submit(request: Request, name: str, form: FormDep, user: UserDep,
           store: StoreDep):
    project = project_for(store, user, name)
    assignment_id = form_id(form, "assignment_id")

    def get(key: str) -> list[str]:
        return [v for v in form.getlist(key) if isinstance(v, str)]

    try:
        store.submit(project, user, assignment_id, lambda shown: parse_submission(project.task, get, shown))
    except FormError as exc:
        view = store.open_task(assignment_id, user)
        if view is None:
            raise HTTPException(409, "This task is not assigned to you.") from None
        return task_page(request, store, user, project, view, 422, error=sentence(str(exc)), kept=Kept(form))
    except KilterError as exc:
        raise HTTPException(409, sentence(str(exc))) from None
    return RedirectResponse(f"/p/{quote(project.name)}?saved=1", status_code=303)


@router.post("/p/{name}/skip")
def skip(request: Request, name: str, form: FormDep, user: UserDep,
         store: StoreDep):
    project = project_for(store, user, name)
    store.skip(project, user, form_id(form, "assignment_id"))
    return RedirectResponse(f"/p/{quote(project.name)}", status_code=303)
