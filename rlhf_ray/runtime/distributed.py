"""The base of every Ray actor role: one rank of a `torch.distributed` group.

`ActorGroup` starts N actors of a `DistributedWorker` subclass and passes each
its rank, the group size, the rendezvous address (rank 0's node and a free
port) and the CPUs it was given. The constructor sets the environment
DeepSpeed and torch read (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), sizes torch's thread pool, and joins the process group, so a
subclass can call `deepspeed.initialize` straight away (DeepSpeed adopts the
existing group). The roles take their job in a remote call once the group has
started (`workers/reference.py`, through `workers/base.py: EngineWorker`):

    class ReferenceWorker(ReferenceScoring, ExportMixin, GenerateMixin, EngineWorker):
        def setup(self, job, *, init_from):
            ...  # self.rank, self.world_size and self.device are set, the process group joined

A subclass with constructor arguments of its own (`ActorGroup(worker_args=...)`)
passes the first five on: `super().__init__(rank, world_size, master_addr,
master_port, num_threads)`.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Sequence

import numpy as np
import ray.util
import torch
import torch.distributed as dist


def get_node_ip() -> str:
    """The IP address Ray knows this node by (the one other nodes can reach)."""
    return ray.util.get_node_ip_address()


def find_free_port() -> int:
    """A TCP port that is free on this node right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


ACCELERATOR_ENV = {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1"}
"""Environment for every Ray worker of a job. Ray (2.60, what this project runs on) leaves
`CUDA_VISIBLE_DEVICES` as the node has it for an actor that reserved no GPU unless this is set, so a
CPU-only rank on a GPU node would see, and by default use, GPU 0. The driver
(`runtime.role_groups.init_ray`), the KubeRay pods and the tests' cluster set it; the device decision
below does not rely on it."""


def assigned_gpu_ids() -> list[str] | None:
    """The GPU ids Ray assigned this actor (empty for one that reserved none), None outside a Ray actor
    (a driver, a test process, a plain script)."""
    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return None
    return [str(gpu) for gpu in ray.get_gpu_ids()]


def role_device(gpu_ids: Sequence | None, cuda_available: bool) -> torch.device:
    """Where a rank computes: `cuda:0` when Ray assigned it GPUs (Ray narrows `CUDA_VISIBLE_DEVICES` to
    them), the CPU when it assigned none, whatever GPUs the process can see. Outside a Ray actor
    (`gpu_ids` None) the first visible GPU, else the CPU."""
    if gpu_ids is None:
        return torch.device("cuda", 0) if cuda_available else torch.device("cpu")
    if not gpu_ids:
        return torch.device("cpu")
    if not cuda_available:
        raise RuntimeError(f"Ray assigned GPU(s) {', '.join(map(str, gpu_ids))} to this actor, but torch sees no "
                           "CUDA device: install a CUDA build of torch on the GPU nodes, or set the role's "
                           "num_gpus_per_rank to 0")
    return torch.device("cuda", 0)


def current_device() -> torch.device:
    """`role_device` of this process: what Ray assigned it, not merely what it can see."""
    return role_device(assigned_gpu_ids(), torch.cuda.is_available())


def backend_for(device: torch.device) -> str:
    """The process-group backend of a rank on `device`: gloo on the CPU; on a GPU, NCCL for CUDA tensors
    and gloo for CPU ones (a collective on a CPU tensor, such as a flag or a count, would raise under
    NCCL alone)."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def default_backend() -> str:
    """`backend_for(current_device())`."""
    return backend_for(current_device())


class DistributedWorker:
    """One rank of a data-parallel group; subclass it for each role.

    Args:
        rank: this actor's rank in `[0, world_size)`.
        world_size: number of ranks in the group (1 still initialises
            `torch.distributed`, so DeepSpeed finds a process group).
        master_addr, master_port: where rank 0 hosts the rendezvous; a group of one rank may pass port 0,
            and the rank picks a free port of its own.
        num_threads: torch intra-op threads, normally the CPUs Ray gave the actor.
        backend: torch.distributed's backend string; default `backend_for` the
            rank's device (gloo on the CPU, `cpu:gloo,cuda:nccl` on a GPU).

    The device is what Ray assigned (`current_device`): a rank that reserved
    no GPU runs on the CPU even where the node's GPUs are visible to it.
    LOCAL_RANK is 0: Ray narrows CUDA_VISIBLE_DEVICES to the actor's own GPUs,
    so its GPU is always `cuda:0` (which this constructor selects).
    """

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, num_threads: int,
                 backend: str | None = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a group of world_size {world_size}")
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        if int(master_port) == 0:
            if world_size != 1:
                raise ValueError("master_port 0 (pick a free port here) needs world_size 1: the other ranks "
                                 "could not know the port")
            master_port = find_free_port()
        self.rank = rank
        self.world_size = world_size
        self.master_addr = master_addr
        self.master_port = int(master_port)
        os.environ.update({
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": "0",
            "MASTER_ADDR": master_addr,
            "MASTER_PORT": str(master_port),
            "OMP_NUM_THREADS": str(num_threads),
        })
        torch.set_num_threads(num_threads)
        self.device = current_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.backend = backend or backend_for(self.device)
        if not dist.is_initialized():
            dist.init_process_group(backend=self.backend, init_method="env://", rank=rank, world_size=world_size)

    def ping(self) -> bool:
        """True once the constructor has finished (the group waits on this)."""
        return True

    def rank_info(self) -> dict:
        """Where this rank runs: rank, world size, node IP, pid, backend, device, threads."""
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "local_rank": int(os.environ["LOCAL_RANK"]),
            "node_ip": get_node_ip(),
            "pid": os.getpid(),
            "backend": dist.get_backend(),
            "device": str(self.device),
            "num_threads": torch.get_num_threads(),
            "master_addr": self.master_addr,
            "master_port": self.master_port,
        }

    def set_seed(self, seed: int, offset_by_rank: bool = True) -> int:
        """Seed Python's `random`, NumPy and torch (all devices); returns the seed used.

        With `offset_by_rank` (the default) rank r uses `seed + r`, so ranks
        draw different dropout masks and samples while the run as a whole stays
        reproducible. Weights need no common seed: DeepSpeed broadcasts rank 0's
        at `initialize`. Pass `offset_by_rank=False` where every rank must draw
        the same numbers (e.g. initialising a new head before DeepSpeed)."""
        effective = seed + self.rank if offset_by_rank else seed
        random.seed(effective)
        np.random.seed(effective % 2**32)
        torch.manual_seed(effective)
        return effective
