"""Plans and comparisons render to JSON (exact bytes) and Markdown."""

from __future__ import annotations

import json

from rlhf_ray.planner.cost import Hardware, online_step_work, run_cost, step_time
from rlhf_ray.planner.layout import compare, plan_layout
from rlhf_ray.planner.report import (
    comparison_to_dict,
    comparison_to_markdown,
    cost_to_dict,
    cost_to_markdown,
    plan_to_dict,
    plan_to_markdown,
)
from rlhf_ray.planner.shapes import load_shape


def _plans():
    shape = load_shape("llama-7b")
    common = dict(policy=shape, reward=shape, gpus=8, gpu_mem_gib=80)
    return (
        plan_layout("ppo", needs_critic=True, needs_reference=True, **common),
        plan_layout("remax", needs_critic=False, needs_reference=True, **common),
    )


def test_plan_dict_round_trips_through_json_with_exact_bytes():
    ppo, _ = _plans()
    data = json.loads(json.dumps(plan_to_dict(ppo)))
    assert data["algorithm"] == "ppo" and data["num_gpus"] == 8
    assert [r["role"] for r in data["roles"]] == ["policy", "critic", "reference", "reward", "rollout"]
    policy = data["roles"][0]
    assert policy["gpu_bytes"] == ppo.role("policy").gpu
    assert data["groups"][0]["required_bytes"] == ppo.groups[0].required_bytes
    assert data["total_required_bytes"] == 8 * ppo.groups[0].required_bytes


def test_plan_markdown_has_a_row_per_role_and_the_verdict():
    ppo, _ = _plans()
    text = plan_to_markdown(ppo)
    for role in ("policy", "critic", "reference", "reward", "rollout"):
        assert f"| {role} | llama-7b |" in text
    assert ("does NOT fit" in text) != ppo.fits
    assert "gpu_memory_utilization" in text


def test_comparison_renders_the_saving():
    ppo, remax = _plans()
    comparison = compare([ppo, remax])
    data = comparison_to_dict(comparison)
    assert data["baseline"] == "ppo"
    assert data["rows"][1]["saving_bytes"] == ppo.total_required_bytes - remax.total_required_bytes
    text = comparison_to_markdown(comparison)
    assert f"({comparison.row('remax').saving_percent:.1f}%)" in text
    assert "| remax | " in text and " - |" in text  # ReMax has no critic column value


def test_cost_renders_phases_and_dollars():
    shape = load_shape("gpt2")
    work = online_step_work(policy=shape, critic=None, reference=shape, reward=None, prompts=8,
                            samples_per_prompt=2, greedy_per_prompt=0, prompt_len=64, response_len=64)
    step = step_time(work, hardware=Hardware(num_gpus=1, peak_flops=1e12))
    run = run_cost(step.total_s, prompts_per_step=8, num_prompts=80, num_gpus=1, price_per_gpu_hour=3.0)
    data = cost_to_dict(step, run)
    assert data["steps"] == 10 and data["dollars"] == run.dollars
    assert "| train/policy/train |" in cost_to_markdown(step, run)
