"""A running PPO job survives `kill -9` of any role's actor: it recreates its role groups, resumes from the
latest checkpoint and ends with every step once and the weights of an uninterrupted run."""

from __future__ import annotations

import os

import pytest

from rlhf_ray.jobs import run_job
from rlhf_ray.runtime.actor_group import DEATH_ERRORS
from rlhf_ray.telemetry.metrics import read_metrics

from job_helpers import assert_same_run, run_killing_once, tiny_config

pytestmark = pytest.mark.timeout(1800)

PPO = ["run.total_steps=6", "run.save_every=2", "run.keep_last=5", "run.batch_size=4", "rollout.max_new_tokens=8",
       "policy.micro_batch_size=4", "critic.micro_batch_size=4", "reference.micro_batch_size=8",
       "reward.micro_batch_size=8"]
ACTOR_CLASS = {"policy": "PolicyWorker", "critic": "CriticWorker", "rollout": "VLLMRolloutWorker",
               "reference": "ReferenceWorker", "reward": "RewardWorker"}


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, actor_tmpdir, tmp_path_factory):
    """The uninterrupted run, and what it left in its actors' temp folder."""
    out = tmp_path_factory.mktemp("ppo") / "full"
    before = set(os.listdir(actor_tmpdir))
    run_job(tiny_config("tiny-ppo", out, *PPO))
    return out, sorted(set(os.listdir(actor_tmpdir)) - before)


def test_a_finished_job_leaves_nothing_in_the_temp_folder(uninterrupted):
    _, left = uninterrupted
    # The vLLM engine's saved model copy, its process groups' files and adapter folders are removed when
    # the job ends. torch's compile cache (torchinductor_<user>, parts of which torch always puts under the
    # temp folder) is torch's, shared by every run on the machine and kept on purpose to start the next warm.
    assert [name for name in left if not name.startswith("torchinductor_")] == []


@pytest.mark.parametrize("role", ["policy", "critic", "rollout", "reference", "reward"])
def test_kill_9_of_a_role_is_survived_with_every_step_once(uninterrupted, tmp_path, role):
    out = tmp_path / role
    summary = run_killing_once(tiny_config("tiny-ppo", out, *PPO), ACTOR_CLASS[role], after_steps=3)
    failures = summary["failures"]
    # the dead role is named, also when another actor noticed first (the policy syncing to a dead engine)
    assert len(failures) == 1 and failures[0]["role"].startswith(f"role '{role}'")
    assert failures[0]["resumed_from_step"] in (2, 4, 6)
    assert any(death in failures[0]["cause"] for death in DEATH_ERRORS), failures[0]["cause"]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # recomputed after the checkpoint, never repeated
    assert_same_run(out, uninterrupted[0])  # metrics to float rounding, and the final weights
