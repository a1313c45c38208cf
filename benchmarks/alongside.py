"""Jobs alongside against the same jobs one after the other: real-model DPO and GRPO on one cluster.

Two pipelines of the same two jobs (`smol-dpo` and `smol-grpo` by default, `--dpo-steps` and `--grpo-steps`
steps each, held-out evaluation off so that both sides do the same training work): `alongside`, where both
jobs start at once and the cluster rlhf-ray starts scales them to fit the cores together, and `sequential`,
where GRPO comes after DPO and each job has the whole machine. Each round runs both sides, alternating which
goes first, each as its own `rlhf-ray run` process started from nothing, so every figure includes Ray's
start, the role actors' start and model loads, the steps, the checkpoints and the shutdown. Reported per
run: the command's wall time, each job's own time (summary.json's `started_at` to `finished_at`), the
median step of each job and the load average (1 min) before and after. Run it on a machine with nothing
else on it: the load average before says whether that held.

    python benchmarks/alongside.py [--rounds 2] [--dpo-steps 12] [--grpo-steps 6] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rlhf_ray.telemetry.metrics import read_metrics

QUIET = ["run.eval_every=0", "data.eval=", "run.progress=false"]


def pipeline(dpo_steps: int, grpo_steps: int, sequential: bool, dpo: str, grpo: str) -> dict:
    """The pipeline file's content: the two jobs, GRPO after DPO when `sequential`."""
    jobs = {"dpo": {"config": dpo, "overrides": [f"run.total_steps={dpo_steps}", *QUIET]},
            "grpo": {"config": grpo, "overrides": [f"run.total_steps={grpo_steps}", *QUIET]}}
    if sequential:
        jobs["grpo"]["after"] = ["dpo"]
    return {"jobs": jobs, "share_frozen": False}


def _seconds(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp).timestamp()


def run_side(side: str, spec: dict, work: Path, round_index: int, keep: bool) -> dict:
    """One `rlhf-ray run` of the pipeline, from a new process; its wall time and each job's own figures. The
    run folders are removed after unless `keep` (its output stays, in `output.txt`)."""
    folder = work / f"{side}-{round_index}"
    folder.mkdir(parents=True)
    path = folder / "pipeline.yaml"
    path.write_text(json.dumps(spec, indent=1))  # JSON is YAML
    before = os.getloadavg()[0]
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "rlhf_ray.cli.main", "run", str(path), "--out", str(folder / "runs")],
                          capture_output=True, text=True)
    wall = time.time() - started
    (folder / "output.txt").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"{side} (round {round_index}) failed with exit status {done.returncode}; its output is "
                         f"in {folder / 'output.txt'}:\n{(done.stdout + done.stderr)[-3000:]}")
    jobs = {}
    for name in spec["jobs"]:
        run_dir = folder / "runs" / name
        summary = json.loads((run_dir / "summary.json").read_text())
        steps = [row["time/step_s"] for row in read_metrics(run_dir / "metrics.jsonl") if "time/step_s" in row]
        jobs[name] = {"job_s": _seconds(summary["finished_at"]) - _seconds(summary["started_at"]),
                      "steps": len(steps), "median_step_s": statistics.median(steps), "steps_s": sum(steps)}
    scaled = [line for line in (done.stdout + done.stderr).splitlines() if "scaled" in line.lower()]
    if not keep:  # checkpoints and exports: gigabytes a run on the real model
        shutil.rmtree(folder / "runs")
    return {"side": side, "round": round_index, "wall_s": wall, "jobs": jobs, "scaling": scaled,
            "loadavg_1m_before": before, "loadavg_1m_after": os.getloadavg()[0]}


def markdown(result: dict) -> str:
    lines = [f"# Jobs alongside against one after the other: {result['dpo']} ({result['dpo_steps']} steps) and "
             f"{result['grpo']} ({result['grpo_steps']} steps)", "",
             f"- CPU: {result['cpu']} ({result['cpus']} CPUs); measured {result['when']}",
             "- each run a new `rlhf-ray run` process: Ray's start, the actors, model loads, steps, checkpoints "
             "and shutdown included; held-out evaluation off", "",
             "| round | side | wall s | DPO job s | DPO median step s | GRPO job s | GRPO median step s | "
             "load 1m before -> after |", "|---|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        dpo, grpo = run["jobs"]["dpo"], run["jobs"]["grpo"]
        lines.append(f"| {run['round']} | {run['side']} | {run['wall_s']:.1f} | {dpo['job_s']:.1f} | "
                     f"{dpo['median_step_s']:.2f} | {grpo['job_s']:.1f} | {grpo['median_step_s']:.2f} | "
                     f"{run['loadavg_1m_before']:.2f} -> {run['loadavg_1m_after']:.2f} |")
    walls = {side: statistics.median(run["wall_s"] for run in result["runs"] if run["side"] == side)
             for side in ("alongside", "sequential")}
    lines += ["", f"Median wall time: alongside {walls['alongside']:.1f} s, one after the other "
              f"{walls['sequential']:.1f} s: alongside takes {walls['alongside'] / walls['sequential']:.2f} of the "
              "time."]
    scaling = sorted({line for run in result["runs"] for line in run["scaling"]})
    if scaling:
        lines += ["", "How the cluster scaled the jobs that run together:", "", *[f"    {line}" for line in scaling]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dpo", default="smol-dpo", help="the DPO job's preset")
    parser.add_argument("--grpo", default="smol-grpo", help="the GRPO job's preset")
    parser.add_argument("--dpo-steps", type=int, default=12)
    parser.add_argument("--grpo-steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of both sides, alternating which goes first")
    parser.add_argument("--out", default="benchmarks/results", help="folder for alongside-<dpo>-<grpo>.{json,md}")
    parser.add_argument("--work", default=None, help="folder for the runs, kept (default: a temporary one whose "
                        "run folders are removed as soon as their figures are read)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="rlhf-ray-alongside-"))
    sides = {"alongside": pipeline(args.dpo_steps, args.grpo_steps, False, args.dpo, args.grpo),
             "sequential": pipeline(args.dpo_steps, args.grpo_steps, True, args.dpo, args.grpo)}
    runs = []
    for index in range(args.rounds):
        order = ["alongside", "sequential"] if index % 2 == 0 else ["sequential", "alongside"]
        for side in order:
            run = run_side(side, sides[side], work, index + 1, keep=args.work is not None)
            runs.append(run)
            print(f"round {index + 1} {side}: {run['wall_s']:.1f} s (load {run['loadavg_1m_before']:.2f} -> "
                  f"{run['loadavg_1m_after']:.2f})", flush=True)
    from rlhf_ray.telemetry.hardware import hardware_info

    result = {"dpo": args.dpo, "grpo": args.grpo, "dpo_steps": args.dpo_steps, "grpo_steps": args.grpo_steps,
              "cpu": hardware_info()["cpu_model"], "cpus": os.cpu_count(), "machine": platform.machine(),
              "when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "runs": runs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"alongside-{args.dpo}-{args.grpo}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
