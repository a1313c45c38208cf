"""`rlhf-ray demo`: the mission's shape on the shipped tiny default, on a CPU, in minutes.

    synthetic task -> SFT -> reward model (from the SFT weights, InstructGPT)
                   -> at the same time, on one cluster:
                      DPO   (from SFT)
                      PPO   (policy from SFT, critic from the reward model)
                      ReMax (policy from SFT, no critic)
                      sharing one frozen reference group and one reward-model group
    -> report.md: alignment accuracy of each, reward curves, the four-model
       layout of PPO against the three of ReMax with every role's memory,
       per-phase time, and what each role cost; layout.png, timeline.png.

The demo is a pipeline (`pipeline/runner.py`): each job writes its own run
directory under the demo folder; the demo clears those directories first, so
it runs twice in a row without clean-up. `run_stages` runs a list of jobs one
after another (the benchmarks use it).
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


@dataclass(frozen=True)
class DemoModel:
    """What the demo trains: the presets of its five stages, their lengths at scale 1, and the task."""

    presets: dict[str, str]
    steps: dict[str, int]
    task: str
    """The data the frontier's held-out prompts come from, and what the report says about it."""
    describe: str
    max_new_tokens: int
    max_prompt_length: int
    checkpoints: int
    """Checkpoints along each of the last three jobs (the frontier's points)."""


DEMO_MODELS = {
    "tiny": DemoModel(
        presets={"sft": "tiny-sft", "rm": "tiny-rm", "dpo": "tiny-dpo", "ppo": "tiny-ppo", "remax": "tiny-remax"},
        steps={"sft": 150, "rm": 100, "dpo": 120, "ppo": 30, "remax": 30}, task="synthetic",
        describe="synthetic 'mention Penn' task (a tiny GPT-2-shaped model) -> SFT (30% of demonstrations "
                 "mention the target)", max_new_tokens=32, max_prompt_length=48, checkpoints=5),
    "smollm2-135m": DemoModel(
        presets={"sft": "smol-sft", "rm": "smol-rm", "dpo": "smol-dpo", "ppo": "smol-ppo", "remax": "smol-remax"},
        steps={"sft": 40, "rm": 40, "dpo": 30, "ppo": 20, "remax": 20}, task="arithmetic",
        describe="two-digit addition (SmolLM2-135M-Instruct, a real model) -> SFT on right answers",
        max_new_tokens=16, max_prompt_length=64, checkpoints=2),
}


def demo_model(name: str) -> DemoModel:
    if name not in DEMO_MODELS:
        raise ValueError(f"demo --model {name!r}: expected one of {', '.join(DEMO_MODELS)}")
    return DEMO_MODELS[name]


def demo_stages(out: Path, scale: float = 1.0, model: str = "tiny") -> list[DemoStage]:
    """The demo's jobs in order; `scale` shortens every stage (tests use a small one)."""
    shape = demo_model(model)

    def steps(name: str) -> int:
        return max(2, int(shape.steps[name] * scale))

    sft, rm = out / "sft" / "final", out / "rm" / "final"
    common = ["run.progress=true", "run.resume=never", "run.save_every=0", "run.eval_every=0"]
    common += ["run.eval_size=125"] if shape.task == "synthetic" else []
    from_sft = [f"policy.model.name_or_path={sft}"]
    reward_model = ["reward.rule=", f"reward.model.name_or_path={rm}"]
    p = shape.presets
    return [
        DemoStage("sft", p["sft"], common + [f"run.total_steps={steps('sft')}"]
                  + _schedule("policy", steps("sft"), 10)),
        DemoStage("rm", p["rm"], common + [f"reward.model.name_or_path={sft}", f"run.total_steps={steps('rm')}"]
                  + _schedule("reward", steps("rm"), 5)),
        DemoStage("dpo", p["dpo"], common + from_sft + [f"run.total_steps={steps('dpo')}"]
                  + _schedule("policy", steps("dpo"), 5)),
        DemoStage("ppo", p["ppo"], common + from_sft + reward_model + [f"run.total_steps={steps('ppo')}",
                                                                       "critic.init_from=reward"]),
        DemoStage("remax", p["remax"], common + from_sft + reward_model + [f"run.total_steps={steps('remax')}"]),
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


def demo_pipeline(out: Path, scale: float = 1.0, model: str = "tiny") -> dict:
    """The demo as a pipeline file's contents: SFT, then the reward model, then DPO, PPO and ReMax together.

    The three last jobs share the two cores of a laptop: every role reserves 0.6 CPU (one torch thread), so
    the three placement groups fit side by side, and the frozen reference and reward groups are set up once
    (by DPO and PPO) and borrowed by the others."""
    jobs = {}
    checkpoints = demo_model(model).checkpoints
    for stage in demo_stages(out, scale, model):
        overrides = [o.replace(str(out / "sft"), "${sft}").replace(str(out / "rm"), "${rm}") for o in stage.overrides]
        after = {"sft": [], "rm": ["sft"]}.get(stage.name, ["sft", "rm"])
        if after == ["sft", "rm"]:
            overrides += [f"{role}.num_cpus_per_rank=0.6" for role in ("policy", "reference", "reward", "critic")]
            # Checkpoints along the run (the model's `checkpoints` each) are the frontier's points.
            steps = int(next(o for o in overrides if o.startswith("run.total_steps=")).split("=")[1])
            overrides += ["rollout.num_cpus_per_engine=0.6", f"run.save_every={max(1, steps // checkpoints)}",
                          "run.keep_last=10"]
        jobs[stage.name] = {"config": stage.preset, "overrides": overrides, "after": after}
    return {"jobs": jobs}


def write_frontier(out: Path, model: str = "tiny") -> Path:
    """`frontier.json` and `frontier.png`: reward against KL along the DPO, PPO and ReMax runs."""
    import json

    from rlhf_ray.evaluation.frontier import draw_frontier, frontier, reward_at_kl

    shape = demo_model(model)
    points = frontier({name: out / name for name in ("dpo", "ppo", "remax")}, sft=out / "sft" / "final",
                      reward_model=out / "rm" / "final", prompts_source=f"{shape.task}:prompts_eval",
                      data_dir=out / "frontier_data", limit=64, max_new_tokens=shape.max_new_tokens,
                      max_prompt_length=shape.max_prompt_length)
    finals = [max((p for p in points if p["method"] == m), key=lambda p: p["step"])["kl"]
              for m in ("dpo", "ppo", "remax") if any(p["method"] == m for p in points)]
    matched = round(0.8 * min(finals), 1) if finals else None  # a KL every method passed
    (out / "frontier.json").write_text(json.dumps({"points": points, "matched_kl": matched,
                                                   "reward_at_matched_kl": reward_at_kl(points, matched)
                                                   if matched else {}}, indent=2))
    return draw_frontier(points, out / "frontier.png", matched)


def run_demo(out_dir: str | Path = "runs/demo", *, scale: float = 1.0, address: str | None = None,
             model: str = "tiny") -> Path:
    """Run the demo pipeline and write `report.md`, `layout.png`, `timeline.png`; returns the report's path."""
    from rlhf_ray.pipeline.runner import configure, parse_pipeline, pipeline_table, run_pipeline
    from rlhf_ray.reports.pipeline_report import write_pipeline_report

    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("sft", "rm", "dpo", "ppo", "remax"):
        if (out / name).exists():
            shutil.rmtree(out / name)
    shape = demo_model(model)
    pipeline = parse_pipeline(demo_pipeline(out, scale, model), "demo", out)
    configure(pipeline)
    outcomes = run_pipeline(pipeline, address)
    print(pipeline_table(outcomes), flush=True)
    failed = [name for name, o in outcomes.items() if o.status != "finished"]
    if failed:
        raise RuntimeError(f"demo jobs did not finish: {', '.join(failed)} (see {out / 'pipeline.json'})")
    run_dirs = {name: out / name for name in pipeline.jobs}
    pictures = write_pipeline_report(out, run_dirs)
    pictures["frontier"] = write_frontier(out, model)
    wall = max(o.finished for o in outcomes.values()) - min(o.started for o in outcomes.values())
    return write_report(out, [(name, out / name, o.finished - o.started) for name, o in outcomes.items()],
                        pictures=pictures, wall_s=wall, describe=shape.describe)
