"""The `rlhf-ray` command. Each subcommand parses, builds, and calls one function.

    rlhf-ray demo [--out DIR]                       the tiny end-to-end default
    rlhf-ray train CONFIG [key=value ...]           a job on a local or running cluster
    rlhf-ray presets | config show | config keys    what can be configured
    rlhf-ray data synth --out DIR                   the shipped synthetic task
    rlhf-ray eval --model PATH ...                  held-out evaluation, no Ray
    rlhf-ray submit | status | logs | stop | list   jobs on a Ray cluster (Jobs API)

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

from rlhf_ray.jobs import submit as jobs_api
from rlhf_ray.cli.errors import EXIT_USAGE, PROG, CLIError, report


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
    from rlhf_ray.jobs import run_job

    summary = run_job(cfg, address)
    print_summary(Path(cfg.run.output_dir).expanduser().resolve(), summary)
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
    from rlhf_ray.jobs.demo import run_demo

    report_path = run_demo(args.out)
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


def config_keys(cls=None, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """Every config key as (dotted key, type, default, help), sections expanded."""
    from rlhf_ray.config import JobConfig

    cls = cls or JobConfig
    hints = typing.get_type_hints(cls)
    rows = []
    for field in dataclasses.fields(cls):
        key = prefix + field.name
        if dataclasses.is_dataclass(hints[field.name]):
            rows += config_keys(hints[field.name], key + ".")
            continue
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        rows.append((key, _type_name(hints[field.name]), default, field.metadata.get("help", "")))
    return rows


def cmd_config_keys(args) -> int:
    rows = [r for r in config_keys() if not args.prefix or r[0] == args.prefix or r[0].startswith(args.prefix + ".")]
    if not rows:
        raise CLIError(f"no config key starts with {args.prefix!r}; sections: algorithm, policy, "
                                "reference, reward, critic, rollout, data, run, placement")
    for key, type_name, default, text in rows:
        print(f"{key} ({type_name}, default {default!r}): {text}")
    return 0


def cmd_data_synth(args) -> int:
    from rlhf_ray.data.synthetic import SyntheticConfig, write_synthetic

    paths = write_synthetic(args.out, SyntheticConfig(seed=args.seed, target=args.target,
                                                      sft_mention_fraction=args.sft_mention_fraction))
    for split, path in paths.items():
        with open(path, encoding="utf-8") as f:
            rows = sum(1 for _ in f)
        print(f"{split:<17} {rows:>5} rows  {path}")
    return 0


def cmd_eval(args) -> int:
    from rlhf_ray.jobs.eval_job import METRICS_FILE, SAMPLES_FILE, run_eval

    metrics = run_eval(args.model, baseline=args.baseline, reward_model=args.reward_model, prompts=args.prompts,
                       judge=args.judge, out_dir=args.out, max_new_tokens=args.max_new_tokens, limit=args.limit,
                       tokenizer=args.tokenizer, batch_size=args.batch_size, device=args.device)
    for key, value in metrics.items():
        if "/" in key:
            print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    out = Path(args.out)
    print(f"wrote {out / METRICS_FILE} and {out / SAMPLES_FILE}")
    return 0


# the parser ---------------------------------------------------------------------

def _command(subparsers, name: str, handler, help_text: str, debug_parent, *, overrides: bool = False,
             description: str | None = None) -> argparse.ArgumentParser:
    sub = subparsers.add_parser(name, help=help_text, description=description or help_text,
                                parents=[debug_parent])
    sub.set_defaults(func=handler, parser=sub, accepts_overrides=overrides)
    return sub


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
    parser = Parser(prog=PROG, description="Distributed RLHF on Ray: PPO, ReMax, GRPO, RLOO, REINFORCE++, SFT, "
                    "reward models and the DPO family, on a laptop CPU or a GPU cluster.")
    parser.add_argument("--debug", action="store_true", help="print the full traceback of a failure")
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="print the full traceback of a failure")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, help="what to do")

    sub = _command(commands, "demo", cmd_demo, "run the tiny end-to-end demo: data, SFT, reward model, PPO, "
                   "ReMax and DPO, then report.md", debug)
    sub.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")

    sub = _command(commands, "train", cmd_train, "run a training job (online or offline)", debug, overrides=True,
                   description="Run a training job on a local Ray cluster (bound to 127.0.0.1), or join a "
                               "running one with --address.")
    _add_config(sub, "e.g. tiny-ppo")
    sub.add_argument("--address", default=None, help="join the Ray cluster at this GCS address (HEAD:6379) or "
                     "ray://HEAD:10001 (default: $RAY_ADDRESS, else a new local cluster)")
    sub.add_argument("--out", default=None, help="the run directory (sets run.output_dir)")

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

    data = commands.add_parser("data", help="data utilities", description="Data utilities.", parents=[debug])
    data.set_defaults(parser=data)
    data_commands = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True,
                                        help="what to do")
    sub = _command(data_commands, "synth", cmd_data_synth, "write the synthetic 'mention the target' task "
                   "(one .jsonl per split)", debug)
    sub.add_argument("--out", required=True, help="folder to write the splits into")
    sub.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    sub.add_argument("--target", default="Penn", help="the word aligned responses mention (default: Penn)")
    sub.add_argument("--sft-mention-fraction", type=float, default=0.3,
                     help="share of SFT completions that mention the target (default: 0.3)")

    sub = _command(commands, "eval", cmd_eval, "evaluate a model on held-out prompts (single process, no Ray)",
                   debug)
    sub.add_argument("--model", required=True, help="the causal LM to evaluate: checkpoint folder, preset or hub name")
    sub.add_argument("--baseline", default=None, help="a second causal LM to compare with")
    sub.add_argument("--reward-model", default=None, help="a reward model: adds mean reward and, with --baseline, "
                     "the win rate")
    sub.add_argument("--prompts", default=None, help="prompt data: a file/folder with a prompt or messages "
                     "column, or synthetic:<split> (default: synthetic:prompts_eval)")
    sub.add_argument("--judge", default="rlhf_ray.data.synthetic:mentions_target",
                     help="module:function of fn(text) -> bool for alignment accuracy; '' for none "
                          "(default: the synthetic task's mentions_target)")
    sub.add_argument("--tokenizer", default=None, help="tokenizer for every model (default: each model's own)")
    sub.add_argument("--out", default="runs/eval", help="where metrics.json and samples.jsonl go (default: runs/eval)")
    sub.add_argument("--max-new-tokens", type=int, default=32, help="longest response (default: 32)")
    sub.add_argument("--limit", type=int, default=0, help="evaluate only the first N prompts (default: all)")
    sub.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (default: 16)")
    sub.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when visible)")

    sub = _command(commands, "submit", jobs_api.cmd_submit, "submit a training job to a Ray cluster", debug,
                   overrides=True, description="Submit a training job through the Ray Jobs API, with the resolved "
                   "config and this rlhf_ray package in its runtime environment; prints the job id.")
    _add_config(sub, "e.g. llama-7b-ppo-vllm")
    _add_address(sub)
    sub.add_argument("--wait", action="store_true", help="follow the job until it ends; exit non-zero unless it "
                     "succeeded (the log tail is printed on failure)")
    sub.add_argument("--no-package", action="store_true", help="do not ship the rlhf_ray package (the cluster "
                     "has it installed)")

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
    return parser


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
    args = parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - every failure becomes one line
        return report(err, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
