"""LoRA end to end on the tiny presets: the adapter-off base as the reference (no reference group),
ZeRO stages with only the adapters trained, exact resume, the merged export, weight sync to the vLLM
engine merged and as an adapter, and the settings refused before any model loads."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlhf_ray.config import ConfigError
from rlhf_ray.jobs import run_job
from rlhf_ray.telemetry.metrics import read_metrics

from job_helpers import assert_same_run, final_weights, stopped_before, tiny_config

LORA = ["policy.lora.rank=8", "policy.lora.alpha=16"]
OFFLINE = ["run.batch_size=8", "policy.micro_batch_size=4", "policy.optim.warmup_steps=0",
           "policy.optim.scheduler=constant", "policy.optim.lr=1e-3", "policy.num_cpus_per_rank=1",
           "placement.colocate=[]"]
ONLINE = ["run.batch_size=4", "rollout.max_new_tokens=8", "algorithm.num_minibatches=1"]


def test_lora_dpo_learns_with_no_reference_group_and_a_small_optimizer(ray_cluster, tmp_path):
    summary = run_job(tiny_config("tiny-dpo", tmp_path / "lora", "run.total_steps=6",
                                  "data.eval=synthetic:preference_eval", "run.eval_size=32", *OFFLINE, *LORA))
    assert summary["roles"] == ["policy"]  # the policy's base, adapter off, scored the reference log-probs
    rows = read_metrics(tmp_path / "lora")
    assert rows[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-4)  # adapter starts at zero: policy == base
    assert rows[-1]["eval/rewards/margins"] > rows[0]["eval/rewards/margins"] + 0.01
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    memory = summary["max"]
    # Only the adapters (rank 8 on c_attn, c_proj, c_fc) carry gradients and AdamW state.
    assert memory["memory/policy/optimizer_bytes"] < 0.15 * memory["memory/policy/params_bytes"], memory
    assert memory["memory/policy/grads_bytes"] < 0.08 * memory["memory/policy/params_bytes"], memory

    full = run_job(tiny_config("tiny-dpo", tmp_path / "full", "run.total_steps=2", *OFFLINE))
    assert full["roles"] == ["policy", "reference"]
    assert full["max"]["memory/policy/optimizer_bytes"] > 10 * memory["memory/policy/optimizer_bytes"]


def test_lora_merged_export_loads_and_generates_what_the_adapted_policy_does(ray_cluster, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlhf_ray.models.loading import load_causal_lm, load_tokenizer_for

    run = tmp_path / "run"
    run_job(tiny_config("tiny-dpo", run, "run.total_steps=3", *OFFLINE, *LORA))
    merged = AutoModelForCausalLM.from_pretrained(run / "final")
    config = json.loads((run / "final" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    tokenizer = load_tokenizer_for("tiny-gpt2")
    base = load_causal_lm("tiny-gpt2", seed=0, tokenizer=tokenizer)  # the preset's seeded initial weights
    adapted = PeftModel.from_pretrained(base, run / "final" / "adapter")
    prompt = torch.tensor([tokenizer.encode("Q: which colour do you like? A:")])
    with torch.no_grad():
        want = adapted.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        got = merged.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert torch.equal(got, want)
        torch.testing.assert_close(merged(prompt).logits, adapted(prompt).logits, rtol=1e-4, atol=1e-4)
        with adapted.disable_adapter():
            assert not torch.allclose(adapted(prompt).logits, merged(prompt).logits, atol=1e-4)  # it trained

    adapter_only = tmp_path / "adapter_only"
    run_job(tiny_config("tiny-dpo", adapter_only, "run.total_steps=1", "export.merge=false", *OFFLINE, *LORA))
    assert (adapter_only / "final" / "adapter_model.safetensors").exists()
    assert not (adapter_only / "final" / "model.safetensors").exists()


def test_lora_resume_is_exact_and_zero3_over_two_ranks_matches_one_rank(ray_cluster, tmp_path):
    full = tmp_path / "full"
    run_job(tiny_config("tiny-dpo", full, "run.total_steps=4", "run.save_every=2", *OFFLINE, *LORA))
    resumed = stopped_before(full, 4, tmp_path / "resumed")
    run_job(tiny_config("tiny-dpo", resumed, "run.total_steps=4", "run.save_every=2", *OFFLINE, *LORA))
    assert_same_run(resumed, full)
    a = final_weights(full)

    # ZeRO-3 over two ranks: the frozen base and the adapters partitioned, the same updates.
    z3 = run_job(tiny_config("tiny-dpo", tmp_path / "z3", "run.total_steps=4", "policy.num_ranks=2",
                             "policy.zero_stage=3", *OFFLINE, *LORA))
    assert z3["roles"] == ["policy"]
    w3 = final_weights(tmp_path / "z3")
    for key in a:
        torch.testing.assert_close(w3[key], a[key], rtol=1e-4, atol=1e-5)
    one = json.loads((full / "summary.json").read_text())["max"]
    assert z3["max"]["memory/policy/held_bytes"] < one["memory/policy/held_bytes"]


def test_lora_ppo_on_vllm_syncs_merged_weights_and_resumes_exactly(ray_cluster, tmp_path):
    full = tmp_path / "ppo"
    args = ("run.total_steps=3", "run.save_every=2", "critic.lora.rank=8", *ONLINE, *LORA)
    summary = run_job(tiny_config("tiny-ppo", full, *args))
    assert summary["roles"] == ["critic", "policy", "reward", "rollout"]  # no reference group
    rows = read_metrics(full)
    assert all(row["rollout/logprob_diff"] < 1e-4 for row in rows)  # the engine got the merged weights
    assert rows[-1]["rollout/kl"] != 0.0  # measured against the adapter-off base
    assert rows[-1]["sync/bytes"] == summary["max"]["memory/rollout/params_bytes"]  # every weight, merged
    memory = summary["max"]
    assert memory["memory/critic/optimizer_bytes"] < 0.15 * memory["memory/critic/params_bytes"]

    resumed = stopped_before(full, 3, tmp_path / "resumed")
    run_job(tiny_config("tiny-ppo", resumed, *args))
    assert_same_run(resumed, full)


def test_lora_remax_serves_the_adapter_on_the_vllm_engine(ray_cluster, tmp_path):
    # vLLM has LoRA kernels for Llama (not GPT-2): the engine keeps the base and serves each new adapter.
    common = ("run.total_steps=3", "policy.model.name_or_path=tiny-llama", *ONLINE, *LORA)
    adapter = run_job(tiny_config("tiny-remax", tmp_path / "adapter", "policy.lora.sync=adapter", *common))
    merged = run_job(tiny_config("tiny-remax", tmp_path / "merged", *common))
    assert adapter["roles"] == ["policy", "reward", "rollout"]
    rows = read_metrics(tmp_path / "adapter")
    assert all(row["rollout/logprob_diff"] < 1e-4 for row in rows)  # a stale adapter would show here
    assert rows[-1]["rollout/kl"] != 0.0
    # The adapter is a small share of the weights a merged sync moves.
    merged_bytes = read_metrics(tmp_path / "merged")[-1]["sync/bytes"]
    assert rows[-1]["sync/bytes"] < 0.1 * merged_bytes
    assert merged_bytes == merged["max"]["memory/rollout/params_bytes"]


@pytest.mark.parametrize("preset, overrides, message", [
    ("tiny-dpo", ["policy.lora.rank=8", "policy.lora.target_modules=[q_proj]"],
     "policy.lora.target_modules: the model (gpt2) has no module named q_proj"),
    ("tiny-dpo", ["policy.lora.rank=8", "reference.share_with=other"],
     "reference.share_with: a LoRA policy's reference"),
    ("tiny-dpo", ["policy.lora.rank=8", "policy.lora.quantize=4bit"],
     "policy.lora.quantize: a 4-bit base (QLoRA) needs"),
    ("tiny-dpo", ["reference.lora.rank=8"], "reference.lora: the reference is frozen"),
    ("tiny-ppo", ["reward.lora.rank=8"], "reward.lora: the reward model is frozen in online jobs"),
    ("tiny-ppo", ["policy.lora.rank=8", "policy.lora.sync=adapter"],
     "policy.lora.sync: adapter needs vLLM LoRA kernels"),
    ("tiny-dpo", ["policy.lora.rank=-1"], "lora.rank: must be >= 0"),
])
def test_bad_lora_settings_fail_before_models_load(tmp_path, preset, overrides, message):
    from rlhf_ray.jobs.validate import validate

    if "quantize" in message and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the QLoRA refusal here is the one for machines without it")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(tiny_config(preset, tmp_path / "run", *overrides))


def test_a_lora_policy_with_its_own_reference_weights_gets_a_reference_group(tmp_path):
    from rlhf_ray.jobs.common import role_specs

    cfg = tiny_config("tiny-dpo", tmp_path / "run", *LORA)
    assert cfg.policy_is_reference and [s.name for s in role_specs(cfg)] == ["policy"]
    other = tiny_config("tiny-dpo", tmp_path / "run", *LORA, "reference.model.name_or_path=tiny-gpt2")
    assert not other.policy_is_reference and [s.name for s in role_specs(other)] == ["policy", "reference"]
    spin = tiny_config("tiny-dpo", tmp_path / "run", *LORA, "algorithm.sdpo_stages=2")
    assert not spin.policy_is_reference  # sDPO moves the reference to the latest policy: it needs its own
