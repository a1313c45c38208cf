"""Benchmarks: where a step's time goes (hand-worked rows), the worker compute clock,
and end-to-end throughput runs whose results have every figure the report needs.

Nothing here checks a duration: only the accounting, the keys and the files."""

from __future__ import annotations

import json

import pytest

from rlhf_ray.config import load_config
from rlhf_ray.reports.bench import (
    largest_batch,
    lm_head_params,
    measure_limits,
    planned_peak_bytes,
    replace_path,
    role_memory,
    run_throughput,
    step_breakdown,
    train_flops_per_token,
    trained_matmul_params,
    with_algorithm,
)
from rlhf_ray.reports.bench_markdown import write_result
from rlhf_ray.telemetry.metrics import read_metrics
from rlhf_ray.telemetry.timers import ComputeClock

from job_helpers import tiny_config

SMALL_ONLINE = ["run.batch_size=2", "rollout.max_new_tokens=4", "algorithm.num_minibatches=1", "algorithm.ppo_epochs=1"]


def test_step_breakdown_splits_a_step_into_compute_sync_and_overhead():
    row = {"step": 3, "time/generate_s": 2.0, "time/score_s": 3.0, "time/advantages_s": 0.5,
           "time/update_policy_s": 4.0, "time/update_critic_s": 1.0, "time/sync_s": 0.5, "time/step_s": 12.0,
           "time/compute/rollout/generate_s": 1.8, "time/compute/rollout_s": 1.8,
           "time/compute/policy/forward_s": 2.0, "time/compute/reference/forward_s": 2.5,
           "time/compute/critic/forward_s": 3.5,  # more than the score phase's wall: capped at 3.0
           "time/compute/policy/train_s": 3.6, "time/compute/critic/train_s": 4.5}
    b = step_breakdown(row)
    # generate 1.8; forward min(3.5, 3.0) = 3.0; train: the slowest rank/role 4.5 inside 4.0 + 1.0 = 5.0;
    # advantages run on the driver: 0.5. Compute 1.8 + 3.0 + 4.5 + 0.5 = 9.8.
    assert b["compute/generate_s"] == pytest.approx(1.8)
    assert b["compute/forward_s"] == pytest.approx(3.0)
    assert b["compute/train_s"] == pytest.approx(4.5)
    assert b["compute/driver_s"] == pytest.approx(0.5)
    assert b["compute_s"] == pytest.approx(9.8)
    assert b["wall/train_s"] == pytest.approx(5.0)
    # Outside compute: 12 - 9.8 = 2.2 = sync 0.5 + overhead 1.7, a share of 2.2 / 12.
    assert b["sync_s"] == pytest.approx(0.5)
    assert b["overhead_s"] == pytest.approx(1.7)
    assert b["outside_compute_share"] == pytest.approx(2.2 / 12)


def test_step_breakdown_adds_up_roles_that_took_turns():
    row = {"step": 1, "time/score_s": 3.0, "time/update_policy_s": 2.0, "time/update_critic_s": 1.5,
           "time/step_s": 7.0, "time/compute/policy/train_s": 1.9, "time/compute/critic/train_s": 1.4,
           "time/compute/reference/forward_s": 1.0, "time/compute/critic/forward_s": 1.2,
           # policy and critic trained in turns, the two forwards too (`RoleGroups.compute_times`)
           "time/compute_of_kind/train_s": 3.3, "time/compute_of_kind/forward_s": 2.2}
    b = step_breakdown(row)
    assert b["compute/train_s"] == pytest.approx(3.3) and b["compute/forward_s"] == pytest.approx(2.2)
    assert b["overhead_s"] == pytest.approx(7.0 - 5.5)


def test_step_breakdown_of_an_offline_step_and_a_row_without_a_step_time():
    row = {"time/reference_s": 1.0, "time/update_s": 3.0, "time/step_s": 4.5,
           "time/compute/reference/forward_s": 0.75, "time/compute/policy/train_s": 2.5}
    b = step_breakdown(row)
    assert b["compute_s"] == pytest.approx(3.25) and b["overhead_s"] == pytest.approx(1.25)  # 4.5 - 3.25 - 0
    with pytest.raises(ValueError, match="time/step_s"):
        step_breakdown({"step": 1, "time/update_s": 1.0})


def test_compute_clock_adds_up_per_kind_and_starts_again_after_take():
    ticks = iter([0.0, 2.0, 10.0, 10.5, 20.0, 23.0])
    clock = ComputeClock(clock=lambda: next(ticks))
    with clock.measure("train"):
        pass
    with clock.measure("train"):
        pass
    with clock.measure("forward"):
        pass
    assert clock.take() == {"train": 2.5, "forward": 3.0}
    assert clock.take() == {}
    with pytest.raises(ValueError, match="compute kind 'sleep'"):
        with clock.measure("sleep"):
            pass


def test_role_memory_reads_the_memory_keys_of_a_summary():
    summary = {"max": {"memory/policy/params_bytes": 8, "memory/policy/held_bytes": 24, "memory/reward/held_bytes": 0,
                       "memory/reward/peak_rss_bytes": 100, "time/step_s": 1.0}}
    roles = role_memory(summary)
    assert roles["policy"]["params"] == 8 and roles["policy"]["held"] == 24 and roles["policy"]["grads"] == 0.0
    assert roles["reward"]["peak_rss"] == 100 and set(roles) == {"policy", "reward"}


def test_largest_batch_follows_the_planned_memory():
    cfg = with_algorithm(load_config("tiny-remax", ["reward.rule=", "reward.model.name_or_path=tiny-gpt2"]), "remax")
    doubled = replace_path(cfg, run={"batch_size": 2 * cfg.run.batch_size})
    budget = planned_peak_bytes(doubled)
    best = largest_batch(cfg, budget)
    assert best >= 2 * cfg.run.batch_size and planned_peak_bytes(replace_path(cfg, run={"batch_size": best})) <= budget
    assert largest_batch(cfg, budget_bytes=1) == cfg.run.batch_size  # nothing larger fits: its own batch


def _limits():
    return measure_limits(threads=1, matmul_n=64, copy_bytes=2**20)


def test_online_throughput_reports_every_phase_compute_and_the_limits(ray_cluster, tmp_path):
    cfg = tiny_config("tiny-ppo", tmp_path / "unused", *SMALL_ONLINE)
    result = run_throughput(cfg, tmp_path, warmup=1, steps=1, limits=_limits(), label="ppo")
    assert set(result["phases_median_s"]) == {"generate", "score", "advantages", "update_policy", "update_critic",
                                              "sync"}
    roles = {key.split("/")[2] for key in result["compute_median_s"]}
    assert roles >= {"policy", "critic", "reference", "reward", "rollout"}
    b = result["breakdown_median"]
    assert b["compute_s"] + b["sync_s"] + b["overhead_s"] == pytest.approx(b["step_s"])
    for kind in ("generate", "forward", "train"):
        assert 0 < b[f"compute/{kind}_s"] <= b[f"wall/{kind}_s"]
    assert result["samples_per_step"] == 2 and result["measured_steps"] == 1
    assert result["model_train_tokens_per_s"] == pytest.approx(2 * result["train_tokens_per_s"])  # policy, critic
    assert result["model_forward_tokens_per_s"] > 0 and len(result["step_seconds"]) == 1
    assert result["train"]["matmul_params"] > 0 and result["train"]["mfu"] > 0
    # The FLOP rate counts the tokens the work needs (PPO: one sample a prompt, so its real tokens), no padding.
    rows = [r for r in read_metrics(tmp_path / "runs" / "ppo") if r["step"] > 1]
    t = result["train"]
    assert t["flops_per_token"] == 6 * t["matmul_params"]
    assert t["needed_tokens_per_step"] == rows[0]["perf/needed_tokens"] <= rows[0]["perf/trained_tokens"]
    assert t["model_flops_per_s"] == pytest.approx(t["flops_per_token"] * t["needed_tokens_per_step"]
                                                   / result["breakdown_median"]["wall/train_s"])
    g = result["generate"]
    assert g["weight_bytes"] == 2242560  # tiny-gpt2: 560,640 fp32 parameters
    # The roofline is the higher of the two lower bounds: policy only (the critic trains, never decodes).
    assert result["train"]["matmul_params"] > trained_matmul_params(cfg, "policy") > 0
    assert g["roofline_bound_tokens_per_s"] == pytest.approx(min(g["bandwidth_bound_tokens_per_s"],
                                                                 g["compute_bound_tokens_per_s"]))
    assert g["roofline_utilisation"] >= g["bandwidth_utilisation"]
    # Compute bound: 2 N a decoded token, 2 N less the LM head a distinct prompt token (prefill).
    n, head = trained_matmul_params(cfg, "policy"), lm_head_params(cfg)
    assert 0 < head < n and g["prefill_tokens_per_step"] == rows[0]["perf/prefill_tokens"] > 0
    assert g["compute_bound_s_per_step"] == pytest.approx(
        2 * (n * rows[0]["perf/generated_tokens"] + (n - head) * rows[0]["perf/prefill_tokens"])
        / result["limits"]["matmul_flops_per_s"])
    assert result["sync"]["bytes"] == 2242560 and 0 < result["sync"]["share_of_memcpy"] < 1
    # The scoring forwards of the model roles (the reward is a rule: no FLOPs), against the GEMM rate.
    assert sorted(result["forward"]["roles"]) == ["critic", "reference"] and result["forward"]["mfu"] > 0
    bounds = {row["phase"]: row for row in result["bounds"]}
    assert set(bounds) == {"training", "forward", "generate", "sync", "overhead"}
    assert bounds["training"]["value"] == result["train"]["mfu"] and bounds["overhead"]["sense"] == "max"
    assert all(row["met"] == (row["value"] >= row["target"] if row["sense"] == "min" else row["value"] <= row["target"])
               for row in result["bounds"])
    assert result["hardware"]["cpu_model"] and result["hardware"]["versions"]["torch"]
    paths = write_result(result, tmp_path / "results", "throughput-ppo")
    assert json.loads(paths["json"].read_text())["label"] == "ppo"
    text = paths["md"].read_text()
    assert "| update_critic |" in text and "MFU" in text and "Versions: python" in text and "roofline" in text
    assert "of memcpy" in text and "Each phase against its own bound" in text and "| >= 60% |" in text


def test_offline_throughput_counts_the_reference_and_the_update(ray_cluster, tmp_path):
    cfg = tiny_config("tiny-dpo", tmp_path / "unused", "run.batch_size=4", "policy.micro_batch_size=4",
                      "policy.optim.warmup_steps=0", "policy.optim.scheduler=constant")
    result = run_throughput(cfg, tmp_path, warmup=1, steps=1, limits=_limits(), label="dpo")
    assert set(result["phases_median_s"]) == {"reference", "update"}
    assert "time/compute/reference/forward_s" in result["compute_median_s"]
    assert "time/compute/policy/train_s" in result["compute_median_s"]
    assert result["train_tokens_per_s"] > 0 and "generate" not in result
    assert result["forward"]["roles"] == ["reference"] and result["forward"]["mfu"] > 0
    assert {row["phase"] for row in result["bounds"]} == {"training", "forward", "overhead"}
    rows = [r for r in read_metrics(tmp_path / "runs" / "dpo") if r["step"] > 1]
    assert result["train"]["needed_tokens_per_step"] == rows[0]["perf/needed_tokens"] < rows[0]["perf/trained_tokens"]


def test_training_flops_per_token_are_4n_under_lora():
    cfg = load_config("tiny-dpo")
    n = trained_matmul_params(cfg)
    assert train_flops_per_token(cfg) == 6 * n
    assert train_flops_per_token(load_config("tiny-dpo", ["policy.lora.rank=4"])) == 4 * n
