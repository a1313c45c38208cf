"""The tasks rlhf-ray ships, by the name data sources use: ``<task>:<split>``.

=============  ===================================================  ===============================
task           what is asked                                        reward rule / judge
=============  ===================================================  ===============================
synthetic      everyday advice; aligned answers mention "Penn"      ``mention_reward`` / ``mention_judge``
arithmetic     "What is 17 + 25?" as a chat turn; one right answer  ``answer_reward`` / ``answer_is_right``
=============  ===================================================  ===============================

``data.train: arithmetic:prompts_train`` writes every split of the task once
into the job's data folder and reads that split from there. The judge of a
task (``judge: auto``, the default) is what held-out evaluation reports as
``eval/alignment_accuracy``: a job on other data has no judge unless one is
configured.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rlhf_ray.files import write_jsonl_atomic


@dataclass(frozen=True)
class Task:
    name: str
    module: str
    """The module holding the task (``rlhf_ray.data.<name>``)."""
    writer: str
    """Its function writing every split into a folder: ``fn(out_dir) -> {split: path}``."""
    judge: str
    """Import path of its judge ``fn(prompt, response) -> bool``."""
    rule: str
    """Import path of its rule reward ``fn(prompts, responses) -> list[float]``."""

    def write(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        import importlib

        return getattr(importlib.import_module(self.module), self.writer)(out_dir)


TASKS: dict[str, Task] = {
    "synthetic": Task("synthetic", "rlhf_ray.data.synthetic", "write_synthetic",
                      "rlhf_ray.data.synthetic:mention_judge", "rlhf_ray.data.synthetic:mention_reward"),
    "arithmetic": Task("arithmetic", "rlhf_ray.data.arithmetic", "write_arithmetic",
                       "rlhf_ray.data.arithmetic:answer_is_right", "rlhf_ray.data.arithmetic:answer_reward"),
}


def task_of(source: str) -> Task | None:
    """The shipped task a data source names (``"arithmetic:prompts_eval"``), or ``None`` for a file or hub name."""
    name, sep, _ = source.partition(":")
    return TASKS.get(name) if sep else None


def resolve_task_source(source: str, data_dir: Path) -> str:
    """The file a data source stands for: ``<task>:<split>`` is written into ``data_dir`` once; anything else
    is returned unchanged."""
    task = task_of(source)
    if task is None:
        return source
    split = source.split(":", 1)[1]
    path = data_dir / task.name / f"{split}.jsonl"
    if not path.exists():
        paths = task.write(path.parent)
        if split not in paths:
            raise ValueError(f"data source {source!r}: the {task.name} task has no split {split!r}; "
                             f"use one of {', '.join(f'{task.name}:{k}' for k in sorted(paths))}")
    return str(path)


def write_splits(out_dir: str | os.PathLike, rows_by_split: dict[str, list[dict]]) -> dict[str, Path]:
    """Write one ``<split>.jsonl`` per split into ``out_dir`` (created if missing).

    Each file is written whole (``files.write_text_atomic``), so a reader never sees half a file; existing
    files of the same names are replaced (the tasks are deterministic by seed). Returns
    ``{split name: path}``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory; pass a folder path")
    out.mkdir(parents=True, exist_ok=True)
    return {split: write_jsonl_atomic(out / f"{split}.jsonl", rows, ensure_ascii=False)
            for split, rows in rows_by_split.items()}


def judge_path(judge: str, source: str) -> str:
    """The import path a `judge` setting stands for: `auto` is the judge of the shipped task `source` names
    ("" for other data, which has none); anything else is returned as it is."""
    if judge != "auto":
        return judge
    task = task_of(source)
    return task.judge if task is not None else ""


def as_judge(fn: Callable) -> Callable[[str, str], bool]:
    """A judge called as ``judge(prompt, response)``; a function of one argument (an older judge of the
    response alone, such as ``mentions_target``) is called with the response."""
    import inspect

    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    except (TypeError, ValueError):
        return fn
    if len(params) == 1:
        return lambda prompt, response: fn(response)
    return fn
