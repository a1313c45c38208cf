"""`rlhf-ray plan` and `rlhf-ray bench`: what plan prints for a 7B comparison and for a
tiny job config, its JSON with exact bytes, and one readable line for every bad input.
(The benchmarks themselves run end to end in tests/jobs/test_bench.py.)"""

from __future__ import annotations

import json

import pytest

from cli_helpers import run


def error_line(code, err) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code not in (0, None) and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("rlhf-ray")
    return lines[0]


def test_plan_compares_ppo_and_remax_at_7b_with_memory_fit_saving_and_cost(capsys):
    code, out, _ = run(["plan", "--compare", "ppo,remax", "--model", "llama-7b", "--gpus", "8", "--gpu-mem", "80",
                        "--samples", "45000", "--price-per-gpu-hour", "2.5"], capsys)
    assert code == 0
    for section in ("### ppo: 8 GPU(s) of 80.00 GiB", "### remax: 8 GPU(s) of 80.00 GiB", "| critic | llama-7b",
                    "saving vs ppo", "GPU-hours", "$", "Cost of 45,000 prompts at $2.50 per GPU-hour"):
        assert section in out, section
    remax = out[out.index("### remax"):out.index("summed over GPUs")]
    assert "| critic |" not in remax  # the registry says ReMax has no critic


def test_plan_json_has_exact_bytes_of_a_tiny_config(capsys):
    code, out, _ = run(["plan", "tiny-ppo", "reward.rule=", "reward.model.name_or_path=tiny-gpt2", "--json",
                        "--compare", "ppo,remax"], capsys)
    assert code == 0
    result = json.loads(out)
    policy = next(r for r in result["plans"]["ppo"]["roles"] if r["role"] == "policy")
    # tiny-gpt2: 560,640 fp32 parameters, whole on its one rank at ZeRO-0.
    assert policy["gpu_bytes"]["params"] == 4 * 560_640 and policy["num_params"] == 560_640
    assert [r["role"] for r in result["plans"]["remax"]["roles"]] == ["policy", "reference", "reward", "rollout"]
    assert result["comparison"]["baseline"] == "ppo" and result["costs"] == {}  # a CPU job: no GPU cost


def test_plan_needs_a_config_or_a_model(capsys):
    assert "--model" in error_line(*run(["plan"], capsys)[::2])


def test_plan_of_a_config_naming_a_hub_model_asks_for_its_shape(capsys):
    line = error_line(*run(["plan", "llama-7b-ppo-vllm"], capsys)[::2])
    assert "policy.model.name_or_path" in line and "--model" in line


def test_plan_rejects_an_unknown_algorithm_model_and_bad_sizes(capsys):
    assert "nope" in error_line(*run(["plan", "--model", "llama-7b", "--compare", "ppo,nope"], capsys)[::2])
    assert "llama-3b" in error_line(*run(["plan", "--model", "llama-3b"], capsys)[::2])
    assert "--gpus" in error_line(*run(["plan", "--model", "llama-7b", "--gpus", "0"], capsys)[::2])
    assert "--gpu-mem" in error_line(*run(["plan", "--model", "llama-7b", "--gpu-mem", "-1"], capsys)[::2])


def test_bench_rejects_bad_step_counts_and_offline_algorithms_before_running(tmp_path, capsys):
    line = error_line(*run(["bench", "throughput", "tiny-dpo", "--steps", "0", "--out", str(tmp_path)], capsys)[::2])
    assert "--steps" in line
    line = error_line(*run(["bench", "memory", "tiny-ppo", "--algos", "ppo,dpo", "--out", str(tmp_path)],
                           capsys)[::2])
    assert "dpo" in line
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_bench_throughput_writes_json_and_markdown(ray_cluster, tmp_path, capsys):
    code, out, err = run(["bench", "throughput", "tiny-dpo", "run.batch_size=4", "policy.micro_batch_size=4",
                          "policy.optim.warmup_steps=0", "policy.optim.scheduler=constant", "--warmup", "1",
                          "--steps", "1", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    assert out.splitlines()[0].startswith("tiny-dpo: step ") and "outside compute" in out
    result = json.loads((tmp_path / "throughput-tiny-dpo.json").read_text())
    assert result["kind"] == "throughput" and result["measured_steps"] == 1
    assert (tmp_path / "throughput-tiny-dpo.md").read_text().startswith("# Throughput: tiny-dpo")


def test_plan_costs_a_run_from_a_measured_throughput(tmp_path, capsys):
    measured = tmp_path / "throughput.json"
    measured.write_text(json.dumps({"kind": "throughput", "generate_tokens_per_s": 100.0,
                                    "model_forward_tokens_per_s": 1000.0, "model_train_tokens_per_s": 500.0}))
    code, out, _ = run(["plan", "tiny-ppo", "--throughput", str(measured), "--samples", "32", "--json"], capsys)
    assert code == 0
    cost = json.loads(out)["costs"]["ppo"]
    # tiny-ppo: 16 prompts x 1 sample, prompts 48 and responses 32 tokens (80 a row), 2 PPO epochs, rule reward.
    # generate 16*32 / 100 = 5.12 s, prefill 16*48 / 1000 = 0.768 s; scoring by policy, reference and
    # critic 3 * 16*80 / 1000 = 3.84 s; training policy and critic 2 * (2*16*80) / 500 = 10.24 s: 19.968 s.
    assert cost["step_total_s"] == pytest.approx(19.968)
    assert cost["steps"] == 2 and cost["run_seconds"] == pytest.approx(2 * 19.968)
    line = error_line(*run(["plan", "tiny-ppo", "--throughput", str(tmp_path / "missing.json")], capsys)[::2])
    assert "missing.json" in line
