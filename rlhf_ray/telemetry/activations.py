"""Bytes of activations a trained model needs during one micro-step, measured.

`memory.measure_memory` counts parameters, gradients and
optimizer state; this module measures what comes on top of them while a
micro-step runs: the tensors autograd saves for backward (layer inputs,
attention probabilities, MLP intermediates, logits and what the loss keeps),
gradient checkpointing's recomputed layer, the activation gradients that flow
back, and the temporaries of every op. Its figure is the **peak of live tensor
bytes beyond the held state** from the start of the forward pass to the end of
the backward pass.

How. An `ActivationTracker` is a `TorchDispatchMode`: every aten op run while
it is active (forward, loss, the autograd engine's backward ops, a
checkpointed layer's recomputation, DeepSpeed's gradient all-reduce) passes
through it. For each op's outputs it registers the underlying storages it has
not seen (dedupe by device and data pointer; views share their base's
storage and are not new bytes) and keeps a `StorageWeakRef` to each, which
says when the storage's last tensor is gone. Before every op, storages that
expired since the last one are closed. Each storage is thus an interval of
ops with its byte size, and the live bytes after each op are a sweep over
those intervals. Outputs that share a storage with one of the op's inputs
(in-place ops, `out=` variants, views) are not allocations and are skipped, so
storages that existed before the tracker started (weights, optimizer state,
gradients being accumulated into) are never counted. Storages created during
the micro-step that are held state at its end (the gradients autograd
allocates on a first micro-step, DeepSpeed's gradient buffers) are dropped
from every interval afterwards (`ActivationTracker.report(exclude=...)`, with
the keys `memory.held_storage_keys` finds), so what remains is activations
and temporaries only.

Why this and not the alternatives. `saved_tensors_hooks` sees only what
autograd saves, and with non-reentrant gradient checkpointing the checkpoint
installs its own (innermost) hooks, so an outer hook sees neither the
checkpointed layers' inputs nor the recomputation; it also never sees the
gradient buffers of backward, which are part of the peak. The profiler's
memory events see allocations but not which ones become held gradients, and
on CPU they need `record_shapes` and stacks to attribute them. The dispatch
mode sees every op on any device, and the held state is told apart by
storage identity. What it cannot see: scratch buffers a kernel allocates and
frees inside one op (a matmul's packing buffer) and allocator caching or
fragmentation (on a GPU `max_memory_allocated` is reported beside it as
`peak_bytes`). Its cost is a Python call per op and a scan of the live
storages, so `TrainEngine` runs it on the first micro-step only.

Two figures come out: `peak_bytes` (the figure above) and
`after_forward_bytes`, the live bytes when `mark_backward()` was called
(forward and loss done, backward not started): what is stored for backward,
the quantity Korthikanti et al. count. `end_with_autograd(loss)` ends the
peak when autograd's backward finishes, so a trainer's gradient
communication after it (DeepSpeed at ZeRO-0 flattens every gradient into one
buffer to all-reduce it, even on one rank) is not taken for activations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

StorageKey = tuple[str, int]
"""(device, data pointer) of a storage: how `memory.py` and this module name one."""


def storage_key(tensor: torch.Tensor) -> StorageKey | None:
    """(device, data pointer) of `tensor`'s storage; None for meta, empty or storage-less tensors."""
    if tensor.device.type == "meta":
        return None
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    if storage.nbytes() == 0:
        return None
    return str(tensor.device), storage.data_ptr()


@dataclasses.dataclass(frozen=True)
class ActivationReport:
    """One micro-step's activation memory, in bytes, and the batch it ran on.

    peak_bytes: most live tensor bytes beyond the held state at any op of the
    forward, loss and backward. after_forward_bytes: live bytes when backward
    began (what is stored for it). rows, seq_len: sequences and the longest
    sequence of the micro-batch (0 where unknown), so a planner estimate can be
    made for the same shape.
    """

    peak_bytes: int
    after_forward_bytes: int
    rows: int = 0
    seq_len: int = 0

    def max(self, other: ActivationReport | None) -> ActivationReport:
        """The larger measurement (by peak) of two micro-steps."""
        if other is None or self.peak_bytes >= other.peak_bytes:
            return self
        return other


@dataclasses.dataclass
class _Interval:
    key: StorageKey
    nbytes: int
    start: int
    end: int | None = None  # first op index at which the storage was seen gone; None: alive at the end


class ActivationTracker(TorchDispatchMode):
    """Records every storage the ops run inside it allocate, and when each is freed.

    Use as a context manager around forward, loss and backward; call
    `mark_backward()` between loss and backward, and `report(exclude=...)`
    after leaving the context with the keys of the held state (see the module
    docstring). A tracker is used once.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[StorageKey, tuple[StorageWeakRef, _Interval]] = {}
        self._intervals: list[_Interval] = []
        self._op = 0
        self._backward_op: int | None = None
        self._end_op: int | None = None
        self._closed = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._close_expired()
        inputs = {key for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
                  and (key := storage_key(t)) is not None}
        out = func(*args, **kwargs)
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._register(tensor, inputs)
        self._op += 1
        return out

    def __exit__(self, exc_type, exc, tb):
        result = super().__exit__(exc_type, exc, tb)
        self._close_expired()
        self._closed = True
        return result

    def _close_expired(self) -> None:
        for key in [k for k, (ref, _) in self._live.items() if ref.expired()]:
            _, interval = self._live.pop(key)
            interval.end = self._op

    def _register(self, tensor: torch.Tensor, inputs: set[StorageKey]) -> None:
        key = storage_key(tensor)
        if key is None or key in inputs:
            return
        if key in self._live:
            ref, interval = self._live[key]
            if not ref.expired():
                return  # a view or alias of a storage already counted
            del self._live[key]  # freed during this op and its address reused
            interval.end = self._op
        storage = tensor.untyped_storage()
        interval = _Interval(key, storage.nbytes(), self._op)
        self._live[key] = (StorageWeakRef(storage), interval)
        self._intervals.append(interval)

    def mark_backward(self) -> None:
        """Note that forward and loss are done: `after_forward_bytes` is read here."""
        self._close_expired()
        self._backward_op = self._op

    def end_with_autograd(self, loss: torch.Tensor) -> None:
        """Stop the peak where autograd's backward of `loss` finishes (call before backward): what a
        trainer does after it, such as DeepSpeed flattening the gradients to all-reduce them, is
        gradient communication (the planner's comm buffers), not activations."""
        if loss.requires_grad:
            loss.register_hook(self._queue_end)

    def _queue_end(self, grad: torch.Tensor) -> None:
        torch.autograd.Variable._execution_engine.queue_callback(self._mark_end)

    def _mark_end(self) -> None:
        self._close_expired()
        self._end_op = self._op

    def report(self, exclude: Iterable[StorageKey] = (), *, rows: int = 0, seq_len: int = 0) -> ActivationReport:
        """Peak and after-forward live bytes, leaving out storages alive at the end whose key is
        in `exclude` (the held state: gradients created in this micro-step)."""
        if not self._closed:
            raise RuntimeError("ActivationTracker.report() is read after the tracked block has ended")
        excluded = set(exclude)
        counted = [i for i in self._intervals if not (i.end is None and i.key in excluded)]
        # Sweep over op indices: a storage adds its bytes at the op that created it and leaves before
        # the op at which it was seen gone (frees at an index come before that op's allocations).
        allocated: dict[int, int] = {}
        freed: dict[int, int] = {}
        for interval in counted:
            allocated[interval.start] = allocated.get(interval.start, 0) + interval.nbytes
            if interval.end is not None:
                freed[interval.end] = freed.get(interval.end, 0) + interval.nbytes
        live = peak = 0
        for op in sorted(set(allocated) | set(freed)):
            if self._end_op is not None and op >= self._end_op:
                break
            live += allocated.get(op, 0) - freed.get(op, 0)
            peak = max(peak, live)
        at_backward = 0
        if self._backward_op is not None:
            at_backward = (sum(b for op, b in allocated.items() if op < self._backward_op)
                           - sum(b for op, b in freed.items() if op <= self._backward_op))
        return ActivationReport(peak_bytes=peak, after_forward_bytes=at_backward, rows=rows, seq_len=seq_len)


def batch_shape(batch: dict) -> tuple[int, int]:
    """(rows, seq_len) of a micro-batch: rows summed over its `*input_ids` tensors (a pair's
    chosen and rejected, a reward trainer's [B, K, T] as B*K), seq_len the longest of them."""
    rows = seq_len = 0
    for name, value in batch.items():
        if name.endswith("input_ids") and isinstance(value, torch.Tensor) and value.dim() >= 1:
            seq_len = max(seq_len, int(value.shape[-1]))
            rows += int(value.numel() // max(int(value.shape[-1]), 1))
    return rows, seq_len


__all__ = ["ActivationReport", "ActivationTracker", "StorageKey", "batch_shape", "storage_key"]
