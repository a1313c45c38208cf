"""The vLLM and Hugging Face rollout engines on the same GRPO work, in one run.

    python benchmarks/engines.py [--out benchmarks/results] [--repeats 2] [--warmup 2] [--steps 5]

Runs the tiny GRPO preset (8 prompts x 4 samples x up to 32 tokens a step) on each
engine, alternating hf, vllm, hf, vllm, ... and writes engines-grpo.{json,md}:
generation tokens/s, the decoding bound and the share of it reached, and the
weight-sync bandwidth against a memcpy measured in the same run.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rlhf_ray.config import load_config
from rlhf_ray.reports.bench import run_engine_comparison
from rlhf_ray.reports.bench_markdown import write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for the results")
    parser.add_argument("--runs", default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per engine, alternating")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps per run")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per run")
    args = parser.parse_args()
    runs = Path(args.runs or tempfile.mkdtemp(prefix="rlhf-ray-engines-"))
    cfg = load_config("tiny-grpo", ["run.batch_size=8"])
    result = run_engine_comparison(cfg, ["hf", "vllm"], runs, repeats=args.repeats, warmup=args.warmup,
                                   steps=args.steps)
    for path in write_result(result, args.out, "engines-grpo").values():
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
