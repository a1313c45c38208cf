"""Sizes the runtime uses and the memory planner plans with, so what is planned
is what runs: ZeRO bucket sizes for a model (the DeepSpeed config in
`runtime/deepspeed_config.py`, the planner in `planner/from_config.py`) and
the log-prob helpers' chunk of rows (`models/logprobs.py`,
`planner/memory.py`). Plain Python, no imports.
"""

from __future__ import annotations

LOGPROB_CHUNK_BYTES = 64 * 2**20
"""Most bytes of float32 temporaries one chunk of rows of the log-prob helpers may take (at least one
row is always taken): a small model's batch in one chunk, a large vocabulary's one row at a time."""


def logprob_chunk_rows(row_bytes: int) -> int:
    """Rows of `row_bytes` float32 bytes each (one row's `[T, V]` logits) the log-prob helpers take per
    chunk: as many as fit in `LOGPROB_CHUNK_BYTES`, at least one."""
    return max(1, LOGPROB_CHUNK_BYTES // max(row_bytes, 1))


DEFAULT_BUCKET = 500_000_000
"""DeepSpeed's default reduce / all-gather / prefetch bucket, in elements."""
DEFAULT_PERSISTENCE = 100_000
"""DeepSpeed's default ZeRO-3 `stage3_param_persistence_threshold`, in elements."""


def zero_buckets(zero_stage: int, model_numel: int, largest_param_numel: int) -> dict:
    """The ZeRO bucket settings rlhf-ray gives DeepSpeed for a model of
    `model_numel` parameters (`runtime/deepspeed_config.py` writes them into
    the config; `planner/from_config.py` plans with them, so both follow this one rule).

    The reduce bucket must hold the largest parameter; a quarter of the model
    keeps communication in few calls; never more than DeepSpeed's default of
    5e8 elements, which it would allocate up front (2 GB in fp32) however small
    the model. ZeRO-3 keeps tensors of at most the persistence threshold whole
    on every rank: a thousandth of the model keeps biases and norms whole and
    partitions every weight matrix (DeepSpeed's 1e5 would leave every weight of
    a small model unpartitioned).

    Worked example, tiny-gpt2 (560,640 parameters, largest tensor the 1,024 x 128
    token embedding = 131,072): bucket = max(131,072, 560,640 // 4 = 140,160) =
    140,160; persistence threshold = min(100,000, 560,640 // 1000) = 560.
    """
    bucket = int(min(DEFAULT_BUCKET, max(largest_param_numel, model_numel // 4, 1)))
    out = {"reduce_bucket_size": bucket}
    if zero_stage == 3:
        out["stage3_prefetch_bucket_size"] = bucket
        out["stage3_param_persistence_threshold"] = int(min(DEFAULT_PERSISTENCE, model_numel // 1000))
    else:
        out["allgather_bucket_size"] = bucket
    return out


__all__ = ["DEFAULT_BUCKET", "DEFAULT_PERSISTENCE", "zero_buckets"]
