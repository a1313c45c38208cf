"""The `rlhf-ray` command: bad input gives one readable line and a non-zero exit;
the listing, config, data and eval commands do what they print; help everywhere.

Commands run in-process through `main([...])`; one smoke test runs the
installed console script.
"""

import argparse
import json
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from rlhf_ray.cli import main as cli
from rlhf_ray.cli.errors import EXIT_INTERRUPTED, CLIError, describe, report
from rlhf_ray.config import JobConfig, load_config
from rlhf_ray.data.synthetic import SPLITS, SyntheticConfig, build_synthetic

from cli_helpers import run

REQUIRED_PRESETS = ("tiny-ppo", "tiny-remax", "tiny-grpo", "tiny-dr-grpo", "tiny-dapo", "tiny-gspo", "tiny-rloo",
                    "tiny-reinforce-pp", "tiny-sft", "tiny-rm", "tiny-dpo", "small-sft", "small-dpo", "small-ppo",
                    "small-remax", "small-grpo",
                    "llama-7b-ppo-vllm", "llama-7b-remax-vllm")



def one_error_line(code, err) -> str:
    """The single stderr line of a failed command (and checks that it is single)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code not in (0, None), err
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    assert lines[0].startswith("rlhf-ray")
    return lines[0]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# bad input ----------------------------------------------------------------------

def test_missing_config_file(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    line = one_error_line(*run(["train", str(missing)], capsys)[::2])
    assert str(missing) in line and "does not exist" in line


def test_unknown_preset_suggests_the_nearest(capsys):
    line = one_error_line(*run(["train", "tiny-dpoo"], capsys)[::2])
    assert "Did you mean 'tiny-dpo'" in line


def test_yaml_syntax_error_names_the_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("algorithm:\n  name: dpo\n beta: [\n")
    line = one_error_line(*run(["config", "show", str(bad)], capsys)[::2])
    assert str(bad) in line and "YAML syntax error at line 3" in line


def test_unknown_key_suggests_the_nearest(capsys):
    line = one_error_line(*run(["train", "tiny-sft", "algorithm.kl_coeff=0.1"], capsys)[::2])
    assert "unknown key 'algorithm.kl_coeff'" in line and "did you mean 'algorithm.kl_coef'" in line


def test_wrong_type_names_the_key(capsys):
    line = one_error_line(*run(["train", "tiny-sft", "policy.num_ranks=two"], capsys)[::2])
    assert "policy.num_ranks expects an integer, got 'two'" in line


def test_unknown_algorithm_is_one_line(capsys):
    line = one_error_line(*run(["train", "tiny-sft", "algorithm.name=ppoo"], capsys)[::2])
    assert "ppoo" in line and "ppo" in line.replace("ppoo", "")


def test_unreachable_jobs_address_names_it(capsys):
    url = f"http://127.0.0.1:{closed_port()}"
    for argv in (["status", "raysubmit_x", "--address", url], ["submit", "tiny-sft", "--address", url]):
        line = one_error_line(*run(argv, capsys)[::2])
        assert f"cannot reach the Ray Jobs API at {url}" in line and "dashboard port" in line


def test_address_comes_from_ray_address_env(monkeypatch, capsys):
    url = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("RAY_ADDRESS", url)
    assert url in one_error_line(*run(["list"], capsys)[::2])
    monkeypatch.delenv("RAY_ADDRESS")
    assert "no Ray cluster address" in one_error_line(*run(["list"], capsys)[::2])


def test_unreachable_train_address_names_it(capsys):
    address = f"127.0.0.1:{closed_port()}"
    line = one_error_line(*run(["train", "tiny-sft", "--address", address], capsys)[::2])
    assert f"cannot reach the Ray cluster at {address}" in line
    line = one_error_line(*run(["train", "tiny-sft", "--address", f"http://{address}"], capsys)[::2])
    assert "rlhf-ray submit" in line  # a dashboard URL is pointed at submit


def test_usage_errors_are_one_line(capsys):
    code, _, err = run(["train"], capsys)
    assert code == 2 and "CONFIG" in one_error_line(code, err)
    code, _, err = run(["presets", "--bogus"], capsys)
    assert code == 2 and "--bogus" in one_error_line(code, err)


def test_debug_prints_the_traceback_then_the_line(tmp_path, capsys):
    missing = str(tmp_path / "nope.yaml")
    for argv in (["--debug", "config", "show", missing], ["config", "show", missing, "--debug"]):
        code, _, err = run(argv, capsys)
        assert code == 1 and "Traceback" in err and "ConfigError" in err
        assert err.strip().splitlines()[-1].startswith("rlhf-ray: error: config file")


def test_interrupt_exits_130(capsys):
    assert report(KeyboardInterrupt(), debug=False) == EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err == "rlhf-ray: interrupted\n"


def test_describe_unwraps_ray_errors_and_flags_bugs():
    class WrappedTaskError(Exception):  # the shape of ray.exceptions.RayTaskError: the cause rides along
        def __init__(self, cause):
            super().__init__("Traceback (most recent call last):\n  ...\nDataError: rows.jsonl, row 3: empty")
            self.cause = cause

    from rlhf_ray.data.formats import DataError

    assert describe(WrappedTaskError(DataError("rows.jsonl, row 3: 'prompt' is empty"))) == \
        "rows.jsonl, row 3: 'prompt' is empty"
    assert describe(CLIError("two\n  lines")) == "two lines"
    assert describe(FileNotFoundError(2, "No such file or directory", "/x/y")) == "No such file or directory: /x/y"
    bug = describe(TypeError("unsupported operand\nmore detail"))
    assert bug == "TypeError: unsupported operand (run with --debug for the full traceback)"


# listing and config -------------------------------------------------------------

def test_presets_lists_every_shipped_job_with_its_description(capsys):
    code, out, _ = run(["presets"], capsys)
    assert code == 0
    rows = dict(line.split(None, 1) for line in out.splitlines())
    for name in REQUIRED_PRESETS:
        assert name in rows and rows[name].strip()
    assert "vLLM" in rows["llama-7b-ppo-vllm"] and "SFT" in rows["tiny-sft"]
    assert all("small-llama" in rows[f"small-{algo}"] for algo in ("sft", "dpo", "ppo", "remax", "grpo"))


def test_config_show_applies_overrides(tmp_path, capsys):
    code, out, _ = run(["config", "show", "tiny-ppo", "algorithm.kl_coef=0.07", "run.sinks=jsonl,tensorboard"], capsys)
    assert code == 0
    shown = yaml.safe_load(out)
    assert shown["algorithm"]["kl_coef"] == 0.07 and shown["run"]["sinks"] == ["jsonl", "tensorboard"]
    assert shown["algorithm"]["name"] == "ppo"
    (tmp_path / "shown.yaml").write_text(out)
    assert load_config(str(tmp_path / "shown.yaml")) == load_config("tiny-ppo", ["algorithm.kl_coef=0.07",
                                                                                 "run.sinks=jsonl,tensorboard"])


def test_overrides_may_follow_options():
    args = cli.parse_args(["train", "tiny-sft", "run.seed=1", "--out", "/tmp/r", "run.total_steps=3"])
    assert args.config == "tiny-sft" and args.out == "/tmp/r"
    assert args.overrides == ["run.seed=1", "run.total_steps=3"]


def test_config_keys_lists_every_key_with_type_and_help(capsys):
    code, out, _ = run(["config", "keys"], capsys)
    assert code == 0
    lines = [line for line in out.splitlines() if not line.startswith(" ")]
    assert len(lines) == len(cli.config_keys())
    assert "algorithm.kl_coef (float, default 0.05): KL penalty coefficient" in out
    assert "algorithm.params (dict, default {})" in out
    assert "policy.optim.betas (tuple[float, float], default (0.9, 0.95))" in out
    assert all(line.split("): ", 1)[1].strip() for line in lines)  # every key has help text
    code, out, _ = run(["config", "keys", "algorithm"], capsys)
    assert "    offline: sft, kl_sft, rm, dpo" in out  # algorithm.name lists the registry's names
    assert "    dapo starts from: clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=0.0" in out  # and their own defaults
    assert "      lam (default 50.0, >= 0): weight of the penalty" in out  # each objective's parameters
    code, out, _ = run(["config", "keys", "rollout"], capsys)
    assert code == 0 and out and all(line.startswith("rollout.") for line in out.splitlines())
    assert "no config key starts with 'rollot'" in one_error_line(*run(["config", "keys", "rollot"], capsys)[::2])


def test_every_config_key_is_settable_as_listed():
    # each listed key, set to its own default, is accepted by the loader
    keys = cli.config_keys()
    assert {k.split(".")[0] for k, *_ in keys} == {f.name for f in JobConfig.__dataclass_fields__.values()}
    for key, _, default, _ in keys:
        value = json.dumps(list(default) if isinstance(default, tuple) else default)
        assert load_config(None, [f"{key}={value}"]) == load_config(None)


# data, eval ---------------------------------------------------------------------

def test_data_synth_writes_every_split(tmp_path, capsys):
    code, out, _ = run(["data", "synth", "--out", str(tmp_path), "--seed", "3", "--target", "Quaker",
                        "--sft-mention-fraction", "0.5"], capsys)
    assert code == 0
    expected = build_synthetic(SyntheticConfig(seed=3, target="Quaker", sft_mention_fraction=0.5))
    for split in SPLITS:
        path = tmp_path / f"{split}.jsonl"
        assert str(path) in out
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert rows == expected[split]
    sft = expected["sft"]
    assert sum("Quaker" in r["completion"] for r in sft) == round(0.5 * len(sft))


def test_data_synth_rejects_a_bad_fraction(tmp_path, capsys):
    line = one_error_line(*run(["data", "synth", "--out", str(tmp_path), "--sft-mention-fraction", "2"], capsys)[::2])
    assert "sft_mention_fraction" in line


def test_eval_command_writes_metrics_and_samples(tmp_path, capsys):
    import torch

    from rlhf_ray.models.loading import load_causal_lm, load_tokenizer_for

    model = tmp_path / "model"
    load_causal_lm("tiny-gpt2").save_pretrained(model)
    load_tokenizer_for("tiny-gpt2").save_pretrained(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, out, _ = run(["eval", "--model", str(model), "--limit", "2", "--max-new-tokens", "3",
                            "--out", str(tmp_path / "eval")], capsys)
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["eval/num_prompts"] == 2 and "eval/num_prompts: 2" in out
    assert f"eval/alignment_accuracy: {metrics['eval/alignment_accuracy']:.4g}" in out
    assert len((tmp_path / "eval" / "samples.jsonl").read_text().splitlines()) == 2


def test_train_prints_the_key_figures(tmp_path, capsys):
    summary = {"algorithm": "sft", "num_steps": 2, "last_step": 2,
               "last": {"train/loss": 6.9578, "eval/alignment_accuracy": 0.25, "memory/policy/peak_bytes": 7},
               "mean": {"time/step_s": 0.0435}, "max": {"memory/policy/peak_bytes": 7}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    cli.print_summary(tmp_path, summary)
    out = capsys.readouterr().out.splitlines()
    assert out == [f"run directory: {tmp_path}", "  algorithm: sft", "  num_steps: 2", "  last_step: 2",
                   "  train/loss: 6.958", "  eval/alignment_accuracy: 0.25", "  mean time/step_s: 0.0435",
                   f"full summary: {tmp_path / 'summary.json'}"]


# help ---------------------------------------------------------------------------

def all_parsers(parser, prefix=()):
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from all_parsers(sub, prefix + (name,))


def test_help_works_for_every_command_and_every_option_has_help(capsys):
    parsers = list(all_parsers(cli.build_parser()))
    names = {" ".join(prefix) for prefix, _ in parsers}
    assert {"train", "demo", "presets", "config show", "config keys", "data synth", "eval", "submit", "status",
            "logs", "stop", "list"} <= names
    for prefix, parser in parsers:
        code, out, _ = run([*prefix, "--help"], capsys)
        assert code == 0 and out.startswith("usage: rlhf-ray"), prefix
        for action in parser._actions:
            assert action.help, f"rlhf-ray {' '.join(prefix)}: {action.dest} has no help text"


def test_listing_commands_load_neither_ray_nor_torch():
    code = ("import sys; from rlhf_ray.cli.main import main; main(['presets']); main(['config', 'keys']); "
            "print(sorted(m for m in ('ray', 'torch', 'deepspeed') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0 and result.stdout.splitlines()[-1] == "[]", result.stderr


def test_console_script_smoke(tmp_path):
    script = Path(sys.executable).parent / "rlhf-ray"
    ok = subprocess.run([str(script), "config", "show", "tiny-remax", "algorithm.kl_coef=0.01"],
                        capture_output=True, text=True, timeout=300, check=False)
    assert ok.returncode == 0 and yaml.safe_load(ok.stdout)["algorithm"]["kl_coef"] == 0.01
    bad = subprocess.run([str(script), "train", str(tmp_path / "missing.yaml")], capture_output=True, text=True,
                         timeout=300, check=False)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]
    assert bad.stderr.startswith("rlhf-ray: error: config file")


def test_an_error_a_role_raises_reaches_the_user_in_one_line_naming_the_role_and_the_rule(tmp_path):
    """End to end: `rlhf-ray train` whose reward rule raises. The driver runs in its own process (with its own
    local Ray cluster), so that the role's actor imports the rule from the folder on PYTHONPATH."""
    import os
    import re

    import rlhf_ray

    (tmp_path / "failing_rule.py").write_text(
        "def unavailable(prompts, responses):\n    raise ValueError('reward service unavailable')\n")
    repo = Path(rlhf_ray.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), str(tmp_path)]), "RAY_USAGE_STATS_ENABLED": "0"}
    argv = ["train", "tiny-grpo", "reward.rule=failing_rule:unavailable", "rollout.engine=hf", "run.total_steps=1",
            f"run.output_dir={tmp_path / 'run'}", "run.progress=false", "run.eval_every=0", "data.eval="]
    code = "import sys; from rlhf_ray.cli.main import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=900,
                            check=False, env=env, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert re.fullmatch(r"rlhf-ray: error: role 'reward' rank 0 of 1 failed in RewardWorker\.score \(reward\.rule "
                        r"failing_rule:unavailable on \d+ responses\): ValueError: reward service unavailable "
                        r"\(run with --debug for the remote traceback\)", result.stderr.strip().splitlines()[-1]), \
        result.stderr
