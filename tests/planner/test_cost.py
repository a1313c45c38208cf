"""Step time and run cost, worked out by hand on a tiny shape."""

from __future__ import annotations

import pytest

from rlhf_ray.planner.cost import Hardware, Throughput, online_step_work, run_cost, step_time
from rlhf_ray.planner.shapes import load_shape, shape_from_config

# h=4, q width 4, L=1, V=10. Matmul parameters: q 16 + k 8 + v 8 + o 16 +
# gate/up/down 24 each + lm_head 40 = 160 (value head: 120 + 4 = 124).
# Forward FLOPs per token over a context c: 2*160 + 4*L*q*c = 320 + 16c.
TINY = shape_from_config({
    "model_type": "llama", "vocab_size": 10, "hidden_size": 4, "intermediate_size": 6, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 16,
})


def _remax_work():
    # 2 prompts, 1 sample + 1 greedy each, prompt 3, response 5 tokens.
    return online_step_work(
        policy=TINY, critic=None, reference=TINY, reward=TINY,
        prompts=2, samples_per_prompt=1, greedy_per_prompt=1, prompt_len=3, response_len=5,
    )


def test_remax_step_work_by_hand():
    work = {(w.phase, w.role, w.kind): (w.tokens, w.flops_per_token) for w in _remax_work()}
    assert work == {
        ("generate", "rollout", "forward"): (4 * 3, 320 + 16 * 3),        # prefill of 4 sequences
        ("generate", "rollout", "generate"): (4 * 5, 320 + 16 * 5.5),     # context 3 + 5/2 on average
        ("score", "policy", "forward"): (2 * 8, 320 + 16 * 8),           # sampled sequences only
        ("score", "reference", "forward"): (2 * 8, 320 + 16 * 8),
        ("score", "reward", "forward"): (4 * 8, 248 + 16 * 8),           # greedy ones too
        ("train", "policy", "train"): (2 * 8, 3 * (320 + 16 * 8)),       # 6N + 12*L*q*c
    }


def test_ppo_adds_critic_values_and_updates():
    work = online_step_work(
        policy=TINY, critic=TINY, reference=TINY, reward=TINY,
        prompts=2, samples_per_prompt=1, greedy_per_prompt=0, prompt_len=3, response_len=5, policy_epochs=4,
    )
    roles = {(w.phase, w.role) for w in work}
    assert ("score", "critic") in roles and ("train", "critic") in roles
    train = {w.role: w.tokens for w in work if w.phase == "train"}
    assert train == {"policy": 4 * 2 * 8, "critic": 4 * 2 * 8}


def test_step_time_from_flops_by_hand():
    hardware = Hardware(num_gpus=2, peak_flops=1000.0, train_mfu=0.5, forward_mfu=0.25, generate_mfu=0.1)
    time = step_time(_remax_work(), hardware=hardware)
    # FLOPs / (2 GPUs * 1000 * MFU): prefill 12*368/500 = 8.832, decode 20*408/200
    # = 40.8, policy and reference 16*448/500 = 14.336 each, reward 32*376/500 =
    # 24.064, training 16*1344/1000 = 21.504.
    assert time.seconds["generate/rollout/forward"] == pytest.approx(8.832)
    assert time.seconds["generate/rollout/generate"] == pytest.approx(40.8)
    assert time.phase_s("score") == pytest.approx(14.336 * 2 + 24.064)
    assert time.seconds["train/policy/train"] == pytest.approx(21.504)
    assert time.total_s == pytest.approx(123.872)


def test_measured_throughput_wins_over_flops():
    throughput = Throughput(generate_tokens_per_s=10.0, forward_tokens_per_s=16.0, train_tokens_per_s=8.0)
    time = step_time(_remax_work(), throughput=throughput)
    # 12/16 + 20/10 + 16/16 + 16/16 + 32/16 + 16/8 = 0.75 + 2 + 1 + 1 + 2 + 2.
    assert time.total_s == pytest.approx(8.75)
    # Only training measured: the rest from FLOPs.
    hardware = Hardware(num_gpus=2, peak_flops=1000.0, train_mfu=0.5, forward_mfu=0.25, generate_mfu=0.1)
    mixed = step_time(_remax_work(), hardware=hardware, throughput=Throughput(train_tokens_per_s=8.0))
    assert mixed.total_s == pytest.approx(123.872 - 21.504 + 2.0)


def test_step_time_needs_a_rate_or_hardware():
    with pytest.raises(ValueError, match="no generate throughput"):
        step_time(_remax_work(), throughput=Throughput(forward_tokens_per_s=1.0, train_tokens_per_s=1.0))
    with pytest.raises(ValueError, match="train_mfu"):
        Hardware(num_gpus=1, peak_flops=1.0, train_mfu=1.5)


def test_run_cost_arithmetic():
    # 1000 prompts at 64 per step: 16 steps (the last one partial) of 10 s = 160 s;
    # on 8 GPUs 160/3600*8 = 0.3556 GPU-hours, at $2.50 = $0.889.
    cost = run_cost(10.0, prompts_per_step=64, num_prompts=1000, num_gpus=8, price_per_gpu_hour=2.5)
    assert cost.steps == 16
    assert cost.seconds == 160.0
    assert cost.hours == pytest.approx(160 / 3600)
    assert cost.gpu_hours == pytest.approx(160 / 3600 * 8)
    assert cost.dollars == pytest.approx(160 / 3600 * 8 * 2.5)
    with pytest.raises(ValueError, match="prompts_per_step"):
        run_cost(1.0, prompts_per_step=0, num_prompts=1, num_gpus=1, price_per_gpu_hour=1.0)


def test_llama_7b_training_flops_are_about_six_n_per_token():
    shape = load_shape("llama-7b")
    (train,) = [w for w in online_step_work(
        policy=shape, critic=None, reference=None, reward=None,
        prompts=1, samples_per_prompt=1, greedy_per_prompt=0, prompt_len=512, response_len=512,
    ) if w.phase == "train"]
    # 6N with N ~ 6.6e9 matmul parameters, plus 12*L*h*T = 12*32*4096*1024 ~ 1.6e9.
    assert train.flops_per_token == pytest.approx(6 * 6.607e9 + 12 * 32 * 4096 * 1024, rel=1e-3)
