"""PPO, ReMax, GRPO, RLOO and REINFORCE++ on the shipped task, from the same SFT model.

Every algorithm starts from one SFT policy (trained here first, or given with
--sft) and optimises the synthetic task's rule reward (`mention_reward`: 1 for
mentioning the target, plus shaping against off-topic or degenerate text) for
the same number of steps on the same prompts. Reported per algorithm: held-out
alignment accuracy (greedy) and mean reward after step 1 and at the end, the
KL to the reference, and the step time.

    python benchmarks/online_algorithms.py [--sft DIR] [--steps 30] [--runs runs/online_algorithms]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlhf_ray.pipeline.demo import DemoStage, run_stages
from rlhf_ray.telemetry.metrics import read_metrics

ALGORITHMS = {"ppo": "tiny-ppo", "remax": "tiny-remax", "grpo": "tiny-grpo", "rloo": "tiny-rloo",
              "reinforce_pp": "tiny-reinforce-pp"}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft", default="", help="an SFT checkpoint to start from (default: train one first)")
    parser.add_argument("--steps", type=int, default=30, help="online steps per algorithm")
    parser.add_argument("--runs", default="runs/online_algorithms", help="where the run directories go")
    parser.add_argument("--results", default="benchmarks/results/online_algorithms", help="where results go")
    args = parser.parse_args(argv)
    out, results = Path(args.runs).resolve(), Path(args.results).resolve()
    results.mkdir(parents=True, exist_ok=True)
    common = ["run.progress=true", "run.resume=never", "run.save_every=0", "run.eval_every=0", "run.eval_size=125"]
    sft = Path(args.sft).resolve() if args.sft else out / "sft" / "final"
    stages = [] if args.sft else [DemoStage("sft", "tiny-sft", common)]
    stages += [DemoStage(name, preset, common + [f"policy.model.name_or_path={sft}",
                                                 f"run.total_steps={args.steps}"])
               for name, preset in ALGORITHMS.items()]
    ran = run_stages(out, stages)
    table = {}
    for stage in ran:
        if stage.name == "sft":
            continue
        rows = read_metrics(out / stage.name)
        evals = [r for r in rows if "eval/alignment_accuracy" in r]
        steps = sorted(r["time/step_s"] for r in rows)
        table[stage.name] = {
            "alignment_first": evals[0]["eval/alignment_accuracy"],
            "alignment_final": evals[-1]["eval/alignment_accuracy"],
            "reward_first": evals[0]["eval/reward_mean"], "reward_final": evals[-1]["eval/reward_mean"],
            "kl_to_ref_final": evals[-1].get("eval/kl_to_ref"), "median_step_s": steps[len(steps) // 2],
            "samples_per_step": rows[-1]["perf/samples_per_s"] * rows[-1]["time/step_s"],
        }
    lines = ["| algorithm | alignment (step 1 -> final) | held-out reward (step 1 -> final) | KL to ref | "
             "samples/step | median step |", "|---|---|---|---|---|---|"]
    for name, r in table.items():
        kl = "–" if r["kl_to_ref_final"] is None else f"{r['kl_to_ref_final']:.2f}"
        lines.append(f"| {name} | {100 * r['alignment_first']:.1f}% -> {100 * r['alignment_final']:.1f}% | "
                     f"{r['reward_first']:.3f} -> {r['reward_final']:.3f} | {kl} | {r['samples_per_step']:.0f} | "
                     f"{r['median_step_s']:.2f} s |")
    (results / "results.json").write_text(json.dumps(table, indent=2) + "\n")
    (results / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return table


if __name__ == "__main__":
    main()
