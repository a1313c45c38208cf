"""`timeline.jsonl`: busy intervals per role, read back and summed with overlaps counted once."""

from __future__ import annotations

import json

import pytest

from rlhf_ray.telemetry.timeline import Timeline, busy_seconds, read_timeline
from rlhf_ray.telemetry.timers import PhaseTimer


def test_intervals_are_recorded_per_role_and_overlaps_count_once(tmp_path):
    with Timeline(tmp_path, "ppo") as timeline:
        timeline.record("generate", ["rollout"], 10.0, 12.0, step=1)
        timeline.record("score", ["policy", "reward"], 12.0, 13.0, step=1)
        timeline.record("update", ["policy"], 12.5, 14.0, step=1)  # overlaps the policy's score interval
    (tmp_path / "timeline.jsonl").open("a").write('{"job": "ppo", "role": "poli')  # a line cut by a crash
    rows = read_timeline(tmp_path)
    assert len(rows) == 4 and rows[0] == {"job": "ppo", "role": "rollout", "phase": "generate", "step": 1,
                                          "start": 10.0, "end": 12.0}
    busy = busy_seconds(rows)
    assert busy[("ppo", "rollout")] == pytest.approx(2.0)
    assert busy[("ppo", "policy")] == pytest.approx(2.0)  # [12, 14], not 1 + 1.5
    assert busy[("ppo", "reward")] == pytest.approx(1.0)
    assert read_timeline(tmp_path / "nowhere") == []


def test_phase_timer_reports_each_phase_in_wall_clock_time(tmp_path):
    seen = []
    timer = PhaseTimer(on_phase=lambda name, start, end: seen.append((name, start, end)))
    with timer.phase("generate"):
        pass
    with Timeline(tmp_path, "dpo") as timeline, timeline.interval("eval", ["policy"], step=3):
        pass
    assert [name for name, _, _ in seen] == ["generate"] and seen[0][1] <= seen[0][2]
    assert seen[0][1] > 1.6e9  # epoch seconds, so jobs running at the same time line up
    row = json.loads((tmp_path / "timeline.jsonl").read_text())
    assert row["phase"] == "eval" and row["step"] == 3 and row["start"] <= row["end"]
