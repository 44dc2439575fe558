"""People as labelers: query clips are posted to a folder, answers are read back from it.

The run (``labeler.kind=human``) and the web app meet in ``<output_dir>/queries/``::

    queries/clips/<id>-left.gif, <id>-right.gif   the two segments as looping animations
    queries/pending.jsonl    one line per query: {"id", "left", "right", "fps", "format", "round"}
    queries/answers.jsonl    one line per answer: {"id", "answer": left|right|equal|cant_tell, ...}

``kilter clips-sync`` (in the feedback app) imports pending queries into a "compare two clips"
project and appends each judgment to answers.jsonl, so this module needs nothing from the web
app and the run can also be labeled by any other tool that writes answers.jsonl.  Query ids are
derived from the segments' positions in the run, so a resumed run asks the same questions
again and finds the answers already given.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from pydantic import Field

from kilter.config import BaseConfig
from kilter.control.clips import ClipFormat, require_encoder, write_clip
from kilter.control.labelers import ANSWERS, Answer, LabelerConfig
from kilter.control.segments import Segment
from kilter.errors import DataError, KilterError
from kilter.runs import atomic_write_text


class ClipConfig(BaseConfig):
    """How segments are shown to people."""

    format: ClipFormat = "webm"
    """gif or webp (animations, no extra package), webm (VP9 video, plays in every browser) or mp4 (H.264);
    the videos need imageio-ffmpeg (in the control extra)."""
    downscale: int = Field(2, gt=0)
    """Keep every n-th pixel of rendered frames (memory: frames of every pooled segment are kept)."""
    keep_frames: bool = False
    """Render frames even with the synthetic labeler (to inspect the clips it judged); always on for people."""
    slowdown: float = Field(1.0, gt=0.0)
    """Play clips this many times slower than real time."""


class LabelingTimeout(KilterError):
    """Nobody answered in time; the run stops with its last checkpoint intact (resume=true continues)."""


def read_answers(path: Path) -> dict[str, Answer]:
    """{query id: answer} from answers.jsonl; the last answer to a query wins; DataError on a malformed line."""
    answers: dict[str, Answer] = {}
    if not path.exists():
        return answers
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path} line {n}: not valid JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("id"), str):
            raise DataError(f"{path} line {n}: field 'id' must be a string")
        if row.get("answer") not in ANSWERS:
            raise DataError(
                f"{path} line {n}: field 'answer' must be one of {', '.join(ANSWERS)}, got {row.get('answer')!r}"
            )
        answers[row["id"]] = row["answer"]
    return answers


class HumanLabeler:
    def __init__(self, root: str | Path, cfg: LabelerConfig, clips: ClipConfig, fps: int):
        self.root = Path(root)
        self.cfg, self.clips, self.fps = cfg, clips, fps / clips.slowdown
        require_encoder(clips.format)  # fail before any step is taken, not at the first query
        (self.root / "clips").mkdir(parents=True, exist_ok=True)

    @property
    def pending_path(self) -> Path:
        return self.root / "pending.jsonl"

    @property
    def answers_path(self) -> Path:
        return self.root / "answers.jsonl"

    def post(self, pairs: list[tuple[Segment, Segment]]) -> list[str]:
        """Write the clips and pending lines of queries not posted before; return the query ids in order."""
        posted = set()
        if self.pending_path.exists():
            posted = {json.loads(line)["id"] for line in self.pending_path.read_text().splitlines() if line.strip()}
        ids, lines = [], []
        ext = self.clips.format
        for left, right in pairs:
            qid = f"s{left.uid}-s{right.uid}"
            ids.append(qid)
            if qid in posted:
                continue
            write_clip(self.root / "clips" / f"{qid}-left.{ext}", left, self.fps, ext)
            write_clip(self.root / "clips" / f"{qid}-right.{ext}", right, self.fps, ext)
            lines.append(
                json.dumps(
                    {
                        "id": qid,
                        "left": f"clips/{qid}-left.{ext}",
                        "right": f"clips/{qid}-right.{ext}",
                        "fps": self.fps,
                        "format": ext,
                        "length": left.length,
                    }
                )
            )
            posted.add(qid)
        if lines:
            old = self.pending_path.read_text() if self.pending_path.exists() else ""
            atomic_write_text(self.pending_path, old + "".join(line + "\n" for line in lines))
        return ids

    def label(self, pairs: list[tuple[Segment, Segment]], rng: np.random.Generator) -> list[Answer]:
        ids = self.post(pairs)
        print(
            f"kilter control: waiting for {len(ids)} answers in {self.answers_path} "
            f"(for the web app: kilter clips-sync queries={self.root} watch=true, with kilter serve)",
            file=sys.stderr,
        )
        last_count, last_change = -1, time.monotonic()
        while True:
            answers = read_answers(self.answers_path)
            have = sum(qid in answers for qid in ids)
            if have == len(ids):
                return [answers[qid] for qid in ids]
            if have != last_count:
                last_count, last_change = have, time.monotonic()
            elif time.monotonic() - last_change > self.cfg.wait_timeout_s:
                raise LabelingTimeout(
                    f"{have} of {len(ids)} queries answered in {self.answers_path}; no new answer for "
                    f"{self.cfg.wait_timeout_s:.0f} s (labeler.wait_timeout_s); resume=true continues"
                )
            time.sleep(self.cfg.poll_s)
