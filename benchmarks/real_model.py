"""Learning on a real model: SmolLM2-135M-Instruct on two-digit addition, with the shipped presets.

Measures the held-out greedy pass rate (64 held-out questions, 16 new tokens, the last number of the
answer counted) of the instruct model as shipped, then trains each method with its `smol-*` preset and
the overrides `METHODS` names (`grpo-bf16`: bf16 mixed precision on the policy, the reference and the
engine; `dpo-plain`: the plain DPO loss), the run folder and, where given, the step count, and reads
the pass rate of every held-out evaluation against the minutes of training before it (the steps' own
seconds: start-up and evaluation excluded; the wall minutes of each run are printed beside). Writes `real_model.json`,
`real_model.md` and `real_model.png` (pass rate against training minutes) to the results folder.
Run it on a quiet machine: every figure is a time.

With `--trl`, TRL's GRPOTrainer trains the same converted model on the same task after ours, in TRL's own
virtual environment (`--trl-venv`, created as `vs_trl.py` creates it) with smol-grpo's settings: 8
questions x 4 samples x 16 new tokens a step, one optimizer step per batch, the learning rate constant,
AdamW betas and clipping as the preset's, KL to the instruct model at the preset's coefficient, fp32 and 2
torch threads; TRL's own defaults elsewhere (its loss aggregation and advantage scaling). It answers the
same 64 held-out questions greedily every `eval_every` steps, scored by the same rule, the time that takes
left out, so both curves are pass rate against minutes of training.

    python benchmarks/real_model.py [--methods grpo,dpo] [--steps 0] [--runs runs/real_model] [--trl]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

BF16 = ["policy.model.dtype=bfloat16", "reference.model.dtype=bfloat16"]  # the engine follows the policy's dtype
# Each method: the preset it trains and the overrides on top of it (the table shows both).
METHODS = {"grpo": ("smol-grpo", []), "grpo-bf16": ("smol-grpo", BF16), "dpo": ("smol-dpo", []),
           "dpo-plain": ("smol-dpo", ["algorithm.name=dpo"]), "remax": ("smol-remax", []), "ppo": ("smol-ppo", []),
           "dpo-lora": ("smol-dpo-lora", []), "sft": ("smol-sft", [])}
TRL_LABEL = "TRL GRPOTrainer, smol-grpo's settings"
LEGEND = {"grpo-bf16": "smol-grpo in bf16 mixed precision", "dpo-plain": "smol-dpo with the plain DPO loss"}
EVAL = "arithmetic:prompts_eval"


def describe(method: str) -> str:
    """The table's and the legend's words for a method: its preset and overrides."""
    if method == "trl-grpo":
        return TRL_LABEL
    preset, overrides = METHODS[method]
    return ", ".join([preset, *overrides])


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


def trl_curve(out: Path, venv: Path, steps: int) -> tuple[list[dict], float, dict]:
    """TRL's GRPOTrainer on the arithmetic task with smol-grpo's settings: (curve, wall seconds, versions)."""
    import subprocess

    from vs_trl import HERE, THREADS, ensure_trl_venv

    import rlhf_ray.data.arithmetic as arithmetic
    from rlhf_ray.config import load_config
    from rlhf_ray.models.sources import local_model_path

    python = ensure_trl_venv(venv)
    cfg = load_config("smol-grpo")
    work = out / "trl-grpo"
    splits = arithmetic.write_arithmetic(work / "data")
    spec = {"mode": "grpo", "model": local_model_path(cfg.policy.model.name_or_path),
            "data": str(splits["prompts_train"]), "reward_module": arithmetic.__file__, "reward_fn": "answer_reward",
            "threads": THREADS, "warmup": 0, "steps": steps or cfg.run.total_steps, "out_dir": str(work / "trainer"),
            "batch_size": cfg.run.batch_size, "samples_per_prompt": cfg.algorithm.samples_per_prompt,
            "max_new_tokens": cfg.rollout.max_new_tokens, "kl_coef": cfg.algorithm.kl_coef,
            "lr": cfg.policy.optim.lr, "adam_beta2": cfg.policy.optim.betas[1],
            "eval": {"prompts": str(splits["prompts_eval"]), "every": cfg.run.eval_every,
                     "max_new_tokens": cfg.rollout.max_new_tokens}}
    (work / "spec.json").write_text(json.dumps(spec, indent=2))
    started = time.perf_counter()
    done = subprocess.run([str(python), str(HERE / "vs_trl_worker.py"), str(work / "spec.json"),
                           str(work / "result.json")])
    if done.returncode != 0:
        raise RuntimeError(f"TRL's GRPO run failed (exit {done.returncode}); its output is above")
    result = json.loads((work / "result.json").read_text())
    return [e for e in result["evals"] if e["step"] > 0], time.perf_counter() - started, result["versions"]


def plot(start: float, curves: dict[str, list[dict]], path: Path, skip: tuple[str, ...] = ()) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, points in curves.items():
        if method in skip:
            continue
        xs = [0.0] + [p["minutes"] for p in points]
        ys = [100 * start] + [100 * p["pass_rate"] for p in points]
        label = describe(method) if method.startswith("trl") else \
            f"rlhf-ray {method} ({LEGEND.get(method, METHODS[method][0])})"
        ax.plot(xs, ys, marker="o", label=label)
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
    parser.add_argument("--methods", default="grpo,dpo", help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--steps", type=int, default=0, help="training steps of each run (0: the preset's)")
    parser.add_argument("--runs", default="runs/real_model", help="where the run directories go")
    parser.add_argument("--results", default="benchmarks/results/real_model", help="where results go")
    parser.add_argument("--trl", action="store_true", help="also train with TRL's GRPOTrainer (see above)")
    parser.add_argument("--trl-venv", default="/tmp/trl-venv", help="TRL's own virtual environment")
    args = parser.parse_args(argv)
    from rlhf_ray.pipeline.demo import DemoStage, run_stages
    from rlhf_ray.telemetry.hardware import hardware_info

    out, results = Path(args.runs).resolve(), Path(args.results).resolve()
    results.mkdir(parents=True, exist_ok=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else []
    start = start_rate(out)
    print(f"instruct model as shipped: greedy pass rate {100 * start:.1f}%", flush=True)
    overrides = ["run.progress=true", "run.resume=never"] + ([f"run.total_steps={args.steps}"] if args.steps else [])
    curves, wall, runs, trl_versions = {}, {}, {}, None
    for method in methods:
        load_before, began = os.getloadavg()[0], time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        preset, extra = METHODS[method]
        (stage,) = run_stages(out, [DemoStage(method, preset, overrides + extra)])
        curves[method], wall[method] = curve(out / method), stage.seconds / 60
        runs[method] = {"started_at": began, "load_before": load_before, "load_after": os.getloadavg()[0]}
    if args.trl:
        load_before, began = os.getloadavg()[0], time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        curves["trl-grpo"], seconds, trl_versions = trl_curve(out, Path(args.trl_venv), args.steps)
        wall["trl-grpo"] = seconds / 60
        runs["trl-grpo"] = {"started_at": began, "load_before": load_before, "load_after": os.getloadavg()[0]}
    # Methods measured before (another --methods) stay in the results beside the ones run now.
    path = results / "real_model.json"
    before = json.loads(path.read_text()) if path.exists() else {}
    result = {"start_pass_rate": start, "curves": {**before.get("curves", {}), **curves},
              "wall_minutes": {**before.get("wall_minutes", {}), **wall},
              "runs": {**before.get("runs", {}), **runs},
              "trl_versions": trl_versions or before.get("trl_versions"), "hardware": hardware_info()}
    path.write_text(json.dumps(result, indent=2, default=str))
    text = write_results(result, results)
    print(text)
    return result


def write_results(result: dict, results: Path) -> str:
    """`real_model.md` and `real_model.png` from the results (every run measured so far); returns the text."""
    start, curves, wall, runs = result["start_pass_rate"], result["curves"], result["wall_minutes"], result["runs"]
    # A run that shared the machine has minutes that say nothing about speed: in the table, not the plot.
    shared = tuple(name for name, run in runs.items() if run.get("shared"))
    plot(start, curves, results / "real_model.png", skip=shared)
    lines = ["# Real model: SmolLM2-135M-Instruct on two-digit addition", "",
             f"CPU: {result['hardware'].get('cpu_model')}, {result['hardware'].get('cpus_available')} CPUs; each run "
             "alone on the machine unless its row says otherwise. Instruct model as shipped: "
             f"{100 * start:.1f}% greedy pass rate on 64 held-out questions.", "",
             "| method | preset | steps | pass rate at the end | minutes of training | wall minutes (start-up, "
             "evaluation) | measured (load average before, after) |",
             "|---|---|---|---|---|---|---|"]
    for name, points in curves.items():
        last = points[-1] if points else {"step": 0, "pass_rate": float("nan"), "minutes": 0.0}
        run = runs.get(name, {})
        when = f"{run['started_at']} ({run['load_before']:.1f}, {run['load_after']:.1f})" if run else "-"
        when += f"; {run['shared']}" if run.get("shared") else ""
        lines.append(f"| {name} | {describe(name)} | {last['step']} | {100 * start:.1f}% -> "
                     f"{100 * last['pass_rate']:.1f}% | {last['minutes']:.1f} | {wall[name]:.1f} | {when} |")
    if result.get("trl_versions") and "trl-grpo" in curves:
        lines += ["", "TRL side: " + ", ".join(f"{k} {v}" for k, v in result["trl_versions"].items())
                  + "; fp32, 2 torch threads, TRL's defaults for loss aggregation and advantage scaling."]
    lines += ["", "Held-out evaluations along each run (step: pass rate at minutes of training):", ""]
    for name, points in curves.items():
        lines.append(f"- {name}: " + ", ".join(f"{p['step']}: {100 * p['pass_rate']:.1f}% at {p['minutes']:.1f}"
                                               for p in points))
    text = "\n".join(lines) + "\n"
    (results / "real_model.md").write_text(text)
    return text

if __name__ == "__main__":
    main()
