"""Learning on a real model: SmolLM2-135M-Instruct on two-digit addition, with the shipped presets.

Measures the held-out greedy pass rate (64 held-out questions, 16 new tokens, the last number of the
answer counted) of the instruct model as shipped, then trains each method with its `smol-*` preset and
no overrides but the run folder and, where given, the step count, and reads the pass rate of every
held-out evaluation against the minutes of training before it (the steps' own seconds: start-up and
evaluation excluded; the wall minutes of each run are printed beside). Writes `real_model.json`,
`real_model.md` and `real_model.png` (pass rate against training minutes) to the results folder.
Run it on a quiet machine: every figure is a time.

    python benchmarks/real_model.py [--methods grpo,dpo] [--steps 0] [--runs runs/real_model]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

PRESETS = {"grpo": "smol-grpo", "dpo": "smol-dpo", "remax": "smol-remax", "ppo": "smol-ppo",
           "dpo-lora": "smol-dpo-lora", "sft": "smol-sft"}
EVAL = "arithmetic:prompts_eval"


def start_rate(out: Path) -> float:
    """Greedy pass rate of the instruct model as shipped (the task's judge: the answer is right)."""
    from rlhf_ray.evaluation.standalone import run_eval

    metrics = run_eval("smollm2-135m", prompts=EVAL, judge="auto", out_dir=out / "start", max_new_tokens=16,
                       max_prompt_length=64, batch_size=16, device="cpu")
    return metrics["eval/alignment_accuracy"]


def curve(run_dir: Path) -> list[dict]:
    """(step, training minutes, greedy pass rate) at every held-out evaluation of a run."""
    from rlhf_ray.telemetry.metrics import read_metrics

    points, seconds = [], 0.0
    for row in read_metrics(run_dir):
        seconds += row.get("time/step_s", 0.0)
        if "eval/greedy_pass_rate" in row:
            points.append({"step": row["step"], "minutes": seconds / 60, "pass_rate": row["eval/greedy_pass_rate"]})
    return points


def plot(start: float, curves: dict[str, list[dict]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, points in curves.items():
        xs = [0.0] + [p["minutes"] for p in points]
        ys = [100 * start] + [100 * p["pass_rate"] for p in points]
        ax.plot(xs, ys, marker="o", label=f"{method} ({PRESETS[method]})")
    ax.axhline(100 * start, color="grey", linestyle=":", label=f"instruct model as shipped ({100 * start:.1f}%)")
    ax.set_xlabel("minutes of training (the steps' own time, 2-core CPU)")
    ax.set_ylabel("held-out greedy pass rate (%)")
    ax.set_ylim(0, 100)
    ax.set_title("SmolLM2-135M-Instruct on two-digit addition (64 held-out questions)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="grpo,dpo", help=f"comma-separated, of {', '.join(PRESETS)}")
    parser.add_argument("--steps", type=int, default=0, help="training steps of each run (0: the preset's)")
    parser.add_argument("--runs", default="runs/real_model", help="where the run directories go")
    parser.add_argument("--results", default="benchmarks/results/real_model", help="where results go")
    args = parser.parse_args(argv)
    from rlhf_ray.pipeline.demo import DemoStage, run_stages
    from rlhf_ray.telemetry.hardware import hardware_info

    out, results = Path(args.runs).resolve(), Path(args.results).resolve()
    results.mkdir(parents=True, exist_ok=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    load_before = os.getloadavg()
    start = start_rate(out)
    print(f"instruct model as shipped: greedy pass rate {100 * start:.1f}%", flush=True)
    overrides = ["run.progress=true", "run.resume=never"] + ([f"run.total_steps={args.steps}"] if args.steps else [])
    stages = run_stages(out, [DemoStage(m, PRESETS[m], overrides) for m in methods])
    # Methods measured before (another --methods) stay in the results beside the ones run now.
    before = json.loads((results / "real_model.json").read_text()) if (results / "real_model.json").exists() else {}
    curves = {**before.get("curves", {}), **{stage.name: curve(out / stage.name) for stage in stages}}
    wall = {**before.get("wall_minutes", {}), **{stage.name: stage.seconds / 60 for stage in stages}}
    result = {"start_pass_rate": start, "curves": curves, "wall_minutes": wall,
              "load_average": {"before": load_before, "after": os.getloadavg()},
              "hardware": hardware_info(), "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (results / "real_model.json").write_text(json.dumps(result, indent=2, default=str))
    plot(start, curves, results / "real_model.png")
    lines = [f"# Real model: SmolLM2-135M-Instruct on two-digit addition ({result['measured_at']})", "",
             f"CPU: {result['hardware'].get('cpu_model')}, load average before {load_before[0]:.2f}, after "
             f"{result['load_average']['after'][0]:.2f}. Instruct model as shipped: {100 * start:.1f}% greedy pass "
             "rate on 64 held-out questions.", "",
             "| method | preset | steps | pass rate at the end | minutes of training | wall minutes (start-up, evaluation) |",
             "|---|---|---|---|---|---|"]
    for name, points in curves.items():
        last = points[-1] if points else {"step": 0, "pass_rate": float("nan"), "minutes": 0.0}
        lines.append(f"| {name} | {PRESETS[name]} | {last['step']} | {100 * start:.1f}% -> {100 * last['pass_rate']:.1f}% "
                     f"| {last['minutes']:.1f} | {wall[name]:.1f} |")
    lines += ["", "Held-out evaluations along each run (step: pass rate at minutes of training):", ""]
    for name, points in curves.items():
        lines.append(f"- {name}: " + ", ".join(f"{p['step']}: {100 * p['pass_rate']:.1f}% at {p['minutes']:.1f}"
                                               for p in points))
    (results / "real_model.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
