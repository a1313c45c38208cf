"""When each role of a job was busy: `timeline.jsonl` in the run directory.

One JSON object per line and per role: `{"job", "role", "phase", "step",
"start", "end"}`, with `start`/`end` in seconds since the epoch (wall clock,
so the timelines of jobs running at the same time line up). The drivers
record every phase of a step (generate, score, update, sync, evaluation,
...) against the roles it occupies; `reports/pipeline_report.py` draws the
Gantt chart from these files, and benchmarks can read them back with
`read_timeline`. A resumed run appends to the file.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

TIMELINE_FILE = "timeline.jsonl"


class Timeline:
    """Appends busy intervals of one job's roles to `<run_dir>/timeline.jsonl`."""

    def __init__(self, run_dir: str | os.PathLike, job: str):
        self.path = Path(run_dir) / TIMELINE_FILE
        self.job = job
        self._file = open(self.path, "a", encoding="utf-8")

    def record(self, phase: str, roles: Iterable[str], start: float, end: float, step: int | None = None) -> None:
        """One interval `[start, end]` (epoch seconds) of `phase`, for each of `roles`."""
        for role in roles:
            self._file.write(json.dumps({"job": self.job, "role": role, "phase": phase, "step": step,
                                         "start": round(start, 4), "end": round(end, 4)}) + "\n")
        self._file.flush()

    @contextmanager
    def interval(self, phase: str, roles: Iterable[str], step: int | None = None) -> Iterator[None]:
        """Record the enclosed block as `phase` for `roles`."""
        start = time.time()
        try:
            yield
        finally:
            self.record(phase, list(roles), start, time.time(), step)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> "Timeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_timeline(run_dir: str | os.PathLike) -> list[dict]:
    """The intervals of `<run_dir>/timeline.jsonl` (empty when the run wrote none)."""
    path = Path(run_dir) / TIMELINE_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write
    return rows


def busy_seconds(rows: Iterable[dict]) -> dict[tuple[str, str], float]:
    """Seconds each (job, role) was busy: the union of its intervals, overlaps counted once."""
    spans: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for row in rows:
        spans.setdefault((row["job"], row["role"]), []).append((row["start"], row["end"]))
    out = {}
    for key, intervals in spans.items():
        total, end = 0.0, float("-inf")
        for a, b in sorted(intervals):
            if b <= end:
                continue
            total += b - max(a, end)
            end = b
        out[key] = total
    return out
