"""Asynchronous rollouts against the on-policy loop: the same GRPO work, the engine on one core, the policy on another.

Each run is the preset (`small-grpo` by default) with the vLLM engine alone in a 1-CPU bundle and the policy,
reference and reward rule sharing another 1-CPU bundle (they take turns), so that on a 2-core machine the engine
can generate the next batch while the policy trains. Runs alternate `rollout.max_staleness` 1 and 0 (`--rounds`
pairs), each `--steps` steps from the same initial weights and seed; a machine whose load drifts then shifts both
alike. Reported per run: samples per second over all its steps (rows trained / the steps' time; every run
generates exactly its own steps' batches, the asynchronous one two of them in its first step and none past its
last, so leaving out the first step would favour it), the median step time, the mean staleness and sync time,
and the load average (1 min) before and after. The load average says whether anything else shared the cores: a
figure taken beside other work says little.

    python benchmarks/async_rollouts.py [--preset small-grpo] [--steps 12] [--rounds 3] [--runs runs/async_rollouts]

What the layout costs: two CPUs in Ray's view (`ray status`); engine threads and policy threads one each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from rlhf_ray.config import load_config
from rlhf_ray.telemetry.metrics import read_metrics

# The engine in its own 1-CPU bundle; the trainer-side roles in one 1-CPU bundle, taking turns.
SPLIT_CORES = ["placement.colocate=[[policy,reference,reward]]", "rollout.num_cpus_per_engine=1",
               "policy.num_cpus_per_rank=1", "reference.num_cpus_per_rank=1", "reward.num_cpus_per_rank=1"]


def run_once(preset: str, out: Path, staleness: int, steps: int, extra: list[str]) -> dict:
    from rlhf_ray.jobs import run_job

    overrides = [f"run.output_dir={out}", "run.resume=never", "run.progress=false", "run.save_every=0",
                 "run.eval_every=0", "data.eval=", f"run.total_steps={steps}", f"rollout.max_staleness={staleness}",
                 *SPLIT_CORES, *extra]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    run_job(load_config(preset, overrides))
    wall = time.perf_counter() - started
    load_after = os.getloadavg()[0]
    rows = read_metrics(out / "metrics.jsonl")
    samples = sum(r["perf/samples_per_s"] * r["time/step_s"] for r in rows)
    seconds = sum(r["time/step_s"] for r in rows)
    return {"max_staleness": staleness, "samples_per_s": samples / max(seconds, 1e-9),
            "median_step_s": statistics.median(r["time/step_s"] for r in rows),
            "staleness_mean": statistics.fmean(r["rollout/staleness"] for r in rows),
            "sync_s_mean": statistics.fmean(r["sync/seconds"] for r in rows),
            "reward_mean_last": rows[-1]["rollout/reward_mean"], "wall_s": wall,
            "loadavg_1m_before": load_before, "loadavg_1m_after": load_after, "steps": len(rows)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small-grpo", help="a GRPO preset (small-grpo, tiny-grpo)")
    parser.add_argument("--steps", type=int, default=12, help="steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="pairs of runs, max_staleness 1 then 0")
    parser.add_argument("--runs", default="runs/async_rollouts", help="where the run directories go")
    parser.add_argument("--results", default="", help="a JSON file for the results (default: none)")
    parser.add_argument("overrides", nargs="*", help="more dotted overrides for every run, e.g. run.batch_size=16")
    args = parser.parse_args(argv)
    from rlhf_ray.runtime.role_groups import init_ray

    init_ray(None)
    runs = Path(args.runs).resolve()
    results = []
    print(f"{args.preset}, {args.steps} steps a run, engine and policy on one CPU each; "
          f"{os.cpu_count()} cores here", flush=True)
    print("| round | max_staleness | samples/s | median step | staleness | sync | load 1m before -> after |",
          flush=True)
    print("|---|---|---|---|---|---|---|", flush=True)
    for round_ in range(1, args.rounds + 1):
        for staleness in (1, 0):
            r = run_once(args.preset, runs / f"round{round_}_k{staleness}", staleness, args.steps, args.overrides)
            r["round"] = round_
            results.append(r)
            print(f"| {round_} | {staleness} | {r['samples_per_s']:.2f} | {r['median_step_s']:.2f} s | "
                  f"{r['staleness_mean']:.2f} | {r['sync_s_mean']:.3f} s | {r['loadavg_1m_before']:.2f} -> "
                  f"{r['loadavg_1m_after']:.2f} |", flush=True)
    for staleness in (1, 0):
        rates = [r["samples_per_s"] for r in results if r["max_staleness"] == staleness]
        print(f"max_staleness {staleness}: median {statistics.median(rates):.2f} samples/s over {len(rates)} runs")
    if args.results:
        Path(args.results).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
