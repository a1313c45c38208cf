"""The online step's advantages as a function of the rollout, its scores and the config: no job, no actors,
hand-made tensors against numbers worked out by hand."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.config.loader import load_config
from rlhf_ray.jobs.online_advantages import RunningStd, compute_advantages, fresh_controllers


def _config(preset: str, tmp_path, *overrides: str):
    return load_config(preset, [f"run.output_dir={tmp_path}", *overrides])


def test_ppo_shapes_the_rewards_with_the_kl_and_runs_gae_over_the_response_tokens(tmp_path):
    cfg = _config("tiny-ppo", tmp_path, "algorithm.lam=0.5", "algorithm.whiten_advantages=false",
                  "algorithm.no_eos_penalty=-1.0")
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    rollout = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5, dtype=torch.long),
               "response_mask": mask, "finished": torch.tensor([True, False]), "engine_logprobs": torch.zeros(2, 3)}
    old = torch.tensor([[-1.0, -0.5, 0.0], [-0.2, 0.0, 0.0]])
    scores = {"sequence_rewards": torch.tensor([1.0, 0.5]), "logprobs": old,
              "ref_logprobs": torch.tensor([[-1.5, -0.5, 0.0], [-0.2, 0.0, 0.0]]),
              "values": torch.tensor([[0.5, 0.25, 0.0], [0.1, 0.0, 0.0]])}
    std = RunningStd()
    batch, metrics, after = compute_advantages(rollout, scores, cfg, 0.2, std)
    # Row 0: k1 = [0.5, 0]; token rewards [-0.2 * 0.5, 1.0] = [-0.1, 1.0]. GAE (gamma 1, lambda 0.5):
    #   t1: delta = 1.0 - 0.25 = 0.75 -> A = 0.75;  t0: delta = -0.1 + 0.25 - 0.5 = -0.35 -> A = -0.35 + 0.5 * 0.75
    # Row 1 did not finish: reward 0.5 - 1 = -0.5 on its only token, A = -0.5 - 0.1 = -0.6.
    torch.testing.assert_close(batch["advantages"], torch.tensor([[0.025, 0.75, 0.0], [-0.6, 0.0, 0.0]]))
    torch.testing.assert_close(batch["returns"], torch.tensor([[0.525, 1.0, 0.0], [-0.5, 0.0, 0.0]]))
    assert torch.equal(batch["old_values"], scores["values"])
    assert torch.equal(batch["old_logprobs"], old)  # two PPO epochs: the policy scores them before the update
    assert metrics["rollout/kl"] == pytest.approx(0.25)  # sequence KLs 0.5 and 0
    assert metrics["policy/kl_coef"] == 0.2
    assert metrics["rollout/advantage_mean"] == pytest.approx((0.025 + 0.75 - 0.6) / 3)
    assert after is std and std.count == 0  # rewards not normalised: the running std is left alone


def test_grpo_compares_each_prompts_samples_and_keeps_the_kl_out_of_the_rewards(tmp_path):
    cfg = _config("tiny-grpo", tmp_path, "algorithm.samples_per_prompt=2", "algorithm.normalize_rewards=true")
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]])
    rollout = {"input_ids": torch.zeros(4, 4, dtype=torch.long), "attention_mask": torch.ones(4, 4, dtype=torch.long),
               "response_mask": mask, "finished": torch.ones(4, dtype=torch.bool), "engine_logprobs": torch.zeros(4, 2)}
    old = torch.zeros(4, 2)
    ref = torch.tensor([[-1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])  # k1 = 1 on row 0's first token
    scores = {"sequence_rewards": torch.tensor([1.0, 0.0, 0.5, 0.5]), "logprobs": old, "ref_logprobs": ref}
    std = RunningStd()
    batch, metrics, after = compute_advantages(rollout, scores, cfg, 0.3, std)
    # Running std of [1, 0, 0.5, 0.5]: mean 0.5, squared deviations 0.5, sample std sqrt(0.5 / 3) = 0.408248;
    # the rewards over it: [2.449490, 0, 1.224745, 1.224745]. Prompt 0: mean 1.224745, sample std 1.732051
    # -> +-0.707107 on every response token; prompt 1's samples agree -> 0. The KL stays out (it is in the loss).
    s = 0.5 ** 0.5
    torch.testing.assert_close(batch["advantages"], torch.tensor([[s, s], [-s, 0.0], [0.0, 0.0], [0.0, 0.0]]))
    assert "returns" not in batch
    assert after.state_dict() == pytest.approx({"count": 4, "mean": 0.5, "m2": 0.5})
    assert after.std == pytest.approx((0.5 / 3) ** 0.5)
    assert std.count == 0  # the one passed in is left as it was
    assert metrics["rollout/kl"] == pytest.approx(0.25) and metrics["policy/kl_coef"] == 0.3


def test_the_controllers_start_from_the_config(tmp_path):
    kl, std = fresh_controllers(_config("tiny-remax", tmp_path, "algorithm.adaptive_kl=true", "algorithm.kl_coef=0.5",
                                        "algorithm.kl_target=1.0", "algorithm.kl_horizon=4"))
    assert kl.value == 0.5 and std.std == 1.0
    kl.update(0.25, 2)  # error clipped to -0.2: 0.5 * (1 - 0.2 * 2 / 4)
    assert kl.value == pytest.approx(0.45)
    fixed, _ = fresh_controllers(_config("tiny-ppo", tmp_path, "algorithm.kl_coef=0.1"))
    fixed.update(5.0, 2)
    assert fixed.value == 0.1
