"""The vLLM rollout engine: vLLM's `LLM` in a Ray actor (GPU), same rows as `hf.py`.

One actor holds one `vllm.LLM`, tensor-parallel over the actor's GPUs (the
actor reserves `rollout.num_gpus_per_engine` = `rollout.tensor_parallel_size`
of them; vLLM's own worker processes inherit them). Written against vLLM 0.33:

* Generation: prompt token ids in (left padding stripped), one `LLM.generate`
  call per step with one `SamplingParams` per request: the `n` samples of a
  prompt are one request (`n=n`, a per-prompt seed; vLLM seeds its k-th sample
  `seed + k`), and ReMax's greedy baseline is a second set of requests at
  temperature 0 in the same call. `logprobs=0` returns the sampled token's
  log-prob; with `logprobs_mode="processed_logprobs"` it is taken after
  temperature (and top-k/top-p), the distribution the token was drawn from,
  which is what the policy recomputes (`rollout/logprob_diff`).
* Weight sync through vLLM's weight-transfer API (`vllm.distributed.weight_transfer`
  and `LLM.start_weight_update` / `update_weights` / `finish_weight_update`),
  with one of two backends chosen at `setup`:
  - `ipc` (default, works wherever the engine runs): the policy streams buckets
    of CPU tensors through Ray (`load_weights(bucket)`, as for the HF engine);
    this actor copies each bucket onto each of its GPUs and hands vLLM's workers
    CUDA IPC handles to the copies. About one bucket per GPU is staged (plus
    what vLLM still holds of layers it has not finished loading).
  - `nccl`: the policy's rank 0 joins an NCCL group with every engine worker and
    broadcasts the weights GPU to GPU (`VLLMWeightSender`, vLLM's
    `NCCLTrainerWeightTransferEngine`); nothing goes through the object store.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Sequence

import torch

from rlhf_ray.config.schema import ConfigError, JobConfig, RolloutConfig
from rlhf_ray.models.loading import check_model_source, load_causal_lm, load_tokenizer_for, resolve_dtype
from rlhf_ray.telemetry.memory import MemoryReport, peak_rss_bytes
from rlhf_ray.telemetry.timers import ComputeClock
from rlhf_ray.workers.rollout.base import assemble_rows

MIN_VLLM_VERSION = (0, 33)
WEIGHT_TRANSFER_BACKENDS = ("ipc", "nccl")
MAX_VLLM_TEMPERATURE = 2.0  # SamplingParams rejects higher temperatures
_MASK64 = (1 << 64) - 1


# runtime checks --------------------------------------------------------------
def _version_tuple(version: str) -> tuple[int, ...]:
    """`"0.33.0rc1"` -> `(0, 33, 0)`: the leading dotted numbers of a version string."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def vllm_runtime_problem(vllm_version: str | None, cuda_available: bool) -> str | None:
    """What keeps `rollout.engine: vllm` from running here (None when nothing does).

    `vllm_version` is the installed vllm's version, None when it is absent."""
    if vllm_version is None:
        return ("rollout.engine: vllm is not installed; install it with `pip install 'rlhf-ray[vllm]'` on a "
                "machine with CUDA GPUs, or set rollout.engine=hf")
    if _version_tuple(vllm_version) < MIN_VLLM_VERSION:
        wanted = ".".join(map(str, MIN_VLLM_VERSION))
        return (f"rollout.engine: vllm {vllm_version} is installed, but this engine uses the weight-transfer API "
                f"of vllm>={wanted}; upgrade with `pip install -U 'vllm>={wanted}'`, or set rollout.engine=hf")
    if not cuda_available:
        return ("rollout.engine: vllm needs a CUDA GPU and none is visible here; give the engine actors GPUs "
                "(rollout.num_gpus_per_engine), or set rollout.engine=hf to generate with Hugging Face on CPU")
    return None


def _installed_vllm_version() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return None
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:  # a source tree on the path, not an installed wheel
        import vllm

        return getattr(vllm, "__version__", "0")


def check_vllm_runtime() -> None:
    """Raise `ConfigError` saying what to install or pick when vLLM cannot run in this process."""
    version = _installed_vllm_version()
    problem = vllm_runtime_problem(version, torch.cuda.is_available())
    if problem:
        raise ConfigError(problem)


# pure helpers: requests in, rows out ------------------------------------------
def prompt_token_lists(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """The real tokens of each left-padded prompt row: `[B, P]` -> B lists."""
    return [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]


def request_seed(seed: int, rank: int, prompt_index: int) -> int:
    """A 31-bit seed for one prompt's request, from the step seed, the engine replica and the prompt.

    Mixed with the SplitMix64 finaliser (Steele, Lea & Flood, 2014) so that
    nearby inputs give unrelated seeds; vLLM seeds the request's k-th sample
    `seed + k`, so samples of different prompts do not share a stream."""
    x = (seed * 0x9E3779B97F4A7C15 + rank * 0xBF58476D1CE4E5B9 + prompt_index * 0x94D049BB133111EB) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & 0x7FFFFFFF


def sampling_kwargs(rollout: RolloutConfig, *, eos_id: int, n: int = 1, greedy: bool = False,
                    seed: int | None = None) -> dict:
    """Keyword arguments of `vllm.SamplingParams` for one request.

    Samples: `n` per request at `rollout.temperature`/`top_p`/`top_k`, seeded,
    with the sampled token's log-prob (`logprobs=0`). Greedy: temperature 0,
    one response, no log-probs. Both stop at the tokenizer's EOS and return
    token ids only (no detokenising)."""
    if n < 1:
        raise ValueError(f"n={n}: a request needs at least one sample")
    common = {"max_tokens": rollout.max_new_tokens, "stop_token_ids": [eos_id], "detokenize": False}
    if greedy:
        return {"n": 1, "temperature": 0.0, **common}
    if rollout.temperature > MAX_VLLM_TEMPERATURE:
        raise ConfigError(f"rollout.temperature: vLLM samples at temperatures up to {MAX_VLLM_TEMPERATURE}, got "
                          f"{rollout.temperature}; lower it or set rollout.engine=hf")
    return {"n": n, "temperature": rollout.temperature, "top_p": rollout.top_p, "top_k": rollout.top_k,
            "seed": seed, "logprobs": 0, **common}


def completion_response(completion, *, pad_id: int, eos_id: int,
                        with_logprobs: bool) -> tuple[list[int], list[float]]:
    """Tokens (up to and including the first EOS) and their log-probs from one vLLM `CompletionOutput`.

    Pad tokens are dropped, as the HF engine's `strip_response` drops them (it
    cannot tell a generated pad from padding), so both engines build the same
    row from the same tokens. `completion.logprobs[t]` maps token id -> `Logprob`
    for position t; the sampled token is always in it when `logprobs=0` was asked."""
    token_ids = list(completion.token_ids)
    positions = completion.logprobs if with_logprobs else None
    if with_logprobs and (positions is None or len(positions) < len(token_ids)):
        raise RuntimeError(f"vLLM returned log-probs for {0 if positions is None else len(positions)} of "
                           f"{len(token_ids)} tokens; the request must set logprobs=0")
    tokens, logprobs = [], []
    for position, token in enumerate(token_ids):
        if token != eos_id and token == pad_id:
            continue
        tokens.append(token)
        if with_logprobs:
            entry = positions[position]
            if not entry or token not in entry:
                raise RuntimeError(f"vLLM's log-probs at position {position} lack the sampled token {token}")
            logprobs.append(float(entry[token].logprob))
        if token == eos_id:
            break
    return tokens, logprobs


def responses_from_outputs(request_outputs: Sequence, n: int, *, pad_id: int, eos_id: int,
                           with_logprobs: bool) -> tuple[list[list[int]], list[list[float]]]:
    """Flatten vLLM `RequestOutput`s, `n` completions each, into rows: request i's at `i*n ... i*n+n-1`,
    ordered by completion index."""
    responses, logprobs = [], []
    for request in request_outputs:
        completions = sorted(request.outputs, key=lambda c: c.index)
        if len(completions) != n:
            raise RuntimeError(f"vLLM returned {len(completions)} completions for request {request.request_id}, "
                               f"expected n={n}")
        for completion in completions:
            tokens, lps = completion_response(completion, pad_id=pad_id, eos_id=eos_id, with_logprobs=with_logprobs)
            responses.append(tokens)
            logprobs.append(lps)
    return responses, logprobs


def logprob_rows(logprobs: list[list[float]], response_length: int) -> torch.Tensor:
    """`[rows, response_length]` float32, each row's log-probs from the left, zeros after."""
    out = torch.zeros(len(logprobs), response_length)
    for row, values in enumerate(logprobs):
        values = values[:response_length]
        if values:
            out[row, :len(values)] = torch.tensor(values, dtype=torch.float32)
    return out


def request_batch(token_lists: list[list[int]], rollout: RolloutConfig, *, n: int, sample: bool, greedy: bool,
                  seed: int, rank: int, eos_id: int) -> tuple[list[list[int]], list[dict]]:
    """Prompts and `SamplingParams` kwargs of one `generate` call: a sampling request (n samples, its own
    seed) per prompt first, then a greedy request per prompt."""
    prompts, kwargs = [], []
    if sample:
        prompts += token_lists
        kwargs += [sampling_kwargs(rollout, eos_id=eos_id, n=n, seed=request_seed(seed, rank, i))
                   for i in range(len(token_lists))]
    if greedy:
        prompts += token_lists
        kwargs += [sampling_kwargs(rollout, eos_id=eos_id, greedy=True) for _ in token_lists]
    return prompts, kwargs


def rows_from_outputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, request_outputs: Sequence, *, n: int,
                      sample: bool, greedy: bool, response_length: int, pad_id: int,
                      eos_id: int) -> dict[str, torch.Tensor]:
    """The rows `generate` returns (see `base.py`) from the `RequestOutput`s of a `request_batch`."""
    prompts = input_ids.shape[0]
    out = {}
    if sample:
        responses, logprobs = responses_from_outputs(request_outputs[:prompts], n, pad_id=pad_id, eos_id=eos_id,
                                                     with_logprobs=True)
        out = assemble_rows(input_ids, attention_mask, responses, response_length, pad_id, eos_id, repeat=n)
        out["engine_logprobs"] = logprob_rows(logprobs, response_length) * out["response_mask"]
    if greedy:
        greedy_outputs = request_outputs[prompts:] if sample else request_outputs
        responses, _ = responses_from_outputs(greedy_outputs, 1, pad_id=pad_id, eos_id=eos_id, with_logprobs=False)
        rows = assemble_rows(input_ids, attention_mask, responses, response_length, pad_id, eos_id, repeat=1)
        out.update({f"greedy_{k}": v for k, v in rows.items()})
    return out


def bucket_metadata(bucket: list[tuple[str, torch.Tensor]]) -> dict:
    """Names, dtype names (`"bfloat16"`) and shapes of a weight bucket, as vLLM's update infos carry them."""
    return {"names": [name for name, _ in bucket],
            "dtype_names": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket]}


def engine_kwargs(job: JobConfig, *, model_dir: str, weight_transfer: str) -> dict:
    """Keyword arguments of `vllm.LLM` for this job's rollout engine."""
    if weight_transfer not in WEIGHT_TRANSFER_BACKENDS:
        raise ConfigError(f"weight_transfer {weight_transfer!r}: expected one of {', '.join(WEIGHT_TRANSFER_BACKENDS)}")
    r, model = job.rollout, job.policy.model
    kwargs = {
        "model": model_dir,
        "tensor_parallel_size": r.tensor_parallel_size,
        "gpu_memory_utilization": r.gpu_memory_utilization,
        "dtype": str(resolve_dtype(model.dtype, "cuda")).removeprefix("torch."),
        "seed": job.run.seed,
        "trust_remote_code": model.trust_remote_code,
        "max_model_len": job.data.max_prompt_length + r.max_new_tokens,
        "enable_prefix_caching": True,       # the n samples and the greedy request share their prompt
        "skip_tokenizer_init": True,         # token ids in, token ids out
        "logprobs_mode": "processed_logprobs",
        "weight_transfer_config": {"backend": weight_transfer},
    }
    if r.tensor_parallel_size > 1:
        # Worker processes on this actor's GPUs (Ray's executor would ask the cluster for more).
        kwargs["distributed_executor_backend"] = "mp"
    return kwargs


def engine_rank_offsets(num_engines: int, tensor_parallel_size: int) -> list[int]:
    """First rank of each engine's workers in the NCCL weight-transfer group (rank 0 is the policy sender)."""
    return [1 + i * tensor_parallel_size for i in range(num_engines)]


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# the actor -------------------------------------------------------------------
class VLLMRolloutWorker:
    """One rollout engine replica backed by `vllm.LLM` (see the module docstring)."""

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, num_threads: int):
        # Replicas are independent (vLLM runs its own process groups): the ActorGroup rendezvous is unused.
        self.rank = rank
        torch.set_num_threads(max(1, int(num_threads)))
        self.clock = ComputeClock()
        self.llm = None
        self._materialised_dir: str | None = None

    def setup(self, job: JobConfig, *, init_from: str) -> dict:
        """Start vLLM on `init_from` (checkpoint directory, hub name or preset) with weight transfer
        `rollout.weight_transfer`: `ipc` (buckets through `load_weights`) or `nccl` (from `VLLMWeightSender`)."""
        check_vllm_runtime()
        r = job.rollout
        weight_transfer = r.weight_transfer
        sampling_kwargs(r, eos_id=0)  # settings vLLM would reject fail here, before the model loads
        visible = torch.cuda.device_count()
        if visible < r.tensor_parallel_size:
            raise ConfigError(f"rollout.tensor_parallel_size={r.tensor_parallel_size} needs that many GPUs in each "
                              f"engine actor, but engine {self.rank} sees {visible}; set "
                              f"rollout.num_gpus_per_engine={r.tensor_parallel_size}")
        self.job = job
        self.weight_transfer = weight_transfer
        cfg = job.policy.model
        self.tokenizer = load_tokenizer_for(cfg.tokenizer or init_from, trust_remote_code=cfg.trust_remote_code)
        kwargs = engine_kwargs(job, model_dir=self._model_dir(init_from), weight_transfer=weight_transfer)
        # The engine core and workers are this actor's child processes; CUDA IPC handles (and
        # `apply_model`'s function) reach them only as pickled messages, which vLLM gates on this flag.
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        from vllm import LLM
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        self.llm = LLM(**kwargs)
        if weight_transfer == "ipc":
            self.llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info={"packed": False}))
        self._ipc_devices: list[tuple[int, str]] = []
        self.version = 0
        return self.memory()

    def _model_dir(self, init_from: str) -> str:
        """A checkpoint vLLM can load: `init_from` itself, or, for a preset (built in memory from a seeded
        config) or a checkpoint whose vocabulary the tokenizer outgrows, the model the policy builds, saved."""
        source = check_model_source(init_from)
        if source != "preset":
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(init_from, trust_remote_code=self.job.policy.model.trust_remote_code)
            if config.get_text_config().vocab_size >= len(self.tokenizer):
                return init_from
        cfg = self.job.policy.model
        model = load_causal_lm(init_from, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                               seed=self.job.run.seed, tokenizer=self.tokenizer)
        self._materialised_dir = tempfile.mkdtemp(prefix=f"rlhf-ray-vllm-engine{self.rank}-")
        model.save_pretrained(self._materialised_dir)
        self.tokenizer.save_pretrained(self._materialised_dir)
        return self._materialised_dir

    def ping(self) -> int:
        return self.rank

    # generation ----------------------------------------------------------------
    def _run(self, token_lists: list[list[int]], kwargs_list: list[dict]):
        from vllm import SamplingParams

        requests = [{"prompt_token_ids": tokens} for tokens in token_lists]
        return self.llm.generate(requests, [SamplingParams(**kw) for kw in kwargs_list], use_tqdm=False)

    def generate(self, prompts: dict, n: int, greedy: bool, seed: int, sample: bool = True) -> dict:
        """Samples (`n` per prompt) and, with `greedy`, one greedy response per prompt, in one
        `LLM.generate` call; rows as in `base.py`. `sample=False` skips the samples."""
        ids, mask = prompts["input_ids"], prompts["attention_mask"]
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        token_lists, kwargs_list = request_batch(prompt_token_lists(ids, mask), self.job.rollout, n=n, sample=sample,
                                                 greedy=greedy, seed=seed, rank=self.rank, eos_id=eos)
        if not token_lists:
            return {}
        with self.clock.measure("generate"):
            outputs = self._run(token_lists, kwargs_list)
            return rows_from_outputs(ids, mask, outputs, n=n, sample=sample, greedy=greedy,
                                     response_length=self.job.rollout.max_new_tokens, pad_id=pad, eos_id=eos)

    def greedy_text(self, prompt_ids: list[int]) -> list[int]:
        """Greedy tokens for one prompt (the weight-sync check compares them with the policy's)."""
        eos = self.tokenizer.eos_token_id
        outputs = self._run([list(prompt_ids)], [sampling_kwargs(self.job.rollout, eos_id=eos, greedy=True)])
        responses, _ = responses_from_outputs(outputs, 1, pad_id=self.tokenizer.pad_token_id, eos_id=eos,
                                              with_logprobs=False)
        return responses[0]

    # weight sync: vLLM's weight-transfer API -------------------------------------
    def init_weight_transfer(self, init_info: dict) -> None:
        """Join the sender's transfer group (`nccl`: blocks until every engine worker and the sender meet)."""
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        self.llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info=init_info))

    def begin_weight_update(self) -> None:
        self.llm.start_weight_update()

    def receive_weights(self, update_info: dict) -> None:
        """One update chunk in the configured backend's format (for `nccl`, runs alongside the broadcast)."""
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        self.llm.update_weights(WeightTransferUpdateRequest(update_info=update_info))

    def load_weights(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        """One bucket of `(name, cpu_tensor)` from the policy, handed to vLLM's workers over CUDA IPC."""
        if self.weight_transfer != "ipc":
            raise RuntimeError(f"rollout engine {self.rank} receives weights over {self.weight_transfer} from "
                               "VLLMWeightSender; streaming buckets through load_weights needs weight_transfer='ipc'")
        from torch.multiprocessing.reductions import reduce_tensor

        if not self._ipc_devices:
            self._ipc_devices = [(d, str(torch.cuda.get_device_properties(d).uuid))
                                 for d in range(self.job.rollout.tensor_parallel_size)]
        handles: list[dict] = [{} for _ in bucket]
        staged = []
        for device, uuid in self._ipc_devices:
            for i, (_, tensor) in enumerate(bucket):
                copy = tensor.detach().to(f"cuda:{device}").contiguous()
                staged.append(copy)
                handles[i][uuid] = reduce_tensor(copy)[1]
        self.receive_weights({**bucket_metadata(bucket), "ipc_handles": handles})
        # vLLM's workers hold their own references until each layer is loaded; torch's IPC
        # refcount keeps the memory until then, and `ipc_collect` returns it afterwards.
        del staged

    def finish_weight_update(self) -> None:
        self.llm.finish_weight_update(weight_version=str(self.version + 1))
        self.version += 1
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        if self.weight_transfer == "ipc":
            torch.cuda.ipc_collect()

    def close_weight_transfer(self) -> None:
        """Leave the sender's transfer group (vLLM keeps serving)."""
        self.llm.shutdown_weight_transfer_engine()

    # bookkeeping -----------------------------------------------------------------
    def compute_time(self) -> dict[str, float]:
        """Seconds of compute by kind since the last call (`ComputeClock.take`)."""
        return self.clock.take()

    def memory(self) -> dict:
        """`memory/rollout/*`: parameter bytes over the engine's workers; peak = what vLLM reserves on its
        GPUs (`gpu_memory_utilization` of each, weights and KV cache)."""
        r = self.job.rollout
        params = sum(self.llm.apply_model(_param_bytes))
        reserved = sum(int(torch.cuda.get_device_properties(d).total_memory * r.gpu_memory_utilization)
                       for d in range(r.tensor_parallel_size))
        report = MemoryReport(params_bytes=params, grads_bytes=0, optimizer_bytes=0, peak_rss_bytes=peak_rss_bytes(),
                              cuda_max_allocated_bytes=reserved, device="cuda")
        return report.to_metrics("rollout")

    def shutdown(self) -> None:
        """Stop vLLM (its engine and worker processes) and remove a materialised checkpoint."""
        self.llm = None
        if self._materialised_dir:
            shutil.rmtree(self._materialised_dir, ignore_errors=True)
            self._materialised_dir = None


# the policy side of the nccl backend --------------------------------------------
class EngineActorsClient:
    """vLLM's `VLLMWeightSyncClient` protocol over our engine actors (one `LLM` each).

    `RayVLLMWeightSyncClient` assumes one engine (its workers at ranks 1..);
    with several replicas each needs its own rank offset in the group."""

    def __init__(self, engines: list, tensor_parallel_size: int):
        self.engines = list(engines)
        self.offsets = engine_rank_offsets(len(self.engines), tensor_parallel_size)

    def _all(self, call: Callable) -> None:
        import ray

        ray.get([call(engine, i) for i, engine in enumerate(self.engines)])

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._all(lambda e, i: e.init_weight_transfer.remote({**init_info, "rank_offset": self.offsets[i]}))

    def start_weight_update(self) -> None:
        self._all(lambda e, i: e.begin_weight_update.remote())

    def update_weights(self, update_info: dict) -> None:
        self._all(lambda e, i: e.receive_weights.remote(update_info))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all(lambda e, i: e.finish_weight_update.remote())  # each engine counts its own versions

    def shutdown_weight_transfer_engine(self) -> None:
        self._all(lambda e, i: e.close_weight_transfer.remote())


def gathered_module_source(module: torch.nn.Module, gathered: Callable | None = None):
    """A vLLM `WeightSource` over `module.named_parameters()` whose full tensors come from `gathered`.

    `gathered(params)` is the policy engine's context that materialises ZeRO-3
    partitions (`TrainEngine.gathered`); shapes come from `ds_shape` for
    partitioned parameters, so metadata never gathers. Every policy rank
    iterates, so the gathers line up; partitioned values are copied out of the
    gather before it is released."""
    from contextlib import nullcontext
    from functools import cached_property

    from vllm.distributed.weight_transfer import ParamMeta, WeightSource

    gather = gathered or (lambda params: nullcontext())

    class GatheredModuleSource(WeightSource):
        @cached_property
        def metadata(self) -> list:
            return [ParamMeta(name, p.dtype, tuple(getattr(p, "ds_shape", p.shape)))
                    for name, p in module.named_parameters()]

        def iter_full(self):
            for name, p in module.named_parameters():
                with gather([p]):
                    yield name, (p.detach().clone() if hasattr(p, "ds_shape") else p.detach())

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
        import ray
        from vllm.distributed.weight_transfer import WeightTransferTrainerFactory
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        address, port = "", 0  # only the sender's rendezvous endpoint matters
        if rank == 0:
            address = ray.util.get_node_ip_address()
            with socket.socket() as probe:
                probe.bind(("", 0))
                port = probe.getsockname()[1]
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

    def close(self) -> None:
        """Tear down the transfer group on both sides (the engines keep generating)."""
        if self.transfer.is_sender:
            self.transfer.client.shutdown_weight_transfer_engine()
        self.transfer.shutdown()

