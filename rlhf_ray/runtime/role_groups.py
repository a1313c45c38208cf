"""A job's role groups: placed together, shared between jobs of one driver, torn down together.

- `init_ray`: connect to a cluster, or start a local one.
- `RoleSpec`: a role's name, actor class and resources.
- `RoleGroups`: the `ActorGroup` of every role of one job in one placement
  group (colocation honoured), a context manager that tears them down; a
  role can be borrowed from another job running in the same driver
  (`reference.share_with`) through `SharedGroups`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import ray

from rlhf_ray.config.schema import ConfigError, JobConfig, RoleConfig
from rlhf_ray.runtime.actor_group import ActorGroup
from rlhf_ray.runtime.auth import use_auth_token
from rlhf_ray.runtime.distributed import ACCELERATOR_ENV
from rlhf_ray.runtime.placement import (
    RoleResources,
    create_placement_group,
    plan_placement,
    wait_until_fits,
)


def node_addresses() -> dict[str, str]:
    """Node id -> IP of every live node of the cluster."""
    return {n["NodeID"]: n.get("NodeManagerAddress", "") for n in ray.nodes() if n.get("Alive")}


def init_ray(address: str | None = None) -> None:
    """Connect to the cluster at `address` (with its token when it has one), or start a local one bound to
    127.0.0.1. Every actor of the job gets `ACCELERATOR_ENV`: one that reserved no GPU sees none."""
    if ray.is_initialized():
        return
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0", **ACCELERATOR_ENV}}
    if address:
        use_auth_token()
        ray.init(address=address, runtime_env=env, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False, runtime_env=env,
                 _node_ip_address="127.0.0.1", configure_logging=False)


@dataclass(frozen=True)
class RoleSpec:
    """A role the job needs: its name, actor class and resources."""

    name: str
    worker_cls: type
    num_ranks: int
    num_cpus_per_rank: float
    num_gpus_per_rank: float = 0.0

    @classmethod
    def of(cls, name: str, worker_cls: type, settings: RoleConfig) -> "RoleSpec":
        """The spec of a role whose resources its config section gives (`policy`, `critic`, ...)."""
        return cls(name, worker_cls, settings.num_ranks, settings.num_cpus_per_rank, settings.num_gpus_per_rank)


class SharedGroups:
    """Groups one job lends to others driven from the same process (`reference.share_with`, `reward.share_with`).

    The owner publishes its group once it is set up; a borrower reserves it
    (before the owner may finish: a pipeline reserves for every borrower when
    it starts), waits for it, uses it and gives it back; the owner tears it down
    only after every borrower has given it back. A key is `<owner job>/<role>`."""

    def __init__(self):
        self._cond = threading.Condition()
        self._groups: dict[str, ActorGroup] = {}
        self._users: dict[str, set[str]] = {}
        self._abandoned: set[str] = set()

    def publish(self, key: str, group: ActorGroup) -> None:
        with self._cond:
            self._groups[key] = group
            self._users.setdefault(key, set())
            self._cond.notify_all()

    def reserve(self, key: str, borrower: str) -> None:
        """Announce `borrower` before the group is offered, so its owner waits for it before tearing down
        (reserving twice is one reservation)."""
        with self._cond:
            self._users.setdefault(key, set()).add(borrower)

    def abandon(self, job: str) -> None:
        """Job `job` ended: its borrowers that are still waiting for a group it never offered fail."""
        with self._cond:
            self._abandoned.add(job)
            self._cond.notify_all()

    def forget(self, job: str) -> None:
        """A new job of this name starts: what an earlier one abandoned no longer counts."""
        with self._cond:
            self._abandoned.discard(job)

    def wait(self, key: str, timeout_s: float) -> ActorGroup:
        """The reserved group, once its owner has offered it."""
        job, role = key.split("/")
        with self._cond:
            self._cond.wait_for(lambda: key in self._groups or job in self._abandoned, timeout=timeout_s)
            if key in self._groups:
                return self._groups[key]
            if job in self._abandoned:
                raise ConfigError(f"{role}.share_with: job {job!r}, whose {role} this job borrows, ended without "
                                  "offering it (it failed, or did not create one)")
            raise ConfigError(f"{role}.share_with: no running job named {job!r} offered its {role} "
                              f"within {timeout_s:g} s; start that job (name: {job}) alongside this one")

    def give_back(self, key: str, borrower: str) -> None:
        with self._cond:
            self._users.get(key, set()).discard(borrower)
            self._cond.notify_all()

    def give_back_all(self, borrower: str) -> None:
        """Every reservation of `borrower` (a job that ended, or was skipped, before giving them back)."""
        with self._cond:
            for users in self._users.values():
                users.discard(borrower)
            self._cond.notify_all()

    def withdraw(self, key: str) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not self._users.get(key))
            self._groups.pop(key, None)
            self._users.pop(key, None)


SHARED = SharedGroups()


SHAREABLE = ("reference", "reward")


def plan_for(cfg: JobConfig, specs: list[RoleSpec]):
    """The placement plan of the groups a job creates itself: `specs` without the frozen roles it borrows
    (`<role>.share_with`), colocation sets cut to the roles that remain."""
    own = [s for s in specs if not (s.name in SHAREABLE and getattr(cfg, s.name).share_with)]
    names = {s.name for s in own}
    resources = [RoleResources(s.name, s.num_ranks, s.num_cpus_per_rank, s.num_gpus_per_rank) for s in own]
    colocate = [tuple(r for r in group if r in names) for group in cfg.placement.colocate]
    return plan_placement(resources, colocate=[group for group in colocate if len(group) > 1])


class RoleGroups:
    """The actor groups of one job, placed together; a context manager that tears them down.

    With `reference.share_with: JOB` (or `reward.share_with`), that frozen group
    is borrowed from the job named JOB running alongside (same driver process)
    instead of created."""

    def __init__(self, cfg: JobConfig, specs: list[RoleSpec]):
        """Waits up to `placement.timeout_s` for the cluster to have room (other jobs finish; a torn-down
        group's resources come back a moment after it is removed); a layout larger than the whole
        cluster fails at once."""
        self.cfg = cfg
        self.specs = {s.name: s for s in specs}
        self.borrowed: dict[str, str] = {}
        self.published: dict[str, str] = {}
        self.groups: dict[str, ActorGroup] = {}
        self.placement = None
        plan = plan_for(cfg, specs)
        wait_until_fits(plan, cfg.placement.timeout_s)
        for spec in specs:
            if spec.name in SHAREABLE and getattr(cfg, spec.name).share_with:
                self.borrowed[spec.name] = f"{getattr(cfg, spec.name).share_with}/{spec.name}"
                SHARED.reserve(self.borrowed[spec.name], cfg.name)
        try:
            self.placement = create_placement_group(plan, timeout_s=cfg.placement.timeout_s,
                                                    strategy=cfg.placement.strategy)
            for spec in specs:
                if spec.name in self.borrowed:
                    continue
                self.groups[spec.name] = ActorGroup(
                    spec.worker_cls, role=spec.name, num_ranks=spec.num_ranks,
                    num_cpus_per_rank=spec.num_cpus_per_rank, num_gpus_per_rank=spec.num_gpus_per_rank,
                    placement=self.placement.for_role(spec.name))
            for name, key in self.borrowed.items():
                self.groups[name] = SHARED.wait(key, timeout_s=max(cfg.placement.timeout_s, 600.0))
        except BaseException:
            self.shutdown()
            raise

    def borrowed_from(self) -> dict[str, str]:
        """{role: the job it is borrowed from} for the frozen groups this job did not create."""
        return {name: key.split("/")[0] for name, key in self.borrowed.items()}

    def layout(self) -> dict[str, dict]:
        """Every role group of the job: ranks, CPUs and GPUs per rank, the node id of each rank (for the
        groups it created), and the job it was borrowed from (`owner`), for `summary.json` and `layout.png`."""
        nodes: dict[int, str] = {}
        if self.placement is not None and self.placement.placement_group is not None:
            from ray.util import placement_group_table

            table = placement_group_table(self.placement.placement_group)
            nodes = {int(k): v for k, v in (table.get("bundles_to_node_id") or {}).items()}
        out = {}
        plan = self.placement.plan if self.placement is not None else None
        for name, spec in self.specs.items():
            owner = self.borrowed_from().get(name)
            slots = plan.slots.get(name, ()) if plan is not None and not owner else ()
            unit = next((u for u in plan.units if name in u), (name,)) if plan is not None else (name,)
            # What the rank's actor reserves: its share of a bundle it shares with colocated roles.
            cpus = slots[0].num_cpus if slots else spec.num_cpus_per_rank
            gpus = slots[0].num_gpus if slots else spec.num_gpus_per_rank
            out[name] = {"ranks": spec.num_ranks, "cpus_per_rank": cpus, "gpus_per_rank": gpus, "owner": owner,
                         "colocated_with": [r for r in unit if r != name],
                         "bundles": [s.bundle_index for s in slots],
                         "nodes": [nodes.get(s.bundle_index, "") for s in slots]}
        return out

    def owns(self, name: str) -> bool:
        """Whether this job created (and so sets up) the group `name`."""
        return name in self.groups and name not in self.borrowed

    def offer(self, name: str) -> None:
        """Let jobs alongside borrow group `name` (after it is set up); a no-op for a borrowed group."""
        if name in self.borrowed or name not in self.groups:
            return
        key = f"{self.cfg.name}/{name}"
        SHARED.publish(key, self.groups[name])
        self.published[name] = key

    def __getitem__(self, name: str) -> ActorGroup:
        return self.groups[name]

    def shares_gpus(self, name: str) -> bool:
        """Whether role `name` has GPUs and shares its bundles with another role that has GPUs."""
        plan = self.placement.plan if self.placement is not None else None
        unit = next((u for u in plan.units if name in u), ()) if plan is not None else ()
        return name in self.specs and self.specs[name].num_gpus_per_rank > 0 and any(
            r != name and r in self.specs and self.specs[r].num_gpus_per_rank > 0 for r in unit)

    def turns(self, names) -> list[list[str]]:
        """`names` in sets whose calls run at the same time: roles that share CPU-only bundles (colocated,
        no GPUs) are one set and take turns, each then with every core of the bundle. At once, their
        torch thread pools would fight over those cores (two 2-thread forwards on 2 cores each took 3-4x
        as long as alone); on GPUs colocated roles run at the same time. Order within a set follows
        `names`."""
        plan = self.placement.plan if self.placement is not None else None
        units = plan.units if plan is not None else ()
        sets: list[list[str]] = []
        unit_of: dict[str, int] = {}
        for name in names:
            unit = next((u for u in units if name in u), None)
            cpu_only = unit is not None and name not in self.borrowed and all(
                self.specs[r].num_gpus_per_rank == 0 for r in unit if r in self.specs)
            if cpu_only and len(unit) > 1:
                key = units.index(unit)
                if key in unit_of:
                    sets[unit_of[key]].append(name)
                    continue
                unit_of[key] = len(sets)
            sets.append([name])
        return sets

    def in_turns(self, launch: dict, finish) -> dict:
        """`finish(name, launch[name]())` for every role named in `launch`, the roles of one `turns` set
        one after another (the next launched when the one before has finished), the sets at the same
        time; returns {name: what finish returned}."""
        sets = self.turns(list(launch))
        started = {names[0]: launch[names[0]]() for names in sets}
        out = {}
        for names in sets:
            for name in names:
                if name not in started:
                    started[name] = launch[name]()
                out[name] = finish(name, started[name])
        return {name: out[name] for name in launch}

    def reference(self) -> ActorGroup | None:
        """The group that answers the reference's calls (`ReferenceScoring`): the job's reference group, or
        a LoRA policy's own (its base with the adapter off, `JobConfig.policy_is_reference`); None when
        the job has no reference."""
        if "reference" in self.groups:
            return self.groups["reference"]
        if self.cfg.policy_is_reference and "policy" in self.groups:
            return self.groups["policy"]
        return None

    def __enter__(self) -> "RoleGroups":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def release(self, name: str) -> None:
        """Stop one role early (e.g. the reference after its log-probs are cached); its memory is freed."""
        group = self.groups.pop(name)
        if name in self.borrowed:
            SHARED.give_back(self.borrowed.pop(name), self.cfg.name)
            return
        if name in self.published:
            SHARED.withdraw(self.published.pop(name))
        group.shutdown()

    def shutdown(self) -> None:
        for name in list(self.groups):
            self.release(name)
        for name in list(self.borrowed):  # reserved but never received
            SHARED.give_back(self.borrowed.pop(name), self.cfg.name)
        if self.placement is not None:
            self.placement.remove()
            self.placement = None

    def memory(self) -> dict[str, float]:
        """Every role's memory metrics (rank 0 of each group; ranks of a role hold alike)."""
        out: dict[str, float] = {}
        for group in self.groups.values():
            out.update(group.call_rank0(lambda actor: actor.memory.remote()))
        return out

    def compute_times(self) -> dict[str, float]:
        """Each role's compute seconds since the last call: `time/compute/<role>/<kind>_s` for each kind
        (generate, forward, train) it ran, from its slowest rank (ranks run in parallel), and
        `time/compute/<role>_s`, their sum. Per kind, `time/compute_of_kind/<kind>_s`: the roles' seconds
        as they ran, added up within a set of roles that take turns (`turns`), the longest of the sets
        that run at the same time. Every rank's counters start again from zero. A group borrowed from
        another job is left out: its counters are the lending job's to read."""
        pending = {name: (group, group.map(lambda actor: actor.compute_time.remote()))
                   for name, group in self.groups.items() if name not in self.borrowed}
        out: dict[str, float] = {}
        by_kind: dict[str, dict[str, float]] = {}
        for name, (group, refs) in pending.items():
            per_rank = group.gather(refs)
            kinds = sorted({kind for seconds in per_rank for kind in seconds})
            slowest = {kind: max(seconds.get(kind, 0.0) for seconds in per_rank) for kind in kinds}
            out.update({f"time/compute/{name}/{kind}_s": value for kind, value in slowest.items()})
            out[f"time/compute/{name}_s"] = sum(slowest.values())
            for kind, value in slowest.items():
                by_kind.setdefault(kind, {})[name] = value
        for kind, seconds in by_kind.items():
            out[f"time/compute_of_kind/{kind}_s"] = max(sum(seconds[name] for name in names)
                                                         for names in self.turns(list(seconds)))
        return out
