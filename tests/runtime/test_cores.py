"""Torch threads that follow the free cores (`runtime/cores.py`), on a scripted machine."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.runtime.cores import CoreFollower, machine_busy_seconds, threads_for
from rlhf_ray.telemetry.timers import ComputeClock


class Machine:
    """Scripted clocks: each call of the follower's block advances wall time by `wall` seconds, this
    process's CPU by `own` seconds and the whole machine's busy time by `own + others` core-seconds."""

    def __init__(self):
        self.wall = self.own = self.busy = 0.0

    def run(self, follower: CoreFollower, *, wall: float, own_cores: float, others_cores: float) -> int:
        with follower.follow():
            used = torch.get_num_threads()
            self.wall += wall
            self.own += own_cores * wall
            self.busy += (own_cores + others_cores) * wall
        return used

    def follower(self, reserved: int = 2, cpus: int = 2, **kwargs) -> CoreFollower:
        return CoreFollower(reserved, busy=lambda: self.busy, own=lambda: self.own, clock=lambda: self.wall,
                            cpus=cpus, **kwargs)


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_rule_keeps_a_core_only_when_most_of_it_is_free():
    assert threads_for(0.0, cpus=2, reserved=2) == 2
    assert threads_for(0.25, cpus=2, reserved=2) == 2  # 1.75 cores free
    assert threads_for(0.35, cpus=2, reserved=2) == 1  # 1.65: the second core is not 0.7 free
    assert threads_for(1.0, cpus=2, reserved=2) == 1   # one spinning process
    assert threads_for(5.0, cpus=2, reserved=2) == 1   # never below one thread
    assert threads_for(0.0, cpus=16, reserved=4) == 4  # never above the reservation
    assert threads_for(13.0, cpus=16, reserved=4) == 3


def test_threads_drop_under_load_and_come_back_when_it_goes():
    machine = Machine()
    follower = machine.follower()
    assert machine.run(follower, wall=1.0, own_cores=2.0, others_cores=0.05) == 2  # quiet: keeps 2
    assert follower.threads == 2
    assert machine.run(follower, wall=1.0, own_cores=1.3, others_cores=0.7) == 2  # a spinner arrives
    assert follower.threads == 1 and follower.others == pytest.approx(0.7)
    assert machine.run(follower, wall=1.0, own_cores=1.0, others_cores=1.0) == 1  # runs on the free core
    assert follower.threads == 1
    assert machine.run(follower, wall=1.0, own_cores=1.0, others_cores=0.0) == 1  # the spinner has gone
    assert follower.threads == 2
    assert machine.run(follower, wall=1.0, own_cores=2.0, others_cores=0.0) == 2


def test_the_fewest_threads_since_the_last_take_are_reported_once():
    machine = Machine()
    follower = machine.follower()
    assert follower.take_fewest() is None  # no call yet
    machine.run(follower, wall=1.0, own_cores=1.0, others_cores=1.0)  # ran with 2; the next gets 1
    assert follower.take_fewest() == 2
    machine.run(follower, wall=1.0, own_cores=1.0, others_cores=0.0)  # ran with 1; the next gets 2 again
    machine.run(follower, wall=1.0, own_cores=2.0, others_cores=0.0)  # ran with 2
    assert follower.take_fewest() == 1 and follower.take_fewest() is None
    reserved = machine.follower(mode="reserved")
    machine.run(reserved, wall=1.0, own_cores=2.0, others_cores=0.0)
    assert reserved.take_fewest() is None  # the threads stay as reserved: nothing to report


def test_short_calls_change_nothing():
    machine = Machine()
    follower = machine.follower()
    machine.run(follower, wall=0.05, own_cores=1.0, others_cores=1.0)  # a few /proc/stat ticks: not measured
    assert follower.threads == 2


def test_reserved_mode_never_changes_threads():
    machine = Machine()
    follower = machine.follower(mode="reserved")
    torch.set_num_threads(2)
    machine.run(follower, wall=1.0, own_cores=1.0, others_cores=1.0)
    assert follower.threads == 2 and torch.get_num_threads() == 2


def test_unknown_mode_names_the_key():
    with pytest.raises(ValueError, match="placement.threads.*follow, reserved"):
        CoreFollower(2, mode="all")


def test_no_proc_stat_keeps_the_reservation(tmp_path):
    assert machine_busy_seconds(str(tmp_path / "missing")) is None
    follower = CoreFollower(2, busy=lambda: None, cpus=2)
    with follower.follow():
        pass
    assert follower.threads == 2


def test_busy_seconds_leave_idle_and_iowait_out(tmp_path):
    import os

    stat = tmp_path / "stat"
    stat.write_text("cpu  100 5 50 1000 20 3 2 1 0 0\ncpu0 50 2 25 500 10 1 1 0 0 0\n")
    assert machine_busy_seconds(str(stat)) == pytest.approx((100 + 5 + 50 + 3 + 2 + 1) / os.sysconf("SC_CLK_TCK"))
    assert machine_busy_seconds() is None or machine_busy_seconds() > 0  # this machine's, where it exists


def test_compute_clock_runs_each_call_inside_the_follower():
    machine = Machine()
    follower = machine.follower()
    clock = ComputeClock(clock=lambda: machine.wall, around=follower.follow)
    with clock.measure("train"):
        machine.wall += 1.0
        machine.own += 1.0
        machine.busy += 2.0  # another process kept a core busy
    assert follower.threads == 1
    assert clock.take() == {"train": 1.0}
