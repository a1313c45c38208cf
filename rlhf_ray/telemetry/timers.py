"""Wall-clock time per phase of a training step: `time/<phase>_s` and `time/step_s`.

    timer = PhaseTimer()
    timer.start_step()
    with timer.phase("generate"):
        ...
    with timer.phase("policy_update"):
        ...
    metrics.update(timer.finish_step())  # {"time/generate_s": ..., "time/policy_update_s": ..., "time/step_s": ...}

A phase entered several times in one step (e.g. one update per PPO epoch)
accumulates. Phases do not nest: entering one while another is open is an
error naming both, because nested phases would count the same seconds twice
and the per-phase times would no longer add up to at most the step time.

`ComputeClock` is the worker-side counterpart: the seconds a Ray worker spends
computing, reported as `time/compute/<role>_s` beside the driver's phases.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

_PHASE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


class PhaseTimer:
    """Accumulates wall seconds per named phase within one step.

    Args:
        clock: a monotonic clock in seconds (`time.perf_counter` by default;
            tests pass a fake one).
        on_phase: called as `on_phase(name, start, end)` with wall-clock
            (epoch) seconds when each phase ends (the driver's `Timeline`).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter,
                 on_phase: Callable[[str, float, float], None] | None = None,
                 around: Callable[[], AbstractContextManager] | None = None):
        self._clock = clock
        self._on_phase = on_phase
        self._around = around  # entered around each measured call (`runtime.cores.CoreFollower.follow`)
        self._totals: dict[str, float] = {}
        self._step_start: float | None = None
        self._open: tuple[str, float] | None = None

    def start_step(self) -> None:
        """Mark the start of a step; phase times from before are discarded."""
        if self._open is not None:
            raise RuntimeError(f"start_step called while phase {self._open[0]!r} is still open")
        self._totals = {}
        self._step_start = self._clock()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the enclosed block as phase `name` (adds to the phase's total for this step).

        The step starts at the first phase if `start_step` was not called.
        """
        if not _PHASE_NAME.match(name) or name == "step":
            raise ValueError(f"phase name {name!r} is not allowed: use letters, digits, '_', '.', '-', not 'step'")
        if self._open is not None:
            raise RuntimeError(f"phase {name!r} entered inside phase {self._open[0]!r}: phases do not nest; "
                               f"end {self._open[0]!r} first or time the outer block only")
        start = self._clock()
        wall_start = time.time()
        if self._step_start is None:
            self._step_start = start
        self._open = (name, start)
        try:
            yield
        finally:
            self._open = None
            self._totals[name] = self._totals.get(name, 0.0) + (self._clock() - start)
            if self._on_phase is not None:
                self._on_phase(name, wall_start, time.time())

    @property
    def current_phase(self) -> str | None:
        """The phase open now, or None."""
        return None if self._open is None else self._open[0]

    def elapsed(self) -> dict[str, float]:
        """Seconds per phase so far in this step, as `{"time/<phase>_s": seconds}`."""
        return {f"time/{name}_s": seconds for name, seconds in self._totals.items()}

    def finish_step(self) -> dict[str, float]:
        """End the step: `time/<phase>_s` for each phase run and `time/step_s`, the
        wall time since `start_step` (or the first phase). Resets for the next step."""
        if self._open is not None:
            raise RuntimeError(f"finish_step called while phase {self._open[0]!r} is still open")
        if self._step_start is None:
            raise RuntimeError("finish_step called with no step started: call start_step() or time a phase first")
        metrics = self.elapsed()
        metrics["time/step_s"] = self._clock() - self._step_start
        self._totals = {}
        self._step_start = None
        return metrics


class ComputeClock:
    """Seconds a worker spends in its own compute, by kind, between two `take()` calls.

    The calls that do a role's work (a training step, a batch of forward
    passes, a generate call) run inside `measure(kind)`; the driver collects
    `take()` from every rank once per step. A phase's wall time on the driver
    minus the longest worker compute inside it is what Ray scheduling,
    serialisation and waiting cost. Each measured call ends by moving its
    results to the CPU (a loss read as a float, log-probs copied back), so on
    a GPU the kernels it queued are finished when the clock stops.

        clock = ComputeClock()
        with clock.measure("train"):
            ...
        clock.take()  # {"train": 0.41}; the counters start again from zero
    """

    KINDS = ("generate", "forward", "train")

    def __init__(self, clock: Callable[[], float] = time.perf_counter,
                 on_phase: Callable[[str, float, float], None] | None = None,
                 around: Callable[[], AbstractContextManager] | None = None):
        self._clock = clock
        self._on_phase = on_phase
        self._around = around  # entered around each measured call (`runtime.cores.CoreFollower.follow`)
        self._seconds: dict[str, float] = {}

    @contextmanager
    def measure(self, kind: str) -> Iterator[None]:
        """Add the enclosed block's wall seconds to `kind` (one of `KINDS`)."""
        if kind not in self.KINDS:
            raise ValueError(f"compute kind {kind!r} is not one of {', '.join(self.KINDS)}")
        start = self._clock()
        try:
            with self._around() if self._around else nullcontext():
                yield
        finally:
            self._seconds[kind] = self._seconds.get(kind, 0.0) + (self._clock() - start)

    def take(self) -> dict[str, float]:
        """Seconds per kind since the last `take()` (kinds not run are absent); resets the counters."""
        out, self._seconds = self._seconds, {}
        return out
