"""`rlhf-ray demo` end to end (shortened stages): every report section is there, and it runs twice."""

from __future__ import annotations

import json

import pytest

from rlhf_ray.cli.main import main


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_demo_writes_every_report_section_and_runs_twice(ray_cluster, tmp_path):
    for _ in range(2):  # the second run clears and replaces the first one's directories
        assert main(["demo", "--out", str(tmp_path), "--scale", "0.05"]) == 0
    report = (tmp_path / "report.md").read_text()
    for heading in ("## Alignment accuracy on held-out prompts", "## Reward curves",
                    "## The four-model layout and what it costs", "## Where the time goes"):
        assert heading in report
    for stage in ("SFT", "DPO", "PPO", "REMAX"):
        assert f"| {stage} |" in report
    assert "| critic |" in report and "not created" in report  # ReMax has no critic
    assert "## The cluster: who ran where, and when" in report and "## What each role cost" in report
    assert "## Reward against KL: what each method buys per nat" in report
    summaries = {name: json.loads((tmp_path / name / "summary.json").read_text()) for name in ("dpo", "ppo", "remax")}
    assert summaries["ppo"]["shared_roles"] == {"reference": "dpo"}
    assert summaries["remax"]["shared_roles"] == {"reference": "dpo", "reward": "ppo"}
    for picture in ("layout.png", "timeline.png", "frontier.png"):
        assert (tmp_path / picture).stat().st_size > 10_000
    assert "ReMax holds" in report
    assert (tmp_path / "rewards.png").stat().st_size > 10_000
    for stage in ("sft", "rm", "dpo", "ppo", "remax"):
        assert (tmp_path / stage / "final" / "config.json").exists()
