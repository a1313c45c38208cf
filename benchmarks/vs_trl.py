"""rlhf-ray against TRL on the same CPU work: DPO steps per second, online RLOO and GRPO samples per second.

    python benchmarks/vs_trl.py [--model tiny-gpt2|small-llama|smollm2-135m] [--out benchmarks/results]
                                [--trl-venv /tmp/trl-venv] [--warmup 2] [--steps 5] [--repeats 2]
                                [--precision fp32|bf16] [--background-load 0]

TRL is never a dependency of rlhf-ray: this script creates its own virtual
environment (`--trl-venv`, default /tmp/trl-venv) when it lacks TRL, with the
pinned CPU torch first (`torch==2.13.0`, as our `.venv`) and then `trl` from
PyPI, and runs TRL's half (`vs_trl_worker.py`) there. Both sides get, in one
run on one machine:

- the same model: a shipped preset (`--model`: tiny-gpt2, 0.6M parameters,
  or small-llama, 26M in the Llama shape; seeded initialisation) and the tiny
  tokenizer, saved to one folder that both load; or the real model
  (`--model smollm2-135m`: SmolLM2-135M-Instruct, 49,152-token vocabulary,
  tied embeddings, ChatML template), converted once into the folder both load;
- the same data: the synthetic task's preference pairs (DPO) and prompts
  (RLOO), written to JSON Lines that both read; with the real model the
  arithmetic task's (chat messages, the rule `answer_reward`);
- the same shapes: DPO 16 pairs per step in micro-batches of 8, max_length 96,
  beta 0.1; RLOO and GRPO 8 prompts x 4 samples per step, 32 new tokens, KL
  0.05 to the reference (TRL's GRPO default of no KL would skip the reference
  model), one optimizer step per batch, the synthetic task's rule reward.
  With the real model, the `smol-*` presets' shapes: DPO 8 pairs in
  micro-batches of 4, max_length 96, beta 0.1; GRPO 8 questions x 4 samples
  x 16 new tokens, KL 0.01, one micro-batch of 32;
- the same optimizer: AdamW, lr 2e-4 constant, betas (0.9, 0.95), clip 1.0
  (real model: lr 5e-6 for DPO and 3e-6 for GRPO, betas (0.9, 0.999));
- the same precision (`--precision`): fp32 on both sides, or bf16 mixed
  precision on both (fp32 master weights: TRL's `bf16=True`, our
  `dtype: bfloat16` for the policy, the reference and the engine), for CPUs
  with BF16 instructions; the work floor then uses the bf16 GEMM rate.

`--background-load N` starts N processes that spin on a core for the whole
benchmark (and stops them at its end): the machine shared with other work,
as a laptop or a test suite shares it. Its results go to
`vs_trl-<model>[-bf16][-loadN].{json,md}`.

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
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import rlhf_ray.data.arithmetic as arithmetic_task
import rlhf_ray.data.synthetic as synthetic_task
from rlhf_ray.config import load_config
from rlhf_ray.data.synthetic import SyntheticConfig, write_synthetic
from rlhf_ray.files import write_text_atomic
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
REAL_MODEL = "smollm2-135m"
"""The real model: its shapes are the `smol-*` presets' and its task the arithmetic one."""
REAL_DPO = {"batch_size": 8, "micro_batch_size": 4, "max_length": 96, "max_prompt_length": 64, "beta": 0.1,
            "lr": 5e-6, "adam_beta2": 0.999}
REAL_GRPO = {"batch_size": 8, "samples_per_prompt": 4, "max_new_tokens": 16, "max_prompt_length": 64,
             "kl_coef": 0.01, "lr": 3e-6, "adam_beta2": 0.999}


def shapes_for(model: str) -> dict[str, dict]:
    """The work of each mode for `model`: the tiny presets' shapes, or the real model's."""
    if model == REAL_MODEL:
        return {"dpo": REAL_DPO, "rloo": REAL_GRPO, "grpo": REAL_GRPO}
    return {"dpo": DPO, "rloo": RLOO, "grpo": RLOO}


@contextlib.contextmanager
def background_load(n: int):
    """`n` processes that each spin on a core until the block ends: a machine shared with other work."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


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

    if preset == REAL_MODEL:
        return prepare_real(work)
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
    return {"model": model_dir, "pairs": Path(splits["preference_train"]), "prompts": prompts,
            "reward_module": SYNTHETIC, "reward_fn": "mention_reward"}


def prepare_real(work: Path) -> dict[str, Path]:
    """The real model's converted folder (its tokenizer and chat template inside) and the arithmetic task's
    pairs and questions (chat messages, as both sides read them)."""
    from rlhf_ray.models.sources import local_model_path

    splits = arithmetic_task.write_arithmetic(work / "data")
    prompts = work / "prompts.jsonl"  # only the prompt column: TRL passes every column to the reward
    with open(splits["prompts_train"]) as src, open(prompts, "w") as dst:
        for line in src:
            dst.write(json.dumps({"prompt": json.loads(line)["prompt"]}) + "\n")
    return {"model": Path(local_model_path(REAL_MODEL)), "pairs": Path(splits["preference_train"]),
            "prompts": prompts, "reward_module": Path(arithmetic_task.__file__), "reward_fn": "answer_reward"}


def run_trl(python: Path, mode: str, shape: dict, paths: dict, work: Path, warmup: int, steps: int,
            label: str, bf16: bool = False) -> dict:
    spec = {"mode": mode, "model": str(paths["model"]), "data": str(paths["pairs" if mode == "dpo" else "prompts"]),
            "reward_module": str(paths["reward_module"]), "reward_fn": paths["reward_fn"], "threads": THREADS,
            "warmup": warmup, "steps": steps, "out_dir": str(work / label), "bf16": bf16, **shape}
    spec_path, out_path = work / f"{label}-spec.json", work / f"{label}-result.json"
    spec_path.write_text(json.dumps(spec))
    load = load_average()
    launched = time.time()
    done = subprocess.run([str(python), str(HERE / "vs_trl_worker.py"), str(spec_path), str(out_path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"TRL {mode} failed:\n{done.stderr[-4000:]}")
    wall = time.time() - launched
    result = json.loads(out_path.read_text())
    measured = result["step_seconds"][warmup:]
    return {"step_median_s": statistics.median(measured), "step_seconds": measured, "versions": result["versions"],
            "threads": result["threads"], "load_average_before": load, "wall_s": wall,
            "first_step_after_launch_s": result["first_step_end_epoch"] - launched}


def our_config(mode: str, model: str, paths: dict, bf16: bool = False, extra: tuple[str, ...] = ()):
    """Our side's config of `mode`'s work on `model`: the tiny presets with the shared shapes, or the real
    model's `smol-*` presets with plain DPO (the loss of TRL's DPOTrainer) and the same shapes; `extra`
    overrides last."""
    if model != REAL_MODEL:
        return our_tiny_config(mode, paths, extra)
    shape = shapes_for(model)[mode]
    common = ["data.eval=", "run.eval_every=0", f"policy.optim.lr={shape['lr']}", "policy.optim.warmup_steps=0",
              "policy.optim.scheduler=constant", "policy.optim.grad_clip=1.0",
              f"policy.optim.betas=[0.9,{shape['adam_beta2']}]",
              f"data.max_prompt_length={shape['max_prompt_length']}"]
    if bf16:
        common += ["policy.model.dtype=bfloat16", "reference.model.dtype=bfloat16"]
    if mode == "dpo":
        return load_config("smol-dpo", common + [
            "algorithm.name=dpo", f"algorithm.params={{beta: {shape['beta']}}}",
            f"run.batch_size={shape['batch_size']}", f"policy.micro_batch_size={shape['micro_batch_size']}",
            f"data.max_length={shape['max_length']}", *extra])
    return load_config("smol-grpo", common + [
        f"algorithm.name={mode}", f"run.batch_size={shape['batch_size']}",
        f"algorithm.samples_per_prompt={shape['samples_per_prompt']}",
        f"rollout.max_new_tokens={shape['max_new_tokens']}", f"algorithm.kl_coef={shape['kl_coef']}",
        "algorithm.ppo_epochs=1", "algorithm.num_minibatches=1", "policy.micro_batch_size=32",
        f"data.max_length={shape['max_prompt_length'] + shape['max_new_tokens']}", *extra])


def our_tiny_config(mode: str, paths: dict, extra: tuple[str, ...] = ()):
    model = [f"policy.model.name_or_path={paths['model']}", "data.eval="]
    if mode == "dpo":
        overrides = model + OPTIM + [f"data.train={paths['pairs']}", "data.format=preference",
                                     f"run.batch_size={DPO['batch_size']}",
                                     f"policy.micro_batch_size={DPO['micro_batch_size']}",
                                     f"data.max_length={DPO['max_length']}", f"algorithm.params.beta={DPO['beta']}"]
        return load_config("tiny-dpo", overrides + list(extra))
    overrides = model + OPTIM + [f"data.train={paths['prompts']}", f"run.batch_size={RLOO['batch_size']}",
                                 f"algorithm.samples_per_prompt={RLOO['samples_per_prompt']}",
                                 f"rollout.max_new_tokens={RLOO['max_new_tokens']}",
                                 f"algorithm.kl_coef={RLOO['kl_coef']}", "algorithm.ppo_epochs=1",
                                 "algorithm.num_minibatches=1", "policy.micro_batch_size=32"]
    return load_config(f"tiny-{mode}", overrides + list(extra))


def run_ours(mode: str, model: str, paths: dict, work: Path, warmup: int, steps: int, limits: dict, label: str,
             bf16: bool = False, overrides: tuple[str, ...] = ()) -> dict:
    cfg = our_config(mode, model, paths, bf16, overrides)
    launched = time.time()
    result = run_throughput(cfg, work, warmup=warmup, steps=steps, limits=limits, label=label)
    wall = time.time() - launched
    first = [json.loads(line) for line in open(work / "runs" / label / "timeline.jsonl")]
    first_end = max(event["end"] for event in first if event["step"] == 1)
    return {"step_median_s": result["step_median_s"], "step_seconds": result["step_seconds"],
            "wall_s": wall, "first_step_after_launch_s": first_end - launched,
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
    precision = "bf16 mixed precision (fp32 master weights)" if result["precision"] == "bf16" else "fp32"
    loaded = result["background_load"]
    lines = [f"# rlhf-ray vs TRL on the same CPU work: {result['model']}, {result['precision']}"
             + (f", {loaded} spinning process(es) beside" if loaded else ""), "",
             f"- CPU: {hw['cpu_model']} ({hw['cpus_available']} CPUs available); torch threads per process: {THREADS}",
             "- rlhf-ray side: " + ", ".join(f"{k} {v}" for k, v in hw["versions"].items() if v),
             "- TRL side: " + ", ".join(f"{k} {v}" for k, v in result["trl_versions"].items()),
             f"- precision on both sides: {precision}",
             *([f"- rlhf-ray's config overridden: {' '.join(result['our_overrides'])}"]
               if result.get("our_overrides") else []),
             f"- background load: {loaded} process(es) spinning on a core each for the whole benchmark"
             if loaded else "- background load: none started by the benchmark",
             f"- {result['repeats']} runs of each side, alternating which goes first; {result['warmup']} warm-up and "
             f"{result['steps']} measured steps per run; the median over every measured step.", "",
             "| work | unit | TRL | rlhf-ray | rlhf-ray / TRL | TRL s / step | rlhf-ray s / step | work floor "
             "(s / step) | TRL's step over the floor |", "|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        floor = row.get("work_floor_s")
        bound = "- | -" if floor is None else f"{floor:.3g} | {row['trl_step_s'] / floor:.2f}x"
        lines.append(f"| {row['work']} | {row['unit']} | {row['trl']:.3g} | {row['ours']:.3g} | "
                     f"{row['ratio']:.2f}x | {row['trl_step_s']:.3g} | {row['our_step_s']:.3g} | {bound} |")
    for mode, detail in result["details"].items():
        first = {side: [run["first_step_after_launch_s"] for run in detail[side]["runs"]
                        if run.get("first_step_after_launch_s")] for side in ("trl", "ours")}
        if first["trl"] and first["ours"]:
            lines += ["", f"{mode} time to first step, launch to the end of the first optimizer step (median over "
                      f"runs): TRL {statistics.median(first['trl']):.1f} s (a new process: Python, torch and TRL "
                      f"imported, models loaded), rlhf-ray {statistics.median(first['ours']):.1f} s (from the call "
                      "of the job in a Python process that has rlhf-ray imported: Ray started, the role actors "
                      "created and loaded, the engine started)."]
        phases = [run.get("phases_median_s") or {} for run in detail["ours"]["runs"]]
        if phases and phases[0]:
            merged = {k: statistics.median(p[k] for p in phases if k in p) for k in phases[0]}
            lines += ["", f"rlhf-ray's {mode} step by phase (median s): "
                      + ", ".join(f"{k} {v:.2f}" for k, v in merged.items())]
    loads = [run.get("load_average_before") for d in result["details"].values() for side in d.values()
             for run in side["runs"] if run.get("load_average_before")]
    if loads:
        lines += ["", f"Load average (1 min) before each run: {min(x[0] for x in loads):.1f} to "
                      f"{max(x[0] for x in loads):.1f} on {hw['cpus_available']} CPUs"
                      + (f" (the {loaded} spinning process(es) included)." if loaded else ".")]
    lines += ["", "Work floor: the FLOPs of a step's batch with every row computed on its own (8 N a prompt or "
              "response token: training forward and backward plus the reference's forward; 2 N a decoded token) at "
              f"the GEMM rate measured in this run ({result['limits']['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s, "
              f"{result['limits']['matmul_dtype']}), N = the model's matmul parameters. TRL computes every row on "
              "its own, so its step is never shorter; TRL's step over the floor is what any implementation of that "
              "work could gain on it. rlhf-ray computes a prompt once for the rows that share it (a group's "
              "samples, a pair's two answers: `shared_prefix`, on for Llama-type models), less work than the "
              "floor counts, so its step can be below the floor."]
    lines += ["", "Ratios above 1 mean rlhf-ray is faster. Shapes (RLOO's are GRPO's too): "
              + json.dumps(result["shapes"]), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-gpt2", help="the model both sides train: a preset (tiny-gpt2, "
                        f"small-llama) or the real model ({REAL_MODEL})")
    parser.add_argument("--modes", default=None, help="which work to compare (default dpo,rloo,grpo; with the "
                        "real model dpo,grpo)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for vs_trl-<model>.json and .md")
    parser.add_argument("--trl-venv", default="/tmp/trl-venv", help="TRL's own virtual environment")
    parser.add_argument("--work", default=None, help="folder for the model, data and runs, kept (default: a "
                        "temporary one, its runs removed as they end and the rest at the end)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps per run")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating which goes first "
                        "(a busy machine then slows both alike); step times are pooled")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="both sides in fp32, or both in bf16 mixed precision (CPUs with BF16 instructions)")
    parser.add_argument("--background-load", type=int, default=0, metavar="N",
                        help="processes spinning on a core each for the whole benchmark (a shared machine)")
    parser.add_argument("--ours", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides of our side's config (e.g. placement.threads=reserved); named in the results")
    args = parser.parse_args()
    bf16 = args.precision == "bf16"
    modes_arg = args.modes or ("dpo,grpo" if args.model == REAL_MODEL else "dpo,rloo,grpo")
    python = ensure_trl_venv(Path(args.trl_venv))
    work = Path(args.work or tempfile.mkdtemp(prefix="rlhf-ray-vs-trl-"))
    paths = prepare(work, args.model)
    shapes = shapes_for(args.model)
    rows, trl_versions, details = [], {}, {}
    with background_load(args.background_load):
        limits = measure_limits(threads=THREADS, dtype=torch.bfloat16 if bf16 else torch.float32)
        for mode in modes_arg.split(","):
            shape = shapes[mode]
            per_step = 1 if mode == "dpo" else shape["batch_size"] * shape["samples_per_prompt"]
            unit = "steps / s" if mode == "dpo" else "samples / s"
            trainer = {"dpo": "DPOTrainer", "rloo": "RLOOTrainer", "grpo": "GRPOTrainer"}[mode]
            trl_runs, our_runs = [], []
            for repeat in range(args.repeats):
                sides = [lambda: trl_runs.append(run_trl(python, mode, shape, paths, work, args.warmup, args.steps,
                                                         f"trl-{mode}-{repeat}", bf16)),
                         lambda: our_runs.append(run_ours(mode, args.model, paths, work, args.warmup, args.steps,
                                                          limits, f"ours-{mode}-{repeat}", bf16, tuple(args.ours)))]
                for side in (sides if repeat % 2 == 0 else sides[::-1]):
                    side()
                if args.work is None:  # a temporary folder: each run's checkpoints are gigabytes on the real model
                    shutil.rmtree(work / "runs", ignore_errors=True)
                    shutil.rmtree(work / f"trl-{mode}-{repeat}", ignore_errors=True)
            trl_versions = trl_runs[0]["versions"]
            trl = {"step_median_s": statistics.median(s for r in trl_runs for s in r["step_seconds"]),
                   "runs": trl_runs}
            ours = {"step_median_s": statistics.median(s for r in our_runs for s in r["step_seconds"]),
                    "runs": our_runs}
            trl_rate, our_rate = per_step / trl["step_median_s"], per_step / ours["step_median_s"]
            floors = [r["work_floor_s"] for r in our_runs if r.get("work_floor_s")]
            rows.append({"work": f"{mode.upper()} ({trainer} vs ours)",
                         "unit": unit, "trl": trl_rate, "ours": our_rate, "ratio": our_rate / trl_rate,
                         "trl_step_s": trl["step_median_s"], "our_step_s": ours["step_median_s"],
                         "work_floor_s": statistics.median(floors) if floors else None})
            details[mode] = {"trl": trl, "ours": ours}
            print(f"{mode}: TRL {trl_rate:.3g} {unit}, rlhf-ray {our_rate:.3g} {unit} ({our_rate / trl_rate:.2f}x); "
                  f"work floor {rows[-1]['work_floor_s']} s / step", flush=True)
    result = {"model": args.model, "precision": args.precision, "background_load": args.background_load,
              "our_overrides": args.ours,
              "hardware": hardware_info(), "limits": limits, "trl_versions": trl_versions,
              "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats, "rows": rows, "details": details,
              "shapes": {m: shapes[m] for m in modes_arg.split(",")}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = (f"vs_trl-{args.model}" + ("-bf16" if bf16 else "")
            + (f"-load{args.background_load}" if args.background_load else "")
            + "".join(f"-{o.rsplit('.', 1)[-1].replace('=', '-')}" for o in args.ours))
    write_text_atomic(out / f"{stem}.json", json.dumps(result, indent=2, sort_keys=True) + "\n")
    write_text_atomic(out / f"{stem}.md", markdown(result))
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
