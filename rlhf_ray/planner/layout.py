"""Place the roles of an RLHF algorithm on GPUs, total each GPU's memory,
decide whether it fits, and compare algorithms (ReMax against PPO).

Which roles exist is the algorithm's declaration, passed in as booleans
(`needs_critic`, `needs_reference`; a reward model unless rewards come from a
rule), so the planner never keeps its own table of algorithms. The CLI reads
them from `rlhf_ray.algorithms.registry`.

Roles sharing a group of GPUs add their resident bytes (weights, optimizer
state, a vLLM engine that does not sleep) and, on top, the largest over the
phases of a step (generate, score, train) of the bytes the roles need only
during that phase; the score phase's forwards run concurrently, so they add.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from rlhf_ray.planner.memory import (
    PHASES,
    GiB,
    InferenceSettings,
    RolePlan,
    RolloutSettings,
    TrainSettings,
    plan_frozen_role,
    plan_rollout,
    plan_trained_role,
)
from rlhf_ray.planner.shapes import ModelShape

ROLES = ("policy", "critic", "reference", "reward", "rollout")


@dataclass(frozen=True)
class GpuGroup:
    """Roles that share the same `num_gpus` GPUs (each role spans all of them)."""

    roles: tuple[str, ...]
    num_gpus: int


@dataclass(frozen=True)
class GroupPlan:
    """Memory of each GPU of one group.

    required_bytes: what the roles need for this batch. claimed_bytes: what
    they take, vLLM's claim in place of its batch's needs; `fits` compares it
    with the GPU and needs no `problems` (a vLLM claim too small to start).
    """

    roles: tuple[str, ...]
    num_gpus: int
    gpu_mem_bytes: int
    resident_bytes: int
    phase_bytes: dict[str, int]
    required_bytes: int
    claimed_bytes: int
    problems: tuple[str, ...] = ()

    @property
    def fits(self) -> bool:
        return self.claimed_bytes <= self.gpu_mem_bytes and not self.problems

    @property
    def headroom_bytes(self) -> int:
        """GPU bytes left free at the step's peak (negative: short by that much)."""
        return self.gpu_mem_bytes - self.claimed_bytes


@dataclass(frozen=True)
class LayoutPlan:
    """An algorithm's roles placed on GPUs."""

    algorithm: str
    gpu_mem_bytes: int
    roles: tuple[RolePlan, ...]
    groups: tuple[GroupPlan, ...]
    notes: tuple[str, ...] = ()

    @property
    def num_gpus(self) -> int:
        return sum(g.num_gpus for g in self.groups)

    @property
    def fits(self) -> bool:
        return all(g.fits for g in self.groups)

    @property
    def total_required_bytes(self) -> int:
        """GPU memory the layout needs, summed over every GPU."""
        return sum(g.num_gpus * g.required_bytes for g in self.groups)

    @property
    def peak_gpu_bytes(self) -> int:
        """Most bytes any one GPU needs."""
        return max(g.required_bytes for g in self.groups)

    @property
    def total_host_bytes(self) -> int:
        return sum(r.num_gpus * r.host_bytes for r in self.roles)

    def role(self, name: str) -> RolePlan:
        for plan in self.roles:
            if plan.role == name:
                return plan
        raise KeyError(f"{self.algorithm} has no role {name!r}; its roles: {[r.role for r in self.roles]}")


def _claimed(role: RolePlan) -> tuple[int, dict[str, int]]:
    """Resident and phase bytes with vLLM's claim in place of its batch's needs."""
    if not role.reserved:
        return role.resident, role.phases
    if role.resident:
        return role.reserved, role.phases
    return 0, {phase: role.reserved for phase in role.phases}


def plan_group(roles: Sequence[RolePlan], num_gpus: int, gpu_mem_bytes: int) -> GroupPlan:
    """Per-GPU totals of roles colocated on the same GPUs."""

    def total(resident_and_phases: Sequence[tuple[int, dict[str, int]]]) -> tuple[int, dict[str, int], int]:
        resident = sum(r for r, _ in resident_and_phases)
        phases = {p: sum(ph.get(p, 0) for _, ph in resident_and_phases) for p in PHASES}
        return resident, phases, resident + max(phases.values())

    resident, phases, required = total([(r.resident, r.phases) for r in roles])
    _, _, claimed = total([_claimed(r) for r in roles])
    problems = tuple(
        f"{r.role}: vLLM needs at least {r.minimum / GiB:.2f} GiB per GPU (weights, workspace, one sequence's "
        f"KV cache) but gpu_memory_utilization gives it {r.reserved / GiB:.2f} GiB; raise it"
        for r in roles
        if r.reserved and r.minimum > r.reserved
    )
    return GroupPlan(
        roles=tuple(r.role for r in roles), num_gpus=num_gpus, gpu_mem_bytes=gpu_mem_bytes,
        resident_bytes=resident, phase_bytes=phases, required_bytes=required, claimed_bytes=claimed,
        problems=problems,
    )


def plan_layout(
    algorithm: str,
    *,
    needs_critic: bool,
    needs_reference: bool,
    policy: ModelShape,
    reward: ModelShape | None,
    critic: ModelShape | None = None,
    reference: ModelShape | None = None,
    train: TrainSettings = TrainSettings(),
    critic_train: TrainSettings | None = None,
    inference: InferenceSettings = InferenceSettings(),
    rollout: RolloutSettings = RolloutSettings(),
    gpus: int | None = None,
    gpu_mem_gib: float = 80.0,
    placement: Sequence[GpuGroup] | None = None,
) -> LayoutPlan:
    """Plan every role of `algorithm` and its GPUs.

    reward=None: rewards come from a rule, no reward model. critic defaults to
    the reward model's shape (InstructGPT initialises it from the reward
    model), else the policy's; reference to the policy's. placement=None puts
    every role on all `gpus` GPUs (colocated, as DeepSpeed-Chat and the ReMax
    paper run); otherwise each role must sit in exactly one group, and roles
    the algorithm lacks are left out (a group left empty is dropped).
    """
    present = ["policy"]
    if needs_critic:
        present.append("critic")
    if needs_reference:
        present.append("reference")
    if reward is not None:
        present.append("reward")
    present.append("rollout")
    notes: list[str] = []
    if placement is None:
        if gpus is None or gpus < 1:
            raise ValueError(f"{algorithm}: give gpus (at least 1) or a placement; got gpus={gpus}.")
        placement = [GpuGroup(tuple(present), gpus)]
    placement = _check_placement(algorithm, placement, present, notes)
    gpu_mem = int(gpu_mem_gib * GiB)
    gpus_of = {role: g.num_gpus for g in placement for role in g.roles}
    plans: dict[str, RolePlan] = {
        "policy": plan_trained_role("policy", policy, "lm", train, gpus_of["policy"]),
        "rollout": plan_rollout(policy, rollout, gpus_of["rollout"], gpu_mem),
    }
    if needs_critic:
        plans["critic"] = plan_trained_role(
            "critic", critic or reward or policy, "scalar", critic_train or train, gpus_of["critic"]
        )
    if needs_reference:
        plans["reference"] = plan_frozen_role("reference", reference or policy, "lm", inference, gpus_of["reference"])
    if reward is not None:
        plans["reward"] = plan_frozen_role("reward", reward, "scalar", inference, gpus_of["reward"])
    groups = tuple(plan_group([plans[r] for r in g.roles], g.num_gpus, gpu_mem) for g in placement)
    return LayoutPlan(
        algorithm=algorithm, gpu_mem_bytes=gpu_mem,
        roles=tuple(plans[r] for r in ROLES if r in plans), groups=groups, notes=tuple(notes),
    )


def _check_placement(
    algorithm: str, placement: Sequence[GpuGroup], present: list[str], notes: list[str]
) -> list[GpuGroup]:
    seen: list[str] = []
    kept: list[GpuGroup] = []
    for group in placement:
        unknown = [r for r in group.roles if r not in ROLES]
        if unknown:
            raise ValueError(f"placement names unknown role(s) {unknown}; roles are {', '.join(ROLES)}.")
        if group.num_gpus < 1:
            raise ValueError(f"placement group {group.roles} has {group.num_gpus} GPUs; give it at least 1.")
        seen += group.roles
        roles = tuple(r for r in group.roles if r in present)
        if len(roles) < len(group.roles):
            notes.append(f"{algorithm} has no {', '.join(r for r in group.roles if r not in present)}")
        if roles:
            kept.append(GpuGroup(roles, group.num_gpus))
        else:
            notes.append(f"group {group.roles} left empty: its {group.num_gpus} GPU(s) are not needed")
    twice = sorted({r for r in seen if seen.count(r) > 1})
    missing = [r for r in present if r not in seen]
    if twice or missing:
        raise ValueError(
            f"{algorithm}: every role must sit in exactly one placement group; "
            f"placed twice: {twice or 'none'}, not placed: {missing or 'none'}."
        )
    return kept


@dataclass(frozen=True)
class ComparisonRow:
    """One algorithm's memory beside the baseline's."""

    algorithm: str
    total_bytes: int
    """GPU bytes over every GPU of the layout."""
    peak_gpu_bytes: int
    role_bytes: dict[str, int]
    """Each role's peak bytes times its GPUs."""
    fits: bool
    saving_bytes: int
    """Baseline total minus this total (positive: this needs less)."""
    saving_percent: float
    peak_saving_percent: float
    """The same for the busiest GPU."""


@dataclass(frozen=True)
class Comparison:
    baseline: str
    rows: tuple[ComparisonRow, ...] = field(default_factory=tuple)

    def row(self, algorithm: str) -> ComparisonRow:
        for r in self.rows:
            if r.algorithm == algorithm:
                return r
        raise KeyError(f"no plan for {algorithm!r} in this comparison; have {[r.algorithm for r in self.rows]}")


def compare(plans: Sequence[LayoutPlan], baseline: str | None = None) -> Comparison:
    """Set plans side by side; savings are relative to `baseline` (default:
    the first plan), in bytes and percent of its total and busiest GPU."""
    if not plans:
        raise ValueError("compare needs at least one plan.")
    names = [p.algorithm for p in plans]
    base = plans[0] if baseline is None else next((p for p in plans if p.algorithm == baseline), None)
    if base is None:
        raise ValueError(f"baseline {baseline!r} is not among the plans {names}.")
    rows = []
    for plan in plans:
        saving = base.total_required_bytes - plan.total_required_bytes
        rows.append(
            ComparisonRow(
                algorithm=plan.algorithm,
                total_bytes=plan.total_required_bytes,
                peak_gpu_bytes=plan.peak_gpu_bytes,
                role_bytes={r.role: r.peak_bytes * r.num_gpus for r in plan.roles},
                fits=plan.fits,
                saving_bytes=saving,
                saving_percent=100.0 * saving / base.total_required_bytes,
                peak_saving_percent=100.0 * (base.peak_gpu_bytes - plan.peak_gpu_bytes) / base.peak_gpu_bytes,
            )
        )
    return Comparison(baseline=base.algorithm, rows=tuple(rows))
