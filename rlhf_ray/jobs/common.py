"""What every driver shares: the run directory, Ray start-up, role groups,
checkpoints with exact resume, and the per-step record.

A run directory (DESIGN.md) holds `config.yaml` (resolved), `metrics.jsonl`,
`checkpoints/step_<N>/` and `summary.json`. A checkpoint holds each trainable
role's DeepSpeed state (model, optimizer, scheduler), the policy exported with
`save_pretrained`, and `trainer_state.json` (step, data position, RNG, KL
controller), written atomically: a crash mid-save leaves the previous one whole.
"""

from __future__ import annotations

import os
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
    write_json_atomic,
)
from rlhf_ray.runtime.placement import RoleResources, check_fits, create_placement_group, plan_placement


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


class RoleGroups:
    """The actor groups of one job, placed together; a context manager that tears them down."""

    def __init__(self, cfg: JobConfig, specs: list[RoleSpec]):
        self.cfg = cfg
        resources = [RoleResources(s.name, s.num_ranks, s.num_cpus_per_rank, s.num_gpus_per_rank) for s in specs]
        colocate = [tuple(r for r in group if r in {s.name for s in specs}) for group in cfg.placement.colocate]
        colocate = [group for group in colocate if len(group) > 1]
        plan = plan_placement(resources, colocate=colocate)
        check_fits(plan, ray.available_resources())
        self.placement = create_placement_group(plan, timeout_s=cfg.placement.timeout_s,
                                                strategy=cfg.placement.strategy)
        self.groups: dict[str, ActorGroup] = {}
        try:
            for spec in specs:
                self.groups[spec.name] = ActorGroup(
                    spec.worker_cls, role=spec.name, num_ranks=spec.num_ranks,
                    num_cpus_per_rank=spec.num_cpus_per_rank, num_gpus_per_rank=spec.num_gpus_per_rank,
                    placement=self.placement.for_role(spec.name))
        except BaseException:
            self.shutdown()
            raise

    def __getitem__(self, name: str) -> ActorGroup:
        return self.groups[name]

    def get(self, name: str) -> ActorGroup | None:
        return self.groups.get(name)

    def __enter__(self) -> "RoleGroups":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        for group in self.groups.values():
            group.shutdown()
        self.groups = {}
        self.placement.remove()

    def memory(self) -> dict[str, float]:
        """Every role's memory metrics (rank 0 of each group; ranks of a role hold alike)."""
        out: dict[str, float] = {}
        for group in self.groups.values():
            out.update(ray.get(group.rank0.memory.remote()))
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
