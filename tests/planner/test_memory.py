"""Activation, logits and KV-cache estimates worked by hand, role and GPU
totals, fit decisions, and PPO against ReMax."""

from __future__ import annotations

import dataclasses

import pytest

from rlhf_ray.planner.layout import GpuGroup, compare, plan_group, plan_layout
from rlhf_ray.planner.memory import (
    GiB,
    InferenceSettings,
    RolePlan,
    RolloutSettings,
    TrainSettings,
    activation_bytes,
    kv_cache_bytes,
    layer_activation_bytes,
    logits_bytes,
    loss_backward_bytes,
    plan_rollout,
    plan_trained_role,
    train_activation_bytes,
)
from rlhf_ray.planner.shapes import load_shape, param_tensors, shape_from_config
from rlhf_ray.planner.zero import ZeroConfig, optimizer_groups, train_state_bytes

# h=4, 2 query heads of 2 (q width 4), 1 KV head (kv width 2), I=6, V=10, L=1.
TINY = shape_from_config({
    "model_type": "llama", "vocab_size": 10, "hidden_size": 4, "intermediate_size": 6, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 16,
})


@pytest.mark.parametrize("seq_len, micro_batch", [(1024, 1), (2048, 4)])
def test_gpt_layer_activations_are_korthikanti_sbh_34_plus_5as_over_h(seq_len, micro_batch):
    # h=768, a=12, I=4h: the paper's setting, bf16 with dropout. The paper's GeLU is one fused op
    # storing its input, as GPT-2's gelu_new is once rlhf-ray loads it (`fuse_activations`); an
    # activation HF computes as a Python formula stores 3 more I-wide tensors (tanh's output, 0.5x,
    # 1 + tanh), e.g. "gelu_fast".
    s, b, h, a = seq_len, micro_batch, 768, 12
    expected = s * b * h * (34 + 5 * a * s / h)
    got = layer_activation_bytes(load_shape("gpt2"), b, s, "bf16", flash_attention=False, dropout=True)
    assert got == expected
    formula = dataclasses.replace(load_shape("gpt2"), hidden_act="gelu_fast")
    unfused = layer_activation_bytes(formula, b, s, "bf16", flash_attention=False, dropout=True)
    assert unfused == expected + s * b * 2 * 3 * 4 * h


def test_swiglu_gqa_layer_by_hand():
    # b=2, s=3 -> 6 tokens; bf16 (e=2), FlashAttention, no dropout. Per token:
    # attention e*(h + q + 2kv + q) = 2*(4+4+4+4) = 32; SwiGLU e*(h + 4I) = 2*28 = 56;
    # norms: HF's RMSNorm stores its input upcast to fp32 and the normalised tensor in bf16,
    # 2 * (4 + 2) * h = 48 (the paper's 2*e*h = 16 misses the fp32 copy; measured in
    # test_activations_measured.py) -> 136 bytes * 6 tokens = 816, plus fp32 log-sum-exp
    # 4 bytes * 2 heads * 6 = 48 -> 864.
    assert layer_activation_bytes(TINY, 2, 3, "bf16") == 864
    # Without FlashAttention and dropout: HF Llama's eager softmax runs in fp32 and keeps a bf16
    # copy for the matmul, a*s*s*b*(4 + 2) = 2*3*3*2*6 = 216, replacing the log-sum-exp: 1032.
    assert layer_activation_bytes(TINY, 2, 3, "bf16", flash_attention=False) == 1032


def test_gradient_checkpointing_keeps_layer_inputs_and_one_layer():
    # Both add what is stored outside the layers: the final RMSNorm (fp32 input + bf16 normalised,
    # (4 + 2) * 4 = 24 per token) and the head's input (2 * 4 = 8): 32 * 6 = 192, and the rotary
    # cos and sin, 2 * 2 bytes * head_dim 2 * 6 = 48: 240.
    # Checkpointed: L*e*sbh = 48, plus one layer 864 -> 1152; stored: 864 -> 1104.
    assert activation_bytes(TINY, 2, 3, "bf16", gradient_checkpointing=True) == 1152
    assert activation_bytes(TINY, 2, 3, "bf16", gradient_checkpointing=False) == 1104
    llama = load_shape("llama-7b")
    saved = activation_bytes(llama, 4, 2048, "bf16", gradient_checkpointing=True)
    full = activation_bytes(llama, 4, 2048, "bf16", gradient_checkpointing=False)
    assert full > 10 * saved


def test_logits_by_hand():
    # 6 tokens * V=10 * (2 bf16 + 4 fp32 log-softmax) = 360; a value head: 6 * 2 = 12.
    assert logits_bytes(TINY, 2, 3, "bf16") == 360
    assert logits_bytes(TINY, 2, 3, "bf16", head="scalar") == 12
    assert logits_bytes(TINY, 2, 3, "fp32") == 6 * 10 * 8
    # Training keeps the fp32 copy and adds its fp32 gradient, whatever the dtype: 6 * 10 * 8.
    assert logits_bytes(TINY, 2, 3, "bf16", train=True) == 480


def test_training_peak_is_the_head_or_a_layer_backward():
    # The loss's backward temporaries: the gather's and the logsumexp's fp32 gradients of both rows
    # (one chunk), 2 * 4 * 2 rows * 3 * vocab 10 = 480.
    assert loss_backward_bytes(TINY, 2, 3) == 480 and loss_backward_bytes(TINY, 2, 3, "scalar") == 0
    # Not checkpointed: at the head, stored 1104 + training logits 480 + loss temporaries 480 = 2064;
    # at the layer's backward, that layer 864 + rotary 48 + gradients 2 * 6 * (h + 2I = 16) = 192 -> 1104.
    assert train_activation_bytes(TINY, 2, 3, "bf16", gradient_checkpointing=False) == 2064
    # Checkpointed: at the head, layer input 48 + outside the layers 240 + logits 480 + 480 = 1248; at
    # the recomputed layer, 48 + 48 + 864 + 192 = 1152.
    assert train_activation_bytes(TINY, 2, 3, "bf16", gradient_checkpointing=True) == 1248
    # An LM head run on 1 of the 3 positions (an online policy scores its response only): logits and
    # temporaries a third each, 1104 + 160 + 160.
    assert train_activation_bytes(TINY, 2, 3, "bf16", gradient_checkpointing=False, logits_len=1) == 1424


def test_loss_temporaries_are_one_chunk_of_rows():
    # Llama-2-7B: a [T, V] fp32 row at 1024 tokens is 131 MB, over the 64 MiB chunk: one row at a time.
    llama7 = load_shape("llama-7b")
    row = 4 * 1024 * llama7.vocab_size
    assert loss_backward_bytes(llama7, 8, 1024) == 2 * row


def test_kv_cache_by_hand():
    # Tiny: 2 * 1 layer * 1 KV head * head_dim 2 * 2 bytes = 8 bytes per token.
    assert kv_cache_bytes(TINY, 100, "bf16") == 800
    # Llama-2-70B: 2 * 80 * 8 * 128 * 2 = 327,680 bytes per token (GQA: 8 KV heads,
    # not 64); tp=4 splits them, 2 heads each; tp=16 replicates one head per GPU.
    llama70 = load_shape("llama-70b")
    assert kv_cache_bytes(llama70, 1, "bf16") == 327_680
    assert kv_cache_bytes(llama70, 1000, "bf16", tensor_parallel_size=4) == 81_920_000
    assert kv_cache_bytes(llama70, 1, "bf16", tensor_parallel_size=16) == 40_960
    # Without GQA the 7B model pays for all 32 heads: 2 * 32 * 32 * 128 * 2 = 524,288.
    assert kv_cache_bytes(load_shape("llama-7b"), 1, "bf16") == 524_288


def _tiny_vllm(gpu_mem_bytes: int):
    settings = RolloutSettings(
        engine="vllm", dtype="bf16", num_sequences=3, prompt_len=5, response_len=6, block_size=16,
        gpu_memory_utilization=0.5, max_num_batched_tokens=8,
    )
    return plan_rollout(TINY, settings, num_gpus=1, gpu_mem_bytes=gpu_mem_bytes)


def test_vllm_rollout_rounds_sequences_to_blocks_and_claims_its_share():
    plan = _tiny_vllm(gpu_mem_bytes=4000)
    # 11 tokens -> one 16-token block per sequence, 3 * 16 = 48 tokens * 8 bytes.
    assert plan.gpu["kv_cache"] == 384
    assert plan.gpu["params"] == 2 * 212
    # Workspace: 8 tokens * 2 bytes * (2h + q + 2kv + 3I = 8+4+4+18 = 34) + fp32 logits 3 * 10 * 4.
    assert plan.gpu["workspace"] == 8 * 2 * 34 + 120
    assert plan.resident == plan.peak_bytes == 424 + 384 + 664
    # It claims half the GPU whatever the batch needs, and must find there its
    # weights, workspace and one sequence's 16 tokens of KV cache (128 bytes).
    assert (plan.reserved, plan.claimed_bytes, plan.minimum) == (2000, 2000, 424 + 664 + 128)


def test_a_vllm_claim_too_small_to_start_does_not_fit():
    plan = _tiny_vllm(gpu_mem_bytes=1000)  # claims 500 bytes, needs 1216 to start
    group = plan_group([plan], num_gpus=1, gpu_mem_bytes=1000)
    assert group.claimed_bytes == 500 and not group.fits
    assert "raise it" in group.problems[0]
    assert any("fewer sequences at a time" in note for note in plan.notes)


def test_trained_role_is_zero_state_plus_activations():
    settings = TrainSettings(dtype="bf16", zero=ZeroConfig(stage=2, reduce_bucket_size=100), micro_batch_size=2,
                             seq_len=3)
    plan = plan_trained_role("policy", TINY, "lm", settings, num_gpus=3)
    state = train_state_bytes(optimizer_groups(param_tensors(TINY)), "bf16", settings.zero, 3)
    for key, value in {**state.device, **state.transient}.items():
        assert plan.gpu[key] == value
    assert plan.resident == sum(state.device.values())
    assert set(state.device) == {"params", "grads", "master_params", "optimizer_states"}
    # Train phase: the checkpointed training peak 1248 (test above) + reduce bucket 200; listed as
    # training logits 480 and the rest.
    assert plan.phases["train"] == 1248 + 200
    assert (plan.gpu["logits"], plan.gpu["activations"]) == (480, 1248 - 480)
    assert plan.peak_bytes == plan.resident + 1248 + 200


def _role(name: str, resident: int, reserved: int = 0, **phases: int) -> RolePlan:
    return RolePlan(role=name, model="m", num_params=1, num_gpus=1, gpu={}, resident=resident, phases=phases,
                    reserved=reserved)


def test_colocated_roles_add_resident_bytes_and_the_worst_phase():
    roles = [
        _role("policy", 100, score=10, train=50),
        _role("reference", 20, score=15),
        _role("reward", 20, score=15),
        _role("rollout", 0, reserved=70, generate=30),  # a sleeping vLLM engine
    ]
    group = plan_group(roles, num_gpus=2, gpu_mem_bytes=250)
    assert group.resident_bytes == 140
    # Phases: generate 30, score 10 + 15 + 15 = 40 (concurrent forwards), train 50.
    assert group.phase_bytes == {"generate": 30, "score": 40, "train": 50}
    assert group.required_bytes == 190
    # vLLM wakes up to its 70-byte claim: 140 + max(70, 40, 50) = 210.
    assert group.claimed_bytes == 210 and group.fits and group.headroom_bytes == 40
    awake = plan_group(roles[:3] + [_role("rollout", 30, reserved=120)], 1, 250)
    # A vLLM engine that never sleeps holds its whole claim: 140 + 120 + 50 = 310.
    assert awake.claimed_bytes == 310 and not awake.fits and awake.headroom_bytes == -60


def _llama7b_plans(placement=None, gpus=8, offload_frozen=False):
    shape = load_shape("llama-7b")
    frozen_zero = ZeroConfig(stage=3, offload_params=offload_frozen)
    kwargs = dict(
        policy=shape, reward=shape, gpus=None if placement else gpus, gpu_mem_gib=80, placement=placement,
        train=TrainSettings(dtype="bf16", zero=ZeroConfig(stage=2), micro_batch_size=4, seq_len=1024),
        inference=InferenceSettings(dtype="bf16", zero=frozen_zero, micro_batch_size=4, seq_len=1024),
        rollout=RolloutSettings(engine="vllm", gpu_memory_utilization=0.3, sleep=True, num_sequences=128),
    )
    ppo = plan_layout("ppo", needs_critic=True, needs_reference=True, **kwargs)
    remax = plan_layout("remax", needs_critic=False, needs_reference=True, **kwargs)
    return ppo, remax


def test_algorithms_decide_the_roles():
    ppo, remax = _llama7b_plans()
    assert [r.role for r in ppo.roles] == ["policy", "critic", "reference", "reward", "rollout"]
    assert [r.role for r in remax.roles] == ["policy", "reference", "reward", "rollout"]
    shape = load_shape("llama-7b")
    rule = plan_layout("grpo", needs_critic=False, needs_reference=True, policy=shape, reward=None, gpus=8)
    assert [r.role for r in rule.roles] == ["policy", "reference", "rollout"]


def test_remax_saves_the_critic_on_llama_7b():
    ppo, remax = _llama7b_plans()
    result = compare([ppo, remax])
    row = result.row("remax")
    assert result.baseline == "ppo"
    assert ppo.total_required_bytes > remax.total_required_bytes
    critic = ppo.role("critic")
    # Colocated: at least the critic's weights, grads, master and Adam on every GPU.
    assert row.saving_bytes >= critic.resident * 8
    assert 0 < row.saving_percent < 100
    assert result.row("ppo").saving_bytes == 0


def test_with_a_gpu_group_per_role_the_saving_is_exactly_the_critic():
    placement = [GpuGroup((role,), 2) for role in ("policy", "critic", "reference", "reward", "rollout")]
    ppo, remax = _llama7b_plans(placement=placement)
    assert ppo.num_gpus == 10 and remax.num_gpus == 8
    assert "critic" in " ".join(remax.notes)
    row = compare([ppo, remax]).row("remax")
    assert row.saving_bytes == 2 * ppo.role("critic").peak_bytes


def test_remax_fits_four_80gb_gpus_where_ppo_does_not():
    # The ReMax paper's setting: Llama-2-7B on 4 x 80 GB, policy ZeRO-2 with
    # gradient checkpointing, reference and reward ZeRO-3 with offload.
    ppo, remax = _llama7b_plans(gpus=4, offload_frozen=True)
    ppo_fits, remax_fits = ppo.fits, remax.fits
    assert (ppo_fits, remax_fits) == (False, True)
    assert ppo.groups[0].headroom_bytes < 0 < remax.groups[0].headroom_bytes


def test_fit_follows_gpu_memory_and_vllm_claim():
    shape = load_shape("llama-7b")
    common = dict(needs_critic=False, needs_reference=True, policy=shape, reward=shape, gpus=8)
    assert not plan_layout("remax", gpu_mem_gib=24, **common).fits
    # vLLM claiming 90% of each GPU for good leaves no room for training beside it.
    greedy = plan_layout("remax", gpu_mem_gib=80, rollout=RolloutSettings(gpu_memory_utilization=0.9), **common)
    assert not greedy.fits
    assert greedy.groups[0].claimed_bytes > greedy.groups[0].required_bytes
    modest = plan_layout("remax", gpu_mem_gib=80, rollout=RolloutSettings(gpu_memory_utilization=0.3, sleep=True),
                         **common)
    assert modest.fits and modest.groups[0].headroom_bytes == 80 * GiB - modest.groups[0].claimed_bytes


def test_placement_errors_name_the_role():
    shape = load_shape("gpt2")
    common = dict(needs_critic=True, needs_reference=True, policy=shape, reward=shape)
    with pytest.raises(ValueError, match="not placed: \\['rollout'\\]"):
        plan_layout("ppo", placement=[GpuGroup(("policy", "critic", "reference", "reward"), 1)], **common)
    with pytest.raises(ValueError, match="placed twice: \\['policy'\\]"):
        plan_layout("ppo", placement=[GpuGroup(("policy", "critic", "reference", "reward", "rollout"), 1),
                                      GpuGroup(("policy",), 1)], **common)
    with pytest.raises(ValueError, match="unknown role"):
        plan_layout("ppo", placement=[GpuGroup(("actor",), 1)], **common)
    with pytest.raises(ValueError, match="give gpus"):
        plan_layout("ppo", **common)
    with pytest.raises(ValueError, match="tensor_parallel_size 2"):
        plan_layout("ppo", gpus=3, rollout=RolloutSettings(tensor_parallel_size=2), **common)


def test_the_planner_imports_no_ray_deepspeed_vllm_or_torch():
    import subprocess
    import sys

    code = (
        "import sys, rlhf_ray.planner\n"
        "heavy = {'ray', 'deepspeed', 'vllm', 'torch'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
