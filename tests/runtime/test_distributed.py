"""Where a rank computes and how its group talks, decided from what Ray assigned (not from what the
process can see), and the collectives that reduce on that device.

Ray 2.60 leaves `CUDA_VISIBLE_DEVICES` alone for an actor that reserved no GPU, so on a GPU node
`torch.cuda.is_available()` is true in a CPU-only rank; these tests stand in for a GPU node by
patching what torch sees and what Ray assigned.
"""

from __future__ import annotations

import types

import pytest
import torch

from rlhf_ray.runtime import distributed
from rlhf_ray.runtime.distributed import ACCELERATOR_ENV, backend_for, current_device, default_backend, role_device

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


def _on_a_gpu_node(monkeypatch, assigned):
    """This process sees a GPU; Ray assigned it `assigned` (None: not a Ray actor)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed, "assigned_gpu_ids", lambda: assigned)


def test_a_rank_ray_gave_no_gpu_runs_on_the_cpu_with_gloo_where_the_node_gpus_are_visible(monkeypatch):
    _on_a_gpu_node(monkeypatch, [])
    assert current_device() == CPU
    assert default_backend() == "gloo"  # NCCL here would open a context on GPU 0 and refuse CPU tensors


def test_a_rank_with_a_gpu_from_ray_runs_on_it_and_keeps_gloo_for_cpu_tensors(monkeypatch):
    _on_a_gpu_node(monkeypatch, ["3"])  # Ray narrows CUDA_VISIBLE_DEVICES to GPU 3: it is cuda:0 here
    assert current_device() == GPU
    assert default_backend() == "cpu:gloo,cuda:nccl"


def test_outside_a_ray_actor_the_visible_gpu_decides():
    assert role_device(None, cuda_available=True) == GPU
    assert role_device(None, cuda_available=False) == CPU
    assert role_device([], cuda_available=True) == CPU
    with pytest.raises(RuntimeError, match="Ray assigned GPU.*0.*torch sees no CUDA device"):
        role_device(["0"], cuda_available=False)
    assert backend_for(CPU) == "gloo" and backend_for(GPU) == "cpu:gloo,cuda:nccl"


def test_a_zero_gpu_actor_is_told_so_by_ray_and_sees_no_gpu(ray_cluster):
    # The tests' cluster carries ACCELERATOR_ENV, as the driver's and a submitted job's do: an actor that
    # reserved no GPU has CUDA_VISIBLE_DEVICES emptied, and Ray assigns it none.
    import os

    @ray_cluster.remote(num_cpus=0.1, num_gpus=0)
    class Probe:
        def where(self):
            return distributed.assigned_gpu_ids(), str(current_device()), os.environ.get("CUDA_VISIBLE_DEVICES")

    probe = Probe.remote()
    try:
        assert ray_cluster.get(probe.where.remote()) == ([], "cpu", "")
    finally:
        ray_cluster.kill(probe)
    assert distributed.assigned_gpu_ids() is None  # the test process is a driver, not an actor
    assert ACCELERATOR_ENV == {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1"}


class _Reduced(Exception):
    """Raised by the stand-in all-reduce once it has seen its tensor."""


def _recording_all_reduce(monkeypatch):
    import torch.distributed as dist

    seen = []

    def all_reduce(tensor, *args, **kwargs):
        seen.append(tensor.device)
        raise _Reduced

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    return seen


def test_the_zero0_skip_flag_is_reduced_on_the_engines_device(monkeypatch):
    # Under NCCL a CPU tensor in all_reduce raises; the flag must live where the engine computes
    # ("meta" stands in for the GPU here).
    from rlhf_ray.runtime.engine import TrainEngine

    seen = _recording_all_reduce(monkeypatch)
    engine = TrainEngine.__new__(TrainEngine)
    engine.engine = types.SimpleNamespace(device=torch.device("meta"))
    with pytest.raises(_Reduced):
        engine._all_ranks(True)
    assert seen == [torch.device("meta")]


def test_the_kto_reference_point_is_reduced_on_the_engines_device(monkeypatch):
    from rlhf_ray.workers.policy import PolicyWorker

    seen = _recording_all_reduce(monkeypatch)
    worker = PolicyWorker.__new__(PolicyWorker)
    worker.world_size = 2
    logps = torch.tensor([-1.0, -2.0])
    worker.engine = types.SimpleNamespace(device=torch.device("meta"),
                                          forward_eval=lambda batch, fn: {"logps": logps})
    with pytest.raises(_Reduced):
        worker.kto_reference_point({"ref_kl_logps": torch.tensor([-1.5, -1.5])})
    assert seen == [torch.device("meta")]


def test_a_frozen_model_at_zero0_runs_on_the_ranks_device():
    # The loaders leave a model on the CPU; at ZeRO-0 nothing else places a frozen role's module
    # ("meta" stands in for the rank's GPU).
    from rlhf_ray.runtime.engine import InferenceEngine

    model = torch.nn.Linear(3, 2)
    engine = InferenceEngine(model, zero_stage=0, micro_batch_size=1, world_size=1, dtype="float32",
                             device=torch.device("meta"))
    assert engine.device == torch.device("meta")
    assert {p.device.type for p in engine.module.parameters()} == {"meta"}
