"""Reliability without a dead actor (test_recovery.py has those): SIGTERM to a running `rlhf-ray train`
writes a checkpoint and exits with its own code, and the same command then finishes every step once; a
damaged latest checkpoint is passed over on resume; non-finite steps are skipped, counted, and stop the
job after `run.max_bad_steps` in a row."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from rlhf_ray.cli.errors import EXIT_STOPPED
from rlhf_ray.jobs import run_job

from job_helpers import assert_same_run, metric_rows, tiny_config

pytestmark = pytest.mark.timeout(1200)

SFT = ["run.progress=false", "data.eval=", "run.eval_every=0", "run.batch_size=8", "policy.micro_batch_size=8",
       "policy.num_cpus_per_rank=1", "policy.optim.scheduler=constant", "policy.optim.warmup_steps=0"]


def _steps(run_dir) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def test_sigterm_writes_a_checkpoint_without_periodic_ones_and_a_rerun_finishes(tmp_path):
    out = tmp_path / "sft"
    command = [sys.executable, "-m", "rlhf_ray.cli.main", "train", "tiny-sft", f"run.output_dir={out}",
               "run.total_steps=400", "run.save_every=0", *SFT]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while len(_steps(out)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the job ended before it could be signalled"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)  # bounded: the current step, then one checkpoint
    assert proc.returncode == EXIT_STOPPED, err[-3000:]
    assert "stopping after the current step" in err and "run the same command again to continue" in err
    done = _steps(out)
    assert 3 <= len(done) < 400 and done == list(range(1, len(done) + 1))
    assert (out / "checkpoints" / f"step_{done[-1]}" / "CHECKPOINT_COMPLETE").is_file()

    again = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _steps(out) == list(range(1, 401))  # every step once


def test_a_corrupted_latest_checkpoint_falls_back_to_the_previous_one(ray_cluster, tmp_path, capsys, command_logging):
    out, full = tmp_path / "resumed", tmp_path / "full"
    run_job(tiny_config("tiny-sft", full, "run.total_steps=6", *SFT))
    run_job(tiny_config("tiny-sft", out, "run.total_steps=4", "run.save_every=2", "run.keep_last=5", *SFT))
    broken = out / "checkpoints" / "step_4" / "policy_hf" / "model.safetensors"
    broken.write_bytes(broken.read_bytes()[:100])  # a save cut short by a dying disk
    run_job(tiny_config("tiny-sft", out, "run.total_steps=6", "run.save_every=2", "run.keep_last=5", *SFT))
    assert "step_4 is damaged (policy_hf/model.safetensors holds 100 bytes" in capsys.readouterr().err
    rows = metric_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # steps 3-4 redone from step 2, never repeated
    assert_same_run(out, full)


def test_non_finite_steps_are_skipped_counted_and_stop_the_job(ray_cluster, tmp_path):
    from safetensors.torch import load_file

    from rlhf_ray.jobs.common import NonFiniteError

    out = tmp_path / "diverged"
    # Adam at lr 1e20 throws the weights far out in step 1; from step 2 every loss is non-finite.
    cfg = tiny_config("tiny-sft", out, "run.total_steps=10", "run.save_every=1", "run.keep_last=10",
                      "policy.optim.lr=1e20", "run.max_bad_steps=3", *SFT)
    with pytest.raises(NonFiniteError, match=r"3 optimizer steps in a row ending at step 4 were skipped .*"
                                             r"train/loss=nan.*lower the learning rate"):
        run_job(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["train/skipped"] for r in rows] == [0.0, 1.0, 1.0, 1.0]
    assert [r["train/skipped_steps"] for r in rows] == [0.0, 1.0, 2.0, 3.0]
    # a skipped step leaves the weights as they were: step 2's checkpoint holds step 1's weights
    first, second = (load_file(str(out / "checkpoints" / f"step_{n}" / "policy_hf" / "model.safetensors"))
                     for n in (1, 2))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_the_bad_step_streak_resets_on_a_good_step():
    from rlhf_ray.jobs.common import BadSteps

    counter = BadSteps(limit=2)
    assert counter.update(1, {"train/skipped": 1.0, "train/loss": float("nan")}, ("train/skipped",), "n") is None
    assert counter.update(2, {"train/skipped": 0.0}, ("train/skipped",), "n") is None  # the streak starts over
    metrics = {"train/skipped": 1.0, "train/loss": float("inf")}
    assert counter.update(3, metrics, ("train/skipped",), "n") is None and metrics["n"] == 2.0
    assert "ending at step 4" in counter.update(4, {"train/skipped": 1.0}, ("train/skipped",), "n")
