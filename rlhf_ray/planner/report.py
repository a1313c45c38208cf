"""Render plans, comparisons and costs as JSON-ready dicts (exact bytes)
and as Markdown tables (GiB, or MiB when every figure of a table is below 1 GiB)."""

from __future__ import annotations

from typing import Any

from rlhf_ray.planner.cost import RunCost, StepTime
from rlhf_ray.planner.layout import ROLES, Comparison, LayoutPlan
from rlhf_ray.planner.memory import PHASES, GiB, RolePlan

_COLUMNS = (
    ("params", "weights"),
    ("grads", "grads"),
    ("master_params", "fp32 master"),
    ("optimizer_states", "optimizer"),
    ("activations", "activations"),
    ("logits", "logits"),
    ("kv_cache", "KV cache"),
)


def _gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f}"


def _unit(largest: float) -> tuple[str, float]:
    """GiB, or MiB for a table whose largest figure is below 1 GiB (the tiny CPU models)."""
    return ("GiB", GiB) if largest >= GiB else ("MiB", 2**20)


def _in(nbytes: float, unit: tuple[str, float]) -> str:
    return f"{nbytes / unit[1]:.2f}"


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def role_to_dict(role: RolePlan) -> dict[str, Any]:
    return {
        "role": role.role,
        "model": role.model,
        "num_params": role.num_params,
        "num_gpus": role.num_gpus,
        "gpu_bytes": dict(role.gpu),
        "resident_bytes": role.resident,
        "phase_bytes": dict(role.phases),
        "peak_bytes": role.peak_bytes,
        "reserved_bytes": role.reserved,
        "claimed_bytes": role.claimed_bytes,
        "host_bytes": dict(role.host),
        "notes": list(role.notes),
    }


def plan_to_dict(plan: LayoutPlan) -> dict[str, Any]:
    """Everything in the plan, bytes as exact integers."""
    return {
        "algorithm": plan.algorithm,
        "num_gpus": plan.num_gpus,
        "gpu_mem_bytes": plan.gpu_mem_bytes,
        "fits": plan.fits,
        "total_required_bytes": plan.total_required_bytes,
        "peak_gpu_bytes": plan.peak_gpu_bytes,
        "total_host_bytes": plan.total_host_bytes,
        "roles": [role_to_dict(r) for r in plan.roles],
        "groups": [
            {
                "roles": list(g.roles),
                "num_gpus": g.num_gpus,
                "resident_bytes": g.resident_bytes,
                "phase_bytes": dict(g.phase_bytes),
                "required_bytes": g.required_bytes,
                "claimed_bytes": g.claimed_bytes,
                "fits": g.fits,
                "headroom_bytes": g.headroom_bytes,
                "problems": list(g.problems),
            }
            for g in plan.groups
        ],
        "notes": list(plan.notes),
    }


def plan_to_markdown(plan: LayoutPlan) -> str:
    """Two tables: each role's GiB per GPU by component and its peak for the
    batch, then each GPU group's total by phase, what it claims (vLLM's
    share in place of its batch's needs), whether it fits and the headroom."""
    shown = {key for key, _ in _COLUMNS}
    unit = _unit(max([plan.peak_gpu_bytes] + [g.claimed_bytes for g in plan.groups]))
    head = ["role", "model", "params", "GPUs"] + [title for _, title in _COLUMNS] + ["other", "peak/GPU", "host/GPU"]
    lines = [
        f"### {plan.algorithm}: {plan.num_gpus} GPU(s) of {_gib(plan.gpu_mem_bytes)} GiB, "
        f"{'fits' if plan.fits else 'does NOT fit'}",
        "",
        f"{unit[0]} per GPU:",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in plan.roles:
        other = sum(v for k, v in r.gpu.items() if k not in shown)
        cells = [r.role, r.model, _count(r.num_params), str(r.num_gpus)]
        cells += [_in(r.gpu.get(key, 0), unit) for key, _ in _COLUMNS]
        cells += [_in(other, unit), _in(r.peak_bytes, unit), _in(r.host_bytes, unit)]
        lines.append("| " + " | ".join(cells) + " |")
    head = ["GPUs", "roles", "resident"] + list(PHASES) + ["required", "claimed", "fits", "headroom"]
    lines += ["", f"{unit[0]} per GPU:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in plan.groups:
        cells = [str(g.num_gpus), ", ".join(g.roles), _in(g.resident_bytes, unit)]
        cells += [_in(g.phase_bytes.get(p, 0), unit) for p in PHASES]
        cells += [_in(g.required_bytes, unit), _in(g.claimed_bytes, unit), "yes" if g.fits else "no",
                  _in(g.headroom_bytes, unit)]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"**{problem}**" for g in plan.groups for problem in g.problems]
    notes += list(plan.notes) + [f"{r.role}: {note}" for r in plan.roles for note in r.notes]
    lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def comparison_to_dict(comparison: Comparison) -> dict[str, Any]:
    return {
        "baseline": comparison.baseline,
        "rows": [
            {
                "algorithm": r.algorithm,
                "total_bytes": r.total_bytes,
                "peak_gpu_bytes": r.peak_gpu_bytes,
                "role_bytes": dict(r.role_bytes),
                "fits": r.fits,
                "saving_bytes": r.saving_bytes,
                "saving_percent": r.saving_percent,
                "peak_saving_percent": r.peak_saving_percent,
            }
            for r in comparison.rows
        ],
    }


def comparison_to_markdown(comparison: Comparison) -> str:
    """One row per algorithm: GiB over all GPUs by role, the total, the busiest
    GPU, and the saving against the baseline."""
    unit = _unit(max(r.total_bytes for r in comparison.rows))
    roles = [role for role in ROLES
             if any(role in r.role_bytes for r in comparison.rows)]
    head = ["algorithm"] + roles + ["total", "busiest GPU", "fits", f"saving vs {comparison.baseline}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in comparison.rows:
        cells = [r.algorithm] + [_in(r.role_bytes[role], unit) if role in r.role_bytes else "-" for role in roles]
        cells += [_in(r.total_bytes, unit), _in(r.peak_gpu_bytes, unit), "yes" if r.fits else "no"]
        cells.append(f"{_in(r.saving_bytes, unit)} {unit[0]} ({r.saving_percent:.1f}%)")
        lines.append("| " + " | ".join(cells) + " |")
    return f"{unit[0]} summed over GPUs:\n\n" + "\n".join(lines) + "\n"


def cost_to_dict(step: StepTime, run: RunCost) -> dict[str, Any]:
    return {
        "step_seconds": dict(step.seconds),
        "step_total_s": step.total_s,
        "steps": run.steps,
        "run_seconds": run.seconds,
        "run_hours": run.hours,
        "gpu_hours": run.gpu_hours,
        "dollars": run.dollars,
    }


def cost_to_markdown(step: StepTime, run: RunCost) -> str:
    lines = ["| phase / role / work | seconds per step |", "|---|---|"]
    lines += [f"| {key} | {seconds:.2f} |" for key, seconds in step.seconds.items()]
    lines.append(f"| **step** | **{step.total_s:.2f}** |")
    lines += [
        "",
        f"{run.steps} steps, {run.hours:.2f} h, {run.gpu_hours:.1f} GPU-hours, ${run.dollars:,.2f}",
    ]
    return "\n".join(lines) + "\n"
