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
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import ray

from rlhf_ray.config.schema import ConfigError, JobConfig, RoleConfig
from rlhf_ray.runtime.actor_group import ActorGroup, actor_death
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


LOCAL_SYSTEM_CONFIG = {"worker_niceness": 0}
"""Ray settings of the clusters rlhf-ray starts itself. Ray starts its worker processes at niceness 15 by default,
to keep its own daemons responsive; a role's torch threads then get a small share of a core that any
ordinary process also wants, and a multi-threaded GEMM waits at every barrier for the thread that lost its
core (a real-model DPO step: 6.7 s quiet, 72 s beside one spinning process at niceness 15, 16-19 s at 0).
Roles are the work here, so they run at the user's own priority. A cluster started by hand needs
`RAY_worker_niceness=0` in the environment of `ray start` for the same."""


def init_ray(address: str | None = None) -> None:
    """Connect to the cluster at `address` (with its token when it has one), or start a local one bound to
    127.0.0.1 (its workers at normal priority: `LOCAL_SYSTEM_CONFIG`). Every actor of the job gets
    `ACCELERATOR_ENV`: one that reserved no GPU sees none."""
    if ray.is_initialized():
        return
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0", **ACCELERATOR_ENV}}
    if address:
        use_auth_token()
        ray.init(address=address, runtime_env=env, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False, runtime_env=env,
                 _node_ip_address="127.0.0.1", configure_logging=False, _system_config=LOCAL_SYSTEM_CONFIG)


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
    it starts, and a job holds its reservations for its whole run, `holding`),
    waits for it, uses it and gives it back when the job ends; the owner tears
    it down only after every borrower has given it back. A borrower that loses
    an actor and recreates its groups therefore finds the group still there,
    even when its owner has finished meanwhile. A key is `<owner job>/<role>`."""

    def __init__(self):
        self._cond = threading.Condition()
        self._groups: dict[str, ActorGroup] = {}
        self._identities: dict[str, dict] = {}
        self._users: dict[str, set[str]] = {}  # reservations: jobs that will use the group, until they end
        self._using: dict[str, set[str]] = {}  # jobs whose role groups hold it now
        self._abandoned: set[str] = set()

    def publish(self, key: str, group: ActorGroup, identity: dict | None = None) -> None:
        """Offer `group` under `key`; `identity` (`frozen_identity` of the owner) is what a borrower must match."""
        with self._cond:
            self._groups[key] = group
            self._identities[key] = identity or {}
            self._users.setdefault(key, set())
            self._cond.notify_all()

    def reserve(self, key: str, borrower: str) -> None:
        """Announce `borrower` before the group is offered, so its owner waits for it before tearing down
        (reserving twice is one reservation)."""
        with self._cond:
            self._users.setdefault(key, set()).add(borrower)

    @contextmanager
    def holding(self, borrower: str, keys) -> Iterator[None]:
        """`keys` reserved for `borrower` for the body (a job's whole run, every recovery included) and
        given back after it, however it ends."""
        keys = list(keys)
        for key in keys:
            self.reserve(key, borrower)
        try:
            yield
        finally:
            for key in keys:
                self.give_back(key, borrower)

    def abandon(self, job: str) -> None:
        """Job `job` ended: its borrowers that are still waiting for a group it never offered fail."""
        with self._cond:
            self._abandoned.add(job)
            self._cond.notify_all()

    def forget(self, job: str) -> None:
        """A new job of this name starts: what an earlier one abandoned no longer counts."""
        with self._cond:
            self._abandoned.discard(job)

    def wait(self, key: str, timeout_s: float, identity: dict | None = None, borrower: str = "this job"
             ) -> ActorGroup:
        """The reserved group, once its owner has offered it; refused when the owner's `frozen_identity`
        differs from the borrower's `identity` in any field both give."""
        job, role = key.split("/")
        with self._cond:
            self._cond.wait_for(lambda: key in self._groups or job in self._abandoned, timeout=timeout_s)
            if key in self._groups:
                check_same_frozen(role, job, self._identities.get(key, {}), borrower, identity or {})
                self._using.setdefault(key, set()).add(borrower)
                return self._groups[key]
            if job in self._abandoned:
                raise ConfigError(f"{role}.share_with: job {job!r}, whose {role} this job borrows, ended without "
                                  "offering it (it failed, or did not create one)")
            raise ConfigError(f"{role}.share_with: no running job named {job!r} offered its {role} "
                              f"within {timeout_s:g} s; start that job (name: {job}) alongside this one")

    def let_go(self, key: str, borrower: str) -> None:
        """`borrower`'s role groups no longer hold the group (torn down, perhaps to be recreated); its
        reservation stays."""
        with self._cond:
            self._using.get(key, set()).discard(borrower)
            self._cond.notify_all()

    def give_back(self, key: str, borrower: str) -> None:
        with self._cond:
            self._users.get(key, set()).discard(borrower)
            self._using.get(key, set()).discard(borrower)
            self._cond.notify_all()

    def give_back_all(self, borrower: str) -> None:
        """Every reservation of `borrower` (a job that ended, or was skipped, before giving them back)."""
        with self._cond:
            for users in (*self._users.values(), *self._using.values()):
                users.discard(borrower)
            self._cond.notify_all()

    def withdraw(self, key: str, final: bool = True) -> None:
        """Take the group back from the borrowers, once every reserved one has given it back (`final`: the
        owner ends), or (an owner recovering from a dead actor, which offers a new group under the same key)
        once no borrower's role groups hold it; the reservations then stay for the new group."""
        with self._cond:
            self._cond.wait_for(lambda: not (self._users if final else self._using).get(key))
            self._groups.pop(key, None)
            self._identities.pop(key, None)
            self._using.pop(key, None)
            if final:
                self._users.pop(key, None)


SHARED = SharedGroups()


SHAREABLE = ("reference", "reward")


def frozen_identity(cfg: JobConfig, role: str) -> dict:
    """What a frozen `role` group (reference or reward) of this job holds and computes with: its weights,
    dtype, tokenizer, the sampling temperature (the reference scores rollouts at it) and whether its code
    is trusted. Jobs with equal identities can use one group; ranks, CPUs and micro-batch size are the
    owner's (they change speed and memory, not the numbers)."""
    m = getattr(cfg, role).model
    policy = cfg.policy.model
    weights = m.name_or_path or (policy.name_or_path if role == "reference" else "")
    return {"weights": weights, "dtype": m.dtype, "tokenizer": m.tokenizer or policy.tokenizer or policy.name_or_path,
            "temperature": cfg.rollout.temperature, "trust_remote_code": m.trust_remote_code}


def check_same_frozen(role: str, owner: str, owner_identity: dict, borrower: str, borrower_identity: dict) -> None:
    """Refuse `borrower`'s use of `owner`'s frozen `role` group when their `frozen_identity`s differ."""
    differ = [f"{field} {owner_identity[field]!r} there, {borrower_identity[field]!r} here"
              for field in owner_identity if field in borrower_identity
              and owner_identity[field] != borrower_identity[field]]
    if differ:
        raise ConfigError(f"{role}.share_with: job {borrower!r} borrows job {owner!r}'s {role}, which is not the "
                          f"{role} it would create itself ({'; '.join(differ)}); share only between jobs whose "
                          f"{role} has the same weights, dtype, tokenizer and sampling temperature, or remove "
                          f"{role}.share_with from {borrower!r}")


def borrowed_keys(cfg: JobConfig, specs: list[RoleSpec]) -> dict[str, str]:
    """{role: `<owner job>/<role>`} for the roles among `specs` that the job borrows (`<role>.share_with`)."""
    return {s.name: f"{getattr(cfg, s.name).share_with}/{s.name}" for s in specs
            if s.name in SHAREABLE and getattr(cfg, s.name).share_with}


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
    instead of created. The reservation is the job's, held across its recoveries
    (`SharedGroups.holding`, in `jobs/common.py`); tearing these groups down
    only lets go of the borrowed handle."""

    def __init__(self, cfg: JobConfig, specs: list[RoleSpec], wait: bool = True):
        """Waits up to `placement.timeout_s` for the cluster to have room (other jobs finish; a torn-down
        group's resources come back a moment after it is removed); a layout larger than the whole
        cluster fails at once. With `wait=False` it returns once every actor is created, before their
        constructors have run: a job then queues its setup calls behind them and calls `wait_started()`
        before it waits for any (an actor runs its calls in order, so a role's setup starts as soon as
        its own process is up, not when the slowest role's is)."""
        self.cfg = cfg
        self.specs = {s.name: s for s in specs}
        self.borrowed: dict[str, str] = {}
        self.published: dict[str, str] = {}
        self.groups: dict[str, ActorGroup] = {}
        self.placement = None
        plan = plan_for(cfg, specs)
        wait_until_fits(plan, cfg.placement.timeout_s)
        self.borrowed = borrowed_keys(cfg, specs)
        try:
            self.placement = create_placement_group(plan, timeout_s=cfg.placement.timeout_s,
                                                    strategy=cfg.placement.strategy)
            # Every group's actors are created before any is waited for: their processes start and import
            # at once (a real-model GRPO job's four groups: 26 s one after another on two cores).
            for spec in specs:
                if spec.name in self.borrowed:
                    continue
                self.groups[spec.name] = ActorGroup(
                    spec.worker_cls, role=spec.name, num_ranks=spec.num_ranks,
                    num_cpus_per_rank=spec.num_cpus_per_rank, num_gpus_per_rank=spec.num_gpus_per_rank,
                    placement=self.placement.for_role(spec.name), wait=False)
            if wait:
                self.wait_started()
            for name, key in self.borrowed.items():
                self.groups[name] = SHARED.wait(key, timeout_s=max(cfg.placement.timeout_s, 600.0),
                                                identity=frozen_identity(cfg, name), borrower=cfg.name)
        except BaseException:
            self.shutdown()
            raise

    def wait_started(self) -> None:
        """Wait for every group's constructors (`ActorGroup.wait_started`): a rank that failed to start is
        named here, before any call queued behind it is waited for."""
        for group in list(self.groups.values()):
            group.wait_started()

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
        SHARED.publish(key, self.groups[name], frozen_identity(self.cfg, name))
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

    def __exit__(self, exc_type, exc, tb) -> None:
        # Torn down because an actor died, the job will most likely recreate its groups: a group it lends
        # is taken back as soon as no borrower holds it (a borrower whose calls failed on it lets go), and
        # the new one is offered under the same key to the same reservations.
        self.shutdown(final=exc is None or actor_death(exc) is None)

    def release(self, name: str, final: bool = True) -> None:
        """Stop one role early (e.g. the reference after its log-probs are cached); its memory is freed."""
        group = self.groups.pop(name)
        if name in self.borrowed:  # the job gives its reservation back when it ends (`SharedGroups.holding`)
            SHARED.let_go(self.borrowed.pop(name), self.cfg.name)
            return
        if name in self.published:
            SHARED.withdraw(self.published.pop(name), final=final)
        group.shutdown()

    def shutdown(self, final: bool = True) -> None:
        """Tear every group down; `final=False` (an attempt that lost an actor) takes a lent group back
        without waiting for its borrowers' reservations (`SharedGroups.withdraw`)."""
        for name in list(self.groups):
            self.release(name, final=final)
        self.borrowed.clear()  # reserved but never received
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
        that run at the same time. `threads/<role>`: the fewest torch threads any of its ranks' calls ran
        with (`placement.threads: follow`; below the reservation when other work took cores). Every rank's
        counters start again from zero. A group borrowed from another job is left out: its counters are
        the lending job's to read."""
        pending = {name: (group, group.map(lambda actor: actor.compute_time.remote()))
                   for name, group in self.groups.items() if name not in self.borrowed}
        out: dict[str, float] = {}
        by_kind: dict[str, dict[str, float]] = {}
        for name, (group, refs) in pending.items():
            per_rank = group.gather(refs)
            threads = [seconds.pop("threads") for seconds in per_rank if "threads" in seconds]
            if threads:
                out[f"threads/{name}"] = float(min(threads))
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
