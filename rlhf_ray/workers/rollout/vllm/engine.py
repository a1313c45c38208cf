"""The engine actor: one `vllm.LLM` in a Ray actor, on the CPU or on this actor's GPUs (see the package).

It turns a step's prompts into one `generate` call (`rows.py`), takes the policy's weights through its
mode's `WeightTransfer` (`transfer.py`) or serves its LoRA adapter, and sleeps between steps where
asked.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch

from rlhf_ray.config.schema import ConfigError, JobConfig
from rlhf_ray.models.loading import check_model_source, dtype_name, load_causal_lm, load_tokenizer_for, resolve_dtype
from rlhf_ray.models.sources import local_model_path
from rlhf_ray.runtime.wire import unpack_bucket
from rlhf_ray.telemetry.memory import MemoryReport, peak_rss_bytes
from rlhf_ray.telemetry.timers import ComputeClock
from rlhf_ray.workers.rollout.vllm.checks import check_sampling, check_vllm_runtime, engine_device
from rlhf_ray.workers.rollout.vllm.rows import (
    prompt_token_lists,
    request_batch,
    responses_from_outputs,
    rows_from_outputs,
    sampling_kwargs,
)
from rlhf_ray.workers.rollout.vllm.transfer import (
    WEIGHT_TRANSFER_BACKENDS,
    WEIGHT_TRANSFERS,
    WeightTransfer,
    init_transfer_engine,
    update_weights,
    weight_transfer_backend,
)
from rlhf_ray.workers.rollout.vllm.weights import checkpoint_layout, max_lora_rank, with_aliases

CPU_BLOCK_SIZE = 32  # KV-cache block on the CPU: the smallest size its attention kernels are tuned for


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


class VLLMRolloutWorker:
    """One rollout engine replica backed by `vllm.LLM` (see the package docstring)."""

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
        actor's GPUs (`rollout.num_gpus_per_engine`); see `transfer.py` for weight sync."""
        r = job.rollout
        self.device = engine_device(r)
        check_vllm_runtime(r, torch.cuda.is_available())
        check_sampling(r)  # settings vLLM would change fail here, before the model loads
        if self.device == "cuda" and torch.cuda.device_count() < r.tensor_parallel_size:
            raise ConfigError(f"rollout.tensor_parallel_size={r.tensor_parallel_size} needs that many GPUs in each "
                              f"engine actor, but engine {self.rank} sees {torch.cuda.device_count()}; set "
                              f"rollout.num_gpus_per_engine={r.tensor_parallel_size}")
        self.job = job
        mode = weight_transfer_backend(job)
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

        self.llm = LLM(**engine_kwargs(job, model_dir=model_dir, device=self.device, weight_transfer=mode))
        torch.set_num_threads(self.num_threads)
        self.transfer: WeightTransfer = WEIGHT_TRANSFERS[mode](self.rank, r.tensor_parallel_size)
        self.transfer.start(self.llm)
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

    # weight sync (`transfer.py`: the mode's `WeightTransfer` does what differs) -------------
    def init_weight_transfer(self, init_info: dict) -> None:
        """Join the sender's transfer group (`nccl`: blocks until every engine worker and the sender meet)."""
        init_transfer_engine(self.llm, init_info)

    def begin_weight_update(self) -> None:
        self._wake("weights")  # the KV cache stays released until the next generation
        self.transfer.begin(self.llm)

    def receive_weights(self, update_info: dict) -> None:
        """One update chunk in the configured backend's format (for `nccl`, runs alongside the broadcast)."""
        update_weights(self.llm, update_info)

    def load_weights(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        """One bucket of `(name, cpu_tensor)` from the policy: reloaded in place on the CPU, handed to
        vLLM's workers over CUDA IPC on GPUs."""
        self.transfer.load(self.llm, with_aliases(unpack_bucket(bucket), self._aliases))

    def finish_weight_update(self) -> None:
        self.transfer.finish(self.llm, self.version + 1)
        self.version += 1
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self.transfer.release()

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

