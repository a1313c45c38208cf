"""Memory by role, PPO against ReMax: measured on the tiny models, planned at 7B.

    python benchmarks/memory.py [--out benchmarks/results]

Writes, into --out:
- memory-ppo-vs-remax.{json,md,png}: two steps of PPO and of ReMax on the
  tiny default with a reward model (a separate frozen role), micro-batches of
  8 rows for every trained role, every role's
  measured bytes beside the planner's, totals, the saving, and a stacked bar
  chart (`rlhf-ray bench memory --algos ppo,remax`);
- memory-ppo-vs-remax-rule-reward.{json,md,png}: the same on the tiny default
  as shipped, whose reward is a rule (the reward role holds no model);
- plan-llama-7b-ppo-vs-remax.{json,md}: the planner's view of the same
  comparison at Llama-2-7B on 8 x 80 GiB GPUs, every role on all eight
  (`rlhf-ray plan --compare ppo,remax --model llama-7b --gpus 8`);
- plan-llama-7b-remax-paper-layout.{json,md}: the ReMax paper's layout on
  4 x 80 GiB GPUs (policy and critic ZeRO-2, reference and reward ZeRO-3 with
  their weights offloaded, all colocated).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from rlhf_ray.config import load_config
from rlhf_ray.planner.plan_command import plan_command, plan_markdown, strip_markdown
from rlhf_ray.reports.bench import run_memory
from rlhf_ray.reports.bench_markdown import write_result

REWARD_MODEL = ["reward.rule=", "reward.model.name_or_path=tiny-gpt2"]
# One micro-batch shape for every trained role: PPO's minibatch of 8 would otherwise give its policy
# micro-batches half the rows of ReMax's, and the activations would differ by that alone.
EQUAL_MICRO_BATCH = ["policy.micro_batch_size=8", "critic.micro_batch_size=8"]
PLANS = {
    # vLLM shares its GPUs with the trainers: it may claim 30% of each.
    "plan-llama-7b-ppo-vs-remax": (8, ["rollout.gpu_memory_utilization=0.3"]),
    "plan-llama-7b-remax-paper-layout": (4, ["policy.zero_stage=2", "critic.zero_stage=2",
                                             "reference.offload_params=true", "reward.offload_params=true",
                                             "rollout.gpu_memory_utilization=0.2"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for the results")
    parser.add_argument("--runs", default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--only-plan", action="store_true", help="only the planned 7B comparison (no runs)")
    args = parser.parse_args()
    runs = Path(args.runs or tempfile.mkdtemp(prefix="rlhf-ray-bench-"))
    for name, overrides in (("memory-ppo-vs-remax", REWARD_MODEL + EQUAL_MICRO_BATCH),
                            ("memory-ppo-vs-remax-rule-reward", EQUAL_MICRO_BATCH)):
        if args.only_plan:
            break
        result = run_memory(load_config("tiny-ppo", overrides), ["ppo", "remax"], runs / name)
        for path in write_result(result, args.out, name).values():
            print(f"wrote {path}")
    out = Path(args.out)
    for name, (gpus, overrides) in PLANS.items():
        plan = plan_command(load_config("llama-7b-ppo-vllm", overrides), algorithms=["ppo", "remax"], model="llama-7b",
                        gpus=gpus, gpu_mem_gib=80, num_prompts=45_000)
        command = (f"rlhf-ray plan --compare ppo,remax --model llama-7b --gpus {gpus} --gpu-mem 80 --samples 45000 "
                   + " ".join(overrides))
        (out / f"{name}.json").write_text(json.dumps(strip_markdown(plan), indent=2, sort_keys=True) + "\n")
        (out / f"{name}.md").write_text(f"# Planned: PPO vs ReMax, Llama-2-7B shapes, {gpus} x 80 GiB GPUs, every "
                                        f"role on all of them\n\n`{command}`\n\n" + plan_markdown(plan))
        print(f"wrote {out / name}.md")


if __name__ == "__main__":
    main()
