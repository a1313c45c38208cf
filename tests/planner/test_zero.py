"""DeepSpeed ZeRO state bytes, worked out by hand on a tiny shape, and (slow)
checked against DeepSpeed itself on two CPU ranks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlhf_ray.planner.shapes import param_tensors, shape_from_config
from rlhf_ray.planner.zero import ZeroConfig, frozen_state_bytes, optimizer_groups, train_state_bytes

# Tensors in order, numel and offset in one flat group:
#   embed 10x4=40 [0,40)  q 16 [40,56)  k 8 [56,64)  v 8 [64,72)  o 16 [72,88)
#   gate 24 [88,112)  up 24 [112,136)  down 24 [136,160)  norms 4+4 [160,168)
#   final norm 4 [168,172)  lm_head 40 [172,212)          total N = 212
TINY = {
    "model_type": "llama", "vocab_size": 10, "hidden_size": 4, "intermediate_size": 6, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 16,
}
TENSORS = param_tensors(shape_from_config(TINY))
ONE_GROUP = optimizer_groups(TENSORS)
BUCKET = 100


def _zero(stage: int, **kw) -> ZeroConfig:
    return ZeroConfig(stage=stage, reduce_bucket_size=BUCKET, **kw)


def test_tiny_shape_has_212_parameters():
    assert sum(ONE_GROUP[0]) == 212


def test_stage0_bf16_is_the_classic_2_2_12_bytes():
    state = train_state_bytes(ONE_GROUP, "bf16", _zero(0), dp_size=3)
    # 2N weights, 2N grads, 4N fp32 master, 8N Adam m and v: 16 bytes per parameter.
    assert state.device == {"params": 424, "grads": 424, "master_params": 848, "optimizer_states": 1696}
    assert sum(state.device.values()) == 16 * 212


def test_stage0_fp32_is_4_4_8_bytes():
    state = train_state_bytes(ONE_GROUP, "fp32", _zero(0), dp_size=3)
    assert state.device == {"params": 848, "grads": 848, "optimizer_states": 1696}


def test_stage1_and_2_pad_the_flat_group_and_partition_the_optimizer():
    # dp=3: alignment 2*3 = 6, 212 -> 216 elements, partition 72 per rank.
    for stage in (1, 2):
        state = train_state_bytes(ONE_GROUP, "bf16", _zero(stage), dp_size=3)
        assert state.device["params"] == 2 * 216
        assert state.device["master_params"] == 4 * 72
        assert state.device["optimizer_states"] == 8 * 72
        # The reduce bucket lives only through backward.
        assert state.transient == {"comm_buffers": 2 * BUCKET} and "comm_buffers" not in state.device


def test_stage2_grads_cover_the_tensors_overlapping_each_partition():
    # Partitions [0,72) [72,144) [144,216). Rank 0: embed q k v = 72. Rank 1:
    # o gate up down start inside = 88. Rank 2: norms, final norm, lm_head
    # start inside (52) and down straddles 144 (24) = 76.
    per_rank = [train_state_bytes(ONE_GROUP, "bf16", _zero(2), 3, rank=r).device["grads"] for r in range(3)]
    assert per_rank == [2 * 72, 2 * 88, 2 * 76]
    assert train_state_bytes(ONE_GROUP, "bf16", _zero(2), 3).device["grads"] == 2 * 88  # the largest


def test_stage1_without_contiguous_gradients_keeps_every_gradient():
    state = train_state_bytes(ONE_GROUP, "bf16", _zero(1, contiguous_gradients=False), dp_size=3)
    assert state.device["grads"] == 2 * 212
    assert state.transient == {}


def test_fp32_stage2_still_clones_an_fp32_master_partition():
    state = train_state_bytes(ONE_GROUP, "fp32", _zero(2), dp_size=3)
    assert state.device["params"] == 4 * 216
    assert state.device["master_params"] == 4 * 72
    assert state.device["grads"] == 4 * 88


def test_stage3_partitions_each_tensor_and_keeps_small_ones_whole():
    # ceil(n/3): embed 14, q 6, k 3, v 3, o 6, gate/up/down 8 each, norms 2 each
    # (x3), lm_head 14 -> 76. Threshold 5 keeps the three 4-element norms whole, each
    # re-gathered into a buffer of ceil(4/3) * 3 = 6 elements: 18.
    state = train_state_bytes(ONE_GROUP, "bf16", _zero(3, param_persistence_threshold=5), dp_size=3)
    assert state.device == {
        "params": 2 * (76 + 18),
        "master_params": 4 * 76,
        "optimizer_states": 8 * 76,
        "grads": 2 * 76,
        "comm_buffers": 2 * BUCKET,  # ZeRO-3 allocates its bucket at start-up and holds it
    }
    assert state.transient == {}


def test_partitioning_divides_what_each_stage_promises():
    # 1000 tensors of 1000 elements over 8 ranks: 125 whole tensors per
    # partition, no padding, no tensor straddling two partitions.
    groups = [[1000] * 1000]
    one = {s: train_state_bytes(groups, "bf16", _zero(s, param_persistence_threshold=0), 1).device for s in (1, 2, 3)}
    eight = {s: train_state_bytes(groups, "bf16", _zero(s, param_persistence_threshold=0), 8).device for s in (1, 2, 3)}
    for stage in (1, 2, 3):  # every stage partitions the fp32 master and Adam states
        assert eight[stage]["optimizer_states"] * 8 == one[stage]["optimizer_states"]
        assert eight[stage]["master_params"] * 8 == one[stage]["master_params"]
    for stage in (1, 2):  # the 16-bit weights stay whole below stage 3
        assert eight[stage]["params"] == one[stage]["params"] == 2 * 1_000_000
    assert eight[3]["params"] * 8 == one[3]["params"]
    assert eight[2]["grads"] * 8 == one[2]["grads"]
    assert eight[3]["grads"] * 8 == one[3]["grads"]


def test_offload_moves_master_adam_and_fp32_grads_to_host():
    state = train_state_bytes(ONE_GROUP, "bf16", _zero(2, offload_optimizer=True), dp_size=3)
    # Device: the 16-bit flat weights, one largest-tensor (40) 16-bit grad buffer.
    assert state.device == {"params": 432, "grads": 2 * 40}
    # Host: fp32 master and m, v of the partition (72), its fp32 grads and a
    # largest-tensor 16-bit grad buffer, a 16-bit staging copy of the partition.
    assert state.host == {"master_params": 288, "optimizer_states": 576, "grads": 288 + 80, "params": 144}
    assert state.held_by_category() == {"params": 432 + 144, "grads": 80 + 288 + 80, "optimizer": 288 + 576}


def test_stage3_param_offload_leaves_only_the_small_tensors_on_the_gpu():
    zero = _zero(3, param_persistence_threshold=5, offload_params=True, offload_optimizer=True)
    state = train_state_bytes(ONE_GROUP, "bf16", zero, dp_size=3)
    assert state.device == {"params": 2 * 18, "comm_buffers": 2 * BUCKET}  # three norms, 6-element buffers
    # Host: 16-bit partitions, fp32 master and m, v, the 16-bit gradient partition
    # and an fp32 gradient of the master.
    assert state.host == {"params": 2 * 76, "master_params": 4 * 76, "optimizer_states": 8 * 76, "grads": 6 * 76}


def test_torch_adamw_adds_a_step_tensor_per_optimized_tensor():
    fused = train_state_bytes(ONE_GROUP, "bf16", _zero(2), 3, "adamw_fused").device["optimizer_states"]
    torch_ = train_state_bytes(ONE_GROUP, "bf16", _zero(2), 3, "adamw_torch").device["optimizer_states"]
    assert torch_ - fused == 4  # one flat partition, one 4-byte step
    per_tensor = train_state_bytes(ONE_GROUP, "fp32", _zero(0), 3, "adamw_torch").device["optimizer_states"]
    assert per_tensor == 8 * 212 + 4 * len(TENSORS)


def test_fp32_gradient_accumulation_with_bf16():
    # What rlhf-ray's DeepSpeed config sets for bf16 at ZeRO 1-3 (dp=3, partition 72).
    def grads(stage: int) -> int:
        return train_state_bytes(ONE_GROUP, "bf16", _zero(stage), 3, grad_accum_dtype="fp32").device["grads"]

    # ZeRO-1 runs BF16_Optimizer: bf16 .grad of all 212 plus an fp32 flat buffer of the padded 216.
    assert grads(1) == 2 * 212 + 4 * 216
    assert grads(2) == 4 * 72  # one compact fp32 partition, no straddling tensors
    assert grads(3) == 4 * 76  # the fp32 flat partition
    zero3 = train_state_bytes(ONE_GROUP, "bf16", _zero(3), 3, grad_accum_dtype="fp32")
    assert zero3.device["comm_buffers"] == 2 * BUCKET  # the reduce bucket stays bf16
    with pytest.raises(ValueError, match="stage 0"):
        train_state_bytes(ONE_GROUP, "bf16", _zero(0), 3, grad_accum_dtype="fp32")
    with pytest.raises(ValueError, match="only bf16 with fp32"):
        train_state_bytes(ONE_GROUP, "fp16", _zero(2), 3, grad_accum_dtype="fp32")


def test_no_decay_split_pads_each_group_on_its_own():
    # dp=12: alignment 24. One group: 212 -> 216. Split: 2-D 200 -> 216 and
    # 1-D 12 -> 24, 240 in all; partitions 18 vs 2 + 18 = 20.
    split = optimizer_groups(TENSORS, split_no_decay=True)
    assert [sum(g) for g in split] == [200, 12]
    one = train_state_bytes(ONE_GROUP, "bf16", _zero(2), 12).device
    two = train_state_bytes(split, "bf16", _zero(2), 12).device
    assert (one["params"], one["master_params"]) == (2 * 216, 4 * 18)
    assert (two["params"], two["master_params"]) == (2 * 240, 4 * 20)


def test_frozen_weights_whole_or_partitioned():
    numels = ONE_GROUP[0]
    assert frozen_state_bytes(numels, "bf16", _zero(0), 3).device == {"params": 424}
    zero3 = frozen_state_bytes(numels, "bf16", _zero(3, param_persistence_threshold=5), 3)
    assert zero3.device == {"params": 2 * (12 + 76)}
    offloaded = frozen_state_bytes(numels, "bf16", _zero(3, param_persistence_threshold=5, offload_params=True), 3)
    assert (offloaded.device, offloaded.host) == ({"params": 24}, {"params": 152})


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="stage 3"):
        ZeroConfig(stage=2, offload_params=True)
    with pytest.raises(ValueError, match="stage must be"):
        ZeroConfig(stage=4)
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        train_state_bytes(ONE_GROUP, "fp8", _zero(1), 1)
    with pytest.raises(ValueError, match="optimizer 'lion'"):
        train_state_bytes(ONE_GROUP, "bf16", _zero(1), 1, "lion")


_RANK_SCRIPT = textwrap.dedent(
    """
    import os, sys, json
    import torch
    torch.set_num_threads(1)
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM
    from rlhf_ray.planner.zero import ZeroConfig, optimizer_groups, train_state_bytes
    from rlhf_ray.planner.shapes import param_tensors, shape_from_config

    stage, dtype, offload = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "offload"
    grad_accum = None if sys.argv[4] == "same" else sys.argv[4]
    config = json.loads(sys.argv[5])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"}))
    groups = [{"params": [p for p in model.parameters() if p.ndim > 1]},
              {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    zero = {"stage": stage, "reduce_bucket_size": 100, "stage3_param_persistence_threshold": 5}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero, "zero_force_ds_cpu_optimizer": False}
    if dtype == "bf16":
        ds["bf16"] = {"enabled": True}
    if grad_accum is not None:
        ds["data_types"] = {"grad_accum_dtype": grad_accum}
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups), config=ds)
    nb = lambda t: t.numel() * t.element_size()
    for step in range(2):  # the second backward holds weights, gradients and optimizer state at once
        ids = torch.randint(0, config["vocab_size"], (1, 6))
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        if step == 1:
            got = {"optimizer_states": sum(nb(v) for s in opt.optimizer.state.values() for v in s.values()
                                           if torch.is_tensor(v))}
            if stage == 3:
                got["params"] = sum(nb(p.ds_tensor) + (nb(p.data) if p.ds_persist else 0) for p in model.parameters())
                got["master_params"] = sum(nb(t) for t in opt.fp32_partitioned_groups_flat)
            elif hasattr(opt, "bf16_groups_flat"):  # BF16_Optimizer (ZeRO-1, fp32 accumulation)
                got["params"] = sum(nb(t) for t in opt.bf16_groups_flat)
                got["master_params"] = sum(nb(t) for t in opt.fp32_groups_flat_partition)
            else:
                staging = getattr(opt, "param_buffer_of_bit16_for_cpu_offload_groups", [])  # offload only
                got["params"] = sum(nb(t) for t in list(opt.bit16_groups_flat) + list(staging))
                got["master_params"] = sum(nb(t) for t in opt.single_partition_of_fp32_groups)
            try:
                from rlhf_ray.telemetry.memory import measure_memory
            except ImportError:
                telemetry = None
            else:
                report = measure_memory(engine)
                telemetry = {"params": report.params_bytes, "grads": report.grads_bytes,
                             "optimizer": report.optimizer_bytes}
        engine.step()
    tensors = param_tensors(shape_from_config(config))
    zero_config = ZeroConfig(stage=stage, reduce_bucket_size=100, param_persistence_threshold=5,
                             offload_optimizer=offload)
    planned = train_state_bytes(optimizer_groups(tensors, split_no_decay=True), dtype, zero_config,
                                int(os.environ["WORLD_SIZE"]), "adamw_torch", rank=int(os.environ["RANK"]),
                                grad_accum_dtype=grad_accum)
    held = {**planned.host}
    for key, value in planned.device.items():
        held[key] = held.get(key, 0) + value
    print("PLANNED", json.dumps({k: held[k] for k in got}, sort_keys=True))
    print("MEASURED", json.dumps(got, sort_keys=True))
    if telemetry is not None:
        print("PLANNED_CATEGORIES", json.dumps(planned.held_by_category(), sort_keys=True))
        print("MEASURED_CATEGORIES", json.dumps(telemetry, sort_keys=True))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, dtype, offload, grad_accum",
    [
        (1, "fp32", "none", "same"),
        (2, "bf16", "none", "same"),
        (2, "bf16", "offload", "same"),
        (3, "bf16", "offload", "same"),
        (1, "bf16", "none", "fp32"),
        (3, "bf16", "none", "fp32"),
    ],
)
def test_plan_equals_what_deepspeed_allocates_on_two_cpu_ranks(tmp_path, stage, dtype, offload, grad_accum):
    # Two gloo ranks on the CPU accelerator: padding, partition boundaries and
    # straddling tensors all show. Where the telemetry package is present, its
    # measure_memory (what `bench memory` reports) must agree too.
    import json
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    repo = Path(__file__).resolve().parents[2]
    procs = []
    for rank in (0, 1):
        env = {
            **os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(repo),
        }
        procs.append(subprocess.Popen(
            [sys.executable, str(script), str(stage), dtype, offload, grad_accum, json.dumps(TINY)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
        lines = dict(line.split(" ", 1) for line in out.splitlines() if line.startswith(("PLANNED", "MEASURED")))
        assert json.loads(lines["MEASURED"]) == json.loads(lines["PLANNED"])
        if "MEASURED_CATEGORIES" in lines:
            assert json.loads(lines["MEASURED_CATEGORIES"]) == json.loads(lines["PLANNED_CATEGORIES"])
