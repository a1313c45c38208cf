"""How the policy's weights reach an engine: one `WeightTransfer` per mode, which the actor calls around a sync.

* `reload` (CPU): the policy streams buckets through Ray as raw bytes
  (`load_weights(bucket)`, `runtime.wire`, as for the HF engine), and each
  bucket is loaded in place on vLLM's worker through its layerwise reload
  (`reload.py`, called with `collective_rpc`).
* GPU, vLLM's weight-transfer API (`vllm.distributed.weight_transfer`), mode
  `rollout.weight_transfer` (`auto` picks by placement: `weight_transfer_backend`):
  - `ipc`: buckets through Ray as on the CPU; the actor copies each bucket onto
    each of its GPUs and hands vLLM's workers CUDA IPC handles to the copies.
    About one bucket per GPU is staged.
  - `nccl`: the policy's rank 0 joins an NCCL group with every engine worker and
    broadcasts the weights GPU to GPU (`sender.VLLMWeightSender`); nothing goes
    through the object store, and the engine only opens and closes the update.

A sync is `begin`, `load` per bucket (streamed modes), `finish`, then the actor
drops its prefix cache and calls `release`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from rlhf_ray.config.schema import JobConfig
from rlhf_ray.models.loading import dtype_name
from rlhf_ray.workers.rollout.vllm import reload
from rlhf_ray.workers.rollout.vllm.checks import engine_device

WEIGHT_TRANSFER_BACKENDS = ("ipc", "nccl")  # the GPU modes, vLLM's weight-transfer backends


def weight_transfer_backend(job: JobConfig) -> str:
    """How the policy's weights reach the engines: `reload` on the CPU; on GPUs `rollout.weight_transfer`,
    where `auto` picks by placement: `ipc` when the engines share the policy's GPU bundles
    (`placement.colocate`: NCCL cannot join two ranks on one GPU, and the object store is local
    there), when the policy has no GPU to broadcast from, or for a LoRA policy (whose parameters are
    adapters on a frozen base); `nccl` otherwise (GPU to GPU, nothing through the object store, which
    crosses nodes when the engines sit elsewhere)."""
    r = job.rollout
    if engine_device(r) == "cpu":
        return "reload"
    if r.weight_transfer != "auto":
        return r.weight_transfer
    colocated = any({"policy", "rollout"} <= set(group) for group in job.placement.colocate)
    if colocated or job.policy.num_gpus_per_rank == 0 or job.policy.lora.enabled:
        return "ipc"
    return "nccl"


def bucket_metadata(bucket: list[tuple[str, torch.Tensor]]) -> dict:
    """Names, dtype names (`"bfloat16"`) and shapes of a weight bucket, as vLLM's update infos carry them."""
    return {"names": [name for name, _ in bucket],
            "dtype_names": [dtype_name(t.dtype) for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket]}


def init_transfer_engine(llm, init_info: dict) -> None:
    """Set up the weight-transfer engine of vLLM's workers (`nccl`: blocks until the whole group meets)."""
    from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

    llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info=init_info))


def update_weights(llm, update_info: dict) -> None:
    """Hand vLLM's workers one update chunk in the backend's format."""
    from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

    llm.update_weights(WeightTransferUpdateRequest(update_info=update_info))


class WeightTransfer(ABC):
    """One engine's end of a weight-transfer mode. `bucket`s are `(name, tensor)` on the CPU, tied aliases
    included; `version` is the weight version the update makes."""

    name = ""

    def __init__(self, rank: int, tensor_parallel_size: int):
        self.rank = rank
        self.tensor_parallel_size = tensor_parallel_size

    def start(self, llm) -> None:
        """Once, after the engine is built."""

    @abstractmethod
    def begin(self, llm) -> None:
        """Before the first bucket of an update."""

    @abstractmethod
    def load(self, llm, bucket: list[tuple[str, torch.Tensor]]) -> None:
        """One bucket into the engine's weights."""

    @abstractmethod
    def finish(self, llm, version: int) -> None:
        """After the last bucket: the engine serves weight version `version`."""

    def release(self) -> None:
        """After the update, once the engine has dropped its stale prefix cache: free what `load` staged."""


class ReloadTransfer(WeightTransfer):
    """CPU: vLLM's layerwise in-place reload on each engine worker, one bucket at a time."""

    name = "reload"

    def begin(self, llm) -> None:
        llm.collective_rpc(reload.begin_reload)

    def load(self, llm, bucket: list[tuple[str, torch.Tensor]]) -> None:
        llm.collective_rpc(reload.load_bucket, args=(bucket,))

    def finish(self, llm, version: int) -> None:
        llm.collective_rpc(reload.finish_reload)


class _TransferAPI(WeightTransfer):
    """The GPU modes: an update opened and closed through vLLM's weight-transfer API."""

    def begin(self, llm) -> None:
        llm.start_weight_update()

    def finish(self, llm, version: int) -> None:
        llm.finish_weight_update(weight_version=str(version))


class IPCTransfer(_TransferAPI):
    """Buckets through Ray, staged on each of the engine's GPUs and handed to its workers over CUDA IPC."""

    name = "ipc"

    def __init__(self, rank: int, tensor_parallel_size: int):
        super().__init__(rank, tensor_parallel_size)
        self._devices: list[tuple[int, str]] = []  # (CUDA index, uuid) of each GPU, read at the first bucket

    def start(self, llm) -> None:
        init_transfer_engine(llm, {"packed": False})

    def load(self, llm, bucket: list[tuple[str, torch.Tensor]]) -> None:
        from torch.multiprocessing.reductions import reduce_tensor

        if not self._devices:
            self._devices = [(d, str(torch.cuda.get_device_properties(d).uuid))
                             for d in range(self.tensor_parallel_size)]
        handles: list[dict] = [{} for _ in bucket]
        staged = []
        for device, uuid in self._devices:
            for i, (_, tensor) in enumerate(bucket):
                copy = tensor.detach().to(f"cuda:{device}").contiguous()
                staged.append(copy)
                handles[i][uuid] = reduce_tensor(copy)[1]
        update_weights(llm, {**bucket_metadata(bucket), "ipc_handles": handles})
        # vLLM's workers hold their own references until each layer is loaded; torch's IPC
        # refcount keeps the memory until then, and `ipc_collect` returns it afterwards.
        del staged

    def release(self) -> None:
        torch.cuda.ipc_collect()


class NCCLTransfer(_TransferAPI):
    """The weights arrive by broadcast from the policy (`sender.VLLMWeightSender`, which drives the engine's
    `receive_weights`), never as buckets."""

    name = "nccl"

    def load(self, llm, bucket: list[tuple[str, torch.Tensor]]) -> None:
        raise RuntimeError(f"rollout engine {self.rank} receives weights over {self.name} from "
                           "VLLMWeightSender; streaming buckets through load_weights needs weight_transfer='ipc'")


WEIGHT_TRANSFERS = {cls.name: cls for cls in (ReloadTransfer, IPCTransfer, NCCLTransfer)}
