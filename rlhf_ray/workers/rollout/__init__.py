"""Rollout engines: one contract (`base.RolloutEngine`), two backends (`hf.py`, the `vllm` package)."""

from importlib import import_module

# rollout.engine -> the actor class implementing `base.RolloutEngine` (imported only when asked for,
# so vLLM is never imported by a job that does not use it).
ENGINES = {
    "hf": "rlhf_ray.workers.rollout.hf:HFRolloutWorker",
    "vllm": "rlhf_ray.workers.rollout.vllm.engine:VLLMRolloutWorker",
}


def engine_worker_class(engine: str) -> type:
    """The actor class of `rollout.engine`."""
    if engine not in ENGINES:
        raise ValueError(f"rollout.engine {engine!r}: expected one of {', '.join(ENGINES)}")
    module, name = ENGINES[engine].split(":")
    return getattr(import_module(module), name)
