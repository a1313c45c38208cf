"""Bytes a rank really holds for one model: parameters, gradients, optimizer state.

`measure_memory` walks the tensors a plain module + torch optimizer, or a
DeepSpeed engine at ZeRO stage 0/1/2/3, keeps alive on this rank, and sums the
bytes of each underlying storage once (views of one flat buffer, tied weights
and ZeRO-3 partitions that alias the fp32 master copy are not counted twice).
Every tensor falls in one of three classes, claimed in this order so that a
storage seen twice stays in the first class that holds it:

- params: the module's parameters (`param.data`; for ZeRO-3 also the rank's
  partition `param.ds_tensor`, with `param.data` empty while released), the
  flat low-precision buffers they are views of (`bit16_groups_flat`,
  `lp_param_buffer`, `fp16_partitioned_groups_flat`, ...), and the staging copy
  that ZeRO-Offload keeps of the rank's partition.
- grads: `param.grad`, and DeepSpeed's gradient holders: `averaged_gradients`,
  the contiguous partition `grads_in_partition` (ZeRO-2) or
  `grad_partitions_flat_buffer` (ZeRO-3), the reduce buckets `ipg_buckets`, the
  gradient of the fp32 master partition, CPU-offload gradient buffers. ZeRO-3
  allocates its reduce bucket (`reduce_bucket_size` elements; DeepSpeed's
  default 5e8 is 2 GB in fp32) at start-up and holds it: it is counted here.
- optimizer: every tensor in the inner torch optimizer's `state` (Adam's
  `exp_avg`, `exp_avg_sq` and its scalar `step` tensors: they are allocated and
  held, 4 bytes each, so they count) and the fp32 master copies of the
  weights (`single_partition_of_fp32_groups`, `fp32_partitioned_groups_flat`,
  `fp32_groups_flat_partition`). Counting master weights as optimizer state
  follows the ZeRO paper (Rajbhandari et al., 2020, sec. 3.1: "K = 12" bytes
  per parameter of optimizer state for mixed-precision Adam = fp32 weights,
  momentum and variance). Where a master copy shares the parameters' storage
  it is counted once, as params. (DeepSpeed 0.19.8's ZeRO-3 means to reuse an
  fp32 partition as its own master, but its test compares a `torch.device` with
  a device string, which never holds: the master is always a separate clone.)

What is held depends on when you look: DeepSpeed frees gradients inside
`engine.step()` and torch optimizers create their state at the first step. A
snapshot taken after `backward()` of the second or a later step shows all three
classes at once; `MemoryReport.max` combines snapshots. Module buffers (rotary
tables, masks) and activations are not counted here: `telemetry.activations`
measures a micro-step's activations beyond these held bytes, and trained
roles report them beside (`MemoryReport.activations`).
"""

from __future__ import annotations

import dataclasses
import resource
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from rlhf_ray.telemetry.activations import ActivationReport

CATEGORIES = ("params", "grads", "optimizer")

# Attributes of DeepSpeed's optimizer wrappers (ZeRO 1/2: DeepSpeedZeroOptimizer,
# ZeRO-3: DeepSpeedZeroOptimizer_Stage3, stage 0: BF16_Optimizer / FP16_Optimizer)
# as laid out in DeepSpeed 0.19.8. Missing attributes are skipped, so one list
# serves every wrapper and a plain torch optimizer.
_PARAM_ATTRS = (
    "bit16_groups_flat",  # ZeRO 1/2: the model's weights, one flat buffer per group
    "bf16_groups_flat",  # stage 0 bf16
    "fp16_groups_flat",  # stage 0 fp16 (fused)
    "lp_param_buffer",  # ZeRO-3: this rank's partitions, defragmented
    "fp16_partitioned_groups_flat",  # ZeRO-3: views of lp_param_buffer
    "param_groups_fp16_flat_cpu_memory",  # ZeRO-3 with offloaded params
    "param_buffer_of_bit16_for_cpu_offload_groups",  # ZeRO-Offload staging copy
)
_GRAD_ATTRS = (
    "averaged_gradients",
    "all_grad_tensors",
    "grads_in_partition",
    "grad_partitions_flat_buffer",
    "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition",
    "accumulated_grads_in_cpu",
    "offload_gradient_dict",
    "temp_grad_buffer_for_cpu_offload",
    "temp_grad_buffer_for_gpu_offload",
    "fp32_groups_gradients",  # stage 0 bf16
    "fp32_groups_gradients_flat",
    "fp32_groups_actual_gradients_flat",
    "fp32_groups_gradient_flat_partition",
)
_MASTER_ATTRS = (
    "single_partition_of_fp32_groups",  # ZeRO 1/2
    "fp32_partitioned_groups_flat",  # ZeRO-3
    "fp32_groups_flat_partition",  # stage 0 bf16
    "fp32_groups_flat",  # stage 0 fp16 (fused)
    "fp32_groups",  # stage 0 fp16 (unfused)
    "muon_momentum_buffer_partitioned_groups_flat",  # ZeRO-3 Muon
)


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """What one rank holds for one role's model, in bytes.

    `peak_bytes` is the figure roles report as `memory/<role>/peak_bytes`: on a
    GPU the allocator's `max_memory_allocated` (everything, activations too), on
    a CPU the bytes of parameters, gradients and optimizer state held (the
    process's peak RSS is reported beside it, as `peak_rss_bytes`).
    """

    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    peak_rss_bytes: int
    cuda_max_allocated_bytes: int | None
    device: str
    activations: ActivationReport | None = None
    """A trained role's activation peak of one micro-step (`telemetry.activations`); None elsewhere."""

    @property
    def held_bytes(self) -> int:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes

    @property
    def peak_bytes(self) -> int:
        if self.cuda_max_allocated_bytes is not None:
            return self.cuda_max_allocated_bytes
        return self.held_bytes

    def max(self, other: MemoryReport) -> MemoryReport:
        """Field-wise maximum of two snapshots of the same role (e.g. after backward and after step)."""
        cuda = [b for b in (self.cuda_max_allocated_bytes, other.cuda_max_allocated_bytes) if b is not None]
        return MemoryReport(
            params_bytes=max(self.params_bytes, other.params_bytes),
            grads_bytes=max(self.grads_bytes, other.grads_bytes),
            optimizer_bytes=max(self.optimizer_bytes, other.optimizer_bytes),
            peak_rss_bytes=max(self.peak_rss_bytes, other.peak_rss_bytes),
            cuda_max_allocated_bytes=max(cuda) if cuda else None,
            device=self.device,
            activations=self.activations.max(other.activations) if self.activations else other.activations,
        )

    def to_metrics(self, role: str) -> dict[str, int]:
        """`memory/<role>/{params,grads,optimizer,held,peak,peak_rss}_bytes` for a metrics row, and for a
        trained role `activations_bytes`, `activations_forward_bytes` and the micro-batch they were
        measured on (`activations_rows`, `activations_seq_len`)."""
        if not role or "/" in role:
            raise ValueError(f"role name {role!r} cannot name a metric: use a non-empty name without '/'")
        prefix = f"memory/{role}/"
        out = {
            prefix + "params_bytes": self.params_bytes,
            prefix + "grads_bytes": self.grads_bytes,
            prefix + "optimizer_bytes": self.optimizer_bytes,
            prefix + "held_bytes": self.held_bytes,
            prefix + "peak_bytes": self.peak_bytes,
            prefix + "peak_rss_bytes": self.peak_rss_bytes,
        }
        if self.activations is not None:
            a = self.activations
            out.update({prefix + "activations_bytes": a.peak_bytes,
                        prefix + "activations_forward_bytes": a.after_forward_bytes,
                        prefix + "activations_rows": a.rows, prefix + "activations_seq_len": a.seq_len})
        return out


class _Ledger:
    """Sums storage bytes per category, each storage once (keyed by device and data pointer)."""

    def __init__(self) -> None:
        self.bytes = dict.fromkeys(CATEGORIES, 0)
        self.seen: set[tuple[str, int]] = set()

    def add(self, category: str, tensors: Iterable[torch.Tensor]) -> None:
        for tensor in tensors:
            if tensor.device.type == "meta":
                continue
            try:
                storage = tensor.untyped_storage()
                key, nbytes = (str(tensor.device), storage.data_ptr()), storage.nbytes()
            except (RuntimeError, NotImplementedError, TypeError):  # sparse or other storage-less tensors
                key, nbytes = (str(tensor.device), id(tensor)), tensor.numel() * tensor.element_size()
            if nbytes == 0 or key in self.seen:
                continue
            self.seen.add(key)
            self.bytes[category] += nbytes


def _tensors_in(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors in nested lists/tuples/dicts and DeepSpeed's IPG buckets (their `.buffer`)."""
    if depth > 4 or obj is None:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors_in(value, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for value in obj:
            yield from _tensors_in(value, depth + 1)
    elif hasattr(obj, "buffer"):  # IPGBucket (ZeRO 1/2: list of tensors) / IPGBucketZ3 (one tensor)
        yield from _tensors_in(obj.buffer, depth + 1)
        yield from _tensors_in(getattr(obj, "grads", None), depth + 1)  # grads queued for reduction


def _optimizer_chain(optimizer: Any) -> list[Any]:
    """The optimizer and every wrapped `.optimizer` below it (DeepSpeed wrapper -> torch optimizer)."""
    chain, seen = [], set()
    while optimizer is not None and id(optimizer) not in seen:
        chain.append(optimizer)
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None)
    return chain


def _unwrap(module: Any, optimizer: Any) -> tuple[torch.nn.Module, Any]:
    """(model, optimizer) from a plain module or a DeepSpeed engine (duck-typed: `.module` and `.optimizer`)."""
    if hasattr(module, "module") and hasattr(module, "optimizer") and isinstance(module.module, torch.nn.Module):
        return module.module, optimizer if optimizer is not None else module.optimizer
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"measure_memory expects a torch.nn.Module or a DeepSpeed engine, got {type(module).__name__}")
    return module, optimizer


def _held_ledger(module: torch.nn.Module, optimizer: Any) -> tuple[_Ledger, list[torch.Tensor]]:
    """The ledger of every held storage by class (see the module docstring), and the parameters."""
    chain = _optimizer_chain(optimizer)
    ledger = _Ledger()
    params = list(module.parameters())
    for opt in chain:
        for group in getattr(opt, "param_groups", None) or ():
            params.extend(p for p in group.get("params", ()) if isinstance(p, torch.Tensor))

    # params: ZeRO-3 partitions first (and ZeRO++ hpZ secondary partitions), then full weights where gathered
    for attr in ("ds_tensor", "ds_secondary_tensor"):
        ledger.add("params", (getattr(p, attr) for p in params if isinstance(getattr(p, attr, None), torch.Tensor)))
    master = [t for opt in chain for name in _MASTER_ATTRS for t in _tensors_in(getattr(opt, name, None))]
    master_ids = {id(t) for t in master}
    ledger.add("params", (p.data for p in params if id(p) not in master_ids))
    for opt in chain:
        for name in _PARAM_ATTRS:
            ledger.add("params", _tensors_in(getattr(opt, name, None)))

    ledger.add("grads", (p.grad for p in params + master if p.grad is not None))
    ledger.add("grads", (p.grad_accum for p in params if isinstance(getattr(p, "grad_accum", None), torch.Tensor)))
    for opt in chain:
        for name in _GRAD_ATTRS:
            ledger.add("grads", _tensors_in(getattr(opt, name, None)))
        ledger.add("grads", _tensors_in(list(getattr(opt, "ipg_buckets", {}).values())))

    ledger.add("optimizer", master)
    for opt in chain:
        state = getattr(opt, "state", None)
        if isinstance(state, dict):
            ledger.add("optimizer", _tensors_in(list(state.values())))

    return ledger, params


def held_storage_keys(module: Any, optimizer: Any = None) -> set[tuple[str, int]]:
    """(device, data pointer) of every storage `measure_memory` counts now: parameters, gradients
    and optimizer state. `telemetry.activations` leaves these out of a micro-step's activations."""
    module, optimizer = _unwrap(module, optimizer)
    return set(_held_ledger(module, optimizer)[0].seen)


def measure_memory(module: Any, optimizer: Any = None) -> MemoryReport:
    """Bytes of parameters, gradients and optimizer state this rank holds now.

    Args:
        module: a `torch.nn.Module`, or a DeepSpeed engine (its `.module` and
            `.optimizer` are used; any ZeRO stage, with or without offload).
        optimizer: a torch optimizer or a DeepSpeed optimizer wrapper; defaults
            to the engine's own. `None` for a frozen model.

    Storages are counted whole and once each (see the module docstring for the
    classes and their order), so ZeRO's alignment padding in flat buffers is
    included: it is allocated.
    """
    module, optimizer = _unwrap(module, optimizer)
    ledger, params = _held_ledger(module, optimizer)
    device = _device_of(params)
    return MemoryReport(
        params_bytes=ledger.bytes["params"],
        grads_bytes=ledger.bytes["grads"],
        optimizer_bytes=ledger.bytes["optimizer"],
        peak_rss_bytes=peak_rss_bytes(),
        cuda_max_allocated_bytes=cuda_peak_bytes(device) if device.startswith("cuda") else None,
        device=device,
    )


def _device_of(params: list[torch.Tensor]) -> str:
    """The compute device: where the parameters live (a released ZeRO-3 parameter keeps an empty
    tensor there even when its partition is offloaded to the CPU)."""
    for p in params:
        if p.device.type != "meta":
            return str(p.device)
    return "cpu"


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes.

    On Linux the high-water mark of the process's own memory (`VmHWM` in
    /proc/self/status), which `reset_peaks` lowers. Not `getrusage`: Linux's
    ru_maxrss also keeps the largest RSS of any of its threads that has
    exited, and the parent's when the parent started it through vfork (as
    Python's `subprocess` does), and no reset lowers it. Elsewhere ru_maxrss
    (bytes on macOS)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024


def cuda_peak_bytes(device: str | torch.device | None = None) -> int | None:
    """`torch.cuda.max_memory_allocated(device)`, or None where CUDA is absent or unused by this process."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.max_memory_allocated(device))


def reset_peaks() -> bool:
    """Start new peak measurements: CUDA's peak statistics and (Linux) the peak RSS.

    The RSS high-water mark is reset by writing 5 to `/proc/self/clear_refs`
    (Linux 4.0+); returns whether that worked (it does not where /proc is
    read-only or on other systems, and the RSS peak then stays the process's).
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True
