"""The machine a run or benchmark ran on, and its physical limits.

`hardware_info()` goes in the header of every benchmark result.
`measure_matmul_flops` (a large GEMM) and `measure_memory_bandwidth` (a large
copy) give the two ceilings the benchmarks compare against: training
model-FLOPs utilisation (Chowdhery et al., 2022, PaLM, appendix B) is achieved
FLOP/s over the GEMM rate; autoregressive decoding of a batch reads every
weight once per token step, so its tokens/s are bounded by
bandwidth / weight_bytes * batch.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time
from pathlib import Path

import torch

PACKAGES = ("torch", "ray", "deepspeed", "transformers", "vllm")


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _cpu_model(cpuinfo: str) -> str:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware", "cpu model") and value.strip():
            return value.strip()
    return platform.processor() or platform.machine()


def _physical_cores(cpuinfo: str) -> int | None:
    """Distinct (physical id, core id) pairs in /proc/cpuinfo; None where the file does not list them."""
    cores, physical = set(), "0"
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            physical = value.strip()
        elif key == "core id":
            cores.add((physical, value.strip()))
    return len(cores) or None


def _memory_bytes() -> int | None:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed versions (from package metadata, nothing imported); None for a package not installed."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware_info() -> dict:
    """CPU model and cores, memory, GPUs (name, memory), torch threads and package versions."""
    cpuinfo = _read("/proc/cpuinfo")
    try:
        cpus_available = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus_available = os.cpu_count()
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append({"name": props.name, "memory_bytes": int(props.total_memory),
                         "capability": f"{props.major}.{props.minor}"})
    return {
        "cpu_model": _cpu_model(cpuinfo),
        "cpu_logical_cores": os.cpu_count(),
        "cpu_physical_cores": _physical_cores(cpuinfo),
        "cpus_available": cpus_available,
        "memory_bytes": _memory_bytes(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "gpus": gpus,
        "cuda": torch.version.cuda,
        "versions": package_versions(),
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


def measure_matmul_flops(n: int = 2048, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                         iters: int = 10, warmup: int = 2) -> float:
    """FLOP/s of `iters` products of two [n, n] matrices (2 n^3 FLOPs each) after `warmup` untimed ones."""
    _check_positive(n=n, iters=iters)
    device = torch.device(device)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(warmup):
        torch.mm(a, b, out=out)
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        torch.mm(a, b, out=out)
    _synchronize(device)
    seconds = time.perf_counter() - start
    return 2.0 * n**3 * iters / max(seconds, 1e-12)


def measure_memory_bandwidth(nbytes: int = 256 * 2**20, device: str | torch.device = "cpu", iters: int = 10,
                             warmup: int = 2) -> float:
    """Bytes/s of copying an `nbytes` buffer `iters` times, counting the read and the write (2 * nbytes per copy)."""
    _check_positive(nbytes=nbytes, iters=iters)
    device = torch.device(device)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(warmup):
        dst.copy_(src)
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    _synchronize(device)
    seconds = time.perf_counter() - start
    return 2.0 * nbytes * iters / max(seconds, 1e-12)
