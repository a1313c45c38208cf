"""Measuring a run: phase timers, per-role memory, metric sinks, progress, hardware.

Used by every role and driver; imports torch (and tqdm, TensorBoard, W&B where
asked for), never ray or deepspeed: DeepSpeed engines are read duck-typed.
"""

from rlhf_ray.telemetry.hardware import hardware_info, measure_matmul_flops, measure_memory_bandwidth, package_versions
from rlhf_ray.telemetry.memory import (
    MemoryReport,
    cuda_peak_bytes,
    measure_memory,
    peak_rss_bytes,
    reset_peaks,
)
from rlhf_ray.telemetry.metrics import (
    MetricsWriter,
    read_metrics,
    summarise,
    to_scalar,
    write_summary,
)
from rlhf_ray.telemetry.progress import Progress, format_metrics
from rlhf_ray.telemetry.timers import ComputeClock, PhaseTimer

__all__ = [
    "ComputeClock",
    "MemoryReport",
    "MetricsWriter",
    "PhaseTimer",
    "Progress",
    "cuda_peak_bytes",
    "format_metrics",
    "hardware_info",
    "measure_matmul_flops",
    "measure_memory",
    "measure_memory_bandwidth",
    "package_versions",
    "peak_rss_bytes",
    "read_metrics",
    "reset_peaks",
    "summarise",
    "to_scalar",
    "write_summary",
]
