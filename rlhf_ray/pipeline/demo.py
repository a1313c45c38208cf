"""`rlhf-ray demo`: the whole pipeline on the shipped tiny default, on a CPU, in minutes.

    synthetic task -> SFT -> reward model (from the SFT weights, InstructGPT)
                   -> DPO (from SFT)
                   -> PPO (policy from SFT, critic from the reward model)
                   -> ReMax (policy from SFT, no critic)
    -> report.md: alignment accuracy of each, reward curves, the four-model
       layout of PPO against the three of ReMax with every role's memory,
       and per-phase time.

Each stage writes its own run directory under the demo folder; the demo
clears those directories first, so it runs twice in a row without clean-up.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_ray.config import load_config
from rlhf_ray.jobs import run_job
from rlhf_ray.reports.demo_report import write_report


@dataclass
class DemoStage:
    name: str
    preset: str
    overrides: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    seconds: float = 0.0


def _schedule(role: str, steps: int, warmup: int) -> list[str]:
    """Warm-up that fits the stage's length (DeepSpeed needs 2 <= warm-up < steps for a decaying schedule)."""
    if steps < 4:
        return [f"{role}.optim.scheduler=constant", f"{role}.optim.warmup_steps=0"]
    return [f"{role}.optim.warmup_steps={max(2, min(warmup, steps // 4))}"]


def demo_stages(out: Path, scale: float = 1.0) -> list[DemoStage]:
    """The demo's jobs in order; `scale` shortens every stage (tests use a small one)."""
    def steps(n: int) -> int:
        return max(2, int(n * scale))

    sft, rm = out / "sft" / "final", out / "rm" / "final"
    common = ["run.progress=true", "run.resume=never", "run.save_every=0", "run.eval_every=0", "run.eval_size=125"]
    from_sft = [f"policy.model.name_or_path={sft}"]
    reward_model = ["reward.rule=", f"reward.model.name_or_path={rm}"]
    return [
        DemoStage("sft", "tiny-sft", common + [f"run.total_steps={steps(150)}"] + _schedule("policy", steps(150), 10)),
        DemoStage("rm", "tiny-rm", common + [f"reward.model.name_or_path={sft}", f"run.total_steps={steps(100)}"]
                  + _schedule("reward", steps(100), 5)),
        DemoStage("dpo", "tiny-dpo", common + from_sft + [f"run.total_steps={steps(60)}"]
                  + _schedule("policy", steps(60), 5)),
        DemoStage("ppo", "tiny-ppo", common + from_sft + reward_model + [f"run.total_steps={steps(30)}",
                                                                         "critic.init_from=reward"]),
        DemoStage("remax", "tiny-remax", common + from_sft + reward_model + [f"run.total_steps={steps(30)}"]),
    ]


def run_stages(out: Path, stages: list[DemoStage], address: str | None = None) -> list[DemoStage]:
    """Run stages in order, each in a fresh `out/<name>` run directory."""
    out.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        run_dir = out / stage.name
        if run_dir.exists():
            shutil.rmtree(run_dir)
        print(f"\n== {stage.name} ({stage.preset}) -> {run_dir}", flush=True)
        cfg = load_config(stage.preset, stage.overrides + [f"run.output_dir={run_dir}"])
        start = time.perf_counter()
        stage.summary = run_job(cfg, address)
        stage.seconds = time.perf_counter() - start
    return stages


def run_demo(out_dir: str | Path = "runs/demo", *, scale: float = 1.0, address: str | None = None) -> Path:
    """Run every stage and write `report.md`; returns its path."""
    out = Path(out_dir).expanduser().resolve()
    stages = run_stages(out, demo_stages(out, scale), address)
    return write_report(out, [(s.name, out / s.name, s.seconds) for s in stages])
