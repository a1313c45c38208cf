"""Weight buckets as they travel between actors.

Ray pickles a torch tensor argument into bytes and builds a new tensor from
them on the other side: on this project's CPU sync path that cost about
120-160 ms per 100 MB, where a NumPy array goes into Ray's shared-memory
object store with one copy and comes out of it with none (about 20 ms). So a
bucket of `(name, tensor)` travels as `(name, uint8 array, dtype, shape)`:
the raw bytes of the tensor, which covers dtypes NumPy lacks (bfloat16, the
float8 types), and the receiver gets back tensors that read those bytes in
place. They are read-only (they live in the object store) and are only
copied from: into vLLM's, the HF engine's or the reference's parameters.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

WireBucket = list[tuple[str, Any, str, tuple[int, ...]]]


def pack_bucket(bucket: list[tuple[str, torch.Tensor]]) -> WireBucket:
    """`(name, cpu_tensor)` pairs as `(name, uint8 array, dtype name, shape)`; the arrays share the
    tensors' memory until Ray copies them into its object store."""
    out = []
    for name, tensor in bucket:
        flat = tensor.detach().contiguous().reshape(-1)
        out.append((name, flat.view(torch.uint8).numpy(), str(flat.dtype).removeprefix("torch."),
                    tuple(tensor.shape)))
    return out


def unpack_bucket(payload: WireBucket | list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """The `(name, tensor)` pairs of a packed bucket (read-only views of the received bytes); an unpacked
    bucket passes through unchanged."""
    out = []
    with warnings.catch_warnings():
        # The object store's arrays are read-only; these tensors are only read (copied from).
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for item in payload:
            if len(item) == 2:
                out.append(item)
                continue
            name, raw, dtype, shape = item
            out.append((name, torch.from_numpy(raw).view(getattr(torch, dtype)).reshape(shape)))
    return out


__all__ = ["WireBucket", "pack_bucket", "unpack_bucket"]
