"""What every driver shares: the run directory and its resolved config, and recovery from a dead actor.

A run directory (docs/ARCHITECTURE.md) holds `config.yaml` (resolved), `metrics.jsonl`,
`checkpoints/step_<N>/` and `summary.json`; the Ray side of a job (its role
groups, their checkpoints) lives in `runtime/`.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable

from rlhf_ray.config.loader import dump_yaml
from rlhf_ray.config.schema import JobConfig
from rlhf_ray.files import write_text_atomic
from rlhf_ray.job_plan import plan_job
from rlhf_ray.runtime.actor_group import ActorGroupError, actor_death
from rlhf_ray.runtime.checkpoint import (
    check_fresh_start,
    checkpoint_marks,
    find_resume_checkpoint,
    latest_sound_checkpoint,
    read_json,
)
from rlhf_ray.runtime.role_groups import SHARED, RoleSpec, borrowed_keys
from rlhf_ray.telemetry.metrics import utc_now

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """`run.max_bad_steps` optimizer steps in a row had a non-finite loss or gradient norm."""


class BadSteps:
    """Counts skipped optimizer steps (non-finite, or with `rollout/skipped` too far from the rollout engine:
    `algorithm.max_logprob_diff`): the total for `train/skipped_steps`, and the streak that stops the job at
    `run.max_bad_steps`."""

    def __init__(self, limit: int, total: int = 0):
        self.limit, self.total, self.streak = limit, total, 0

    def update(self, step: int, metrics: dict, skipped_keys: tuple[str, ...], counter_key: str) -> str | None:
        """Count this step; adds `counter_key` to `metrics`; returns why the job must stop, or None."""
        bad = any(metrics.get(key, 0.0) > 0 for key in skipped_keys)
        self.total += bad
        self.streak = self.streak + 1 if bad else 0
        metrics[counter_key] = float(self.total)
        if self.streak < self.limit:
            return None
        if metrics.get("rollout/skipped", 0.0) > 0:
            return (f"{self.streak} steps in a row ending at step {step} were skipped because the rollout engine's "
                    f"log-probs of the sampled tokens were too far from the policy's (rollout/logprob_diff "
                    f"{metrics.get('rollout/logprob_diff', float('nan')):.3g} > algorithm.max_logprob_diff); the last "
                    "good checkpoint is kept: check the weight sync and the engine's dtype and sampling settings, "
                    "or raise algorithm.max_logprob_diff")
        losses = ", ".join(f"{k}={v}" for k, v in metrics.items()
                           if k.endswith("loss") and isinstance(v, float) and not math.isfinite(v)) or \
            "the gradient norm"
        return (f"{self.streak} optimizer steps in a row ending at step {step} were skipped because they were not "
                f"finite ({losses}); the last good checkpoint is kept: lower the learning rate, clip gradients "
                "(optim.grad_clip) or check the data")


class RecoveryError(RuntimeError):
    """An actor died once more than `run.max_failures` allows; the message names the role and the cause."""


def prepare_run_dir(cfg: JobConfig) -> Path:
    """Create the run directory and write the resolved config; `run.resume: never` in a folder holding an
    earlier run's checkpoints is refused first (`check_fresh_start`), before its config is replaced."""
    run_dir = Path(cfg.run.output_dir).expanduser().resolve()
    check_fresh_start(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", dump_yaml(cfg))
    return run_dir


def with_recovery(cfg: JobConfig, run_dir: Path, attempt: Callable[[Path | None, list[dict]], dict]) -> dict:
    """`attempt(resume_from, failures)` (one pass of a driver's loop, creating and tearing down its role
    groups), again each time one of its actors dies (killed, out of memory, node lost), at most
    `run.max_failures` times. Errors an actor raised are not retried.

    A recovery resumes from the latest sound checkpoint this run wrote, else from where the run started
    (`run.resume`'s checkpoint, or the initial weights): never from a checkpoint another run left in the
    folder, whatever its step.

    `failures` holds one entry per recovery (`time`, `role`, `cause`, `resumed_from_step`) for the
    summary; the rows after the checkpoint are recomputed, so `metrics.jsonl` ends with every step once."""
    failures: list[dict] = []
    earlier = checkpoint_marks(run_dir)  # what was there before this run: not its own
    started_from = find_resume_checkpoint(cfg, run_dir)
    resume_from = started_from
    while True:
        try:
            return attempt(resume_from, failures)
        except ActorGroupError as err:
            cause = actor_death(err)
            if cause is None:
                raise
            where = err.where or "an actor"
            if len(failures) >= cfg.run.max_failures:
                raise RecoveryError(f"{cfg.name}: {where} died ({cause}) after {len(failures)} recoveries "
                                    f"(run.max_failures={cfg.run.max_failures}); the job stops with its latest "
                                    "checkpoint kept: run the same command again to continue") from err
            own, _ = latest_sound_checkpoint(run_dir, written_before=earlier)
            resume_from = own or started_from
            step = read_json(resume_from / "trainer_state.json")["step"] if resume_from is not None else 0
            failures.append({"time": utc_now(), "role": where, "cause": cause, "resumed_from_step": step})
            logger.warning("%s: %s died (%s); recreating the job's role groups and resuming from step %d "
                           "(recovery %d of run.max_failures=%d)", cfg.name, where, cause, step, len(failures),
                           cfg.run.max_failures)


def role_specs(cfg: JobConfig) -> list[RoleSpec]:
    """The role groups of `cfg`'s job (`plan_job(cfg).groups`, in that order) with their actor classes and
    resources: a borrowed group is listed too (its owner's actors answer)."""
    from rlhf_ray.workers.critic import CriticWorker
    from rlhf_ray.workers.policy import PolicyWorker
    from rlhf_ray.workers.reference import ReferenceWorker
    from rlhf_ray.workers.reward import RewardWorker
    from rlhf_ray.workers.reward_trainer import RewardTrainerWorker
    from rlhf_ray.workers.rollout import engine_worker_class

    plan = plan_job(cfg)
    r = cfg.rollout
    reward = RewardTrainerWorker if "reward" in plan.trained else RewardWorker
    workers = {"policy": PolicyWorker, "critic": CriticWorker, "reference": ReferenceWorker, "reward": reward}
    return [RoleSpec("rollout", engine_worker_class(r.engine), r.num_engines, r.num_cpus_per_engine,
                     r.num_gpus_per_engine) if role == "rollout"
            else RoleSpec.of(role, workers[role], getattr(cfg, role))
            for role in plan.groups]


class RecoveringJob(ABC):
    """A driver whose `run` is one `_attempt(stop, resume_from, failures, started_at)` after another under
    `with_recovery`; subclasses set `cfg` and `run_dir` and make one attempt (`_attempt`)."""

    cfg: JobConfig
    run_dir: Path

    def _specs(self) -> list[RoleSpec]:
        """The role groups each attempt creates or borrows."""
        return role_specs(self.cfg)

    @abstractmethod
    def _attempt(self, stop, resume_from: Path | None, failures: list[dict], started_at: str) -> dict:
        """One run of the job from `resume_from` (None: the start) until it ends or an actor dies."""

    def run(self, stop=None) -> dict:
        """The loop, recovering from dead actors (`with_recovery`); returns the summary. The frozen groups
        the job borrows stay reserved until it ends, so that their owner keeps them across a recovery."""
        started_at = utc_now()
        with SHARED.holding(self.cfg.name, borrowed_keys(self.cfg, self._specs()).values()):
            return with_recovery(self.cfg, self.run_dir, lambda resume_from, failures: self._attempt(
                stop, resume_from, failures, started_at))
