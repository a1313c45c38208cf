"""Files written whole or not at all: a reader sees the old file or the new one, never half of one.

Every file a run, an evaluation, a task or a report writes for others to read (config.yaml, metrics.jsonl
rewritten on resume, summary.json, trainer_state.json, samples, task splits, report.md) goes through
`write_text_atomic`: a temporary file beside the target, flushed to disk, then renamed over it.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path`, creating its folder, through a temporary file in the same folder
    that is fsynced and renamed over `path`; on any failure the temporary file is removed and `path` is
    as it was. Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "x", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """`obj` as indented JSON with sorted keys (`default=str` for what JSON lacks), written atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, rows: Any, *, ensure_ascii: bool = True) -> Path:
    """One JSON object per line, written atomically."""
    return write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=ensure_ascii) + "\n" for row in rows))
