"""PhaseTimer with a fake clock: the arithmetic of phases and steps, never real time."""

import pytest

from rlhf_ray.telemetry.timers import PhaseTimer


class FakeClock:
    """Returns the times it is given, one per call."""

    def __init__(self, *times):
        self.times = list(times)

    def __call__(self):
        return self.times.pop(0)


def test_phases_and_step_time_by_hand():
    # clock reads: start_step 10.0 | generate 10.5 -> 12.5 (2.0 s) | update 13.0 -> 16.0 (3.0 s)
    # | update again 16.0 -> 16.25 (0.25 s, accumulates: 3.25 s) | finish 17.0 -> step 7.0 s
    clock = FakeClock(10.0, 10.5, 12.5, 13.0, 16.0, 16.0, 16.25, 17.0)
    timer = PhaseTimer(clock)
    timer.start_step()
    with timer.phase("generate"):
        assert timer.current_phase == "generate"
    with timer.phase("update"):
        pass
    with timer.phase("update"):
        pass
    assert timer.current_phase is None
    assert timer.finish_step() == {"time/generate_s": 2.0, "time/update_s": 3.25, "time/step_s": 7.0}


def test_next_step_starts_clean_and_step_starts_at_first_phase_without_start_step():
    # step 1: phase a 0 -> 1, finish at 2. step 2 (no start_step): phase b 5 -> 6, finish at 8 -> step 3 s
    clock = FakeClock(0.0, 1.0, 2.0, 5.0, 6.0, 8.0)
    timer = PhaseTimer(clock)
    with timer.phase("a"):
        pass
    assert timer.finish_step() == {"time/a_s": 1.0, "time/step_s": 2.0}
    with timer.phase("b"):
        pass
    assert timer.finish_step() == {"time/b_s": 1.0, "time/step_s": 3.0}


def test_phase_time_recorded_when_the_block_raises():
    clock = FakeClock(0.0, 0.0, 4.0, 5.0)
    timer = PhaseTimer(clock)
    timer.start_step()
    with pytest.raises(KeyError):
        with timer.phase("reward"):
            raise KeyError("boom")
    assert timer.current_phase is None
    assert timer.finish_step() == {"time/reward_s": 4.0, "time/step_s": 5.0}


def test_nesting_is_an_error_naming_both_phases():
    timer = PhaseTimer(FakeClock(0.0, 1.0, 2.0))
    with pytest.raises(RuntimeError, match="'inner'.*'outer'"):
        with timer.phase("outer"):
            with timer.phase("inner"):
                pass


def test_finish_without_step_and_bad_names_are_errors():
    timer = PhaseTimer(FakeClock(0.0))
    with pytest.raises(RuntimeError, match="no step started"):
        timer.finish_step()
    for bad in ("", "step", "a/b", "has space"):
        with pytest.raises(ValueError, match="phase name"):
            with timer.phase(bad):
                pass


def test_default_clock_gives_non_negative_seconds():
    timer = PhaseTimer()
    timer.start_step()
    with timer.phase("work"):
        sum(range(100))
    metrics = timer.finish_step()
    assert set(metrics) == {"time/work_s", "time/step_s"}
    assert 0.0 <= metrics["time/work_s"] <= metrics["time/step_s"]
