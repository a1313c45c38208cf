"""Atomic checkpoint directories, finding and pruning checkpoints, and RNG state for exact resume."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from rlhf_ray.config.schema import ConfigError
from rlhf_ray.files import write_json_atomic
from rlhf_ray.runtime.checkpoint import (
    COMPLETE_MARKER,
    atomic_dir,
    capture_rng_state,
    latest_checkpoint,
    latest_sound_checkpoint,
    prune_checkpoints,
    read_json,
    restore_rng_state,
)


def _step_dir(run_dir, step: int):
    """Where the drivers save checkpoint `step` (jobs/common.py `checkpoint_dir`)."""
    return run_dir / "checkpoints" / f"step_{step}"


def _save(run_dir, step: int, payload: str) -> None:
    with atomic_dir(_step_dir(run_dir, step)) as tmp:
        (tmp / "model.txt").write_text(payload)


def test_atomic_dir_publishes_a_complete_directory(tmp_path):
    _save(tmp_path, 3, "weights-3")
    final = tmp_path / "checkpoints" / "step_3"
    assert (final / "model.txt").read_text() == "weights-3"
    assert (final / COMPLETE_MARKER).is_file()
    assert sorted(p.name for p in final.parent.iterdir()) == ["step_3"]  # no temp dir left


def test_a_crash_mid_save_leaves_the_previous_checkpoint_whole(tmp_path):
    _save(tmp_path, 3, "weights-3")
    final = _step_dir(tmp_path, 3)
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_dir(final) as tmp:
            (tmp / "model.txt").write_text("half-written")
            raise RuntimeError("disk full")
    assert (final / "model.txt").read_text() == "weights-3"
    with pytest.raises(OSError):
        with atomic_dir(_step_dir(tmp_path, 4)) as tmp:
            (tmp / "model.txt").write_text("half")
            raise OSError("killed")
    # Neither the failed step_4 nor any temp directory is visible; step_3 is still the latest.
    assert sorted(p.name for p in final.parent.iterdir()) == ["step_3"]
    assert latest_checkpoint(tmp_path) == final


def test_saving_a_step_again_replaces_it_whole(tmp_path):
    _save(tmp_path, 5, "first")
    _save(tmp_path, 5, "second")
    final = _step_dir(tmp_path, 5)
    assert (final / "model.txt").read_text() == "second"
    assert sorted(p.name for p in final.parent.iterdir()) == ["step_5"]


def test_latest_checkpoint_skips_incomplete_and_temp_dirs(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    _save(tmp_path, 2, "a")
    _save(tmp_path, 10, "b")  # numeric order: step_10 is newer than step_2
    root = tmp_path / "checkpoints"
    (root / "step_12").mkdir()  # no marker: e.g. copied by hand, half done
    (root / ".step_14.tmp-deadbeef").mkdir()  # a save that crashed
    (root / ".step_14.tmp-deadbeef" / COMPLETE_MARKER).write_text("")
    (root / "step_x").mkdir()
    assert latest_checkpoint(tmp_path) == root / "step_10"


def test_prune_keeps_the_newest_and_clears_leftovers(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, str(step))
    root = tmp_path / "checkpoints"
    (root / ".step_5.tmp-0badc0de").mkdir()  # a killed save
    (root / "notes").mkdir()  # not ours: left alone
    (root / "step_0").mkdir()  # no marker, so not written by atomic_dir: left alone
    removed = prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == [".step_5.tmp-0badc0de", "step_1", "step_2"]
    assert sorted(p.name for p in root.iterdir()) == ["notes", "step_0", "step_3", "step_4"]
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        prune_checkpoints(tmp_path, keep_last=0)


def test_resume_and_pruning_agree_that_the_last_written_checkpoint_is_the_newest(tmp_path):
    import os

    # A run left step_7 and step_8, was resumed from step_5, and wrote step_6 before it died.
    for step in (5, 7, 8, 6):
        _save(tmp_path, step, str(step))
    for age, step in enumerate((5, 7, 8, 6)):  # marker times in writing order, whatever the clock's grain
        marker = _step_dir(tmp_path, step) / COMPLETE_MARKER
        os.utime(marker, ns=(10**18 + age * 10**9, 10**18 + age * 10**9))
    path, damaged = latest_sound_checkpoint(tmp_path)
    assert path.name == "step_6" and not damaged  # run.resume: auto continues the resumed line
    assert sorted(p.name for p in prune_checkpoints(tmp_path, keep_last=2)) == ["step_5", "step_7"]


def test_write_and_read_json(tmp_path):
    path = tmp_path / "sub" / "trainer_state.json"
    write_json_atomic(path, {"step": 7, "data": {"epoch": 1}})
    write_json_atomic(path, {"step": 8})
    assert read_json(path) == {"step": 8}
    assert sorted(p.name for p in path.parent.iterdir()) == ["trainer_state.json"]
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"bad.json is not valid JSON \(line 1"):
        read_json(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        read_json(tmp_path / "missing.json")


def _draws() -> tuple:
    return (random.random(), random.gauss(0, 1), float(np.random.rand()), torch.rand(3).tolist(),
            torch.randint(0, 1000, (2,)).tolist())


def test_rng_capture_restore_reproduces_draws_through_json(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's state: it must survive too
    state = capture_rng_state()
    write_json_atomic(tmp_path / "rng.json", state)
    expected = _draws()
    _draws()  # move every generator on
    restore_rng_state(read_json(tmp_path / "rng.json"))
    assert _draws() == expected
    assert json.loads(json.dumps(state)) == state


def test_a_damaged_latest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, capsys, command_logging):
    from rlhf_ray.config import load_config
    from rlhf_ray.runtime.checkpoint import (
        MANIFEST,
        checkpoint_problem,
        find_resume_checkpoint,
        latest_sound_checkpoint,
    )

    for step in (2, 4):
        with atomic_dir(tmp_path / "checkpoints" / f"step_{step}") as tmp:
            (tmp / "policy").mkdir()
            (tmp / "policy" / "model.bin").write_bytes(bytes(range(256)) * 4)
            (tmp / "trainer_state.json").write_text('{"step": %d}' % step)
    newest = tmp_path / "checkpoints" / "step_4"
    manifest = json.loads((newest / MANIFEST).read_text())["files"]
    assert manifest["policy/model.bin"]["bytes"] == 1024 and len(manifest["policy/model.bin"]["sha256"]) == 64
    assert checkpoint_problem(newest) is None
    cfg = load_config(None, [f"run.output_dir={tmp_path}"])
    assert find_resume_checkpoint(cfg, tmp_path) == newest

    data = bytearray((newest / "policy" / "model.bin").read_bytes())
    data[100] ^= 0xFF  # one flipped byte: same size, other content
    (newest / "policy" / "model.bin").write_bytes(bytes(data))
    assert "policy/model.bin changed since it was written" in checkpoint_problem(newest)
    assert find_resume_checkpoint(cfg, tmp_path) == tmp_path / "checkpoints" / "step_2"
    assert "step_4 is damaged (policy/model.bin changed since it was written" in capsys.readouterr().err
    (newest / "policy" / "model.bin").write_bytes(bytes(data[:10]))  # cut short
    path, damaged = latest_sound_checkpoint(tmp_path)
    assert path == tmp_path / "checkpoints" / "step_2" and "holds 10 bytes, 1024 were written" in damaged[0][1]
    with pytest.raises(ConfigError, match=r"run.resume: checkpoint .*step_4 is damaged"):
        find_resume_checkpoint(load_config(None, [f"run.resume={newest}"]), tmp_path)
