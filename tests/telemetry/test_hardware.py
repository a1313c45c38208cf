"""hardware_info and the two physical-limit probes (small sizes; numbers are checked, never timed)."""

import json
import math
import subprocess
import sys

import pytest
import torch

from rlhf_ray.telemetry.hardware import (
    _physical_cores,
    hardware_info,
    measure_matmul_flops,
    measure_memory_bandwidth,
    package_versions,
)


def test_hardware_info_describes_this_machine():
    info = hardware_info()
    json.dumps(info)  # goes into benchmark headers as JSON
    assert isinstance(info["cpu_model"], str) and info["cpu_model"]
    assert info["cpu_logical_cores"] >= 1 and info["cpus_available"] >= 1
    assert info["memory_bytes"] is None or info["memory_bytes"] > 0
    assert info["torch_threads"] == torch.get_num_threads()
    assert info["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert set(info["versions"]) == {"python", "torch", "ray", "deepspeed", "transformers", "vllm"}
    assert info["gpus"] == [] or all(g["memory_bytes"] > 0 for g in info["gpus"])


def test_package_versions_reads_metadata_without_importing():
    versions = package_versions(("torch", "no-such-package-rlhf-ray"))
    assert versions["torch"] and versions["no-such-package-rlhf-ray"] is None


def test_physical_cores_counts_distinct_core_ids():
    # two sockets x two cores, hyper-threaded: 8 logical entries, 4 distinct (socket, core) pairs
    entries = [f"processor\t: {i}\nphysical id\t: {i // 4}\ncore id\t\t: {i % 2}\n" for i in range(8)]
    assert _physical_cores("\n".join(entries)) == 4
    assert _physical_cores("processor : 0\n") is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_rate_is_a_positive_finite_number(dtype):
    flops = measure_matmul_flops(n=64, dtype=dtype, iters=2, warmup=1)
    assert math.isfinite(flops) and flops > 0


def test_copy_bandwidth_is_a_positive_finite_number():
    rate = measure_memory_bandwidth(nbytes=1 << 20, iters=2, warmup=1)
    assert math.isfinite(rate) and rate > 0


def test_bad_sizes_are_errors():
    with pytest.raises(ValueError, match="n must be at least 1"):
        measure_matmul_flops(n=0)
    with pytest.raises(ValueError, match="iters must be at least 1"):
        measure_memory_bandwidth(nbytes=16, iters=0)


@pytest.mark.gpu
def test_probes_on_gpu():
    assert measure_matmul_flops(n=256, dtype=torch.bfloat16, device="cuda", iters=2) > 0
    assert measure_memory_bandwidth(nbytes=1 << 24, device="cuda", iters=2) > 0
    assert hardware_info()["gpus"][0]["memory_bytes"] > 0


def test_telemetry_imports_neither_ray_nor_deepspeed():
    # a fresh interpreter: this one may have imported deepspeed for other tests
    code = ("import sys, rlhf_ray.telemetry; "
            "print(sorted(m for m in ('ray', 'deepspeed', 'vllm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
