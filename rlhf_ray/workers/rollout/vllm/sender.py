"""The policy's end of the `nccl` weight transfer: a vLLM sender over our engine actors.

Runs in the policy's actors (`workers/policy.py`), never in an engine's; the engine's end is
`transfer.NCCLTransfer`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from rlhf_ray.runtime.distributed import find_free_port, get_node_ip
from rlhf_ray.workers.rollout.vllm.weights import tied_aliases


def engine_rank_offsets(num_engines: int, tensor_parallel_size: int) -> list[int]:
    """First rank of each engine's workers in the NCCL weight-transfer group (rank 0 is the policy sender)."""
    return [1 + i * tensor_parallel_size for i in range(num_engines)]


class EngineActorsClient:
    """vLLM's `VLLMWeightSyncClient` protocol over our engine actors (one `LLM` each).

    `RayVLLMWeightSyncClient` assumes one engine (its workers at ranks 1..);
    with several replicas each needs its own rank offset in the group."""

    def __init__(self, engines: list, tensor_parallel_size: int):
        self.engines = list(engines)
        self.offsets = engine_rank_offsets(len(self.engines), tensor_parallel_size)

    def _all(self, call: Callable) -> None:
        from rlhf_ray.runtime.actor_group import wait_all

        wait_all([call(engine, i) for i, engine in enumerate(self.engines)],
                 lambda i: f"role 'rollout' rank {i} of {len(self.engines)}")

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._all(lambda e, i: e.init_weight_transfer.remote({**init_info, "rank_offset": self.offsets[i]}))

    def start_weight_update(self) -> None:
        self._all(lambda e, i: e.begin_weight_update.remote())

    def update_weights(self, update_info: dict) -> None:
        self._all(lambda e, i: e.receive_weights.remote(update_info))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all(lambda e, i: e.finish_weight_update.remote())  # each engine counts its own versions


def sent_weight_layout(module: torch.nn.Module) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """`(name, dtype, full shape)` of every tensor the `nccl` sender sends, in order: each parameter of
    `module.named_parameters()`, then its tied aliases (`tied_aliases`), as the IPC and CPU paths send
    them. Shapes come from `ds_shape` for ZeRO-3 partitioned parameters, so nothing is gathered."""
    aliases = tied_aliases(module)
    out = []
    for name, p in module.named_parameters():
        shape = tuple(getattr(p, "ds_shape", p.shape))
        out += [(n, p.dtype, shape) for n in (name, *aliases.get(name, ()))]
    return out


def sent_weights(module: torch.nn.Module, gathered: Callable | None = None):
    """`(name, full tensor)` in `sent_weight_layout`'s order. `gathered(params)` is the policy engine's
    context that materialises ZeRO-3 partitions (`TrainEngine.gathered`); every policy rank iterates,
    so the gathers line up; partitioned values are copied out of the gather before it is released."""
    from contextlib import nullcontext

    gather = gathered or (lambda params: nullcontext())
    aliases = tied_aliases(module)
    for name, p in module.named_parameters():
        with gather([p]):
            tensor = p.detach().clone() if hasattr(p, "ds_shape") else p.detach()
        for n in (name, *aliases.get(name, ())):
            yield n, tensor


def gathered_module_source(module: torch.nn.Module, gathered: Callable | None = None):
    """A vLLM `WeightSource` over `sent_weight_layout` / `sent_weights` of `module`."""
    from functools import cached_property

    from vllm.distributed.weight_transfer import ParamMeta, WeightSource

    class GatheredModuleSource(WeightSource):
        @cached_property
        def metadata(self) -> list:
            return [ParamMeta(name, dtype, shape) for name, dtype, shape in sent_weight_layout(module)]

        def iter_full(self):
            return sent_weights(module, gathered)

    return GatheredModuleSource()


class VLLMWeightSender:
    """The policy's end of the `nccl` weight transfer (vLLM's `NCCLTrainerWeightTransferEngine`).

    Built on every policy rank (`connect`); rank 0 is the sender: it hosts the
    rendezvous, joins one NCCL group with every engine worker (world size
    `1 + num_engines * tensor_parallel_size`) and, per `send`, drives
    begin/receive/finish on the engines while broadcasting packed buffers of
    `bucket_bytes`. The other ranks only take part in the ZeRO-3 gathers."""

    def __init__(self, transfer, *, engines: int, model_bytes: int):
        self.transfer = transfer
        self.num_engines = engines
        self.model_bytes = model_bytes

    @classmethod
    def connect(cls, engines: list, *, rank: int, module: torch.nn.Module, tensor_parallel_size: int,
                bucket_bytes: int, gathered: Callable | None = None) -> VLLMWeightSender:
        if not torch.cuda.is_available():
            raise RuntimeError("weight_transfer 'nccl' broadcasts from the policy's GPU, and policy rank "
                               f"{rank} sees none; use weight_transfer 'ipc' (buckets through Ray)")
        from vllm.distributed.weight_transfer import WeightTransferTrainerFactory
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        address, port = "", 0  # only the sender's rendezvous endpoint matters
        if rank == 0:
            address, port = get_node_ip(), find_free_port()
        init_info = NCCLTrainerInitInfo(master_address=address, master_port=port,
                                        world_size=1 + len(engines) * tensor_parallel_size, rank=rank,
                                        packed=True, packed_buffer_size_bytes=bucket_bytes)
        source = gathered_module_source(module, gathered)
        model_bytes = sum(m.dtype.itemsize * math.prod(m.shape) for m in source.metadata)
        transfer = WeightTransferTrainerFactory.trainer_init(
            init_info, client=EngineActorsClient(engines, tensor_parallel_size), source=source)
        return cls(transfer, engines=len(engines), model_bytes=model_bytes)

    def send(self) -> dict:
        """Push the current weights to every engine (call on every policy rank); returns `sync/bytes`."""
        self.transfer.send_weights()
        sent = self.model_bytes * self.num_engines if self.transfer.is_sender else 0
        return {"sync/bytes": float(sent)}
