"""Bytes DeepSpeed ZeRO allocates for a model's weights and training state,
per data-parallel rank, reproduced from DeepSpeed 0.19.8.

ZeRO (Rajbhandari et al., 2020) counts mixed-precision Adam as 2 + 2 + 12
bytes per parameter: 16-bit weights, 16-bit gradients, and an fp32 master
copy plus fp32 Adam m and v. Stage 1 partitions the 12 optimizer bytes over
the data-parallel ranks, stage 2 also the gradients, stage 3 also the weights.
What DeepSpeed really allocates differs in ways that matter on small models:

- ZeRO-1/2 (`stage_1_and_2.py`) flattens each optimizer param group into one
  buffer padded to a multiple of 2 * dp elements (`nccl_start_alignment_factor`
  2 times the dp size), keeps that whole 16-bit buffer on every rank, and
  *clones* its own 1/dp slice as the fp32 master partition, even when training
  is already fp32 (so fp32 ZeRO-1/2 holds the weights 1 + 1/dp times).
- After backward, ZeRO-1 and ZeRO-2 keep, per rank, the gradients of every
  parameter that overlaps its partition, whole parameters included, in one
  contiguous buffer (`grads_in_partition`); the other gradients are freed as
  soon as they are reduced. Without contiguous gradients ZeRO-1 keeps every
  parameter's full gradient until the step.
- ZeRO-3 (`partition_parameters.py`, `stage3.py`) partitions each tensor on its
  own into ceil(numel / dp) elements; tensors of at most
  `param_persistence_threshold` elements stay whole on every rank as well.
  Gradients live in one flat partition buffer in the model dtype. In training,
  each persistent tensor is re-gathered after every optimizer step into its own
  buffer of ceil(numel / dp) * dp elements, all of which stay allocated. The fp32
  master partition is always a copy: the branch of `_create_fp32_partitions`
  that would reuse an fp32 16-bit partition compares a `torch.device` with a
  device-name string, which is never equal.
- With contiguous gradients, a reduce bucket of `reduce_bucket_size` elements
  is allocated: by ZeRO-1/2 for each backward pass (two with `overlap_comm`),
  by ZeRO-3 once at start-up, and held.
- Offloading the optimizer moves the fp32 master, Adam states and fp32
  gradient partition to host memory (ZeRO-3 also its 16-bit gradient
  partition); offloading parameters (stage 3) moves the 16-bit partitions there.

Without ZeRO (stage 0), fp32 training holds 4 + 4 + 8 bytes per parameter;
16-bit training holds 2 + 2 and an fp32 master plus Adam states (12).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from rlhf_ray.planner.shapes import ParamTensor

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
"""Bytes per element of the dtypes the planner knows."""

OPTIMIZERS = ("adamw_fused", "adamw_torch")
"""adamw_fused: DeepSpeed FusedAdam / DeepSpeedCPUAdam (m and v, fp32).
adamw_torch: torch.optim.AdamW (m and v, fp32, plus a 0-dim fp32 `step`
tensor per tensor it optimizes)."""

_NCCL_START_ALIGNMENT_FACTOR = 2  # stage_1_and_2.py: 4-byte alignment / sizeof(fp16)


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of `dtype` ("fp32", "bf16", "fp16")."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} unknown; use one of {', '.join(DTYPE_BYTES)}.")
    return DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class ZeroConfig:
    """The DeepSpeed `zero_optimization` settings that decide memory."""

    stage: int = 0
    """0 (plain data parallel), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters)."""
    offload_optimizer: bool = False
    """`offload_optimizer.device: cpu`: fp32 master, Adam states and fp32 grads in host memory."""
    offload_params: bool = False
    """`offload_param.device: cpu` (stage 3 only): 16-bit parameter partitions in host memory."""
    reduce_bucket_size: int = 500_000_000
    """Elements in the gradient reduce bucket (DeepSpeed's default 5e8)."""
    overlap_comm: bool = False
    """Double-buffer the reduce bucket (DeepSpeed defaults it on for stage 3)."""
    contiguous_gradients: bool = True
    """Copy gradients into a contiguous buffer as they are produced (allocates the bucket)."""
    param_persistence_threshold: int = 100_000
    """Stage 3: tensors of at most this many elements stay whole on every rank."""
    sub_group_size: int = 1_000_000_000
    """Stage 3: elements per optimizer sub-group (one fp32 flat tensor each)."""
    prefetch_bucket_size: int = 50_000_000
    """Stage 3: elements gathered ahead of use."""

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"zero stage must be 0, 1, 2 or 3, got {self.stage}.")
        if self.offload_params and self.stage != 3:
            raise ValueError(f"offload_params needs ZeRO stage 3 (got stage {self.stage}); set stage 3 or drop it.")
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("offload_optimizer needs ZeRO stage 1, 2 or 3; stage 0 has no ZeRO optimizer.")


@dataclass(frozen=True)
class StateBytes:
    """Bytes one data-parallel rank holds for a model's weights and training
    state: `device` on its GPU (or in its process, on CPU runs), `host` in
    host memory when offloaded, and `transient` device bytes that exist only
    during backward (the ZeRO-1/2 reduce bucket). Keys: params, grads,
    master_params, optimizer_states, comm_buffers."""

    device: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)
    transient: dict[str, int] = field(default_factory=dict)

    def held_by_category(self) -> dict[str, int]:
        """Held bytes (device + host) in the three classes that
        `rlhf_ray.telemetry.memory.measure_memory` reports after a backward:
        params; grads (reduce buckets included); optimizer (the fp32 master
        with Adam's states, as the ZeRO paper's K = 12 counts them)."""
        category = {"params": "params", "grads": "grads", "comm_buffers": "grads",
                    "master_params": "optimizer", "optimizer_states": "optimizer"}
        held = {"params": 0, "grads": 0, "optimizer": 0}
        for place in (self.device, self.host):
            for key, nbytes in place.items():
                held[category[key]] += nbytes
        return held


def optimizer_groups(tensors: Sequence[ParamTensor], split_no_decay: bool = False) -> list[list[int]]:
    """Element counts of each optimizer param group, in parameter order.

    split_no_decay=False: one group. True: the two groups of the usual
    weight-decay split, matrices first, then every 1-D tensor (biases and
    norm weights). DeepSpeed pads each group on its own, so the split changes
    ZeRO-1/2 padding. Empty groups are dropped, as DeepSpeed does.
    """
    if not split_no_decay:
        return [[t.numel for t in tensors]]
    decay = [t.numel for t in tensors if len(t.shape) > 1]
    no_decay = [t.numel for t in tensors if len(t.shape) <= 1]
    return [g for g in (decay, no_decay) if g]


def _aligned(numel: int, dp: int) -> int:
    # stage_1_and_2.py: aligned_numel = ceil(numel / (2 * dp)) * (2 * dp)
    alignment = _NCCL_START_ALIGNMENT_FACTOR * dp
    return math.ceil(numel / alignment) * alignment


def _stage2_grad_numel(group: Sequence[int], dp: int, rank: int) -> int:
    """Elements of every tensor overlapping rank's partition (get_partition_info)."""
    partition = _aligned(sum(group), dp) // dp
    start, end = partition * rank, partition * (rank + 1)
    total, offset = 0, 0
    for numel in group:
        if start <= offset < end or offset < start < offset + numel:
            total += numel
        offset += numel
    return total


def _stage3_sub_groups(group: Sequence[int], dp: int, sub_group_size: int) -> int:
    partitions = [math.ceil(n / dp) for n in group]
    if sub_group_size >= sum(partitions):
        return 1
    count, running = 0, 0
    for i, p in enumerate(partitions):
        running += p
        if running >= sub_group_size or i == len(partitions) - 1:
            count, running = count + 1, 0
    return count


def _put(state: StateBytes, key: str, nbytes: int, on_host: bool) -> None:
    target = state.host if on_host else state.device
    target[key] = target.get(key, 0) + nbytes


def frozen_state_bytes(numels: Sequence[int], dtype: str, zero: ZeroConfig, dp_size: int) -> StateBytes:
    """Weights of a frozen (inference-only) model on one rank.

    Stage 3 partitions each tensor (ceil(numel / dp) elements) and keeps small
    tensors whole as well (from the second forward on: the first records the
    module trace and releases them after use); any other stage holds the
    whole model.
    """
    e = dtype_bytes(dtype)
    state = StateBytes()
    if zero.stage != 3:
        _put(state, "params", e * sum(numels), on_host=False)
        return state
    persistent = [n for n in numels if n <= zero.param_persistence_threshold]
    partitions = sum(math.ceil(n / dp_size) for n in numels)
    _put(state, "params", e * sum(persistent), on_host=False)
    _put(state, "params", e * partitions, on_host=zero.offload_params)
    return state


def train_state_bytes(
    groups: Sequence[Sequence[int]],
    dtype: str,
    zero: ZeroConfig,
    dp_size: int,
    optimizer: str = "adamw_fused",
    rank: int | None = None,
    grad_accum_dtype: str | None = None,
) -> StateBytes:
    """Weights, gradients, fp32 master and Adam states of a trained model on
    one data-parallel rank under DeepSpeed `zero`.

    groups: element counts of each optimizer param group's tensors, in order
    (see `optimizer_groups`). rank: the rank to account; None takes, for each
    entry, the largest over ranks (only ZeRO-1/2 gradients differ by rank).
    grad_accum_dtype: DeepSpeed's `data_types.grad_accum_dtype`; None means the
    model dtype. "fp32" with bf16 (what `runtime/deepspeed_config.py` sets for
    ZeRO 1-3) makes ZeRO-1 use `BF16_Optimizer` (an fp32 gradient buffer of the
    whole padded model beside the bf16 `.grad`s), ZeRO-2 keep its rank's
    gradient partition in fp32, and ZeRO-3 its flat gradient partition.
    ZeRO-1 with optimizer offload and fp32 accumulation is modelled as ZeRO-2
    plus fp32 accumulators for the rank's partition: within a few per cent.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer {optimizer!r} unknown; use one of {', '.join(OPTIMIZERS)}.")
    if dp_size < 1:
        raise ValueError(f"data-parallel size must be at least 1, got {dp_size}.")
    e = dtype_bytes(dtype)
    g = dtype_bytes(grad_accum_dtype) if grad_accum_dtype is not None else e
    if g != e and (dtype, grad_accum_dtype) != ("bf16", "fp32"):
        raise ValueError(f"grad_accum_dtype {grad_accum_dtype!r} with dtype {dtype!r}: only bf16 with fp32 is "
                         "modelled.")
    if g != e and zero.stage == 0:
        raise ValueError("DeepSpeed refuses grad_accum_dtype fp32 with bf16 at ZeRO stage 0; use stage 1-3.")
    numels = [n for group in groups for n in group]
    n_total = sum(numels)
    per_step_tensor = 4 if optimizer == "adamw_torch" else 0
    state = StateBytes()
    offload = zero.offload_optimizer
    bucket = zero.reduce_bucket_size * e * (2 if zero.overlap_comm else 1)

    if zero.stage == 0:
        # fp32: the optimizer works on the model's own tensors. 16-bit: FP16_Optimizer
        # keeps one fp32 master per group (fused) or per tensor (torch AdamW, unfused).
        _put(state, "params", e * n_total, False)
        _put(state, "grads", e * n_total, False)
        if e != 4:
            _put(state, "master_params", 4 * n_total, False)
        fused_masters = e != 4 and optimizer == "adamw_fused"
        step_tensors = len(groups) if fused_masters else len(numels)
        _put(state, "optimizer_states", 8 * n_total + per_step_tensor * step_tensors, False)
        return state

    if zero.stage in (1, 2):
        aligned = [_aligned(sum(group), dp_size) for group in groups]
        partition = sum(a // dp_size for a in aligned)
        _put(state, "params", e * sum(aligned), False)
        _put(state, "master_params", 4 * partition, offload)
        _put(state, "optimizer_states", 8 * partition + per_step_tensor * len(groups), offload)
        if g != e and zero.stage == 1 and not offload:
            # BF16_Optimizer: the bf16 .grad of every tensor and a padded fp32 flat accumulator.
            _put(state, "grads", e * n_total + g * sum(aligned), False)
            return state
        if offload:
            # Host: the fp32 gradient partition, a 16-bit staging copy of the
            # weights' partition, a largest-tensor 16-bit gradient buffer; the
            # GPU keeps a buffer of that size too (and, with fp32 accumulation,
            # the rank's fp32 gradient partition; ZeRO-1 also fp32 accumulators).
            _put(state, "grads", 4 * partition + e * max(numels), True)
            _put(state, "params", e * partition, True)
            _put(state, "grads", e * max(numels), False)
            if g != e:
                _put(state, "grads", g * partition * (2 if zero.stage == 1 else 1), False)
        elif g != e:
            _put(state, "grads", g * partition, False)  # one compact fp32 partition
        elif zero.stage == 1 and not zero.contiguous_gradients:
            _put(state, "grads", e * n_total, False)
        else:
            ranks = range(dp_size) if rank is None else [rank]
            largest = max(sum(_stage2_grad_numel(grp, dp_size, r) for grp in groups) for r in ranks)
            _put(state, "grads", e * largest, False)
        if zero.contiguous_gradients or offload:
            state.transient["comm_buffers"] = bucket  # set up for backward, released after it
        return state

    partitions = sum(math.ceil(n / dp_size) for n in numels)
    # After each optimizer step ZeRO-3 re-gathers every persistent tensor on its own into a buffer of
    # ceil(n / dp) * dp elements (`_all_gather_sequential`) and keeps a view of its first n: the whole
    # buffer stays allocated (a 1-element bias on 2 ranks holds 2 elements).
    persistent = sum(math.ceil(n / dp_size) * dp_size for n in numels if n <= zero.param_persistence_threshold)
    sub_groups = sum(_stage3_sub_groups(group, dp_size, zero.sub_group_size) for group in groups)
    _put(state, "params", e * persistent, False)
    _put(state, "params", e * partitions, zero.offload_params)
    _put(state, "master_params", 4 * partitions, offload)
    _put(state, "optimizer_states", 8 * partitions + per_step_tensor * sub_groups, offload)
    _put(state, "grads", g * partitions, offload)
    if offload:  # and an fp32 gradient for each master sub-group, held in host memory
        _put(state, "grads", 4 * partitions, True)
    if zero.contiguous_gradients:
        _put(state, "comm_buffers", zero.reduce_bucket_size * e, False)  # allocated at start-up, held
    return state
