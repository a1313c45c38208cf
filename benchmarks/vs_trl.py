"""rlhf-ray against TRL on the same CPU work: DPO steps per second, online RLOO and GRPO samples per second.

    python benchmarks/vs_trl.py [--model tiny-gpt2|small-llama] [--out benchmarks/results]
                                [--trl-venv /tmp/trl-venv] [--warmup 2] [--steps 5] [--repeats 2]

TRL is never a dependency of rlhf-ray: this script creates its own virtual
environment (`--trl-venv`, default /tmp/trl-venv) when it lacks TRL, with the
pinned CPU torch first (`torch==2.13.0`, as our `.venv`) and then `trl` from
PyPI, and runs TRL's half (`vs_trl_worker.py`) there. Both sides get, in one
run on one machine:

- the same model: a shipped preset (`--model`: tiny-gpt2, 0.6M parameters,
  or small-llama, 26M in the Llama shape; seeded initialisation) and the tiny
  tokenizer, saved to one folder that both load;
- the same data: the synthetic task's preference pairs (DPO) and prompts
  (RLOO), written to JSON Lines that both read;
- the same shapes: DPO 16 pairs per step in micro-batches of 8, max_length 96,
  beta 0.1; RLOO and GRPO 8 prompts x 4 samples per step, 32 new tokens, KL
  0.05 to the reference (TRL's GRPO default of no KL would skip the reference
  model), one optimizer step per batch, the synthetic task's rule reward;
- the same optimizer: AdamW, lr 2e-4 constant, betas (0.9, 0.95), clip 1.0.

Each side runs `--repeats` times, alternating which goes first, so that a
busy machine slows both alike; step time is the median over every measured
step (`--steps` per run, after `--warmup`): ours is
`time/step_s` (batch assembly to the end of the update, weight sync included),
TRL's the time from one optimizer step's end to the next (data loading,
generation and update). TRL runs in one process with as many torch threads as
one of our role actors has (2); our roles are separate Ray actors sharing the
same CPUs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import rlhf_ray.data.synthetic as synthetic_task
from rlhf_ray.config import load_config
from rlhf_ray.data.synthetic import SyntheticConfig, write_synthetic
from rlhf_ray.reports.bench import load_average, measure_limits, run_throughput, trained_matmul_params
from rlhf_ray.telemetry.hardware import hardware_info

HERE = Path(__file__).resolve().parent
SYNTHETIC = Path(synthetic_task.__file__)
TORCH_PIN = "torch==2.13.0"
THREADS = 2
DPO = {"batch_size": 16, "micro_batch_size": 8, "max_length": 96, "max_prompt_length": 48, "beta": 0.1, "lr": 2e-4}
RLOO = {"batch_size": 8, "samples_per_prompt": 4, "max_new_tokens": 32, "max_prompt_length": 48, "kl_coef": 0.05,
        "lr": 2e-4}
OPTIM = ["policy.optim.lr=0.0002", "policy.optim.warmup_steps=0", "policy.optim.scheduler=constant",
         "policy.optim.grad_clip=1.0"]


def ensure_trl_venv(venv: Path) -> Path:
    """The TRL environment's python, creating the environment when it has no TRL yet."""
    python = venv / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import trl"], capture_output=True) if python.exists() else None
    if probe is not None and probe.returncode == 0:
        return python
    print(f"creating {venv}: {TORCH_PIN} (CPU), then trl from PyPI")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for packages in (["--upgrade", "pip"], [TORCH_PIN], ["trl"]):
        subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True)
    return python


def prepare(work: Path, preset: str) -> dict[str, Path]:
    """The shared model folder and data files."""
    from rlhf_ray.models.loading import load_causal_lm, load_tokenizer_for

    tokenizer = load_tokenizer_for(preset)
    model = load_causal_lm(preset, dtype="float32", seed=0, tokenizer=tokenizer)
    model_dir = work / preset
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    splits = write_synthetic(work / "data", SyntheticConfig(seed=0))
    prompts = work / "prompts.jsonl"  # only the prompt column: TRL's RLOO passes every column to the reward
    with open(splits["prompts_train"]) as src, open(prompts, "w") as dst:
        for line in src:
            dst.write(json.dumps({"prompt": json.loads(line)["prompt"]}) + "\n")
    return {"model": model_dir, "pairs": Path(splits["preference_train"]), "prompts": prompts}


def run_trl(python: Path, mode: str, shape: dict, paths: dict, work: Path, warmup: int, steps: int,
            label: str) -> dict:
    spec = {"mode": mode, "model": str(paths["model"]), "data": str(paths["pairs" if mode == "dpo" else "prompts"]),
            "reward_module": str(SYNTHETIC), "threads": THREADS, "warmup": warmup, "steps": steps,
            "out_dir": str(work / label), **shape}
    spec_path, out_path = work / f"{label}-spec.json", work / f"{label}-result.json"
    spec_path.write_text(json.dumps(spec))
    load = load_average()
    done = subprocess.run([str(python), str(HERE / "vs_trl_worker.py"), str(spec_path), str(out_path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"TRL {mode} failed:\n{done.stderr[-4000:]}")
    result = json.loads(out_path.read_text())
    measured = result["step_seconds"][warmup:]
    return {"step_median_s": statistics.median(measured), "step_seconds": measured, "versions": result["versions"],
            "threads": result["threads"], "load_average_before": load}


def run_ours(mode: str, paths: dict, work: Path, warmup: int, steps: int, limits: dict, label: str) -> dict:
    model = [f"policy.model.name_or_path={paths['model']}", "data.eval="]
    if mode == "dpo":
        overrides = model + OPTIM + [f"data.train={paths['pairs']}", "data.format=preference",
                                     f"run.batch_size={DPO['batch_size']}",
                                     f"policy.micro_batch_size={DPO['micro_batch_size']}",
                                     f"data.max_length={DPO['max_length']}", f"algorithm.params.beta={DPO['beta']}"]
        cfg = load_config("tiny-dpo", overrides)
    else:  # rloo, grpo
        overrides = model + OPTIM + [f"data.train={paths['prompts']}", f"run.batch_size={RLOO['batch_size']}",
                                     f"algorithm.samples_per_prompt={RLOO['samples_per_prompt']}",
                                     f"rollout.max_new_tokens={RLOO['max_new_tokens']}",
                                     f"algorithm.kl_coef={RLOO['kl_coef']}", "algorithm.ppo_epochs=1",
                                     "algorithm.num_minibatches=1", "policy.micro_batch_size=32"]
        cfg = load_config(f"tiny-{mode}", overrides)
    result = run_throughput(cfg, work, warmup=warmup, steps=steps, limits=limits, label=label)
    return {"step_median_s": result["step_median_s"], "step_seconds": result["step_seconds"],
            "work_floor_s": work_floor_s(cfg, result, limits),
            "phases_median_s": result["phases_median_s"],
            "outside_compute_share": result["breakdown_median"]["outside_compute_share"],
            "load_average_before": result["load_average"]["before"]}


def work_floor_s(cfg, result: dict, limits: dict) -> float | None:
    """Seconds a step's work takes at the GEMM rate measured in the run, by any implementation: 8 N FLOPs
    a token (the training forward and backward, 6 N, and the reference's forward, 2 N) over the batch's
    real prompt and response tokens, plus 2 N a decoded token (prefill left out). A lower bound on any
    side's step, so TRL's step over it is the highest ratio to TRL that the work allows on this CPU."""
    n = trained_matmul_params(cfg, "policy")
    if not n or not result.get("tokens_per_step"):
        return None
    flops = 8 * n * result["tokens_per_step"] + 2 * n * result.get("generated_tokens_per_step", 0.0)
    return flops / limits["matmul_flops_per_s"]


def markdown(result: dict) -> str:
    hw = result["hardware"]
    lines = [f"# rlhf-ray vs TRL on the same CPU work: {result['model']}", "",
             f"- CPU: {hw['cpu_model']} ({hw['cpus_available']} CPUs available); torch threads per process: {THREADS}",
             "- rlhf-ray side: " + ", ".join(f"{k} {v}" for k, v in hw["versions"].items() if v),
             "- TRL side: " + ", ".join(f"{k} {v}" for k, v in result["trl_versions"].items()),
             f"- {result['repeats']} runs of each side, alternating which goes first; {result['warmup']} warm-up and "
             f"{result['steps']} measured steps per run; the median over every measured step.", "",
             "| work | unit | TRL | rlhf-ray | rlhf-ray / TRL | work floor (s / step) | highest ratio the work "
             "allows |", "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        floor = row.get("work_floor_s")
        bound = "-" if floor is None else f"{floor:.3g} | {row['trl_step_s'] / floor:.2f}x"
        lines.append(f"| {row['work']} | {row['unit']} | {row['trl']:.3g} | {row['ours']:.3g} | "
                     f"{row['ratio']:.2f}x | {bound} |")
    loads = [run.get("load_average_before") for d in result["details"].values() for side in d.values()
             for run in side["runs"] if run.get("load_average_before")]
    if loads:
        lines += ["", f"Load average (1 min) before each run: {min(x[0] for x in loads):.1f} to "
                      f"{max(x[0] for x in loads):.1f} on {hw['cpus_available']} CPUs."]
    lines += ["", "Work floor: the FLOPs both sides must do each step (8 N a prompt or response token: training "
              "forward and backward plus the reference's forward; 2 N a decoded token) at the GEMM rate measured "
              f"in this run ({result['limits']['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s, fp32), N = the model's "
              "matmul parameters. No implementation's step is shorter, so TRL's step over it is the highest "
              "ratio to TRL this work allows on this CPU; where it is near 1, both sides are compute-bound."]
    lines += ["", "Ratios above 1 mean rlhf-ray is faster. Shapes (RLOO's are GRPO's too): "
              + json.dumps({"dpo": DPO, "rloo": RLOO}), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-gpt2", help="the model preset both sides train (tiny-gpt2, "
                        "small-llama)")
    parser.add_argument("--modes", default="dpo,rloo,grpo", help="which work to compare")
    parser.add_argument("--out", default="benchmarks/results", help="folder for vs_trl-<model>.json and .md")
    parser.add_argument("--trl-venv", default="/tmp/trl-venv", help="TRL's own virtual environment")
    parser.add_argument("--work", default=None, help="folder for the model, data and runs (default: temporary)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps per run")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating which goes first "
                        "(a busy machine then slows both alike); step times are pooled")
    args = parser.parse_args()
    python = ensure_trl_venv(Path(args.trl_venv))
    work = Path(args.work or tempfile.mkdtemp(prefix="rlhf-ray-vs-trl-"))
    paths = prepare(work, args.model)
    limits = measure_limits(threads=THREADS)
    rows, trl_versions, details = [], {}, {}
    rloo_samples = RLOO["batch_size"] * RLOO["samples_per_prompt"]
    modes = {"dpo": (DPO, "steps / s", 1, "DPOTrainer"), "rloo": (RLOO, "samples / s", rloo_samples, "RLOOTrainer"),
             "grpo": (RLOO, "samples / s", rloo_samples, "GRPOTrainer")}
    for mode in args.modes.split(","):
        shape, unit, per_step, trainer = modes[mode]
        trl_runs, our_runs = [], []
        for repeat in range(args.repeats):
            sides = [lambda: trl_runs.append(run_trl(python, mode, shape, paths, work, args.warmup, args.steps,
                                                     f"trl-{mode}-{repeat}")),
                     lambda: our_runs.append(run_ours(mode, paths, work, args.warmup, args.steps, limits,
                                                      f"ours-{mode}-{repeat}"))]
            for side in (sides if repeat % 2 == 0 else sides[::-1]):
                side()
        trl_versions = trl_runs[0]["versions"]
        trl = {"step_median_s": statistics.median(s for r in trl_runs for s in r["step_seconds"]), "runs": trl_runs}
        ours = {"step_median_s": statistics.median(s for r in our_runs for s in r["step_seconds"]), "runs": our_runs}
        trl_rate, our_rate = per_step / trl["step_median_s"], per_step / ours["step_median_s"]
        floors = [r["work_floor_s"] for r in our_runs if r.get("work_floor_s")]
        rows.append({"work": f"{mode.upper()} ({trainer} vs ours)",
                     "unit": unit, "trl": trl_rate, "ours": our_rate, "ratio": our_rate / trl_rate,
                     "trl_step_s": trl["step_median_s"],
                     "work_floor_s": statistics.median(floors) if floors else None})
        details[mode] = {"trl": trl, "ours": ours}
        print(f"{mode}: TRL {trl_rate:.3g} {unit}, rlhf-ray {our_rate:.3g} {unit} ({our_rate / trl_rate:.2f}x); "
              f"work floor {rows[-1]['work_floor_s']} s / step")
    result = {"model": args.model, "hardware": hardware_info(), "limits": limits, "trl_versions": trl_versions,
              "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats, "rows": rows, "details": details,
              "shapes": {"dpo": DPO, "rloo": RLOO}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"vs_trl-{args.model}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")


if __name__ == "__main__":
    main()
