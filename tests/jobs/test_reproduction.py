"""The DPO-vs-SFT study's claims on the shipped task (benchmarks/dpo_vs_sft.py at full length):
DPO and DPOP reach at least 90% alignment accuracy from an SFT model that is below it, DPOP
keeps the chosen reward positive, and the reward model ranks held-out pairs at least 90% right."""

from __future__ import annotations

import pytest

from rlhf_ray.pipeline.demo import DemoStage, run_stages
from rlhf_ray.telemetry.metrics import read_metrics


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_dpo_and_dpop_align_and_the_reward_model_ranks_pairs(ray_cluster, tmp_path):
    base = tmp_path / "sft" / "final"
    common = ["run.progress=false", "run.save_every=0", "run.eval_every=0", "run.eval_size=125"]
    tuned = common + [f"policy.model.name_or_path={base}"]
    run_stages(tmp_path, [
        DemoStage("sft", "tiny-sft", common + ["run.total_steps=150"]),
        DemoStage("rm", "tiny-rm", common + [f"reward.model.name_or_path={base}", "run.total_steps=100"]),
        DemoStage("dpo", "tiny-dpo", tuned + ["run.total_steps=60"]),
        DemoStage("dpop", "tiny-dpop", tuned + ["run.total_steps=60"]),
    ])
    sft = read_metrics(tmp_path / "sft")[-1]["eval/alignment_accuracy"]
    for name in ("dpo", "dpop"):
        final = read_metrics(tmp_path / name)[-1]["eval/alignment_accuracy"]
        assert final >= 0.9 and final > sft, (name, final, sft)
    dpop = read_metrics(tmp_path / "dpop")
    assert min(row["rewards/chosen"] for row in dpop) > -0.05
    assert read_metrics(tmp_path / "rm")[-1]["eval/rm_accuracy"] >= 0.9
