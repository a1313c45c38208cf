"""Asynchronous rollouts against the on-policy loop: the same GRPO work, the engine on one core, the policy on another,
and the preset's own layout beside them.

A `split` run is the preset (`small-grpo` by default) with the vLLM engine alone in a 1-CPU bundle and the policy,
reference and reward rule sharing another 1-CPU bundle (they take turns), so that on a 2-core machine the engine
can generate the next batch while the policy trains; a `colocated` run keeps the preset's placement (every role
reserving what the preset asks, taking turns on all the cores), the synchronous layout the presets ship. Each
round runs every side of `--sides` (default `split:1,split:0,colocated:0`: layout and `rollout.max_staleness`) in
turn, each `--steps` steps from the same initial weights and seed; a machine whose load drifts then shifts all
alike. Reported per run: samples per second over all its steps (rows trained / the steps' time; every run
generates exactly its own steps' batches, the asynchronous one two of them in its first step and none past its
last, so leaving out the first step would favour it), the median step time, the mean staleness and sync time,
and the load average (1 min) before and after. The load average says whether anything else shared the cores: a
figure taken beside other work says little.

With `--eval-every N` each run also evaluates the preset's held-out prompts every N steps: the held-out reward
(greedy pass rate for a rule reward) against the minutes of training before it (the steps' own time, evaluation
left out), and how long each side took to reach the final held-out reward of the first synchronous side.

    python benchmarks/async_rollouts.py [--preset small-grpo] [--steps 12] [--rounds 3] [--runs runs/async_rollouts]
    python benchmarks/async_rollouts.py --preset smol-grpo --sides split:1,split:0 --steps 40 --eval-every 10 --rounds 1

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


LAYOUTS = {"split": SPLIT_CORES, "colocated": []}


def parse_sides(text: str) -> list[tuple[str, int]]:
    """`split:1,colocated:0` -> [("split", 1), ("colocated", 0)]."""
    sides = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        layout, _, k = item.partition(":")
        if layout not in LAYOUTS or not k.isdigit():
            raise SystemExit(f"--sides: {item!r} is not LAYOUT:K with LAYOUT one of {', '.join(LAYOUTS)} "
                             "and K a max_staleness (0, 1, ...)")
        sides.append((layout, int(k)))
    return sides


def held_out_curve(rows: list[dict]) -> list[dict]:
    """(step, minutes of training before it, held-out reward) at every evaluation of a run."""
    points, seconds = [], 0.0
    for row in rows:
        seconds += row.get("time/step_s", 0.0)
        value = row.get("eval/greedy_pass_rate", row.get("eval/greedy_reward_mean"))
        if value is not None:
            points.append({"step": row["step"], "minutes": seconds / 60, "value": value})
    return points


def minutes_to_reach(curve: list[dict], target: float) -> float | None:
    return next((p["minutes"] for p in curve if p["value"] >= target - 1e-9), None)


def run_once(preset: str, out: Path, layout: str, staleness: int, steps: int, extra: list[str],
             eval_every: int = 0) -> dict:
    from rlhf_ray.jobs import run_job

    evaluation = [f"run.eval_every={eval_every}"] if eval_every else ["run.eval_every=0", "data.eval="]
    overrides = [f"run.output_dir={out}", "run.resume=never", "run.progress=false", "run.save_every=0",
                 *evaluation, f"run.total_steps={steps}", f"rollout.max_staleness={staleness}",
                 *LAYOUTS[layout], *extra]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    run_job(load_config(preset, overrides))
    wall = time.perf_counter() - started
    load_after = os.getloadavg()[0]
    rows = read_metrics(out / "metrics.jsonl")
    samples = sum(r["perf/samples_per_s"] * r["time/step_s"] for r in rows)
    seconds = sum(r["time/step_s"] for r in rows)
    return {"layout": layout, "max_staleness": staleness, "curve": held_out_curve(rows),
            "samples_per_s": samples / max(seconds, 1e-9),
            "median_step_s": statistics.median(r["time/step_s"] for r in rows),
            "staleness_mean": statistics.fmean(r["rollout/staleness"] for r in rows),
            "sync_s_mean": statistics.fmean(r["sync/seconds"] for r in rows),
            "reward_mean_last": rows[-1]["rollout/reward_mean"], "wall_s": wall,
            "loadavg_1m_before": load_before, "loadavg_1m_after": load_after, "steps": len(rows)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small-grpo", help="a GRPO preset (small-grpo, tiny-grpo)")
    parser.add_argument("--steps", type=int, default=12, help="steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of runs, one run of every side each")
    parser.add_argument("--sides", default="split:1,split:0,colocated:0",
                        help="LAYOUT:MAX_STALENESS, comma-separated (layouts: split, colocated)")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="held-out evaluation every N steps, and the reward-against-minutes curves (0: none)")
    parser.add_argument("--runs", default="runs/async_rollouts", help="where the run directories go")
    parser.add_argument("--results", default="", help="a JSON file for the results (default: none)")
    parser.add_argument("overrides", nargs="*", help="more dotted overrides for every run, e.g. run.batch_size=16")
    args = parser.parse_args(argv)
    sides = parse_sides(args.sides)
    from rlhf_ray.runtime.role_groups import init_ray

    init_ray(None)
    runs = Path(args.runs).resolve()
    results = []
    print(f"{args.preset}, {args.steps} steps a run; split: engine and policy on one CPU each; colocated: the "
          f"preset's placement; {os.cpu_count()} cores here", flush=True)
    print("| round | layout | max_staleness | samples/s | median step | staleness | sync | load 1m before -> after |",
          flush=True)
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for round_ in range(1, args.rounds + 1):
        for layout, staleness in sides:
            r = run_once(args.preset, runs / f"round{round_}_{layout}_k{staleness}", layout, staleness, args.steps,
                         args.overrides, args.eval_every)
            r["round"] = round_
            results.append(r)
            print(f"| {round_} | {layout} | {staleness} | {r['samples_per_s']:.2f} | {r['median_step_s']:.2f} s | "
                  f"{r['staleness_mean']:.2f} | {r['sync_s_mean']:.3f} s | {r['loadavg_1m_before']:.2f} -> "
                  f"{r['loadavg_1m_after']:.2f} |", flush=True)
    for layout, staleness in sides:
        rates = [r["samples_per_s"] for r in results if (r["layout"], r["max_staleness"]) == (layout, staleness)]
        print(f"{layout} max_staleness {staleness}: median {statistics.median(rates):.2f} samples/s over "
              f"{len(rates)} runs")
    if args.eval_every:
        report_curves(results)
    if args.results:
        Path(args.results).write_text(json.dumps(results, indent=2) + "\n")
    return results


def report_curves(results: list[dict]) -> None:
    """Each run's held-out curve, and when it reached the final value of the first synchronous run."""
    sync = next((r for r in results if r["max_staleness"] == 0 and r["curve"]), None)
    target = sync["curve"][-1]["value"] if sync else None
    print("\nHeld-out reward (greedy pass rate for a rule) at minutes of training:")
    for r in results:
        points = ", ".join(f"{p['step']}: {p['value']:.3f} at {p['minutes']:.1f}" for p in r["curve"])
        reached = minutes_to_reach(r["curve"], target) if target is not None else None
        tail = f"; reached {target:.3f} at {reached:.1f} min" if reached is not None else \
            (f"; did not reach {target:.3f}" if target is not None else "")
        print(f"- round {r['round']} {r['layout']} k={r['max_staleness']}: {points}{tail}")


if __name__ == "__main__":
    main()
