"""What every driver shares: the run directory, Ray start-up, role groups,
checkpoints with exact resume, and the per-step record.

A run directory (docs/ARCHITECTURE.md) holds `config.yaml` (resolved), `metrics.jsonl`,
`checkpoints/step_<N>/` and `summary.json`. A checkpoint holds each trainable
role's DeepSpeed state (model, optimizer, scheduler), the policy exported with
`save_pretrained`, and `trainer_state.json` (step, data position, RNG, KL
controller), written atomically: a crash mid-save leaves the previous one whole.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from rlhf_ray.config.loader import dump_yaml
from rlhf_ray.config.schema import ConfigError, JobConfig, RoleConfig
from rlhf_ray.runtime.actor_group import ActorGroup
from rlhf_ray.runtime.checkpoint import (
    atomic_dir,
    capture_rng_state,
    latest_checkpoint,
    prune_checkpoints,
    read_json,
    restore_rng_state,
)
from rlhf_ray.runtime.placement import RoleResources, check_fits, create_placement_group, plan_placement
from rlhf_ray.telemetry.metrics import write_json_atomic


def prepare_run_dir(cfg: JobConfig) -> Path:
    """Create the run directory and write the resolved config."""
    run_dir = Path(cfg.run.output_dir).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "config.yaml.tmp"
    tmp.write_text(dump_yaml(cfg))
    os.replace(tmp, run_dir / "config.yaml")
    return run_dir


def init_ray(address: str | None = None) -> None:
    """Connect to the cluster at `address`, or start a local one bound to 127.0.0.1."""
    if ray.is_initialized():
        return
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False, runtime_env=env,
                 _node_ip_address="127.0.0.1", configure_logging=False)


@dataclass
class RoleSpec:
    """A role the job needs: its name, actor class and resource settings."""

    name: str
    worker_cls: type
    settings: RoleConfig | Any
    num_ranks: int
    num_cpus_per_rank: float
    num_gpus_per_rank: float


def role_spec(name: str, worker_cls: type, settings: RoleConfig) -> RoleSpec:
    return RoleSpec(name, worker_cls, settings, settings.num_ranks, settings.num_cpus_per_rank,
                    settings.num_gpus_per_rank)


class SharedGroups:
    """Groups one job lends to others driven from the same process (`reference.share_with`).

    The owner publishes its group once it is set up; a borrower waits for it,
    uses it, and gives it back; the owner tears it down only after every
    borrower has given it back."""

    def __init__(self):
        self._cond = threading.Condition()
        self._groups: dict[str, ActorGroup] = {}
        self._users: dict[str, int] = {}

    def publish(self, key: str, group: ActorGroup) -> None:
        with self._cond:
            self._groups[key] = group
            self._users.setdefault(key, 0)
            self._cond.notify_all()

    def reserve(self, key: str) -> None:
        """Announce a borrower before the group is offered, so its owner waits for it before tearing down."""
        with self._cond:
            self._users[key] = self._users.get(key, 0) + 1

    def wait(self, key: str, timeout_s: float) -> ActorGroup:
        """The reserved group, once its owner has offered it."""
        with self._cond:
            if not self._cond.wait_for(lambda: key in self._groups, timeout=timeout_s):
                job = key.split("/")[0]
                raise ConfigError(f"reference.share_with: no running job named {job!r} offered its reference "
                                  f"within {timeout_s:g} s; start that job (name: {job}) alongside this one")
            return self._groups[key]

    def give_back(self, key: str) -> None:
        with self._cond:
            self._users[key] -= 1
            self._cond.notify_all()

    def withdraw(self, key: str) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._users.get(key, 0) == 0)
            self._groups.pop(key, None)
            self._users.pop(key, None)


SHARED = SharedGroups()


class RoleGroups:
    """The actor groups of one job, placed together; a context manager that tears them down.

    With `reference.share_with: JOB`, the reference group is borrowed from the
    job named JOB running alongside (same driver process) instead of created."""

    def __init__(self, cfg: JobConfig, specs: list[RoleSpec]):
        self.cfg = cfg
        self.borrowed: dict[str, str] = {}
        self.published: dict[str, str] = {}
        self.groups: dict[str, ActorGroup] = {}
        self.placement = None
        borrow = cfg.reference.share_with and any(s.name == "reference" for s in specs)
        if borrow:
            specs = [s for s in specs if s.name != "reference"]
        resources = [RoleResources(s.name, s.num_ranks, s.num_cpus_per_rank, s.num_gpus_per_rank) for s in specs]
        colocate = [tuple(r for r in group if r in {s.name for s in specs}) for group in cfg.placement.colocate]
        colocate = [group for group in colocate if len(group) > 1]
        plan = plan_placement(resources, colocate=colocate)
        check_fits(plan, ray.available_resources())
        if borrow:
            self.borrowed["reference"] = f"{cfg.reference.share_with}/reference"
            SHARED.reserve(self.borrowed["reference"])
        try:
            self.placement = create_placement_group(plan, timeout_s=cfg.placement.timeout_s,
                                                    strategy=cfg.placement.strategy)
            for spec in specs:
                self.groups[spec.name] = ActorGroup(
                    spec.worker_cls, role=spec.name, num_ranks=spec.num_ranks,
                    num_cpus_per_rank=spec.num_cpus_per_rank, num_gpus_per_rank=spec.num_gpus_per_rank,
                    placement=self.placement.for_role(spec.name))
            for name, key in self.borrowed.items():
                self.groups[name] = SHARED.wait(key, timeout_s=max(cfg.placement.timeout_s, 600.0))
        except BaseException:
            self.shutdown()
            raise

    def owns(self, name: str) -> bool:
        """Whether this job created (and so sets up) the group `name`."""
        return name in self.groups and name not in self.borrowed

    def offer(self, name: str) -> None:
        """Let jobs alongside borrow group `name` (after it is set up)."""
        key = f"{self.cfg.name}/{name}"
        SHARED.publish(key, self.groups[name])
        self.published[name] = key

    def __getitem__(self, name: str) -> ActorGroup:
        return self.groups[name]

    def __enter__(self) -> "RoleGroups":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def release(self, name: str) -> None:
        """Stop one role early (e.g. the reference after its log-probs are cached); its memory is freed."""
        group = self.groups.pop(name)
        if name in self.borrowed:
            SHARED.give_back(self.borrowed.pop(name))
            return
        if name in self.published:
            SHARED.withdraw(self.published.pop(name))
        group.shutdown()

    def shutdown(self) -> None:
        for name in list(self.groups):
            self.release(name)
        for name in list(self.borrowed):  # reserved but never received
            SHARED.give_back(self.borrowed.pop(name))
        if self.placement is not None:
            self.placement.remove()
            self.placement = None

    def memory(self) -> dict[str, float]:
        """Every role's memory metrics (rank 0 of each group; ranks of a role hold alike)."""
        out: dict[str, float] = {}
        for group in self.groups.values():
            out.update(ray.get(group.rank0.memory.remote()))
        return out

    def compute_times(self) -> dict[str, float]:
        """Each role's compute seconds since the last call: `time/compute/<role>/<kind>_s` for each kind
        (generate, forward, train) it ran, from its slowest rank (ranks run in parallel), and
        `time/compute/<role>_s`, their sum. Every rank's counters start again from zero. A group
        borrowed from another job is left out: its counters are the lending job's to read."""
        pending = {name: [actor.compute_time.remote() for actor in group.actors]
                   for name, group in self.groups.items() if name not in self.borrowed}
        out: dict[str, float] = {}
        for name, refs in pending.items():
            per_rank = ray.get(refs)
            kinds = sorted({kind for seconds in per_rank for kind in seconds})
            slowest = {kind: max(seconds.get(kind, 0.0) for seconds in per_rank) for kind in kinds}
            out.update({f"time/compute/{name}/{kind}_s": value for kind, value in slowest.items()})
            out[f"time/compute/{name}_s"] = sum(slowest.values())
        return out


# checkpoints -----------------------------------------------------------------

def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step}"


def save_checkpoint(run_dir: Path, step: int, trainables: dict[str, ActorGroup], state: dict,
                    keep_last: int, export: dict[str, ActorGroup] | None = None) -> Path:
    """Write checkpoint `step` atomically: each trainable group's DeepSpeed state under
    `<role>/`, `save_pretrained` exports under `<role>_hf/`, and `trainer_state.json`."""
    final = checkpoint_dir(run_dir, step)
    with atomic_dir(final) as tmp:
        for name, group in trainables.items():
            ray.get(group.map(lambda actor, d=str(tmp / name): actor.save_checkpoint.remote(d)))
        for name, group in (export or {}).items():
            ray.get(group.map(lambda actor, d=str(tmp / f"{name}_hf"): actor.export.remote(d)))
        write_json_atomic(tmp / "trainer_state.json", {**state, "step": step, "rng": capture_rng_state()})
    prune_checkpoints(run_dir, keep_last)
    return final


def find_resume_checkpoint(cfg: JobConfig, run_dir: Path) -> Path | None:
    """The checkpoint to resume from: `run.resume` auto (latest in the run dir), never, or a path."""
    if cfg.run.resume == "never":
        return None
    if cfg.run.resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(cfg.run.resume)
    if not (path / "trainer_state.json").is_file():
        raise ConfigError(f"run.resume: {path} is not a checkpoint directory (no trainer_state.json); give "
                          "a checkpoints/step_<N> folder, auto or never")
    return path


def load_checkpoint(path: Path, trainables: dict[str, ActorGroup]) -> dict:
    """Restore each trainable group and the driver's RNG; returns the trainer state."""
    for name, group in trainables.items():
        ray.get(group.map(lambda actor, d=str(path / name): actor.load_checkpoint.remote(d)))
    state = read_json(path / "trainer_state.json")
    restore_rng_state(state["rng"])
    return state
