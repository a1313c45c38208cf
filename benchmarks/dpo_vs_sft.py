"""Our reproduction of the DPO-vs-SFT "mention Penn" study on the shipped synthetic task.

A tiny GPT-2-shaped model is first fine-tuned on the task's demonstrations
(30% of which mention the target), then four methods start from it on the
same preference pairs: SFT on the chosen responses, KL-SFT on them (SFT plus
a penalty on the log-ratio to the SFT model), DPO and DPOP. We report the
held-out alignment accuracy (share of greedy responses that mention the
target) and the chosen/rejected implicit rewards over training.

    python benchmarks/dpo_vs_sft.py [--runs runs/dpo_vs_sft] [--results benchmarks/results/dpo_vs_sft] [--scale 1.0]

The study used GPT-2 124M and GPT-4-written prompts; ours is a 2-layer model
on templated prompts, on a CPU: compare directions, not numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlhf_ray.pipeline.demo import DemoStage, run_stages
from rlhf_ray.telemetry.metrics import read_metrics

CHOSEN_AS_SFT = ["data.train=synthetic:preference_train", "data.format=sft", "data.column_map={chosen: completion}"]


def stages(out: Path, scale: float) -> list[DemoStage]:
    def steps(n: int) -> int:
        return max(2, int(n * scale))

    base = out / "sft_base" / "final"
    common = ["run.progress=true", "run.resume=never", "run.save_every=0", "run.eval_every=0", "run.eval_size=125"]
    tuned = common + [f"policy.model.name_or_path={base}"]
    return [
        DemoStage("sft_base", "tiny-sft", common + [f"run.total_steps={steps(150)}"]),
        DemoStage("sft", "tiny-sft", tuned + CHOSEN_AS_SFT + [f"run.total_steps={steps(60)}",
                                                             "policy.optim.lr=2.0e-4"]),
        DemoStage("kl_sft", "tiny-kl-sft", tuned + CHOSEN_AS_SFT + [f"run.total_steps={steps(60)}",
                                                                   "policy.optim.lr=2.0e-4"]),
        DemoStage("dpo", "tiny-dpo", tuned + [f"run.total_steps={steps(60)}"]),
        DemoStage("dpop", "tiny-dpop", tuned + [f"run.total_steps={steps(60)}"]),
    ]


def summarise(out: Path, ran: list[DemoStage]) -> dict:
    table = {}
    for stage in ran:
        rows = read_metrics(out / stage.name)
        evals = [r for r in rows if "eval/alignment_accuracy" in r]
        table[stage.name] = {
            "steps": rows[-1]["step"],
            "alignment_accuracy_first": evals[0]["eval/alignment_accuracy"],
            "alignment_accuracy_final": evals[-1]["eval/alignment_accuracy"],
            "rewards_chosen_final": rows[-1].get("rewards/chosen"),
            "rewards_rejected_final": rows[-1].get("rewards/rejected"),
            "rewards_chosen_min": min((r["rewards/chosen"] for r in rows if "rewards/chosen" in r), default=None),
            "seconds": round(stage.seconds, 1),
        }
    return table


def plot(out: Path, results: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, name in zip(axes, ("dpo", "dpop")):
        rows = read_metrics(out / name)
        for key in ("rewards/chosen", "rewards/rejected"):
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=key.split("/")[1])
        ax.axhline(0.0, color="grey", linewidth=0.5)
        ax.set(title=f"{name.upper()}: implicit rewards", xlabel="step")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = results / "dpo_vs_dpop_rewards.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(table: dict) -> str:
    study = {"sft": "94%", "kl_sft": "88%", "dpo": "~100%", "dpop": "~100%"}
    lines = ["| method | alignment accuracy (ours) | study (GPT-2 124M) | chosen reward, final | chosen reward, min |",
             "|---|---|---|---|---|"]
    for name, row in table.items():
        if name == "sft_base":
            continue
        chosen = "–" if row["rewards_chosen_final"] is None else f"{row['rewards_chosen_final']:+.2f}"
        low = "–" if row["rewards_chosen_min"] is None else f"{row['rewards_chosen_min']:+.2f}"
        lines.append(f"| {name.upper()} | {100 * row['alignment_accuracy_final']:.1f}% | {study.get(name, '')} | "
                     f"{chosen} | {low} |")
    base = table.get("sft_base")
    if base:
        lines.append(f"\nStarting point (SFT on the task's demonstrations, 30% of which mention the target): "
                     f"{100 * base['alignment_accuracy_final']:.1f}% of greedy responses mention it.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/dpo_vs_sft", help="where the run directories go")
    parser.add_argument("--results", default="benchmarks/results/dpo_vs_sft", help="where results.json/.md and the "
                                                                                  "plot go")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's step count")
    args = parser.parse_args(argv)
    out, results = Path(args.runs).resolve(), Path(args.results).resolve()
    results.mkdir(parents=True, exist_ok=True)
    ran = run_stages(out, stages(out, args.scale))
    table = summarise(out, ran)
    (results / "results.json").write_text(json.dumps(table, indent=2) + "\n")
    (results / "results.md").write_text(markdown(table))
    plot(out, results)
    print(markdown(table))
    return table


if __name__ == "__main__":
    main()
