"""Torch threads that follow the CPU cores a role really gets.

A role's actor computes with as many torch threads as the CPUs Ray reserved
for it. Ray's reservation is bookkeeping: any other program on the machine
(a second cluster, a test suite, a browser) takes cores from under it, and
a multi-threaded GEMM then waits at every barrier for the thread that lost
its core. Measured on a 2-core machine with one process spinning beside a
real-model DPO step: 2 threads on the one free core are 2.6x slower than
quiet, 1 thread 1.6x.

`CoreFollower` wraps each compute call (`follow()`). After a call long
enough to measure, it reads how much CPU the rest of the machine used
during it (every core's busy time from `/proc/stat`, less this process's
own), and sets the threads of the next call to the cores left, rounded
down unless at least `FREE_CORE` of a core is free, between 1 and the
reservation:

    others = (machine busy seconds - own busy seconds) / wall seconds
    threads = clamp(floor(cpus - others + 1 - FREE_CORE), 1, reserved)

On a quiet machine `others` is near 0 and a role keeps its reservation;
with one spinning process on two cores it is near 1 and the role computes
with one thread; when the load goes, the next call sees the free core and
takes it back. Where `/proc/stat` cannot be read (not Linux), or with
`placement.threads: reserved`, the threads stay as reserved.

Our own roles count as "others" while they compute at the same time as this
one on the same CPUs (roles in one colocated bundle scoring at once): they
then share the cores instead of oversubscribing them, which is what the
reservation meant.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

FREE_CORE = 0.7
"""Fraction of a core that must be free, on average over the last call, for a thread to run on it."""

MIN_WALL_S = 0.2
"""Calls shorter than this are not measured: `/proc/stat` counts in 10 ms ticks."""

MODES = ("follow", "reserved")


def machine_busy_seconds(path: str = "/proc/stat") -> float | None:
    """Seconds every core of the machine has spent busy since boot (all but idle and iowait), or None
    where the file cannot be read."""
    try:
        with open(path) as handle:
            fields = handle.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    busy = sum(ticks[:8]) - idle  # user nice system idle iowait irq softirq steal; guest is inside user
    return busy / os.sysconf("SC_CLK_TCK")


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def threads_for(others: float, cpus: int, reserved: int) -> int:
    """Threads for the next call when the rest of the machine kept `others` cores busy (see the module
    docstring's rule)."""
    return max(1, min(reserved, math.floor(cpus - others + 1 - FREE_CORE)))


class CoreFollower:
    """Sets torch's threads before each compute call to the cores the last one found free."""

    def __init__(self, reserved: int | None = None, *, mode: str = "follow",
                 busy: Callable[[], float | None] = machine_busy_seconds,
                 own: Callable[[], float] = time.process_time, clock: Callable[[], float] = time.perf_counter,
                 cpus: int | None = None):
        if mode not in MODES:
            raise ValueError(f"placement.threads: got {mode!r}; expected one of {', '.join(MODES)}")
        self.reserved = max(1, int(reserved or torch.get_num_threads()))
        self.mode = mode
        self.threads = self.reserved
        self.others = 0.0
        """Cores the rest of the machine kept busy during the last measured call."""
        self._busy, self._own, self._clock = busy, own, clock
        self._cpus = cpus or cpu_count()
        self._fewest: int | None = None  # fewest threads a call ran with since `take_fewest`

    def take_fewest(self) -> int | None:
        """The fewest threads any call ran with since the last `take_fewest` (None: no call, or mode
        `reserved`, where the threads stay as reserved); starts counting again."""
        fewest, self._fewest = self._fewest, None
        return fewest

    @contextmanager
    def follow(self) -> Iterator[None]:
        """Run the enclosed compute with the threads chosen so far, then choose again from what it saw."""
        if self.mode != "follow":
            yield
            return
        torch.set_num_threads(self.threads)
        self._fewest = self.threads if self._fewest is None else min(self._fewest, self.threads)
        busy0, own0, wall0 = self._busy(), self._own(), self._clock()
        try:
            yield
        finally:
            busy1, own1, wall = self._busy(), self._own(), self._clock() - wall0
            if busy0 is not None and busy1 is not None and wall >= MIN_WALL_S:
                self.others = max(0.0, ((busy1 - busy0) - (own1 - own0)) / wall)
                self.threads = threads_for(self.others, self._cpus, self.reserved)
