"""The drivers: online RL (`online.py`), offline training (`offline.py`),
evaluation, and `run_job`, which picks the driver from the algorithm name."""

from __future__ import annotations

from rlhf_ray.config.schema import JobConfig


def run_job(cfg: JobConfig, address: str | None = None) -> dict:
    """Validate `cfg` (before any model loads), then run it; returns the run's summary."""
    from rlhf_ray.jobs.validate import validate

    if validate(cfg) == "online":
        from rlhf_ray.jobs.online import run_online

        return run_online(cfg, address)
    from rlhf_ray.jobs.offline import run_offline

    return run_offline(cfg, address)
