"""measure_memory on plain modules and on real DeepSpeed engines (ZeRO 0/2/3, CPU, gloo).

Every expected byte count is derived by hand from the layout of torch's AdamW
and of DeepSpeed 0.19.8 (stage_1_and_2.py, stage3.py), so the planner can be
checked against the same figures.
"""

import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_ray.runtime.distributed import find_free_port
from rlhf_ray.telemetry.memory import MemoryReport, measure_memory, peak_rss_bytes, reset_peaks


def tiny_mlp() -> torch.nn.Module:
    # parameters: 0.weight 3x4 = 12, 0.bias 3, 1.weight 2x3 = 6, 1.bias 2 -> P = 23 (odd: shows ZeRO padding)
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


# ----------------------------------------------------------------------------- plain torch


def test_plain_module_after_one_adamw_step_by_hand():
    # Linear(8, 4) + Linear(4, 2): P = 8*4 + 4 + 4*2 + 2 = 46 fp32 parameters in 4 tensors.
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 8)).sum().backward()
    optimizer.step()
    report = measure_memory(model, optimizer)
    # params 4P = 184; grads 4P = 184 (kept after step until zero_grad);
    # optimizer: exp_avg + exp_avg_sq = 8P = 368, plus one fp32 scalar `step` tensor per parameter
    # tensor (held, so counted): 4 * 4 bytes = 16 -> 384.
    assert (report.params_bytes, report.grads_bytes, report.optimizer_bytes) == (184, 184, 384)
    assert report.held_bytes == 752 and report.peak_bytes == 752  # CPU: peak is what is held
    assert report.device == "cpu" and report.cuda_max_allocated_bytes is None
    optimizer.zero_grad(set_to_none=True)
    assert measure_memory(model, optimizer).grads_bytes == 0


def test_tied_and_viewed_storages_are_counted_once():
    class TiedLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight  # one 10x4 storage, two modules

    model = TiedLM()
    assert measure_memory(model).params_bytes == 10 * 4 * 4  # 160, not 320

    # two parameters that are views of one flat 6-element buffer (as ZeRO's flat groups are): 24 bytes
    flat = torch.zeros(6)
    holder = torch.nn.Module()
    holder.a = torch.nn.Parameter(flat[:2])
    holder.b = torch.nn.Parameter(flat[2:])
    holder.b.data = flat[2:].view(2, 2)
    assert measure_memory(holder).params_bytes == 24


def test_frozen_model_without_optimizer_holds_only_parameters():
    model = tiny_mlp().requires_grad_(False)
    report = measure_memory(model)
    assert (report.params_bytes, report.grads_bytes, report.optimizer_bytes) == (92, 0, 0)  # 23 * 4


def test_to_metrics_and_max():
    a = MemoryReport(params_bytes=10, grads_bytes=0, optimizer_bytes=30, peak_rss_bytes=100,
                     cuda_max_allocated_bytes=None, device="cpu")
    b = MemoryReport(params_bytes=10, grads_bytes=20, optimizer_bytes=5, peak_rss_bytes=90,
                     cuda_max_allocated_bytes=None, device="cpu")
    assert a.max(b) == MemoryReport(10, 20, 30, 100, None, "cpu")
    assert a.max(b).to_metrics("policy") == {
        "memory/policy/params_bytes": 10, "memory/policy/grads_bytes": 20, "memory/policy/optimizer_bytes": 30,
        "memory/policy/held_bytes": 60, "memory/policy/peak_bytes": 60, "memory/policy/peak_rss_bytes": 100}
    gpu = MemoryReport(10, 20, 30, 100, cuda_max_allocated_bytes=500, device="cuda:0")
    assert gpu.peak_bytes == 500 and gpu.held_bytes == 60
    with pytest.raises(ValueError, match="role name 'a/b'"):
        a.to_metrics("a/b")
    with pytest.raises(TypeError, match="torch.nn.Module or a DeepSpeed engine"):
        measure_memory(object())


@pytest.mark.gpu
def test_plain_module_on_gpu_reports_the_allocator_peak():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2)).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 8, device="cuda")).sum().backward()
    optimizer.step()
    report = measure_memory(model, optimizer)
    assert report.device == "cuda:0" and (report.params_bytes, report.grads_bytes) == (184, 184)
    assert report.optimizer_bytes >= 368  # exp_avg + exp_avg_sq, plus the `step` scalars
    assert report.peak_bytes == report.cuda_max_allocated_bytes >= 184 + 184 + 368


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _touched_block(size: int) -> mmap.mmap:
    """Anonymous pages, every one written: outside any allocator's cache of resident free pages (after
    hundreds of tests a tensor may be handed pages that are already resident)."""
    block = mmap.mmap(-1, size)
    for offset in range(0, size, os.sysconf("SC_PAGE_SIZE")):
        block[offset] = 1
    return block


SIZE, SLACK = 256 * 2**20, 16 * 2**20  # the kernel's RSS counters are per-CPU and lag by a few MiB


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_peak_rss_covers_touched_memory_and_reset_lowers_it():
    reset_peaks()
    rss_before = _rss_bytes()
    block = _touched_block(SIZE)
    rss_with_block = _rss_bytes()
    assert rss_with_block >= rss_before + SIZE - SLACK
    peak_with_block = peak_rss_bytes()
    assert peak_with_block >= rss_with_block - SLACK
    block.close()  # unmapped: the pages go straight back to the system
    if reset_peaks():
        assert peak_rss_bytes() <= peak_with_block - SIZE // 2


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_peak_rss_is_the_processs_own_not_its_parents():
    # Python starts children through vfork, and getrusage's ru_maxrss would hand this process's peak
    # (held block included) to the child; VmHWM is the child's own.
    block = _touched_block(SIZE)
    parent_rss = _rss_bytes()
    probe = "from rlhf_ray.telemetry.memory import peak_rss_bytes; print(peak_rss_bytes())"
    child = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    block.close()
    child_peak = int(child.stdout.split()[-1])
    assert 0 < child_peak < parent_rss - SIZE // 2, (child_peak, parent_rss)


# ----------------------------------------------------------------------------- DeepSpeed

# Expected bytes per rank: (after step 1, after backward of step 2), each (params, grads, optimizer).
# Model: tiny_mlp, P = 23 fp32 elements (bf16: 2 bytes), AdamW via DeepSpeed's "optimizer" section
# (torch_adam: torch.optim.AdamW, whose `step` is one 4-byte fp32 scalar per parameter tensor it holds).
#
# Stage 0, any world size: DeepSpeed hands AdamW the module's own 4 tensors; engine.step() frees grads.
#   params 23*4 = 92; grads 0 after step, 92 after backward; optimizer 2*92 + 4*4 = 200.
# Stage 2 (stage_1_and_2.py): the group is flattened into `bit16_groups_flat`, padded to a multiple of
#   nccl_start_alignment_factor (2) * world_size: ws=1 -> 24 elements, ws=2 -> 24. The module's params are
#   views of it: params = 24 * elem. Each rank keeps an fp32 clone of its partition
#   `single_partition_of_fp32_groups` (24/ws elements) as AdamW's only param, so AdamW's states are one
#   flat tensor each + one `step`: optimizer = 3 * 4 * 24/ws + 4. Gradients are freed in step(); after
#   backward `averaged_gradients` holds the rank's partition (its params' grads + padding): 24/ws * elem.
#   ws=1 fp32: (96, 0, 292) / (96, 96, 292).  ws=1 bf16: params 48, grads 48, master+states still fp32: 292.
#   ws=2 fp32: (96, 0, 148) / (96, 48, 148): optimizer 3*4*12 + 4 = 148.
# Stage 3 (stage3.py), stage3_param_persistence_threshold 0 so every param is released after use:
#   each param is split into ceil(numel/ws) elements per rank, `param.ds_tensor`, defragmented into
#   `lp_param_buffer`; `param.data` is empty. ws=1: 23 elements; ws=2: 6+2+3+1 = 12.
#   grads: `grad_partitions_flat_buffer` (one partition, allocated at init, persistent) + the reduce
#   bucket `ipg_buckets[fp32].buffer` of reduce_bucket_size = 8 elements = 32 bytes (DeepSpeed's
#   default, 5e8 elements, would be 2 GB: runtime configs must size it to the model).
#   optimizer: the fp32 master `fp32_partitioned_groups_flat` is a clone even for fp32 weights on CPU
#   (DeepSpeed compares the tensor's torch.device with the string "cpu", never equal), + 2 states + step.
#   ws=1: (92, 92+32=124, 3*92+4=280) both times.  ws=2: (48, 48+32=80, 3*48+4=148) both times.
#   With the default persistence threshold (1e5 elements) these tiny params stay gathered after use.
#   At ws=1 the gather of a single partition returns a view of it (no copy): params stay 92. At ws=2
#   each param is gathered into ceil(numel/2)*2 elements, 12+4+6+2 = 24 -> 96 bytes beside the 48-byte
#   partition: params 144.
CASES = {
    # name: (stage, dtype, persistence_threshold) -> {world_size: expected}
    "stage0": ((0, "fp32", 0), {1: ((92, 0, 200), (92, 92, 200)), 2: ((92, 0, 200), (92, 92, 200))}),
    "stage2": ((2, "fp32", 0), {1: ((96, 0, 292), (96, 96, 292)), 2: ((96, 0, 148), (96, 48, 148))}),
    "stage2_bf16": ((2, "bf16", 0), {1: ((48, 0, 292), (48, 48, 292))}),
    "stage3": ((3, "fp32", 0), {1: ((92, 124, 280), (92, 124, 280)), 2: ((48, 80, 148), (48, 80, 148))}),
    "stage3_persistent": ((3, "fp32", 100_000), {1: ((92, 124, 280), (92, 124, 280)),
                                                  2: ((144, 80, 148), (144, 80, 148))}),
}


def train_and_measure(stage: int, dtype: str, persistence_threshold: int) -> tuple[tuple, tuple]:
    """One DeepSpeed step, then the backward of a second; (params, grads, optimizer) after each."""
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 8,
                              "stage3_param_persistence_threshold": persistence_threshold},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    }
    if dtype == "bf16":
        config["bf16"] = {"enabled": True}
    model = tiny_mlp()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    x = torch.randn(2, 4, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    engine.backward(engine(x).float().sum())
    engine.step()
    after_step = measure_memory(engine)
    engine.backward(engine(x).float().sum())
    after_backward = measure_memory(engine)
    engine.step()
    return tuple((r.params_bytes, r.grads_bytes, r.optimizer_bytes) for r in (after_step, after_backward))


@pytest.fixture(scope="module")
def gloo_world_of_one(world_of_one):
    """A world of one with one torch thread (the byte counts do not depend on it; the time does)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(CASES))
def test_deepspeed_layout_world_size_one(gloo_world_of_one, name):
    (stage, dtype, persistence), expected = CASES[name]
    assert train_and_measure(stage, dtype, persistence) == expected[1]


def _rank_main(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed("gloo", verbose=False)
    results = {name: train_and_measure(*setup) for name, (setup, expected) in CASES.items() if world_size in expected}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


@pytest.mark.slow  # two spawned ranks importing DeepSpeed: about a minute on a busy two-core machine
def test_deepspeed_layout_two_ranks_partitions_per_rank(tmp_path):
    """Two gloo ranks: ZeRO-2 halves the optimizer state and gradients, ZeRO-3 the parameters too."""
    pytest.importorskip("deepspeed")
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(2, find_free_port(), str(tmp_path)), nprocs=2, join=True)
    expected = {name: per_ws[2] for name, (_, per_ws) in CASES.items() if 2 in per_ws}
    for rank in range(2):
        measured = json.loads(Path(tmp_path, f"rank{rank}.json").read_text())
        assert {name: tuple(map(tuple, pair)) for name, pair in measured.items()} == expected, f"rank {rank}"
    # held per rank after backward (params + grads + optimizer): stage 0 92+92+200 = 384,
    # stage 2 96+48+148 = 292, stage 3 48+80+148 = 276
    held = {name: sum(expected[name][1]) for name in ("stage0", "stage2", "stage3")}
    assert held == {"stage0": 384, "stage2": 292, "stage3": 276}
