"""Soak: a long PPO run whose actors are killed every few dozen steps, and how long each recovery takes.

    python benchmarks/soak.py [--steps 200] [--every 40] [--out benchmarks/results]

Runs tiny-ppo for --steps steps (checkpoint every 10) and, each time about
--every more steps are done, sends SIGKILL to one role's actor (policy,
critic, vLLM engine, reference, reward in turn). For each failure it records
the step the kill landed after, the step the job resumed from, and the
recovery time: from the kill until `metrics.jsonl` is past the step it landed
after again (teardown, new groups, restore, and the recomputed steps).
At the end it checks that every step is in `metrics.jsonl` once. Writes
soak.{json,md} with the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

from rlhf_ray.config import load_config
from rlhf_ray.jobs import run_job
from rlhf_ray.telemetry.hardware import hardware_info

ACTOR_CLASS = {"policy": "PolicyWorker", "critic": "CriticWorker", "rollout": "VLLMRolloutWorker",
               "reference": "ReferenceWorker", "reward": "RewardWorker"}


def actor_pids(class_name: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if title == f"ray::{class_name}" or title.startswith(f"ray::{class_name}."):
                pids.append(int(entry.name))
    return pids


def steps_done(path: Path) -> list[int]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=40, help="steps between kills")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="rlhf-ray-soak-")) / "ppo"
    cfg = load_config("tiny-ppo", [f"run.output_dir={run_dir}", f"run.total_steps={args.steps}", "run.save_every=10",
                                   "run.eval_every=0", "data.eval=", "run.progress=false",
                                   f"run.max_failures={args.steps // args.every + 1}"])
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(summary=run_job(cfg)))
    started = time.monotonic()
    job.start()
    metrics = run_dir / "metrics.jsonl"
    kills, roles = [], list(ACTOR_CLASS)
    while job.is_alive():
        done = steps_done(metrics)
        if done and done[-1] >= args.every * (len(kills) + 1) and done[-1] < args.steps:
            role = roles[len(kills) % len(roles)]
            pids = actor_pids(ACTOR_CLASS[role])
            if pids:
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                kills.append({"role": role, "after_step": done[-1], "at": time.monotonic()})
                print(f"killed {role} after step {done[-1]}", flush=True)
        rows = steps_done(metrics)
        for kill in kills:
            # recovered: the job is past the step it was killed after (restart, restore, recomputed steps)
            if "recovery_s" not in kill and rows and rows[-1] > kill["after_step"]:
                kill["recovery_s"] = time.monotonic() - kill["at"]
        time.sleep(0.2)
    job.join()
    summary = result.get("summary", {})
    failures = summary.get("failures", [])
    for kill, failure in zip(kills, failures):
        kill["resumed_from_step"] = failure["resumed_from_step"]
        kill["cause"] = failure["cause"][:80]
    rows = steps_done(metrics)
    load = os.getloadavg()
    report = {"steps": args.steps, "every": args.every, "wall_s": time.monotonic() - started,
              "every_step_once": rows == list(range(1, args.steps + 1)), "kills": kills,
              "load_average": load, "hardware": hardware_info()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=2, default=str))
    lines = [f"# Soak: tiny-ppo, {args.steps} steps, a kill every ~{args.every}", "",
             f"- Machine: {report['hardware'].get('cpu_model', 'CPU')}; load average at the end "
             f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}", f"- Wall time {report['wall_s']:.0f} s; every step in "
             f"metrics.jsonl once: {report['every_step_once']}", "",
             "| killed | after step | resumed from step | recovery (s) |", "|---|--:|--:|--:|"]
    for kill in kills:
        recovery = kill.get("recovery_s")
        lines.append(f"| {kill['role']} | {kill['after_step']} | {kill.get('resumed_from_step', '?')} | "
                     f"{'?' if recovery is None else f'{recovery:.1f}'} |")
    (out / "soak.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
