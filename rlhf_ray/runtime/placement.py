"""Where each role's ranks run: one Ray placement group for a job's roles.

Each role declares `RoleResources` (ranks, CPUs and GPUs per rank). A role on
its own gets one bundle per rank. Roles in a colocation set share bundles, as
OpenRLHF's hybrid layout does: rank r of every role in the set lands in the
same bundle, sized to the largest need among them, and each role's actor asks
Ray for an equal share of it (two roles on a 1-CPU bundle take 0.5 CPU each;
four roles on a 1-GPU bundle take 0.25 GPU each). Colocated roles mostly take
turns (generate, then score, then train), so each may still use the bundle's
CPUs as threads.

    plan = plan_placement([RoleResources("policy", 2, 1, 0), RoleResources("reference", 2, 1, 0)],
                          colocate=[["policy", "reference"]])
    check_fits(plan)                      # before any model loads
    placement = create_placement_group(plan, timeout_s=60)
    group = ActorGroup(PolicyWorker, role="policy", ..., placement=placement.for_role("policy"))
    ...
    placement.remove()
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from rlhf_ray.telemetry.formatting import compact

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


class PlacementError(ValueError):
    """A layout that cannot be placed; the message names the role and what to change."""


@dataclass(frozen=True)
class RoleResources:
    """What one role asks for: `num_ranks` actors of `num_cpus_per_rank` CPUs and `num_gpus_per_rank` GPUs."""

    role: str
    num_ranks: int
    num_cpus_per_rank: float = 1.0
    num_gpus_per_rank: float = 0.0

    def __post_init__(self):
        if self.num_ranks < 1:
            raise PlacementError(f"role {self.role!r}: num_ranks must be >= 1, got {self.num_ranks}")
        if self.num_cpus_per_rank <= 0:
            raise PlacementError(f"role {self.role!r}: num_cpus_per_rank must be > 0 (every actor is a process "
                                 f"that needs CPU time), got {self.num_cpus_per_rank}")
        if self.num_gpus_per_rank < 0:
            raise PlacementError(f"role {self.role!r}: num_gpus_per_rank must be >= 0, got {self.num_gpus_per_rank}")
        if self.num_gpus_per_rank > 1 and self.num_gpus_per_rank != int(self.num_gpus_per_rank):
            raise PlacementError(f"role {self.role!r}: num_gpus_per_rank={self.num_gpus_per_rank}; Ray gives a "
                                 "fraction of one GPU or a whole number of GPUs, not a fraction above one")


@dataclass(frozen=True)
class RankSlot:
    """One rank's place in a plan: its bundle and the share of it its actor asks Ray for."""

    bundle_index: int
    num_cpus: float
    num_gpus: float


@dataclass(frozen=True)
class PlacementPlan:
    """Bundles for one placement group and, per role, one `RankSlot` per rank.

    `units` lists the roles that own bundles together, in bundle order: a
    single role, or a colocation set."""

    bundles: tuple[dict[str, float], ...]
    slots: dict[str, tuple[RankSlot, ...]]
    roles: dict[str, RoleResources]
    units: tuple[tuple[str, ...], ...]

    def total(self, resource: str) -> float:
        """Sum of `resource` ("CPU" or "GPU") over all bundles."""
        return sum(b.get(resource, 0.0) for b in self.bundles)

    def describe(self) -> str:
        """One line per unit, e.g. `policy+reference: 2 x {CPU: 1}`."""
        lines = []
        for unit in self.units:
            first = self.slots[unit[0]][0].bundle_index
            bundle = ", ".join(f"{k}: {compact(v)}" for k, v in self.bundles[first].items())
            lines.append(f"{'+'.join(unit)}: {len(self.slots[unit[0]])} x {{{bundle}}}")
        return "; ".join(lines)


def _amount(x: float, resource: str) -> str:
    return f"{compact(x)} {resource}{'' if x == 1 else 's'}"


def _share(amount: float, ways: int) -> float:
    """`amount / ways` rounded down to Ray's resource precision (1e-4), so the shares still fit."""
    return math.floor(amount / ways * 10_000) / 10_000


def _check_colocation(by_name: Mapping[str, RoleResources], colocate: Iterable[Sequence[str]]) -> list[tuple[str, ...]]:
    sets, seen = [], {}
    for group in colocate:
        group = tuple(group)
        for name in group:
            if name not in by_name:
                raise PlacementError(f"colocate set {list(group)} names role {name!r}, which this job does not have "
                                     f"(roles: {', '.join(by_name)})")
            if name in seen:
                raise PlacementError(f"role {name!r} is in two colocate sets, {list(seen[name])} and {list(group)}: "
                                     "a role shares bundles with one set at most; merge the sets")
            seen[name] = group
        ranks = {name: by_name[name].num_ranks for name in group}
        if len(set(ranks.values())) > 1:
            listed = ", ".join(f"{n}.num_ranks={r}" for n, r in ranks.items())
            raise PlacementError(f"colocated roles share one bundle per rank, so they need the same num_ranks; "
                                 f"got {listed}: make them equal or stop colocating them")
        sets.append(group)
    return sets


def plan_placement(roles: Sequence[RoleResources], colocate: Iterable[Sequence[str]] = ()) -> PlacementPlan:
    """Lay out bundles for `roles`; each set in `colocate` (role names) shares one bundle per rank."""
    by_name: dict[str, RoleResources] = {}
    for res in roles:
        if res.role in by_name:
            raise PlacementError(f"role {res.role!r} is declared twice; give each role one RoleResources")
        by_name[res.role] = res
    sets = _check_colocation(by_name, colocate)
    set_of = {name: group for group in sets for name in group}

    units: list[tuple[str, ...]] = []
    for res in roles:
        unit = set_of.get(res.role, (res.role,))
        if unit not in units:
            units.append(unit)

    bundles: list[dict[str, float]] = []
    slots: dict[str, tuple[RankSlot, ...]] = {}
    for unit in units:
        members = [by_name[name] for name in unit]
        cpus = max(m.num_cpus_per_rank for m in members)
        gpus = max(m.num_gpus_per_rank for m in members)
        cpu_users = len(members)
        gpu_users = sum(1 for m in members if m.num_gpus_per_rank > 0)
        gpu_share = _share(gpus, gpu_users) if gpu_users else 0.0
        if gpu_share > 1 and not gpu_share.is_integer():
            raise PlacementError(f"colocating {', '.join(map(repr, unit))} splits a {_amount(gpus, 'GPU')} bundle "
                                 f"into {gpu_share:g} GPUs each; Ray gives whole GPUs above one: colocate a number "
                                 "of GPU roles that divides the GPUs per rank, or lower num_gpus_per_rank")
        first = len(bundles)
        for _ in range(members[0].num_ranks):
            bundles.append({"CPU": float(cpus), **({"GPU": float(gpus)} if gpus > 0 else {})})
        for m in members:
            slot_gpus = gpu_share if m.num_gpus_per_rank > 0 else 0.0
            slots[m.role] = tuple(RankSlot(first + r, _share(cpus, cpu_users), slot_gpus) for r in range(m.num_ranks))
    return PlacementPlan(tuple(bundles), slots, by_name, tuple(units))


def _unit_label(unit: tuple[str, ...]) -> str:
    if len(unit) == 1:
        return f"role {unit[0]!r} needs"
    return f"roles {', '.join(map(repr, unit))} (colocated) need"


def check_fits(plan: PlacementPlan, available: Mapping[str, float] | None = None, what: str = "free") -> None:
    """Raise `PlacementError` if the plan's bundles need more CPUs or GPUs than `available`
    (default: `ray.available_resources()`), naming the first role that does not fit; `what` says
    which amounts those are in the message ("free", or "" for the cluster's whole resources).

    Call it before any model loads. It checks totals; whether each bundle fits
    on one node is Ray's to decide when the group is created."""
    if available is None:
        available = ray.available_resources()
    for resource in ("GPU", "CPU"):
        have = float(available.get(resource, 0.0))
        used: list[tuple[tuple[str, ...], float]] = []
        for unit in plan.units:
            per_rank = plan.bundles[plan.slots[unit[0]][0].bundle_index].get(resource, 0.0)
            ranks = len(plan.slots[unit[0]])
            taken = sum(amount for _, amount in used)
            if taken + per_rank * ranks > have + 1e-9:
                raise PlacementError(_shortage_message(plan, unit, resource, per_rank, ranks, have, used, what))
            used.append((unit, per_rank * ranks))


def _shortage_message(plan: PlacementPlan, unit: tuple[str, ...], resource: str, per_rank: float, ranks: int,
                      have: float, used: list[tuple[tuple[str, ...], float]], what: str = "free") -> str:
    name = unit[0]
    message = (f"{_unit_label(unit)} {_amount(per_rank, resource)} per rank x {ranks} rank{'s' * (ranks != 1)}; "
               f"the cluster has {_amount(have, resource)}{' ' + what if what else ''} in total")
    before = [(u, amount) for u, amount in used if amount > 0]
    if before:
        taken = ", ".join(f"{'+'.join(u)}: {compact(amount)}" for u, amount in before)
        message += f", of which the roles placed before it take {compact(sum(a for _, a in before))} ({taken})"
    if resource == "GPU" and have == 0:
        roles = ", ".join(f"{r}.num_gpus_per_rank" for r in unit)
        return f"{message}: set {roles} to 0 to run on CPUs, or connect to a cluster with GPUs"
    partners = [u[0] for u in plan.units if len(u) == 1 and u != unit and plan.roles[u[0]].num_ranks == ranks]
    if len(unit) == 1:
        knobs, it = f"lower {name}.num_ranks or {name}.num_{resource.lower()}s_per_rank", "it"
    else:
        knobs, it = f"lower num_ranks or num_{resource.lower()}s_per_rank of {', '.join(unit)}", "them"
    share = (f"colocate {it} with {' or '.join(map(repr, partners))} (placement.colocate)" if partners
             else f"colocate {it} with another {ranks}-rank role (placement.colocate)")
    return f"{message}: {knobs}, {share}, or add {resource}s"


def wait_until_fits(plan: PlacementPlan, timeout_s: float, poll_s: float = 0.5) -> None:
    """Wait up to `timeout_s` for the cluster to have the plan's CPUs and GPUs free (other jobs finish,
    a removed group's bundles come back a moment after its removal), then raise the shortage as
    `PlacementError`. A plan larger than the whole cluster fails at once, naming the role."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            check_fits(plan, ray.available_resources())
            return
        except PlacementError as short:
            check_fits(plan, ray.cluster_resources(), what="")
            if time.monotonic() >= deadline:
                raise PlacementError(f"{short} (waited {timeout_s:g} s for other jobs to free them: "
                                     "placement.timeout_s)") from None
            time.sleep(poll_s)


@dataclass(frozen=True)
class RankPlacement:
    """Where one rank's actor goes: bundle `bundle_index` of `placement_group`, asking for these amounts."""

    placement_group: PlacementGroup
    bundle_index: int
    num_cpus: float
    num_gpus: float


class ClusterPlacement:
    """A created placement group and the per-rank slots of each role in it."""

    def __init__(self, plan: PlacementPlan, group: PlacementGroup):
        self.plan = plan
        self.placement_group = group

    def for_role(self, role: str) -> list[RankPlacement]:
        """Rank r's placement at index r, as `ActorGroup(placement=...)` takes it."""
        if role not in self.plan.slots:
            raise KeyError(f"role {role!r} is not in this placement (roles: {', '.join(self.plan.slots)})")
        return [RankPlacement(self.placement_group, s.bundle_index, s.num_cpus, s.num_gpus)
                for s in self.plan.slots[role]]

    def remove(self) -> None:
        """Give the bundles back to the cluster (kill the actors in them first). Safe to call twice."""
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None


def create_placement_group(plan: PlacementPlan, timeout_s: float = 60.0, strategy: str = "PACK",
                           name: str = "") -> ClusterPlacement:
    """Reserve the plan's bundles as one Ray placement group and wait until they are placed.

    `strategy`: PACK (fill few nodes; the default) or SPREAD (one bundle per node
    where possible), or the STRICT_ variants. Raises `PlacementError` if Ray
    cannot place the bundles within `timeout_s` (removing the group again)."""
    if strategy not in STRATEGIES:
        raise PlacementError(f"placement strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    group = placement_group(bundles=[dict(b) for b in plan.bundles], strategy=strategy, name=name)
    if not group.wait(timeout_seconds=timeout_s):
        remove_placement_group(group)
        free = ray.available_resources()
        raise PlacementError(
            f"Ray could not place the bundles ({plan.describe()}) with strategy {strategy} within {timeout_s:g} s; "
            f"the cluster has {_amount(free.get('CPU', 0), 'CPU')} and {_amount(free.get('GPU', 0), 'GPU')} free. "
            "Each bundle must fit on one node: "
            "lower num_ranks or the per-rank resources, colocate roles, add nodes, or raise placement.timeout_s "
            "if nodes are still joining")
    return ClusterPlacement(plan, group)
