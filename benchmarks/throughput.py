"""Throughput of the tiny defaults, and PPO against ReMax on step time.

    python benchmarks/throughput.py [--out benchmarks/results] [--warmup 2] [--steps 5]

Writes, into --out:
- throughput-tiny-ppo.{json,md}, throughput-tiny-dpo.{json,md}: per-phase
  medians, tokens/s, samples/s, the share of the step outside compute, MFU
  and generation against the memory-bandwidth bound (`rlhf-ray bench throughput`);
- step-time-ppo-vs-remax.{json,md}: PPO and ReMax with a reward model (a
  separate frozen role) at equal batch, and at the largest batch each fits in
  the memory the planner gives PPO (`rlhf-ray bench compare`).

The runs themselves go to a temporary folder (`--runs` to keep them).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rlhf_ray.config import load_config
from rlhf_ray.reports.bench import limits_threads, measure_limits, run_step_time_comparison, run_throughput
from rlhf_ray.reports.bench_markdown import write_result

REWARD_MODEL = ["reward.rule=", "reward.model.name_or_path=tiny-gpt2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for the results")
    parser.add_argument("--runs", default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps per run")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per run")
    parser.add_argument("--skip-compare", action="store_true", help="only the two throughput runs")
    args = parser.parse_args()
    runs = Path(args.runs or tempfile.mkdtemp(prefix="rlhf-ray-bench-"))
    ppo = load_config("tiny-ppo")
    limits = measure_limits(threads=limits_threads(ppo))
    for name in ("tiny-ppo", "tiny-dpo"):
        result = run_throughput(load_config(name), runs, warmup=args.warmup, steps=args.steps, limits=limits,
                                label=name)
        for path in write_result(result, args.out, f"throughput-{name}").values():
            print(f"wrote {path}")
    if not args.skip_compare:
        result = run_step_time_comparison(load_config("tiny-ppo", REWARD_MODEL), ["ppo", "remax"], runs,
                                          warmup=args.warmup, steps=args.steps, limits=limits)
        for path in write_result(result, args.out, "step-time-ppo-vs-remax").values():
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
