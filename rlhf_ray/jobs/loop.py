"""The step loop every driver runs: cadence, checkpoints, stopping and metrics around a driver's own step.

A driver (`online.py`, `offline.py`) sets up its role groups, restores a checkpoint when it resumes, and
hands itself to `run_steps`, which owns everything around a step:

    for step in start+1 .. run.total_steps:
        stop requested?          -> checkpoint the last finished step, raise StopRequested
        driver.before_step(n)    (untimed: an offline stage's set-up)
        metrics = driver.step(n) (timed: the driver's phases)
        non-finite steps counted, step time and per-role compute added, driver.rates(metrics)
        memory at the second step, held-out evaluation at steps 1, every run.eval_every and the last
        metrics written (jsonl and sinks), progress shown
        checkpoint every run.save_every and at the last step
    export the final model, write summary.json

The driver supplies, besides `step`: `state_dict()` (what its checkpoint holds besides the trained
weights), `trainables` / `exports` (the groups a checkpoint saves and exports), `evaluate`, `finish`
(export at the end; returns extra summary fields) and the names the timeline and skip counters use.
"""

from __future__ import annotations

import threading
from contextlib import ExitStack
from pathlib import Path
from typing import Protocol

from rlhf_ray.config.schema import JobConfig
from rlhf_ray.jobs import StopRequested
from rlhf_ray.jobs.common import BadSteps, NonFiniteError
from rlhf_ray.runtime.checkpoint import latest_checkpoint, save_checkpoint
from rlhf_ray.runtime.role_groups import RoleGroups, node_addresses
from rlhf_ray.telemetry.metrics import MetricsWriter, utc_now, write_summary
from rlhf_ray.telemetry.progress import Progress
from rlhf_ray.telemetry.timeline import Timeline
from rlhf_ray.telemetry.timers import PhaseTimer


class Steps(Protocol):
    """What a driver gives `run_steps`."""

    cfg: JobConfig
    run_dir: Path
    timeline: Timeline
    skip_keys: tuple[str, ...]
    """Metrics that say an optimizer step was skipped (non-finite loss or gradient)."""

    def busy(self, roles: RoleGroups) -> dict[str, list[str]]:
        """Phase -> the role groups it keeps busy (the timeline's rows); "eval" for held-out evaluation."""

    def before_step(self, roles: RoleGroups, step: int, timer: PhaseTimer) -> None:
        """Work before step `step` that is not the step's (its time is left out of `time/step_s`)."""

    def step(self, roles: RoleGroups, step: int, timer: PhaseTimer) -> dict:
        """One training step; returns its metrics."""

    def rates(self, metrics: dict) -> dict:
        """Metrics derived from the step's time (`metrics["time/step_s"]`), e.g. tokens per second."""

    def evaluate(self, roles: RoleGroups, step: int) -> dict:
        """Held-out metrics after step `step`."""

    def state_dict(self) -> dict:
        """The driver's state a checkpoint holds besides the weights (sampler, controllers, stage)."""

    def trainables(self, roles: RoleGroups) -> dict:
        """Role -> the trained group whose DeepSpeed state a checkpoint saves."""

    def exports(self, roles: RoleGroups) -> dict:
        """Role -> the group a checkpoint exports as a Hugging Face folder."""

    def finish(self, roles: RoleGroups) -> dict:
        """After the last step: export `final/`; returns extra fields for `summary.json`."""


def run_steps(job: Steps, roles: RoleGroups, *, start: int, skipped_steps: int, failures: list[dict],
              started_at: str, stop: threading.Event | None) -> dict:
    """Steps `start + 1 .. run.total_steps` of `job` (see the module docstring); returns the summary."""
    cfg = job.cfg
    total = cfg.run.total_steps
    busy = job.busy(roles)
    current = [start]  # the step the timeline's phases belong to
    with ExitStack() as closing:
        writer = MetricsWriter(job.run_dir, sinks=cfg.run.sinks, config=cfg, resume_step=start)
        closing.callback(writer.close)  # also when an actor dies mid-run
        job.timeline = Timeline(job.run_dir, cfg.name)
        closing.callback(job.timeline.close)
        progress = Progress(total=total, initial=start, enabled=cfg.run.progress, desc=cfg.algorithm.name)
        timer = PhaseTimer(on_phase=lambda name, t0, t1: job.timeline.record(
            name, busy.get(name, ()), t0, t1, current[0]))
        bad_steps = BadSteps(cfg.run.max_bad_steps, skipped_steps)

        def checkpoint(step: int) -> Path:
            state = {**job.state_dict(), "skipped_steps": bad_steps.total}
            return save_checkpoint(job.run_dir, step, job.trainables(roles), state, cfg.run.keep_last,
                                   export=job.exports(roles))

        saved = start
        for step in range(start + 1, total + 1):
            if stop is not None and stop.is_set():
                where = checkpoint(step - 1) if step - 1 > saved else latest_checkpoint(job.run_dir) or "none yet"
                raise StopRequested(f"{cfg.name} after step {step - 1} of {total}; checkpoint {where}; run the "
                                    "same command again to continue")
            current[0] = step
            job.before_step(roles, step, timer)
            timer.start_step()
            metrics = job.step(roles, step, timer)
            stop_why = bad_steps.update(step, metrics, job.skip_keys, "train/skipped_steps")
            metrics.update(timer.finish_step())
            metrics.update(roles.compute_times())
            metrics.update(job.rates(metrics))
            if step == min(start + 2, total):  # gradients and optimizer state seen
                metrics.update(roles.memory())
            if step == 1 or (cfg.run.eval_every and step % cfg.run.eval_every == 0) or step == total:
                with job.timeline.interval("eval", busy.get("eval", ()), step):
                    metrics.update(job.evaluate(roles, step))
                roles.compute_times()  # evaluation's compute is not the next step's
            if failures:
                metrics["run/restarts"] = len(failures)
            writer.write(step, metrics)
            progress.update(step, metrics)
            if stop_why:
                raise NonFiniteError(f"{cfg.name}: {stop_why}")
            if (cfg.run.save_every and step % cfg.run.save_every == 0) or step == total:
                checkpoint(step)
                saved = step
        progress.close()
        job.timeline.close()
        extra = job.finish(roles)
        summary = write_summary(job.run_dir, writer, extra={
            "algorithm": cfg.algorithm.name, "roles": sorted(roles.groups), "shared_roles": roles.borrowed_from(),
            "layout": roles.layout(), "nodes": node_addresses(), **extra, "failures": failures,
            "started_at": started_at, "finished_at": utc_now()})
        writer.close()
    return summary
