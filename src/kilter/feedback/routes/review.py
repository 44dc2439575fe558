"""Review: a reviewer (or an admin) accepts or rejects other people's judgments, with a reason.

Rejected judgments stay in the database and in ``raw`` exports, but every training export leaves
them out. Reviewers see the projects they are members of, like annotators, and never review
their own judgments.
"""

from __future__ import annotations

from urllib.parse import quote, urlencode

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import RedirectResponse

from kilter.errors import KilterError
from kilter.feedback.routes.deps import (
    FormDep,
    StoreDep,
    UserDep,
    field,
    project_for,
    render,
)
from kilter.feedback.store import REVIEW_VERDICTS, UserRow
from kilter.feedback.tasks import sentence

router = APIRouter(prefix="/review")

SHOWN = ("unreviewed", "accept", "reject", "all")
PER_PAGE = 20  # newest first; reviewing them takes the next ones up


def require_reviewer(user: UserRow) -> None:
    if user.role not in ("admin", "reviewer"):
        raise HTTPException(403, "Reviewing is for reviewers and administrators.")


@router.get("/p/{name}")
def review_page(request: Request, name: str, user: UserDep, store: StoreDep, show: str = "unreviewed",
                annotator: str = ""):
    require_reviewer(user)
    project = project_for(store, user, name)
    if show not in SHOWN:
        raise HTTPException(400, f"show must be one of {', '.join(SHOWN)}.")
    records = [r for r in store.judgments(project) if r.user != user.username]
    annotators = sorted({r.user for r in records})
    if annotator:
        records = [r for r in records if r.user == annotator]
    if show == "unreviewed":
        records = [r for r in records if r.review is None]
    elif show != "all":
        records = [r for r in records if r.review == show]
    return render(request, "review.html", user=user, project=project, records=records[-PER_PAGE:][::-1],
                  total=len(records), show=show,
                  shown=SHOWN, annotator=annotator, annotators=annotators,
                  back=f"/review/p/{quote(project.name)}?" + urlencode({"show": show, "annotator": annotator}))


@router.post("/p/{name}/j/{judgment_id}")
def review(request: Request, name: str, judgment_id: int, form: FormDep, user: UserDep, store: StoreDep):
    require_reviewer(user)
    project = project_for(store, user, name)
    verdict = field(form, "verdict")
    if verdict not in REVIEW_VERDICTS:
        raise HTTPException(400, "Choose accept or reject.")
    try:
        store.review(project, user, judgment_id, verdict, field(form, "reason"))
    except KilterError as exc:
        raise HTTPException(409 if "own" in str(exc) else 422, sentence(str(exc))) from None
    back = field(form, "back")
    return RedirectResponse(back if back.startswith("/review/") else f"/review/p/{quote(project.name)}", status_code=303)
