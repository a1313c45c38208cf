"""Checkpoint directories that are either whole or absent, and RNG state for exact resume.

Layout (docs/ARCHITECTURE.md, "Run directories"): `<run_dir>/checkpoints/step_<N>/`, each holding a
completion marker. A save goes into a hidden sibling `.step_<N>.tmp-<id>/`;
only when everything inside is written (and flushed to disk) is the marker
added and the directory renamed into place. A crash mid-save therefore leaves
the previous checkpoint whole and no half-written `step_<N>` visible; the temp
directory a killed process leaves behind is ignored by `latest_checkpoint` and
removed by `prune_checkpoints`.

Ray actors write their shards straight into the directory `atomic_dir`
yields (all ranks must see the same filesystem, as DeepSpeed checkpoints
already require). `save_checkpoint` / `load_checkpoint` do that for a job:
each trainable role group's DeepSpeed state under `<role>/`, `save_pretrained`
exports under `<role>_hf/`, and `trainer_state.json` (step, data position,
RNG, KL controller).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from rlhf_ray.config.schema import ConfigError
from rlhf_ray.files import write_json_atomic

if TYPE_CHECKING:
    from rlhf_ray.config.schema import JobConfig
    from rlhf_ray.runtime.actor_group import ActorGroup

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "CHECKPOINT_COMPLETE"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"step_(\d+)")
_TEMP_MARK = ".tmp-"
_OLD_MARK = ".old-"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(folder) / name)
        _fsync_path(Path(folder))


@contextmanager
def atomic_dir(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temp directory beside `final_path`; on normal exit, mark it
    complete and rename it to `final_path` (replacing an existing one).

    If the body raises, the temp directory is removed and `final_path` (an
    older checkpoint of the same name included) is left as it was.
    """
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}{_TEMP_MARK}{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        write_manifest(tmp)
        (tmp / COMPLETE_MARKER).write_text(final.name + "\n")
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        # rename() cannot replace a non-empty directory: move the old one aside
        # first. Between the two renames `final` is briefly absent, never partial.
        old = final.parent / f".{final.name}{_OLD_MARK}{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_path(final.parent)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> Path:
    """`manifest.json`: every file under `directory` with its size and SHA-256, written last."""
    files = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name not in (MANIFEST, COMPLETE_MARKER)}
    path = directory / MANIFEST
    path.write_text(json.dumps({"files": files}, indent=1))
    return path


def checkpoint_problem(directory: str | os.PathLike) -> str | None:
    """Why checkpoint `directory` cannot be trusted (a file missing, cut short or changed since it was
    written, per its manifest), or None when it is whole. A checkpoint without a manifest (written by
    an earlier release) is trusted on its completion marker alone."""
    directory = Path(directory)
    if not (directory / COMPLETE_MARKER).is_file():
        return "no completion marker (the save did not finish)"
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as err:
        return f"{MANIFEST} is unreadable ({err})"
    for name, meta in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta["bytes"]:
            return f"{name} holds {path.stat().st_size} bytes, {meta['bytes']} were written"
        if _sha256(path) != meta["sha256"]:
            return f"{name} changed since it was written (checksum mismatch)"
    return None


def read_json(path: str | os.PathLike) -> Any:
    """Load a JSON file, naming the file when it is missing or malformed."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}") from err


def _complete_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """`(step, path)` of every complete `checkpoints/step_<N>`, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.fullmatch(child.name)
        if match and child.is_dir() and (child / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The complete `checkpoints/step_<N>` with the largest N, or None when there is none.
    Directories without the completion marker and temp directories are skipped."""
    found = _complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def _mark(path: Path) -> tuple:
    stat = (path / COMPLETE_MARKER).stat()
    return path.name, stat.st_ino, stat.st_mtime_ns


def checkpoint_marks(run_dir: str | os.PathLike) -> frozenset[tuple]:
    """What identifies each complete checkpoint as written: its name and its completion marker's inode and
    modification time. A checkpoint whose mark is not in an earlier `checkpoint_marks` was written (or
    written again) since."""
    marks = []
    for _, path in _complete_checkpoints(run_dir):
        try:
            marks.append(_mark(path))
        except FileNotFoundError:  # pruned meanwhile
            continue
    return frozenset(marks)


def _in_write_order(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest written first (the completion marker's time, then the step): a run
    resumed from an earlier checkpoint of its folder writes step_6 after the step_8 of the line it left,
    and step_6 is then the newest, for resuming and for pruning alike."""
    found = []
    for step, path in _complete_checkpoints(run_dir):
        try:
            found.append(((path / COMPLETE_MARKER).stat().st_mtime_ns, step, path))
        except FileNotFoundError:  # pruned meanwhile
            continue
    return [path for _, _, path in sorted(found)]


def latest_sound_checkpoint(run_dir: str | os.PathLike, written_before: frozenset[tuple] = frozenset()
                            ) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint (the last written) whose files match its manifest, and the newer ones
    passed over (each with what is wrong with it). Checkpoints whose marks are in `written_before` (`checkpoint_marks`
    taken when a run started: what earlier runs left) are not considered."""
    damaged = []
    for path in reversed(_in_write_order(run_dir)):
        if written_before and _mark(path) in written_before:
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            return path, damaged
        damaged.append((path, problem))
    return None, damaged


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the `keep_last` complete checkpoints written last, and the temp
    directories of crashed saves; returns what was removed. A `step_<N>`
    without the completion marker was not written by `atomic_dir` and is left
    alone.

    Call it from the process that saves, after a save: a save in flight in
    another process would look like a leftover."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (the newest checkpoint is what a resume needs), got {keep_last}")
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    doomed = _in_write_order(run_dir)[:-keep_last]
    doomed += [child for child in root.iterdir() if child.is_dir() and child.name.startswith(".step_")
               and (_TEMP_MARK in child.name or _OLD_MARK in child.name)]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


# RNG state ---------------------------------------------------------------------
# The state is JSON-compatible (lists, ints, base64 strings) so that it can sit in
# a trainer_state.json next to the step and data position.

def _bytes_to_text(state: torch.Tensor) -> str:
    return base64.b64encode(state.cpu().numpy().tobytes()).decode("ascii")


def _text_to_bytes(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def capture_rng_state() -> dict:
    """The generators a training step draws from: Python's `random`, NumPy's global
    generator, torch's CPU generator and, when CUDA is visible, every CUDA device's."""
    kind, keys, pos, has_gauss, cached_gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "python": [version, list(internal), gauss_next],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached_gauss)],
        "torch": _bytes_to_text(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_bytes_to_text(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict) -> None:
    """Put back what `capture_rng_state` captured (also after a JSON round trip).

    CUDA state is restored when both the capture and this process have CUDA; a
    capture from a different number of devices is an error."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached_gauss))
    torch.set_rng_state(_text_to_bytes(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            raise ValueError(f"the RNG state holds {len(state['cuda'])} CUDA generators but this process sees "
                             f"{torch.cuda.device_count()} devices: resume with the same GPUs per rank")
        torch.cuda.set_rng_state_all([_text_to_bytes(s) for s in state["cuda"]])


# A job's checkpoint: every trainable group's state plus the driver's --------------------------------


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step}"


def save_checkpoint(run_dir: Path, step: int, trainables: dict[str, "ActorGroup"], state: dict,
                    keep_last: int, export: dict[str, "ActorGroup"] | None = None) -> Path:
    """Write checkpoint `step` atomically: each trainable group's DeepSpeed state under
    `<role>/`, `save_pretrained` exports under `<role>_hf/`, and `trainer_state.json`."""
    final = checkpoint_dir(run_dir, step)
    with atomic_dir(final) as tmp:
        for name, group in trainables.items():
            group.call(lambda actor, d=str(tmp / name): actor.save_checkpoint.remote(d))
        for name, group in (export or {}).items():
            group.call(lambda actor, d=str(tmp / f"{name}_hf"): actor.export.remote(d))
        write_json_atomic(tmp / "trainer_state.json", {**state, "step": step, "rng": capture_rng_state()})
    prune_checkpoints(run_dir, keep_last)
    return final


def check_fresh_start(cfg: "JobConfig", run_dir: Path) -> None:
    """Refuse `run.resume: never` in a run directory that holds checkpoints: the run would mix its own with
    an earlier run's (a later `auto` resume, or pruning by step, would take the earlier run's)."""
    if cfg.run.resume != "never":
        return
    found = _complete_checkpoints(run_dir)
    if found:
        raise ConfigError(f"run.resume: never, but {Path(run_dir) / 'checkpoints'} holds an earlier run's "
                          f"checkpoints ({', '.join(p.name for _, p in found[-3:])}); give this run another "
                          "run.output_dir, remove that folder to start over there, or set run.resume=auto to "
                          "continue the earlier run")


def find_resume_checkpoint(cfg: "JobConfig", run_dir: Path) -> Path | None:
    """The checkpoint to resume from: `run.resume` auto (latest in the run dir), never, or a path."""
    if cfg.run.resume == "never":
        check_fresh_start(cfg, run_dir)
        return None
    if cfg.run.resume == "auto":
        path, damaged = latest_sound_checkpoint(run_dir)
        for bad, problem in damaged:
            logger.warning("checkpoint %s is damaged (%s); resuming from %s instead", bad, problem,
                           path or "the start")
        return path
    path = Path(cfg.run.resume)
    if not (path / "trainer_state.json").is_file():
        raise ConfigError(f"run.resume: {path} is not a checkpoint directory (no trainer_state.json); give "
                          "a checkpoints/step_<N> folder, auto or never")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ConfigError(f"run.resume: checkpoint {path} is damaged ({problem}); give an earlier "
                          "checkpoints/step_<N>, or auto to take the newest sound one")
    return path


def load_checkpoint(path: Path, trainables: dict[str, "ActorGroup"]) -> dict:
    """Restore each trainable group and the driver's RNG; returns the trainer state."""
    for name, group in trainables.items():
        group.call(lambda actor, d=str(path / name): actor.load_checkpoint.remote(d))
    state = read_json(path / "trainer_state.json")
    restore_rng_state(state["rng"])
    return state
