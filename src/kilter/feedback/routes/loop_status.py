"""/admin/loop: where a `kilter loop` run stands (``kilter serve --loop_dir RUN``, or the loop's own
server). The loop's state is a plain JSON file (state.json); this page only reads it, plus the
round project's progress from the database."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request

from kilter.errors import KilterError
from kilter.feedback.routes.deps import AdminDep, StoreDep, get_settings, render

router = APIRouter(prefix="/admin")

SERIES = (("reward/gold", "gold", "#1f77b4"), ("reward/rm", "proxy (RM)", "#ff7f0e"), ("kl/sqrt", "sqrt(KL)", "#2ca02c"))
WIDTH, HEIGHT, PAD = 560, 220, 30


def read_state(loop_dir: str) -> dict:
    path = Path(loop_dir) / "state.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise HTTPException(404, f"No loop has started in {loop_dir} yet (no state.json).") from None
    except ValueError:
        raise HTTPException(500, f"{path} is not valid JSON.") from None


def rounds_of(state: dict) -> list[dict]:
    done, rows, r = state.get("done", {}), [], 1
    if "baseline" in done:
        rows.append(dict(done["baseline"], round=0))
    while f"{r}:evaluate" in done:
        rows.append(dict(done[f"{r}:evaluate"], round=r))
        r += 1
    return rows


def chart(rows: list[dict]) -> list[dict]:
    """Polylines (SVG points) of each metric against the round, on one shared scale."""
    values = [row[key] for row in rows for key, _, _ in SERIES if isinstance(row.get(key), (int, float))]
    if len(rows) < 2 or not values:
        return []
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    last = max(row["round"] for row in rows) or 1
    lines = []
    for key, label, color in SERIES:
        pts = [(PAD + (WIDTH - 2 * PAD) * row["round"] / last, HEIGHT - PAD - (HEIGHT - 2 * PAD) * (row[key] - lo) / span)
               for row in rows if isinstance(row.get(key), (int, float))]
        if pts:
            lines.append({"label": label, "color": color, "points": " ".join(f"{x:.1f},{y:.1f}" for x, y in pts),
                          "dots": pts})
    return lines


@router.get("/loop")
def loop_page(request: Request, user: AdminDep, store: StoreDep):
    loop_dir = get_settings(request).loop_dir
    if not loop_dir:
        raise HTTPException(404, "This server shows no loop; start it with --loop_dir RUN_DIR.")
    state = read_state(loop_dir)
    current = state.get("current") or {}
    progress = None
    if current.get("project"):
        try:
            project = store.project(current["project"])
        except KilterError:
            project = None
        if project is not None:
            quota = current.get("quota") or store.progress(project).items
            judged = sum(1 for j in store.judgments(project) if not j.is_gold)  # the quota leaves gold items out
            progress = {"project": current["project"], "judgments": judged, "quota": quota,
                        "percent": min(100, round(100 * judged / quota)) if quota else 100}
    rows = rounds_of(state)
    return render(request, "admin_loop.html", user=user, loop_dir=loop_dir, current=current, progress=progress,
                  rows=rows, lines=chart(rows), width=WIDTH, height=HEIGHT, stopped=state.get("stopped"))
