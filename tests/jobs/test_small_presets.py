"""The small-* job presets (the 26M-parameter small-llama policy) end to end on a local Ray cluster.

Each preset runs two steps with small batches and short responses, so the module stays a few minutes
on a two-core machine: enough to show that the Llama-shaped model loads in every role, DeepSpeed
trains it, the vLLM engine serves it and is synced to it, and each job writes a metrics row per
step. Steps are not timed here; the preset's step times are the benchmarks' business."""

from __future__ import annotations

import math

import pytest

from rlhf_ray.config import load_config
from rlhf_ray.jobs import run_job
from rlhf_ray.models.tokenizer import load_tokenizer
from rlhf_ray.telemetry.metrics import read_metrics

from job_helpers import tiny_config

STEPS = 2
# The offline jobs: four sequences a step in micro-batches of two, so gradient accumulation runs too.
OFFLINE = [f"run.total_steps={STEPS}", "run.batch_size=4", "policy.micro_batch_size=2",
           "policy.optim.warmup_steps=0", "policy.optim.scheduler=constant"]
# The online jobs: two prompts, eight new tokens, one PPO pass.
ONLINE = [f"run.total_steps={STEPS}", "run.batch_size=2", "rollout.max_new_tokens=8",
          "algorithm.num_minibatches=1", "algorithm.ppo_epochs=1"]


def test_every_small_preset_uses_the_small_llama_policy():
    for name in ("small-sft", "small-dpo", "small-ppo", "small-remax", "small-grpo"):
        cfg = load_config(name)
        assert cfg.policy.model.name_or_path == "small-llama", name
        assert cfg.run.output_dir == f"runs/{name}", name
    assert load_config("small-dpo").algorithm.params == {"beta": 0.1}
    for name in ("small-ppo", "small-remax", "small-grpo"):
        assert load_config(name).rollout.engine == "vllm", name


def test_small_sft_trains_from_a_uniform_start(ray_cluster, tmp_path):
    summary = run_job(tiny_config("small-sft", tmp_path / "sft", *OFFLINE))
    assert summary["roles"] == ["policy"] and summary["num_steps"] == STEPS
    rows = read_metrics(tmp_path / "sft")
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    # Seeded random weights with initializer_range 0.02 predict near-uniformly over the vocabulary.
    vocab = len(load_tokenizer("tiny"))
    assert rows[0]["train/loss"] == pytest.approx(math.log(vocab), abs=0.3)
    assert all(math.isfinite(row["train/loss"]) and row["train/grad_norm"] > 0 for row in rows)
    assert summary["max"]["memory/policy/optimizer_bytes"] > 0
    assert (tmp_path / "sft" / "final" / "model.safetensors").exists()


def test_small_dpo_starts_at_log_2_with_policy_and_reference(ray_cluster, tmp_path):
    summary = run_job(tiny_config("small-dpo", tmp_path / "dpo", *OFFLINE, "reference.micro_batch_size=4"))
    assert summary["roles"] == ["policy", "reference"] and summary["num_steps"] == STEPS
    rows = read_metrics(tmp_path / "dpo")
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert rows[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-4)  # the policy is the reference
    assert all(math.isfinite(row["train/loss"]) for row in rows)
    assert summary["max"]["memory/reference/optimizer_bytes"] == 0


@pytest.mark.parametrize("preset, roles, loss_key", [
    ("small-ppo", ["critic", "policy", "reference", "reward", "rollout"], "critic/value_loss"),
    ("small-remax", ["policy", "reference", "reward", "rollout"], "rollout/greedy_reward_mean"),
    ("small-grpo", ["policy", "reference", "reward", "rollout"], "policy/pg_loss"),
])
def test_small_online_preset_runs_on_the_synced_vllm_engine(ray_cluster, tmp_path, preset, roles, loss_key):
    overrides = list(ONLINE)
    if preset == "small-grpo":
        overrides.append("algorithm.samples_per_prompt=2")
    summary = run_job(tiny_config(preset, tmp_path / preset, *overrides))
    assert summary["roles"] == roles and summary["num_steps"] == STEPS
    rows = read_metrics(tmp_path / preset)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    for row in rows:
        # The engine's log-probs of its sampled tokens are the policy's: step 1 from the same seeded
        # weights, step 2 after the first update was synced into vLLM.
        assert row["rollout/logprob_diff"] < 1e-3, row["rollout/logprob_diff"]
        assert row["rollout/response_length"] > 0
        assert math.isfinite(row["policy/pg_loss"]) and math.isfinite(row[loss_key])
    assert rows[-1]["sync/bytes"] > 0
