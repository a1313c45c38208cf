"""Weight replacement on a vLLM worker, run there through `LLM.collective_rpc` (CPU engines).

vLLM's CPU backend repacks linear weights after loading, so new weights go
through its layerwise reload: `begin_reload` puts every layer back into its
checkpoint shape, `load_bucket` feeds checkpoint-format `(name, tensor)`
pairs (a layer is repacked as soon as all its weights have arrived, so
buckets may cut across layers), `finish_reload` processes what is left. The
functions live in an importable module because vLLM ships them to its
workers by reference.
"""

from __future__ import annotations


def _model_and_config(worker):
    from vllm.config import set_current_vllm_config

    return worker.model_runner.get_model(), set_current_vllm_config(worker.vllm_config)


def begin_reload(worker) -> None:
    from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

    model, config = _model_and_config(worker)
    with config:
        initialize_layerwise_reload(model)


def load_bucket(worker, bucket: list) -> None:
    model, config = _model_and_config(worker)
    with config:
        model.load_weights(iter(bucket))


def finish_reload(worker) -> None:
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

    model, config = _model_and_config(worker)
    with config:
        finalize_layerwise_reload(model, worker.vllm_config.model_config)
