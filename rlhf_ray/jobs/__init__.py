"""The drivers: online RL (`online.py`), offline training (`offline.py`), their
validation (`validate.py`), and `run_job`, which picks the driver from the algorithm name."""

from __future__ import annotations

import threading

from rlhf_ray.config.schema import JobConfig


class StopRequested(RuntimeError):
    """The job was asked to stop (its `stop` event was set) and ended after its last finished step."""


def run_job(cfg: JobConfig, address: str | None = None, stop: threading.Event | None = None) -> dict:
    """Validate `cfg` (before any model loads), then run it; returns the run's summary.

    `stop`: when set (by another thread, e.g. a pipeline whose other job failed), the job ends after the
    step it is in and raises `StopRequested`."""
    from rlhf_ray.jobs.validate import validate

    if validate(cfg) == "online":
        from rlhf_ray.jobs.online import run_online

        return run_online(cfg, address, stop=stop)
    from rlhf_ray.jobs.offline import run_offline

    return run_offline(cfg, address, stop=stop)
