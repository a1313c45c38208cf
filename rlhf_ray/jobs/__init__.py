"""The drivers: online RL (`online.py`), offline training (`offline.py`), their
validation (`validate.py`), and `run_job`, which picks the driver from the algorithm name."""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

from rlhf_ray.config.schema import JobConfig

logger = logging.getLogger(__name__)


class StopRequested(RuntimeError):
    """The job was asked to stop (its `stop` event was set: a signal, or a pipeline's fail_fast) and ended
    after its last finished step, which it saved as a checkpoint; the message says which and where."""


@contextmanager
def stop_on_signals(stop: threading.Event | None) -> Iterator[threading.Event | None]:
    """In the main thread without a `stop` of its own, SIGTERM and SIGINT (`ray job stop`, a pod eviction,
    Ctrl-C) set one: the job finishes its current step, writes a checkpoint and raises `StopRequested`. A
    second signal stops at once (KeyboardInterrupt). Enter it after `ray.init`, which installs handlers
    of its own; they are put back on exit."""
    if stop is not None or threading.current_thread() is not threading.main_thread():
        yield stop
        return
    stop = threading.Event()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        logger.warning("%s: stopping after the current step with a checkpoint (send it again to stop at once)",
                       signal.Signals(signum).name)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_job(cfg: JobConfig, address: str | None = None, stop: threading.Event | None = None) -> dict:
    """Validate `cfg` (before any model loads), then run it; returns the run's summary.

    `stop`: when set (by another thread, e.g. a pipeline whose other job failed), the job ends after the
    step it is in, saves a checkpoint of it and raises `StopRequested`. Without one, in the main thread,
    SIGTERM and SIGINT do the same (`stop_on_signals`)."""
    from rlhf_ray.jobs.validate import validate

    if validate(cfg) == "online":
        from rlhf_ray.jobs.online import run_online

        return run_online(cfg, address, stop=stop)
    from rlhf_ray.jobs.offline import run_offline

    return run_offline(cfg, address, stop=stop)
