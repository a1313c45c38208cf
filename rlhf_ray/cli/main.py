"""The `rlhf-ray` command. Each subcommand parses, builds, and calls one function.

    rlhf-ray demo [--out DIR] [--model smollm2-135m] the tiny end-to-end default, or on the real model
    rlhf-ray train CONFIG [key=value ...]           a job on a local or running cluster
    rlhf-ray presets | config show | config keys    what can be configured
    rlhf-ray data synth --out DIR                   the shipped synthetic task
    rlhf-ray data synth --task arithmetic --out DIR the shipped arithmetic task (verifiable answers)
    rlhf-ray models import FILE.gguf OUT            a GGUF file as a Hugging Face model folder
    rlhf-ray eval --model PATH ...                  held-out evaluation, no Ray
    rlhf-ray submit | status | logs | stop | list   jobs on a Ray cluster (Jobs API)
    rlhf-ray bench throughput|memory|compare CONFIG benchmarks of real runs (JSON, Markdown, charts)
    rlhf-ray plan [CONFIG] [--model M] [--gpus N]   memory per role and GPU, fit and cost, before launch

Failures print one line (`rlhf-ray: error: ...`) and exit non-zero; `--debug`
adds the traceback (see `errors.py`). Heavy imports (torch, Ray) happen inside
the commands that need them, so `--help` and `presets` answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhf_ray.cli import submit as jobs_api
from rlhf_ray.cli.errors import EXIT_USAGE, PROG, CLIError, configure_logging, report
from rlhf_ray.runtime.auth import use_auth_token


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line that points at `--help`."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# commands -----------------------------------------------------------------------

def cmd_train(args) -> int:
    from rlhf_ray.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.out:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, output_dir=args.out))
    # Inside a Ray job (`rlhf-ray submit`), RAY_ADDRESS names the cluster to join.
    address = args.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        jobs_api.check_cluster_address(address)
        use_auth_token()  # before Ray is imported
    from rlhf_ray.jobs import run_job

    summary = run_job(cfg, address)
    print_summary(Path(cfg.run.output_dir).expanduser().resolve(), summary)
    return 0


def cmd_run(args) -> int:
    address = args.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        jobs_api.check_cluster_address(address)
        use_auth_token()  # before Ray is imported
    from rlhf_ray.pipeline.runner import load_pipeline, pipeline_table, run_pipeline

    pipeline = load_pipeline(args.pipeline, args.out)  # every job's config is checked before anything loads
    outcomes = run_pipeline(pipeline, address)
    print(f"\npipeline {args.pipeline} -> {pipeline.out}")
    print(pipeline_table(outcomes))
    failed = [name for name, o in outcomes.items() if o.status != "finished"]
    if failed:
        raise CLIError(f"{len(failed)} of {len(outcomes)} jobs did not finish: {', '.join(failed)} (see "
                       f"{pipeline.out / 'pipeline.json'} and <job>.error.txt there)")
    return 0


def key_figures(summary: dict) -> list[tuple[str, Any]]:
    """What `train` prints of a run's summary: its top-level scalars, the last
    evaluation metrics and losses, and the mean step time."""
    figures = [(k, v) for k, v in summary.items() if isinstance(v, (int, float, str, bool)) and v is not None]
    last = summary.get("last") or {}
    figures += [(k, v) for k, v in last.items()
                if isinstance(v, (int, float)) and (k.startswith("eval/") or k.endswith("loss"))]
    step_time = (summary.get("mean") or {}).get("time/step_s")
    if step_time is not None:
        figures.append(("mean time/step_s", step_time))
    return figures


def print_summary(run_dir: Path, summary: dict) -> None:
    print(f"run directory: {run_dir}")
    for key, value in key_figures(summary or {}):
        print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
    if (run_dir / "summary.json").is_file():
        print(f"full summary: {run_dir / 'summary.json'}")


def cmd_demo(args) -> int:
    from rlhf_ray.pipeline.demo import run_demo

    report_path = run_demo(args.out, scale=args.scale, model=args.model)
    print(f"demo report: {report_path}")
    return 0


def preset_description(path: Path) -> str:
    """The first comment line of a preset's YAML."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def cmd_presets(args) -> int:
    from rlhf_ray.config.loader import list_config_presets, resolve_config_path

    names = list_config_presets()
    width = max(map(len, names), default=0)
    for name in names:
        print(f"{name:<{width}}  {preset_description(resolve_config_path(name))}")
    return 0


def cmd_config_show(args) -> int:
    from rlhf_ray.config import dump_yaml, load_config

    print(dump_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def _type_name(tp) -> str:
    if isinstance(tp, type):
        return tp.__name__
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return f"{_type_name(args[0])} or empty"
    return str(tp).replace("typing.", "")


def config_keys(instance=None, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """Every config key as (dotted key, type, default, help), sections expanded.

    Defaults are read from a default-built config, so a section whose default
    differs from its class's (the reference model's empty path) shows its own."""
    from rlhf_ray.config import JobConfig

    instance = JobConfig() if instance is None else instance
    hints = typing.get_type_hints(type(instance))
    rows = []
    for field in dataclasses.fields(instance):
        key = prefix + field.name
        value = getattr(instance, field.name)
        if dataclasses.is_dataclass(hints[field.name]):
            rows += config_keys(value, key + ".")
            continue
        rows.append((key, _type_name(hints[field.name]), value, field.metadata.get("help", "")))
    return rows


def cmd_config_keys(args) -> int:
    rows = [r for r in config_keys() if not args.prefix or r[0] == args.prefix or r[0].startswith(args.prefix + ".")]
    if not rows:
        raise CLIError(f"no config key starts with {args.prefix!r}; sections: algorithm, policy, "
                                "reference, reward, critic, rollout, data, run, placement")
    expand = args.prefix.startswith("algorithm")  # the registry imports torch: only when asked for
    for key, type_name, default, text in rows:
        print(f"{key} ({type_name}, default {default!r}): {text}")
        for line in _registry_lines(key) if expand else ():
            print(line)
    return 0


def _registry_lines(key: str) -> list[str]:
    """What the registry adds below a key: the algorithm names, and each objective's parameters."""
    from rlhf_ray.algorithms.registry import OFFLINE_OBJECTIVES, ONLINE_ALGORITHMS

    if key == "algorithm.name":
        starts = [f"    {a.name} starts from: " + ", ".join(f"{k}={v}" for k, v in a.defaults.items())
                  for a in ONLINE_ALGORITHMS.values() if a.defaults]
        return [f"    online:  {', '.join(ONLINE_ALGORITHMS)}", f"    offline: {', '.join(OFFLINE_OBJECTIVES)}",
                *starts]
    if key != "algorithm.params":
        return []
    lines = []
    for objective in OFFLINE_OBJECTIVES.values():
        lines.append(f"    {objective.name}:" + ("" if objective.params else " (no parameters)"))
        lines += [f"      {line}" for line in objective.describe_params().splitlines() if objective.params]
    return lines


def cmd_data_synth(args) -> int:
    if args.task == "arithmetic":
        from rlhf_ray.data.arithmetic import ArithmeticConfig, write_arithmetic

        paths = write_arithmetic(args.out, ArithmeticConfig(seed=args.seed, digits=args.digits,
                                                            operations=tuple(args.operations)))
    else:
        from rlhf_ray.data.synthetic import SyntheticConfig, write_synthetic

        paths = write_synthetic(args.out, SyntheticConfig(seed=args.seed, target=args.target,
                                                          sft_mention_fraction=args.sft_mention_fraction))
    for split, path in paths.items():
        with open(path, encoding="utf-8") as f:
            rows = sum(1 for _ in f)
        print(f"{split:<17} {rows:>5} rows  {path}")
    return 0


def cmd_models_import(args) -> int:
    from rlhf_ray.models.sources import import_model

    out = import_model(args.file, args.out)
    print(f"wrote {out} (safetensors in float32, tokenizer, chat template); use it as model.name_or_path={out}")
    return 0


def cmd_eval(args) -> int:
    from rlhf_ray.evaluation.standalone import METRICS_FILE, SAMPLES_FILE, run_eval

    metrics = run_eval(args.model, baseline=args.baseline, reward_model=args.reward_model, prompts=args.prompts,
                       judge=args.judge, out_dir=args.out, max_new_tokens=args.max_new_tokens, limit=args.limit,
                       tokenizer=args.tokenizer, batch_size=args.batch_size, device=args.device)
    for key, value in metrics.items():
        if "/" in key:
            print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    out = Path(args.out)
    print(f"wrote {out / METRICS_FILE} and {out / SAMPLES_FILE}")
    return 0


def _algorithms(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise CLIError(f"--algos/--compare {text!r} names no algorithm; give a comma-separated list, e.g. ppo,remax")
    return names


def _bench_setup(args):
    from rlhf_ray.config import load_config

    cfg = load_config(args.config, args.overrides)
    address = args.address or os.environ.get("RAY_ADDRESS") or None
    return cfg, address, Path(args.config).stem


def _print_written(paths: dict) -> None:
    for path in paths.values():
        print(f"wrote {path}")


def cmd_bench_throughput(args) -> int:
    from rlhf_ray.reports.bench import run_throughput
    from rlhf_ray.reports.bench_markdown import write_result

    cfg, address, name = _bench_setup(args)
    result = run_throughput(cfg, args.out, warmup=args.warmup, steps=args.steps, address=address, label=name)
    b = result["breakdown_median"]
    print(f"{name}: step {result['step_median_s']:.3g} s (median of {result['measured_steps']}), "
          f"{result['samples_per_s']:.3g} samples/s, outside compute {100 * b['outside_compute_share']:.1f}% "
          f"of the step")
    _print_written(write_result(result, args.out, f"throughput-{name}"))
    return 0


def cmd_bench_memory(args) -> int:
    from rlhf_ray.reports.bench import run_memory
    from rlhf_ray.reports.bench_markdown import write_result

    cfg, address, name = _bench_setup(args)
    result = run_memory(cfg, _algorithms(args.algos), args.out, address=address)
    for algo, run in result["runs"].items():
        saving = run["saving_percent"].get("held", 0.0)
        print(f"{algo}: {run['totals']['held'] / 2**20:.2f} MiB held over its roles "
              f"({saving:.1f}% less than {result['baseline']})")
    _print_written(write_result(result, args.out, f"memory-{name}"))
    return 0


def cmd_bench_compare(args) -> int:
    from rlhf_ray.reports.bench import run_step_time_comparison
    from rlhf_ray.reports.bench_markdown import write_result

    cfg, address, name = _bench_setup(args)
    result = run_step_time_comparison(cfg, _algorithms(args.algos), args.out, warmup=args.warmup, steps=args.steps,
                                      address=address)
    for key in ("equal_batch", "equal_memory"):
        speedups = ", ".join(f"{a} {x:.2f}x" for a, x in result[key]["speedup_over_baseline"].items())
        print(f"{key.replace('_', ' ')}: samples/s over {result['baseline']}: {speedups}")
    _print_written(write_result(result, args.out, f"step-time-{name}"))
    return 0


DEFAULT_PLAN_CONFIG = "llama-7b-ppo-vllm"


def cmd_plan(args) -> int:
    from rlhf_ray.config import load_config
    from rlhf_ray.planner.plan_command import plan_command, plan_markdown, strip_markdown, throughput_from_bench

    config, overrides = args.config, list(args.overrides)
    if config and "=" in config:  # `plan key=value ...` without a config
        config, overrides = None, [config, *overrides]
    if config is None and not args.model:
        raise CLIError("plan needs a CONFIG or --model (a preset such as llama-7b, or a config.json)")
    cfg = load_config(config or DEFAULT_PLAN_CONFIG, overrides)
    algorithms = _algorithms(args.compare) if args.compare else None
    throughput = throughput_from_bench(args.throughput) if args.throughput else None
    result = plan_command(cfg, algorithms=algorithms, model=args.model, gpus=args.gpus, gpu_mem_gib=args.gpu_mem,
                      gpu_type=args.gpu_type, price_per_gpu_hour=args.price_per_gpu_hour, num_prompts=args.samples,
                      throughput=throughput)
    if args.json:
        import json

        print(json.dumps(strip_markdown(result), indent=2, sort_keys=True))
    else:
        if config is None:
            print(f"Layout and sizes of the shipped {DEFAULT_PLAN_CONFIG} preset, models from --model.\n")
        print(plan_markdown(result), end="")
    return 0


# the parser ---------------------------------------------------------------------

def _command(subparsers, name: str, handler, help_text: str, debug_parent, *, overrides: bool = False,
             description: str | None = None) -> argparse.ArgumentParser:
    sub = subparsers.add_parser(name, help=help_text, description=description or help_text,
                                parents=[debug_parent])
    sub.set_defaults(func=handler, parser=sub, accepts_overrides=overrides)
    return sub


def _group(commands, name: str, help_text: str, debug):
    """A command with subcommands of its own (`rlhf-ray data ...`); returns their subparsers."""
    group = commands.add_parser(name, help=help_text, description=help_text.capitalize() + ".", parents=[debug])
    group.set_defaults(parser=group)
    return group.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True, help="what to do")


def _add_config(sub, what: str) -> None:
    sub.add_argument("config", metavar="CONFIG", help=f"a YAML path, or the name of a shipped preset ({what}; "
                     f"`{PROG} presets` lists them)")
    sub.add_argument("overrides", metavar="key=value", nargs="*", default=[],
                     help="dotted overrides, type-checked against the config (e.g. algorithm.kl_coef=0.05); "
                          f"`{PROG} config keys` lists every key")


def _add_address(sub) -> None:
    sub.add_argument("--address", default=None,
                     help="the head node's dashboard, http://HEAD:8265 (default: $RAY_ADDRESS)")


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Distributed RLHF on Ray: PPO, ReMax, GRPO, Dr. GRPO, DAPO, GSPO, RLOO, "
                    "REINFORCE++, SFT, reward models and the DPO family, on a laptop CPU or a GPU cluster.")
    parser.add_argument("--debug", action="store_true", help="print the full traceback of a failure")
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="print the full traceback of a failure")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, help="what to do")

    sub = _command(commands, "demo", cmd_demo, "run the tiny end-to-end demo: data, SFT, reward model, PPO, "
                   "ReMax and DPO, then report.md", debug)
    sub.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    sub.add_argument("--scale", type=float, default=1.0,
                     help="multiply every stage's step count (e.g. 0.2 for a quick look; default 1)")
    sub.add_argument("--model", default="tiny", choices=("tiny", "smollm2-135m"),
                     help="tiny (default: the synthetic task on a tiny model, minutes) or smollm2-135m "
                          "(SmolLM2-135M-Instruct on the arithmetic task: the same report on a real model)")

    sub = _command(commands, "train", cmd_train, "run a training job (online or offline)", debug, overrides=True,
                   description="Run a training job on a local Ray cluster (bound to 127.0.0.1), or join a "
                               "running one with --address.")
    _add_config(sub, "e.g. tiny-ppo")
    sub.add_argument("--address", default=None, help="join the Ray cluster at this GCS address (HEAD:6379) or "
                     "ray://HEAD:10001 (default: $RAY_ADDRESS, else a new local cluster)")
    sub.add_argument("--out", default=None, help="the run directory (sets run.output_dir)")

    sub = _command(commands, "run", cmd_run, "run a pipeline: several jobs on one Ray cluster, each as soon as the "
                   "jobs it comes after have finished", debug,
                   description="Run a pipeline file (jobs: {name: {config, overrides, after}}): jobs whose "
                               "dependencies are done run at the same time on one Ray cluster, sharing frozen "
                               "roles of equal weights.")
    sub.add_argument("pipeline", metavar="PIPELINE", help="the pipeline YAML file")
    sub.add_argument("--out", default=None, help="folder of the jobs' run directories (default: runs/<file name>)")
    sub.add_argument("--address", default=None, help="join the Ray cluster at this GCS address (HEAD:6379) or "
                     "ray://HEAD:10001 (default: $RAY_ADDRESS, else a new local cluster)")

    _command(commands, "presets", cmd_presets, "list the shipped job presets", debug)

    config = commands.add_parser("config", help="show a resolved config or every config key",
                                 description="Inspect configurations.", parents=[debug])
    config.set_defaults(parser=config)
    config_commands = config.add_subparsers(dest="config_command", metavar="COMMAND", required=True,
                                            help="what to show")
    sub = _command(config_commands, "show", cmd_config_show, "print a config with its overrides applied, as YAML",
                   debug, overrides=True)
    _add_config(sub, "e.g. tiny-dpo")
    sub = _command(config_commands, "keys", cmd_config_keys, "list every config key with its type, default and "
                   "meaning", debug)
    sub.add_argument("prefix", nargs="?", default="", help="only keys under this section or key (e.g. algorithm)")

    data_commands = _group(commands, "data", "data utilities", debug)
    sub = _command(data_commands, "synth", cmd_data_synth, "write a shipped task (one .jsonl per split): the "
                   "synthetic 'mention the target' task or arithmetic questions with a verifiable answer", debug)
    sub.add_argument("--task", choices=("synthetic", "arithmetic"), default="synthetic",
                     help="which task (default: synthetic)")
    sub.add_argument("--out", required=True, help="folder to write the splits into")
    sub.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    sub.add_argument("--target", default="Penn", help="synthetic: the word aligned responses mention (default: Penn)")
    sub.add_argument("--sft-mention-fraction", type=float, default=0.3,
                     help="synthetic: share of SFT completions that mention the target (default: 0.3)")
    sub.add_argument("--digits", type=int, default=2, help="arithmetic: digits of each operand (default: 2)")
    sub.add_argument("--operations", nargs="+", default=["+"], choices=("+", "-", "*"),
                     help="arithmetic: operations asked about (default: +)")

    model_commands = _group(commands, "models", "model utilities", debug)
    sub = _command(model_commands, "import", cmd_models_import, "convert a GGUF file (or a shipped model such as "
                   "smollm2-135m) into a Hugging Face model folder", debug)
    sub.add_argument("file", help="a .gguf file, or the name of a shipped model (smollm2-135m)")
    sub.add_argument("out", help="the folder to write (it must not exist, or be empty)")

    sub = _command(commands, "eval", cmd_eval, "evaluate a model on held-out prompts (single process, no Ray)",
                   debug)
    sub.add_argument("--model", required=True, help="the causal LM to evaluate: checkpoint folder, preset, .gguf file, "
                     "shipped model (smollm2-135m) or hub name")
    sub.add_argument("--baseline", default=None, help="a second causal LM to compare with")
    sub.add_argument("--reward-model", default=None, help="a reward model: adds mean reward and, with --baseline, "
                     "the win rate")
    sub.add_argument("--prompts", default=None, help="prompt data: a file/folder with a prompt or messages "
                     "column, or a shipped task's <task>:<split>, e.g. arithmetic:prompts_eval "
                     "(default: synthetic:prompts_eval)")
    sub.add_argument("--judge", default="auto",
                     help="module:function of fn(prompt, response) -> bool for alignment accuracy; '' for none "
                          "(default: auto, the judge of the shipped task the prompts come from)")
    sub.add_argument("--tokenizer", default=None, help="tokenizer for every model (default: each model's own)")
    sub.add_argument("--out", default="runs/eval", help="where metrics.json and samples.jsonl go (default: runs/eval)")
    sub.add_argument("--max-new-tokens", type=int, default=32, help="longest response (default: 32)")
    sub.add_argument("--limit", type=int, default=0, help="evaluate only the first N prompts (default: all)")
    sub.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (default: 16)")
    sub.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when visible)")

    sub = _command(commands, "submit", jobs_api.cmd_submit, "submit a training job or a pipeline to a Ray cluster",
                   debug, overrides=True, description="Submit a training job (or a pipeline file, run as one job) "
                   "through the Ray Jobs API, with the resolved config and this rlhf_ray package in its runtime "
                   "environment; prints the job id.")
    _add_config(sub, "e.g. llama-7b-ppo-vllm")
    _add_address(sub)
    sub.add_argument("--wait", action="store_true", help="stream the job's output until it ends (reconnecting "
                     "after a dropped connection) and exit with its driver's exit status")
    sub.add_argument("--submission-id", default=None, help="the job's id; submitting again with an id that exists "
                     "starts nothing new (safe to retry)")
    sub.add_argument("--entrypoint-num-cpus", type=float, default=None, help="CPUs the job's driver reserves")
    sub.add_argument("--entrypoint-num-gpus", type=float, default=None, help="GPUs the job's driver reserves")
    sub.add_argument("--entrypoint-memory", type=int, default=None, help="bytes of memory the job's driver reserves")
    sub.add_argument("--no-package", action="store_true", help="do not ship the rlhf_ray package (the cluster "
                     "has it installed)")
    sub.add_argument("--out", default=None, help="for a pipeline file: the folder of its jobs' run directories "
                     "on the cluster (default: runs/<file name>)")

    for name, handler, text in (("status", jobs_api.cmd_status, "show a job's status"),
                                ("logs", jobs_api.cmd_logs, "print a job's logs"),
                                ("stop", jobs_api.cmd_stop, "stop a job")):
        sub = _command(commands, name, handler, text, debug)
        sub.add_argument("job_id", metavar="ID", help="the job id printed by submit")
        _add_address(sub)
        if name == "logs":
            sub.add_argument("--follow", action="store_true", help="keep streaming until the job ends")
        if name == "stop":
            sub.add_argument("--wait", action="store_true", help="wait until the job has stopped")
    sub = _command(commands, "list", jobs_api.cmd_list, "list the cluster's jobs", debug)
    _add_address(sub)
    _add_bench(commands, debug)
    _add_plan(commands, debug)
    return parser


def _add_bench(commands, debug) -> None:
    bench = commands.add_parser("bench", help="benchmark real runs: throughput per phase, memory per role, "
                                "ReMax against PPO", description="Benchmarks of real runs on a local Ray cluster "
                                "(or --address); results as JSON, Markdown and charts in --out.", parents=[debug])
    bench.set_defaults(parser=bench)
    bench_commands = bench.add_subparsers(dest="bench_command", metavar="COMMAND", required=True,
                                          help="which benchmark")

    def common(sub, what: str, timed: bool) -> None:
        _add_config(sub, what)
        sub.add_argument("--out", default="runs/bench", help="folder for the results and the runs (default: "
                         "runs/bench)")
        sub.add_argument("--address", default=None, help="join the Ray cluster at this address (default: "
                         "$RAY_ADDRESS, else a new local cluster)")
        if timed:
            sub.add_argument("--warmup", type=int, default=2, help="steps run first and not measured (default: 2)")
            sub.add_argument("--steps", type=int, default=5, help="measured steps (default: 5)")

    sub = _command(bench_commands, "throughput", cmd_bench_throughput, "median time per phase, tokens/s, "
                   "samples/s, the share outside compute, MFU and the decoding bound", debug, overrides=True)
    common(sub, "online or offline, e.g. tiny-ppo", timed=True)
    sub = _command(bench_commands, "memory", cmd_bench_memory, "each role's measured memory under several "
                   "algorithms at the same sizes, with the saving and a chart", debug, overrides=True)
    sub.add_argument("--algos", default="ppo,remax", help="online algorithms, the first is the baseline "
                     "(default: ppo,remax)")
    common(sub, "an online config, e.g. tiny-ppo", timed=False)
    sub = _command(bench_commands, "compare", cmd_bench_compare, "step time of several algorithms at equal batch "
                   "and at the largest batch each fits in the same memory", debug, overrides=True)
    sub.add_argument("--algos", default="ppo,remax", help="online algorithms, the first is the baseline "
                     "(default: ppo,remax)")
    common(sub, "an online config, e.g. tiny-ppo", timed=True)


def _add_plan(commands, debug) -> None:
    from rlhf_ray.planner.cost import GPU_PEAK_FLOPS

    sub = _command(commands, "plan", cmd_plan, "memory per role and per GPU, whether it fits, and the cost of a "
                   "run, before launching it", debug, overrides=True,
                   description="Plan a job without running it: parameters, gradients, optimizer state, "
                   "activations, vLLM weights and KV cache per role and per GPU, whether each GPU fits, the saving "
                   f"of each --compare algorithm over the first, and the cost. Without CONFIG, the layout and "
                   f"sizes of the shipped {DEFAULT_PLAN_CONFIG} preset with --model's shapes.")
    sub.add_argument("config", metavar="CONFIG", nargs="?", default=None,
                     help=f"a job YAML or shipped preset (default: {DEFAULT_PLAN_CONFIG}, with --model)")
    sub.add_argument("overrides", metavar="key=value", nargs="*", default=[],
                     help="dotted overrides of the config (e.g. rollout.gpu_memory_utilization=0.3)")
    sub.add_argument("--model", default=None, help="every role's model shape: a shipped preset (llama-7b, "
                     "llama-13b, llama-70b, gpt2, ...) or an HF config.json / model folder")
    sub.add_argument("--gpus", type=int, default=None, help="put every role on the same N GPUs (default: the "
                     "config's placement)")
    sub.add_argument("--gpu-mem", type=float, default=80.0, help="memory of one GPU in GiB (default: 80)")
    sub.add_argument("--gpu-type", default="a100", choices=sorted(GPU_PEAK_FLOPS),
                     help="GPU whose bf16 peak FLOP/s sets the assumed step time (default: a100)")
    sub.add_argument("--compare", default=None, help="online algorithms to plan side by side, the first is the "
                     "baseline (e.g. ppo,remax)")
    sub.add_argument("--price-per-gpu-hour", type=float, default=2.0, help="dollars per GPU-hour (default: 2.0)")
    sub.add_argument("--samples", type=int, default=None, help="prompts in the run, for its cost (default: "
                     "run.total_steps x run.batch_size)")
    sub.add_argument("--throughput", default=None, help="a `bench throughput` JSON: use its measured tokens/s "
                     "instead of FLOPs at an assumed MFU")
    sub.add_argument("--json", action="store_true", help="print the plan as JSON (exact bytes) instead of tables")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse, letting overrides follow options (`train tiny-ppo --out d a.b=1`)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "accepts_overrides", False) and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            getattr(args, "parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line `argv` (default: `sys.argv[1:]`); returns the exit code."""
    configure_logging()
    args = parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - every failure becomes one line
        return report(err, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
