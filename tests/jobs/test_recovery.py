"""A running PPO job survives `kill -9` of any role's actor: it recreates its role groups, resumes from the
latest checkpoint and ends with every step once and the weights of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from rlhf_ray.jobs import run_job
from rlhf_ray.runtime.actor_group import DEATH_ERRORS
from rlhf_ray.telemetry.metrics import read_metrics

from job_helpers import assert_same_run, tiny_config

pytestmark = pytest.mark.timeout(1800)

PPO = ["run.total_steps=6", "run.save_every=2", "run.keep_last=5", "run.batch_size=4", "rollout.max_new_tokens=8",
       "policy.micro_batch_size=4", "critic.micro_batch_size=4", "reference.micro_batch_size=8",
       "reward.micro_batch_size=8"]
ACTOR_CLASS = {"policy": "PolicyWorker", "critic": "CriticWorker", "rollout": "VLLMRolloutWorker",
               "reference": "ReferenceWorker", "reward": "RewardWorker"}


def actor_pids(class_name: str) -> list[int]:
    """Processes of live Ray actors of `class_name` (Ray titles them `ray::<Class>` or `ray::<Class>.<method>`)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title == f"ray::{class_name}" or title.startswith(f"ray::{class_name}."):
            pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo") / "full"
    run_job(tiny_config("tiny-ppo", out, *PPO))
    return out


@pytest.mark.parametrize("role", ["policy", "critic", "rollout", "reference", "reward"])
def test_kill_9_of_a_role_is_survived_with_every_step_once(uninterrupted, tmp_path, role):
    out = tmp_path / role
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(summary=run_job(tiny_config("tiny-ppo", out, *PPO))))
    job.start()
    deadline = time.monotonic() + 900
    while job.is_alive() and time.monotonic() < deadline:
        if (out / "metrics.jsonl").exists() and len(read_metrics(out / "metrics.jsonl")) >= 3:
            break
        time.sleep(0.2)
    pids = actor_pids(ACTOR_CLASS[role])
    assert job.is_alive() and pids, f"no live {ACTOR_CLASS[role]} actor to kill"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    job.join(timeout=900)
    assert "summary" in result, "the job did not finish after the kill"
    failures = result["summary"]["failures"]
    # the dead role is named, also when another actor noticed first (the policy syncing to a dead engine)
    assert len(failures) == 1 and failures[0]["role"].startswith(f"role '{role}'")
    assert failures[0]["resumed_from_step"] in (2, 4, 6)
    assert any(death in failures[0]["cause"] for death in DEATH_ERRORS), failures[0]["cause"]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # recomputed after the checkpoint, never repeated
    assert_same_run(out, uninterrupted)  # metrics to float rounding, and the final weights
