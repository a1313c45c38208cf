"""Rollout engines: one interface (`base.py`), two backends (`hf.py`, `vllm.py`)."""


def engine_worker_class(engine: str) -> type:
    """The actor class of `rollout.engine` (vLLM is imported only when asked for)."""
    if engine == "hf":
        from rlhf_ray.workers.rollout.hf import HFRolloutWorker

        return HFRolloutWorker
    if engine == "vllm":
        from rlhf_ray.workers.rollout.vllm import VLLMRolloutWorker

        return VLLMRolloutWorker
    raise ValueError(f"rollout.engine {engine!r}: expected hf or vllm")
