"""The algorithms learn the synthetic task, end to end, in a few minutes on two cores.

One short SFT run (shared by the module) starts every job: each online
algorithm raises the held-out reward of its samples within eight steps on the
vLLM engine, the reward model separates held-out pairs, DPO's implicit reward
margin rises, and ReMax's advantages are each sample's reward minus the greedy
response's reward of the same prompt.
"""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.jobs import run_job
from rlhf_ray.telemetry.metrics import read_metrics

from job_helpers import tiny_config

# Dr. GRPO and GSPO change GRPO's loss alone (their math is tested by hand, GSPO's wiring by one step in
# test_online_runs.py): their learning runs are marked slow, to keep the default suite's time.
ONLINE = ["tiny-ppo", "tiny-remax", "tiny-grpo", "tiny-dapo", "tiny-rloo", "tiny-reinforce-pp",
          pytest.param("tiny-dr-grpo", marks=pytest.mark.slow), pytest.param("tiny-gspo", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def sft(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("learning") / "sft"
    run_job(tiny_config("tiny-sft", out, "run.total_steps=60"))
    return out / "final"


@pytest.mark.parametrize("preset", ONLINE)
def test_each_online_algorithm_raises_the_heldout_reward(sft, tmp_path, preset):
    out = tmp_path / preset
    run_job(tiny_config(preset, out, "run.total_steps=8", "run.batch_size=8", f"policy.model.name_or_path={sft}",
                        "data.eval=synthetic:prompts_eval", "run.eval_size=64"))
    evals = [r for r in read_metrics(out) if "eval/reward_mean" in r]
    assert [r["step"] for r in evals] == [1, 8]
    first, last = evals[0]["eval/reward_mean"], evals[-1]["eval/reward_mean"]
    assert last > first + 0.1, (preset, first, last)
    rows = read_metrics(out)
    if "rollout/draws" in rows[0]:  # dynamic sampling (dapo): every step drew at least its batch of 8 prompts
        assert all(r["rollout/prompts_drawn"] >= 8 and r["rollout/groups_refilled"] <= 8 for r in rows)


def test_reward_model_separates_heldout_pairs(sft, tmp_path):
    out = tmp_path / "rm"
    run_job(tiny_config("tiny-rm", out, "run.total_steps=30", f"reward.model.name_or_path={sft}",
                        "data.eval=synthetic:preference_eval", "run.eval_every=30"))
    assert read_metrics(out)[-1]["eval/rm_accuracy"] >= 0.9


def test_dpo_margins_rise(sft, tmp_path):
    out = tmp_path / "dpo"
    run_job(tiny_config("tiny-dpo", out, "run.total_steps=10", f"policy.model.name_or_path={sft}"))
    rows = read_metrics(out)
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as its reference
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"] + 0.05
    assert rows[-1]["rewards/accuracies"] > 0.5


def test_remax_advantage_is_sample_reward_minus_greedy_reward_of_its_prompt(tmp_path):
    from rlhf_ray.jobs.online import OnlineJob

    cfg = tiny_config("tiny-remax", tmp_path / "remax", "algorithm.samples_per_prompt=2",
                      "algorithm.whiten_advantages=false", "algorithm.kl_coef=0", "run.batch_size=2")
    job = OnlineJob.from_config(cfg)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]])
    rollout = {"input_ids": torch.zeros(4, 5, dtype=torch.long), "attention_mask": torch.ones(4, 5, dtype=torch.long),
               "response_mask": mask, "finished": torch.ones(4, dtype=torch.bool),
               "greedy_finished": torch.ones(2, dtype=torch.bool), "engine_logprobs": torch.zeros(4, 3)}
    rewards = torch.tensor([1.0, 0.5, 0.25, 2.0])          # prompt 0: rows 0-1, prompt 1: rows 2-3
    greedy = torch.tensor([0.75, 1.0]).repeat_interleave(2)  # as `score` expands the greedy rewards
    scores = {"sequence_rewards": rewards, "greedy_rewards": greedy, "logprobs": torch.zeros(4, 3),
              "ref_logprobs": torch.zeros(4, 3)}
    batch, _ = job.compute_advantages(rollout, scores)
    expected = (rewards - torch.tensor([0.75, 0.75, 1.0, 1.0]))[:, None] * mask
    assert torch.allclose(batch["advantages"] * mask, expected)
