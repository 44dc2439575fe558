"""``kilter clips-sync``: connect a ``kilter control`` run that waits for people to a "compare two clips" project.

The run posts queries to ``<run>/queries/`` (:mod:`kilter.control.human`): ``pending.jsonl`` and
the clip files.  Each sync

1. imports every pending query not yet in the project as one item: the prompt is the query id
   (``external_id``), the two candidates are the left and right clip embedded as ``data:`` URIs
   (the page's Content-Security-Policy allows ``data:`` images and media, so no file route is needed;
   GIF/WebP show in an ``<img>``, WebM/MP4 in a looping muted ``<video>``),
   with ``sampling = {"query", "side"}``;
2. rewrites ``answers.jsonl`` from the project's judgments: the first judgment of each query,
   resolved from the order it was *shown* in back to the run's left/right.

Judgments stay in the database as given, like every other task (``kilter export kind=raw``).
With ``watch=true`` it repeats every ``poll_s`` seconds until interrupted.
"""

from __future__ import annotations

import base64
import json
import sys
import time
from pathlib import Path

from pydantic import Field

from kilter.config import BaseConfig
from kilter.control.clips import MIME
from kilter.control.labelers import ANSWERS
from kilter.errors import DataError, KilterError
from kilter.feedback.cli import default_db, open_store
from kilter.feedback.importer import CandidateIn, PromptIn
from kilter.feedback.store import JudgmentRecord, Store
from kilter.runs import atomic_write_text

SIDES = ("left", "right")


class ClipSyncConfig(BaseConfig):
    """Move query clips from a control run into a feedback project and the judgments back as answers."""

    queries: str = "runs/control/queries"
    """The run's queries folder (<output_dir>/queries of a `kilter control labeler.kind=human` run)."""
    project: str = "clips"
    """Feedback project to use; created (task "clips") when it does not exist."""
    db: str = Field(default_factory=default_db)
    """SQLite file or database URL (default: $KILTER_DB or kilter.db)."""
    members: list[str] = Field(default_factory=list)
    """Usernames to add to the project (existing accounts)."""
    title: str = "Compare two clips"
    """Project title shown to annotators (when the project is created)."""
    instructions: str = "Watch both clips. Which one shows the agent doing better at the task?"
    """Instructions shown above every task (when the project is created)."""
    watch: bool = False
    """Keep syncing every poll_s seconds until interrupted."""
    poll_s: float = Field(2.0, gt=0.0)
    """Seconds between syncs with watch=true."""


def read_pending(root: Path) -> list[dict]:
    path = root / "pending.jsonl"
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path} line {n}: not valid JSON") from None
        for key in ("id", "left", "right"):
            if not isinstance(row.get(key), str):
                raise DataError(f"{path} line {n}: field {key!r} must be a string")
        rows.append(row)
    return rows


def _data_uri(path: Path) -> str:
    ext = path.suffix.lstrip(".").lower()
    if ext not in MIME:
        raise DataError(
            f"{path}: the web app shows gif, webp, webm or mp4 clips (run kilter control with clips.format=webm)"
        )
    if not path.is_file():
        raise DataError(f"{path}: clip file not found")
    return f"data:{MIME[ext]};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def clip_answer(rec: JudgmentRecord) -> str | None:
    """The run-side answer (left/right/equal/cant_tell) of one clips judgment, or None when not a clip pair."""
    sides = {c.id: (c.sampling or {}).get("side") for c in rec.candidates}
    if rec.choice in ("equal", "cant_tell"):
        return rec.choice
    if rec.preferred_candidate_id is None:
        return None
    side = sides.get(rec.preferred_candidate_id)
    return side if side in SIDES else None


def sync(store: Store, project: str, root: Path) -> tuple[int, int]:
    """Import new queries and write answers.jsonl; return (queries imported, answers written)."""
    root = Path(root)
    proj = store.project(project)
    if proj.task != "clips":
        raise KilterError(f"project {project!r} is a {proj.task} project; clips-sync needs a clips project")
    records = [r for r in store.judgments(proj) if r.task == "clips"]
    known = {r.prompt_id for r in records}
    rows = []
    have_ids = set(store.prompt_external_ids(proj.id))
    for q in read_pending(root):
        if q["id"] in have_ids or q["id"] in known:
            continue
        cands = [
            CandidateIn(_data_uri(root / q[side]), model="control", sampling={"query": q["id"], "side": side})
            for side in SIDES
        ]
        rows.append(
            PromptIn(prompt=f"Query {q['id']}", external_id=q["id"], responses=cands, where=f"{root}/pending.jsonl")
        )
    if rows:
        store.import_prompts(project, rows)
    answers: dict[str, str] = {}
    for rec in records:  # oldest first: the first judgment of a query is its answer
        answer = clip_answer(rec)
        if rec.prompt_id and answer in ANSWERS and rec.prompt_id not in answers:
            answers[rec.prompt_id] = answer
    lines = "".join(
        json.dumps({"id": qid, "answer": a, "source": "kilter-feedback"}) + "\n" for qid, a in answers.items()
    )
    path = root / "answers.jsonl"
    if answers and (not path.exists() or path.read_text() != lines):
        atomic_write_text(path, lines)
    return len(rows), len(answers)


def run(cfg: ClipSyncConfig) -> int:
    root = Path(cfg.queries)
    if not root.is_dir():
        raise KilterError(f"queries folder not found: {root} (start `kilter control labeler.kind=human` first)")
    store = open_store(cfg.db)
    try:
        names = {p.name for p in store.projects()}
        if cfg.project not in names:
            store.create_project(cfg.project, "clips", 1, cfg.title, cfg.instructions)
            print(f"created project {cfg.project} (clips)")
        for user in cfg.members:
            store.add_member(cfg.project, user)
        while True:
            imported, answered = sync(store, cfg.project, root)
            print(
                f"{cfg.project}: {imported} new queries imported, {answered} answers in {root / 'answers.jsonl'}",
                file=sys.stderr,
            )
            if not cfg.watch:
                return 0
            time.sleep(cfg.poll_s)
    except KeyboardInterrupt:
        return 0
    finally:
        store.close()
