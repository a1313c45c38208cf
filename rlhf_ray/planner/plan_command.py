"""What `rlhf-ray plan` reports for a job config: each algorithm's memory per
role and per GPU, whether it fits, the saving of each algorithm over the
first, and the cost of a run (GPU-hours and dollars).

The time of a step comes from FLOPs at an assumed MFU on the named GPU
(`cost.Hardware`), or from measured tokens per second (a `bench throughput`
result); the run is `num_prompts` prompts, `run.batch_size` per step.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_ray.config.schema import JobConfig
from rlhf_ray.job_plan import with_algorithm
from rlhf_ray.planner.cost import GPU_PEAK_FLOPS, Hardware, Throughput, online_step_work, run_cost, step_time
from rlhf_ray.planner.from_config import on_gpu, planned_roles
from rlhf_ray.planner.layout import LayoutPlan, compare
from rlhf_ray.planner.memory import GiB
from rlhf_ray.planner.report import (
    comparison_to_dict,
    comparison_to_markdown,
    cost_to_dict,
    cost_to_markdown,
    plan_to_dict,
    plan_to_markdown,
)


def throughput_from_bench(path: str | Path) -> Throughput:
    """Measured tokens per second from a `rlhf-ray bench throughput` JSON file: generation, and per
    model forward (scoring) and training passes, which the cost model adds up phase by phase.
    A kind the file lacks (offline runs generate nothing) falls back to FLOPs at the assumed MFU."""
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read a bench throughput result ({err}); give the .json that "
                         "`rlhf-ray bench throughput` wrote") from None
    if result.get("kind") != "throughput":
        raise ValueError(f"{path}: not a bench throughput result (kind={result.get('kind')!r})")
    if "model_train_tokens_per_s" not in result:
        raise ValueError(f"{path}: has no per-model training rate (model_train_tokens_per_s); run "
                         "`rlhf-ray bench throughput` again with this version")
    return Throughput(generate_tokens_per_s=result.get("generate_tokens_per_s"),
                      forward_tokens_per_s=result.get("model_forward_tokens_per_s"),
                      train_tokens_per_s=result["model_train_tokens_per_s"])


def _step_cost(cfg: JobConfig, plan: LayoutPlan, *, model: str | None, gpus: int | None, gpu_type: str,
               throughput: Throughput | None, num_prompts: int, price: float) -> dict | None:
    """Time and cost of an online run; None for offline jobs."""
    from rlhf_ray.algorithms.registry import UnknownAlgorithmError, get_online_algorithm

    try:
        algorithm = get_online_algorithm(cfg.algorithm.name)
    except UnknownAlgorithmError:
        return None
    shapes = {s.role: s.shape for s in planned_roles(cfg, model=model, gpus=gpus)}
    n = cfg.algorithm.samples_per_prompt or algorithm.default_samples_per_prompt
    work = online_step_work(
        policy=shapes["policy"], critic=shapes.get("critic"), reference=shapes.get("reference"),
        reward=shapes.get("reward"), prompts=cfg.run.batch_size, samples_per_prompt=n,
        greedy_per_prompt=1 if algorithm.needs_greedy else 0, prompt_len=cfg.data.max_prompt_length,
        response_len=cfg.rollout.max_new_tokens, policy_epochs=cfg.algorithm.ppo_epochs)
    hardware = Hardware(num_gpus=plan.num_gpus, peak_flops=GPU_PEAK_FLOPS[gpu_type])
    step = step_time(work, hardware=hardware, throughput=throughput)
    run = run_cost(step.total_s, prompts_per_step=cfg.run.batch_size, num_prompts=num_prompts,
                   num_gpus=plan.num_gpus, price_per_gpu_hour=price)
    return {**cost_to_dict(step, run), "markdown": cost_to_markdown(step, run)}


def fit_hint(plan: LayoutPlan) -> str | None:
    """For a colocated vLLM engine that makes a group overflow: the largest share it could claim."""
    for group in plan.groups:
        rollout = next((r for r in plan.roles if r.role == "rollout" and r.reserved and r.role in group.roles), None)
        if group.fits or rollout is None:
            continue
        others = group.claimed_bytes - rollout.reserved
        share = (group.gpu_mem_bytes - others) / group.gpu_mem_bytes
        if share * group.gpu_mem_bytes >= rollout.minimum:
            return (f"{plan.algorithm}: the other roles need {others / GiB:.1f} GiB per GPU beside vLLM; "
                    f"rollout.gpu_memory_utilization={share:.2f} or lower would fit")
        return (f"{plan.algorithm}: even the smallest vLLM claim ({rollout.minimum / GiB:.1f} GiB) does not fit "
                "beside the other roles; give the rollout its own GPUs, more GPUs, or ZeRO-3 with offload")
    return None


def plan_command(cfg: JobConfig, *, algorithms: list[str] | None = None, model: str | None = None,
             gpus: int | None = None, gpu_mem_gib: float = 80.0, gpu_type: str = "a100",
             price_per_gpu_hour: float = 2.0, num_prompts: int | None = None,
             throughput: Throughput | None = None) -> dict:
    """Plans of `cfg` under each of `algorithms` (default: its own), the comparison with the first,
    and each online run's cost over `num_prompts` prompts (default: total_steps x batch_size)."""
    from rlhf_ray.planner.from_config import plan_from_config

    if gpus is not None and gpus < 1:
        raise ValueError(f"--gpus must be at least 1, got {gpus}")
    if gpu_mem_gib <= 0:
        raise ValueError(f"--gpu-mem must be a positive number of GiB, got {gpu_mem_gib}")
    if num_prompts is not None and num_prompts < 1:
        raise ValueError(f"--samples must be at least 1, got {num_prompts}")
    if gpu_type not in GPU_PEAK_FLOPS:
        raise ValueError(f"gpu type {gpu_type!r} unknown; use one of {', '.join(GPU_PEAK_FLOPS)}")
    names = algorithms or [cfg.algorithm.name]
    if algorithms:
        from rlhf_ray.algorithms.registry import get_online_algorithm

        for name in algorithms:  # compared algorithms are online ones: a typo fails here, by name
            get_online_algorithm(name)
    prompts = num_prompts or cfg.run.total_steps * cfg.run.batch_size
    out: dict = {"algorithms": names, "gpu_mem_gib": gpu_mem_gib, "gpu_type": gpu_type, "num_prompts": prompts,
                 "price_per_gpu_hour": price_per_gpu_hour, "measured": throughput is not None, "plans": {},
                 "costs": {}, "hints": []}
    plans = []
    for name in names:
        variant = with_algorithm(cfg, name)
        plan = plan_from_config(variant, model=model, gpus=gpus, gpu_mem_gib=gpu_mem_gib)
        plans.append(plan)
        out["plans"][name] = {**plan_to_dict(plan), "markdown": plan_to_markdown(plan)}
        cost = None
        if throughput is not None or on_gpu(variant, gpus):  # a CPU job's cost needs its measured throughput
            cost = _step_cost(variant, plan, model=model, gpus=gpus, gpu_type=gpu_type, throughput=throughput,
                              num_prompts=prompts, price=price_per_gpu_hour)
        if cost is not None:
            out["costs"][name] = cost
        hint = fit_hint(plan)
        if hint:
            out["hints"].append(hint)
    if len(plans) > 1:
        comparison = compare(plans)
        out["comparison"] = {**comparison_to_dict(comparison), "markdown": comparison_to_markdown(comparison)}
        # What each busiest GPU has allocated: vLLM takes its claim whatever its batch needs.
        claimed = {p.algorithm: max(g.claimed_bytes for g in p.groups) for p in plans}
        base = claimed[plans[0].algorithm]
        out["comparison"]["claimed_busiest_gpu_bytes"] = claimed
        out["comparison"]["claimed_saving_percent"] = {n: 100.0 * (base - b) / base for n, b in claimed.items()}
    return out


def plan_markdown(result: dict) -> str:
    """The plans, their costs, the comparison and any hint, as one Markdown text."""
    lines = []
    source = "measured throughput" if result.get("measured") else \
        f"FLOPs on {result['gpu_type'].upper()} GPUs at the assumed MFU"
    for name, plan in result["plans"].items():
        lines.append(plan["markdown"])
        if name in result["costs"]:
            lines += [f"Cost of {result['num_prompts']:,} prompts at ${result['price_per_gpu_hour']:.2f} per "
                      f"GPU-hour ({source}):", "", result["costs"][name]["markdown"]]
    if "comparison" in result:
        c = result["comparison"]
        lines.append(c["markdown"])
        allocated = ", ".join(f"{n} {b / GiB:.2f} GiB ({c['claimed_saving_percent'][n]:.1f}% less)"
                              for n, b in c["claimed_busiest_gpu_bytes"].items())
        lines += [f"Busiest GPU as allocated (vLLM's claim in place of its batch's needs): {allocated}.", ""]
    lines += [f"- hint: {hint}" for hint in result["hints"]]
    return "\n".join(lines) + "\n"


def strip_markdown(result: dict) -> dict:
    """The result without its rendered Markdown (for `--json`)."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "markdown"}
        return value
    return strip(result)


__all__ = ["fit_hint", "plan_command", "plan_markdown", "strip_markdown", "throughput_from_bench"]
