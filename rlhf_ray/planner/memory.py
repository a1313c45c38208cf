"""Per-role, per-GPU memory of the four-model RLHF layout.

Each role (policy, critic, reference, reward, rollout) gets a `RolePlan`: its
bytes per GPU by component, which of them it holds for the whole step
(weights, optimizer state) and which only during one phase of it (generate,
score, train). Roles sharing GPUs add their resident bytes, plus the largest
sum of their transient bytes over the phases. `zero.py` gives DeepSpeed's
exact allocations; this module adds the estimates:

- Activations, after Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models", sec. 4.1): a GPT layer stores
  s*b*h*(34 + 5*a*s/h) bytes with 16-bit activations, a fused GeLU and 1-byte
  dropout masks (s sequence, b micro-batch, h hidden, a heads). Spelled out
  per stored tensor of the Hugging Face implementations rlhf-ray trains, so it
  scales to fp32, to no dropout, to grouped-query attention, to an inner MLP
  width I and to FlashAttention (no s^2 terms, a fp32 log-sum-exp per head
  and token), and counts what is really kept: GPT-2's default gelu_new, a Python formula
  in HF storing 5 I-wide tensors, runs as torch's fused kernel in rlhf-ray
  (2, as Korthikanti's count); Llama's RMSNorm keeps its input in fp32 and
  the normalised tensor; Llama's eager softmax is fp32.
  Gradient checkpointing of every layer keeps each layer's input (s*b*h) and
  one layer's activations while it is recomputed. A training micro-step peaks
  either at the head (everything stored, plus the fp32 logits the loss keeps
  and their fp32 gradient) or at a layer's backward (the layer's activations
  and its gradients); `train_activation_bytes` takes the larger. Checked
  against the bytes `telemetry.activations` measures on the tiny presets
  (`tests/planner/test_activations_measured.py`).
- Logits: in a forward pass the LM head's output in the compute dtype plus
  its fp32 copy for the token log-probs, b*s*V*(bytes + 4); in training the
  fp32 copy and its gradient, b*s*V*8.
- Rollout: vLLM holds weights / tensor-parallel size plus a KV cache of
  2 * layers * kv_heads * head_dim * bytes per token, and pre-allocates
  `gpu_memory_utilization` of the whole GPU for weights, activations and KV
  blocks at start-up, so it claims that fraction whatever the batch needs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

from rlhf_ray.planner.shapes import ModelShape, lora_tensors, param_tensors
from rlhf_ray.planner.zero import (
    StateBytes,
    ZeroConfig,
    dtype_bytes,
    frozen_state_bytes,
    optimizer_groups,
    train_state_bytes,
)
from rlhf_ray.sizing import logprob_chunk_rows

GiB = 1024**3
PHASES: tuple[str, ...] = ("generate", "score", "train")
"""The phases of an online step, in order: decode, score (concurrent forwards), update."""


def _check_batch(owner: str, dtype: str, sequences: int, tokens: int) -> None:
    dtype_bytes(dtype)
    if sequences < 1 or tokens < 1:
        raise ValueError(f"{owner}: batch and sequence length must be at least 1, got {sequences} and {tokens}.")


@dataclass(frozen=True)
class TrainSettings:
    """A trained role (policy or critic): DeepSpeed engine and batch shape."""

    dtype: str = "bf16"
    """Weights and activations: "bf16", "fp16" (fp32 master weights) or "fp32"."""
    zero: ZeroConfig = field(default_factory=lambda: ZeroConfig(stage=2))
    """ZeRO stage and offload."""
    micro_batch_size: int = 1
    """Sequences per forward/backward pass on one GPU."""
    seq_len: int = 1024
    """Prompt plus response tokens of one sequence."""
    logits_len: int | None = None
    """Positions the LM head runs on in training (None: all `seq_len`): an online policy scores only its
    response (`models.forward.lm_logits` keeps the last max_new_tokens + 1)."""
    gradient_checkpointing: bool = True
    """Recompute each layer in backward instead of storing its activations."""
    flash_attention: bool = True
    """Attention without the s^2 score matrices (FlashAttention / SDPA)."""
    dropout: bool = False
    """Dropout on (stores 1-byte masks); RLHF fine-tuning usually turns it off."""
    optimizer: str = "adamw_fused"
    """"adamw_fused" (DeepSpeed FusedAdam / CPU Adam) or "adamw_torch"."""
    split_no_decay: bool = False
    """Two optimizer groups (biases and norms without weight decay) instead of one."""
    grad_accum_dtype: str | None = None
    """DeepSpeed's data_types.grad_accum_dtype (None: the model dtype). rlhf-ray
    sets "fp32" for bf16 under ZeRO 1-3."""
    lora_rank: int = 0
    """LoRA adapters of this rank on `lora_targets` (0: every weight trains)."""
    lora_targets: tuple[str, ...] = ()
    """Module names (last name component) that carry adapters."""

    def __post_init__(self) -> None:
        _check_batch("TrainSettings", self.dtype, self.micro_batch_size, self.seq_len)


@dataclass(frozen=True)
class InferenceSettings:
    """A frozen role (reference or reward model): weights and forward batch."""

    dtype: str = "bf16"
    """Weights and activations: "bf16", "fp16" or "fp32"."""
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    """Stage 3 partitions the weights over the role's GPUs; offload_params moves them to host."""
    micro_batch_size: int = 1
    """Sequences per forward pass on one GPU."""
    seq_len: int = 1024
    """Prompt plus response tokens of one sequence."""
    flash_attention: bool = True
    """Attention without the s^2 score matrices (FlashAttention / SDPA)."""

    def __post_init__(self) -> None:
        _check_batch("InferenceSettings", self.dtype, self.micro_batch_size, self.seq_len)


@dataclass(frozen=True)
class RolloutSettings:
    """The generation engine."""

    engine: Literal["vllm", "hf"] = "vllm"
    """"vllm" (weights plus the KV cache it claims) or "hf" (transformers `generate`, a full copy of the weights)."""
    dtype: str = "bf16"
    """Weights and KV cache."""
    tensor_parallel_size: int = 1
    """GPUs one vLLM instance spans (weights and KV heads split over them)."""
    gpu_memory_utilization: float = 0.9
    """vLLM: share of each GPU the instance claims at start-up."""
    num_sequences: int = 256
    """Sequences generated per step over all instances (ReMax: include the greedy ones)."""
    prompt_len: int = 512
    """Longest prompt, in tokens."""
    response_len: int = 512
    """Longest response, in tokens."""
    max_num_seqs: int = 256
    """vLLM: sequences one instance decodes at once; more wait their turn."""
    max_num_batched_tokens: int = 8192
    """vLLM: tokens in one scheduler step (sizes its activation workspace)."""
    block_size: int = 16
    """vLLM: tokens per KV-cache block; each sequence takes whole blocks."""
    sleep: bool = False
    """Release weights and KV cache between generations (vLLM sleep mode), so
    the engine holds GPU memory only while it generates."""

    def __post_init__(self) -> None:
        if self.engine not in ("vllm", "hf"):
            raise ValueError(f"rollout engine must be 'vllm' or 'hf', got {self.engine!r}.")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}.")
        _check_batch("RolloutSettings", self.dtype, self.num_sequences, self.prompt_len + self.response_len)
        if self.tensor_parallel_size < 1:
            raise ValueError(f"RolloutSettings: tensor_parallel_size must be at least 1, got "
                             f"{self.tensor_parallel_size}.")


@dataclass(frozen=True)
class RolePlan:
    """One role's memory on each of its GPUs.

    gpu: bytes per GPU by component (params, grads, master_params,
    optimizer_states, comm_buffers, gathered_params, activations, logits,
    kv_cache, workspace). resident: bytes held for the whole step. phases:
    bytes added only while a phase runs. host: host-memory bytes per GPU's
    process. reserved: what vLLM claims per GPU (0 for other roles); minimum:
    what vLLM must find inside that claim to start (weights, workspace and
    one sequence's KV cache).
    """

    role: str
    model: str
    num_params: int
    num_gpus: int
    gpu: dict[str, int]
    resident: int
    phases: dict[str, int]
    host: dict[str, int] = field(default_factory=dict)
    reserved: int = 0
    minimum: int = 0
    notes: tuple[str, ...] = ()

    @property
    def peak_bytes(self) -> int:
        """Most bytes the role needs on one GPU for its whole batch at once."""
        return self.resident + max(self.phases.values(), default=0)

    @property
    def claimed_bytes(self) -> int:
        """Most bytes the role takes on one GPU: vLLM takes exactly its claim
        (a batch needing more KV cache runs fewer sequences at a time)."""
        return self.reserved or self.peak_bytes

    @property
    def host_bytes(self) -> int:
        return sum(self.host.values())


def _e(dtype: str) -> int:
    return dtype_bytes(dtype)


# HF activations whose module is one fused op saving only its input (GeLU, SiLU in torch). GPT-2's
# default gelu_new is a Python formula in HF (`NewGELUActivation`), but rlhf-ray loads it as torch's
# fused tanh-GELU (`models.loading.fuse_activations`), so it stores its input only; the others in HF's
# ACT2FN are Python formulas: every intermediate autograd needs is a stored tensor.
_FUSED_ACTS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish")
# I-wide tensors a Python GELU formula (HF's NewGELUActivation, 0.5*x*(1+tanh(c*(x+0.044715x^3))))
# stores beside its input: tanh's output, 0.5*x and 1+tanh for the final product.
_GELU_FORMULA_EXTRA = 3


def mlp_stored_widths(shape: ModelShape) -> int:
    """Elements per token one MLP stores for backward in the HF implementation, its input apart.

    GPT-2: the up-projection output I and the activation's output I (the down-projection's input),
    and for an activation HF computes as a Python formula 3 more I-wide intermediates of it (gelu_new
    is fused at load). Llama (SwiGLU): gate and up outputs, SiLU(gate) and the product, 4I.
    """
    inner = shape.intermediate_size
    act = shape.hidden_act or ("gelu_new" if shape.model_type == "gpt2" else "silu")
    if shape.model_type == "llama":
        return 4 * inner
    return (2 + (0 if act in _FUSED_ACTS else _GELU_FORMULA_EXTRA)) * inner


def norm_stored_bytes(shape: ModelShape, dtype: str) -> int:
    """Bytes per token one norm stores, its output apart (that is the next matmul's input).

    GPT-2's LayerNorm (one fused op): its input in the compute dtype. HF Llama's RMSNorm upcasts:
    it stores its input in fp32 (the input itself in fp32) and the normalised tensor in the
    compute dtype, which the weight multiplies: 4h + e*h.
    """
    h = shape.hidden_size
    return (4 + _e(dtype)) * h if shape.model_type == "llama" else _e(dtype) * h


def layer_activation_bytes(
    shape: ModelShape, micro_batch: int, seq_len: int, dtype: str, *, flash_attention: bool = True,
    dropout: bool = False,
) -> int:
    """Bytes one transformer layer stores for backward (Korthikanti et al. 2022, per HF tensor).

    Per token, in the compute dtype: the QKV input (h), Q and K (q + kv; Llama's after rotary),
    V (kv), the output-projection input (q), the MLP's input (h) and its intermediates
    (`mlp_stored_widths`), and the two norms' inputs (`norm_stored_bytes`); with dropout a 1-byte
    mask after attention and after the MLP. Without FlashAttention, per head and query position,
    the softmax output over s keys in the compute dtype (Llama's eager attention computes it in
    fp32 and keeps a compute-dtype copy for the matmul: 4 + e, or 4 in fp32), plus its mask and
    dropout output when dropout is on; with it (FlashAttention, or SDPA's flash kernels, also
    the CPU one), an fp32 log-sum-exp. For GPT with a fused GeLU, bf16 and dropout this is
    s*b*h*(34 + 5*a*s/h).
    """
    e, h, sb = _e(dtype), shape.hidden_size, seq_len * micro_batch
    mask = 1 if dropout else 0
    attention = e * (h + shape.q_dim + 2 * shape.kv_dim + shape.q_dim)
    per_token = attention + e * (h + mlp_stored_widths(shape)) + 2 * norm_stored_bytes(shape, dtype) + 2 * mask * h
    if flash_attention:
        scores = 4 * shape.num_heads * sb
    else:
        probs = (4 + (e if e != 4 else 0)) if shape.model_type == "llama" else e
        scores = shape.num_heads * seq_len * sb * (probs + (mask + e if dropout else 0))
    return sb * per_token + scores


def _model_stored_bytes(shape: ModelShape, micro_batch: int, seq_len: int, dtype: str) -> int:
    """What the model stores outside its layers, per micro-batch: the final norm's input and the
    head's input (its output), and Llama's rotary cos and sin tables (one per token, shared by
    every layer)."""
    e, sb = _e(dtype), seq_len * micro_batch
    stored = sb * (norm_stored_bytes(shape, dtype) + e * shape.hidden_size)
    if shape.model_type == "llama":
        stored += 2 * e * sb * shape.head_dim
    return stored


def activation_bytes(
    shape: ModelShape,
    micro_batch: int,
    seq_len: int,
    dtype: str,
    *,
    gradient_checkpointing: bool,
    flash_attention: bool = True,
    dropout: bool = False,
) -> int:
    """Activation bytes stored for backward over the whole model (logits apart).

    Without checkpointing: L layers' activations. With it: every layer's
    input (e*s*b*h each) plus one layer's activations during its recompute.
    Both add what the model stores outside its layers (`_model_stored_bytes`:
    the final norm's and the head's inputs; rotary tables for Llama).
    """
    e, sbh = _e(dtype), seq_len * micro_batch * shape.hidden_size
    layer = layer_activation_bytes(shape, micro_batch, seq_len, dtype, flash_attention=flash_attention, dropout=dropout)
    stored = shape.num_layers * e * sbh + layer if gradient_checkpointing else shape.num_layers * layer
    return stored + _model_stored_bytes(shape, micro_batch, seq_len, dtype)


def layer_backward_bytes(shape: ModelShape, micro_batch: int, seq_len: int, dtype: str) -> int:
    """Gradients alive while one layer's backward runs, besides its stored tensors: the gradient
    of the residual stream (h) and, inside the MLP, the incoming gradient of an I-wide tensor and
    the one computed from it (2I), per token in the compute dtype."""
    return _e(dtype) * seq_len * micro_batch * (shape.hidden_size + 2 * shape.intermediate_size)


def train_activation_bytes(
    shape: ModelShape,
    micro_batch: int,
    seq_len: int,
    dtype: str,
    head: str = "lm",
    *,
    gradient_checkpointing: bool,
    flash_attention: bool = True,
    dropout: bool = False,
    logits_len: int | None = None,
) -> int:
    """The most activation bytes (logits included) live at once in one training micro-step; the LM
    head runs on `logits_len` of the `seq_len` positions (None: all).

    Two moments compete. At the head, when backward starts: everything stored
    (`activation_bytes`, but with checkpointing no layer is being recomputed
    yet) plus the logits the loss keeps and their gradient (`logits_bytes(...,
    train=True)`) and the loss's own backward temporaries
    (`loss_backward_bytes`). At the last layer's backward (the first one
    checkpointing recomputes): the head's tensors are freed by then; the layer inputs,
    or without checkpointing every layer's activations, stay, with the layer's own
    (recomputed) activations and its backward gradients (`layer_backward_bytes`).
    """
    e, sbh = _e(dtype), seq_len * micro_batch * shape.hidden_size
    scored = scored_positions(seq_len, logits_len)
    layer = layer_activation_bytes(shape, micro_batch, seq_len, dtype, flash_attention=flash_attention, dropout=dropout)
    # Checkpointed, no layer is being recomputed yet at the head: only the layer inputs are stored.
    layers = shape.num_layers * e * sbh if gradient_checkpointing else shape.num_layers * layer
    at_head = (layers + _model_stored_bytes(shape, micro_batch, seq_len, dtype)
               + logits_bytes(shape, micro_batch, scored, dtype, head, train=True)
               + loss_backward_bytes(shape, micro_batch, scored, head))
    kept = shape.num_layers * e * sbh if gradient_checkpointing else (shape.num_layers - 1) * layer
    rotary = 2 * e * seq_len * micro_batch * shape.head_dim if shape.model_type == "llama" else 0
    at_layer = kept + rotary + layer + layer_backward_bytes(shape, micro_batch, seq_len, dtype)
    return max(at_head, at_layer)


def scored_positions(seq_len: int, logits_len: int | None) -> int:
    """Positions the LM head runs on: `logits_len` of the `seq_len` (None: all of them)."""
    return seq_len if logits_len is None else min(seq_len, logits_len)


def loss_backward_bytes(shape: ModelShape, micro_batch: int, seq_len: int, head: str = "lm") -> int:
    """The log-prob loss's backward temporaries (`models/logprobs.py`): for one chunk of rows, the
    gradients of the label gather and of the logsumexp, two fp32 `[rows, T, V]` tensors, before they
    are added into the logits' gradient. A chunk holds the rows `sizing.logprob_chunk_rows` gives: a
    small vocabulary's whole micro-batch, a large one's single row."""
    if head == "scalar":
        return 0
    row = 4 * seq_len * shape.vocab_size
    return 2 * row * min(micro_batch, logprob_chunk_rows(row))


def forward_activation_bytes(
    shape: ModelShape, micro_batch: int, seq_len: int, dtype: str, *, flash_attention: bool = True
) -> int:
    """Peak activation bytes of a forward pass without gradients: one layer's
    tensors live at a time, plus the residual stream and the layer's output."""
    e, sbh = _e(dtype), seq_len * micro_batch * shape.hidden_size
    return layer_activation_bytes(shape, micro_batch, seq_len, dtype, flash_attention=flash_attention) + 2 * e * sbh


def logits_bytes(shape: ModelShape, micro_batch: int, seq_len: int, dtype: str, head: str = "lm",
                 *, train: bool = False) -> int:
    """LM head in a forward pass: logits in the compute dtype plus their fp32 copy for the
    log-probs, b*s*V*(bytes + 4). In training the loss keeps the fp32 copy for backward (the
    compute-dtype logits are freed) and backward adds its fp32 gradient: b*s*V*(4 + 4).
    Scalar head: one value per token, b*s*bytes."""
    tokens = micro_batch * seq_len
    if head == "scalar":
        return tokens * _e(dtype)
    return tokens * shape.vocab_size * ((4 if train else _e(dtype)) + 4)


def kv_heads_per_gpu(shape: ModelShape, tensor_parallel_size: int) -> int:
    """KV heads one tensor-parallel rank holds: kv_heads / tp, at least one
    (vLLM replicates KV heads when tp exceeds their number)."""
    return max(1, shape.num_kv_heads // tensor_parallel_size)


def kv_cache_bytes(shape: ModelShape, tokens: int, dtype: str, tensor_parallel_size: int = 1) -> int:
    """KV cache on one GPU: 2 (K and V) * layers * kv_heads_per_gpu * head_dim * bytes * tokens."""
    heads = kv_heads_per_gpu(shape, tensor_parallel_size)
    return 2 * shape.num_layers * heads * shape.head_dim * _e(dtype) * tokens


def _largest_module_numel(shape: ModelShape) -> int:
    layer = sum(t.numel for t in param_tensors(shape, "scalar") if ".h.0." in t.name or ".layers.0." in t.name)
    return max(layer, shape.vocab_size * shape.hidden_size)


def _gathered_params(shape: ModelShape, head: str, dtype: str, zero: ZeroConfig) -> int:
    """ZeRO-3 estimate: the module being computed, gathered whole, plus the
    prefetch bucket, never more than the model's non-persistent tensors."""
    if zero.stage != 3:
        return 0
    big = sum(t.numel for t in param_tensors(shape, head) if t.numel > zero.param_persistence_threshold)
    return _e(dtype) * min(big, _largest_module_numel(shape) + zero.prefetch_bucket_size)


def trained_tensors(shape: ModelShape, head: str, settings: TrainSettings) -> tuple[list, list]:
    """(trained, frozen) parameter tensors of a trained role: everything and nothing, or with LoRA the
    adapters plus a scalar head's trained copy, and the whole base (peft keeps the head's original)."""
    tensors = param_tensors(shape, head)
    if not settings.lora_rank:
        return tensors, []
    adapters = lora_tensors(shape, settings.lora_rank, settings.lora_targets, head)
    heads = [t for t in tensors if t.name.startswith("score.")]
    return adapters + heads, tensors


def trained_state_bytes(shape: ModelShape, head: str, settings: TrainSettings, num_gpus: int,
                        rank: int | None = None) -> StateBytes:
    """What one rank of a trained role holds: the trained tensors' weights, gradients and optimizer state
    (`train_state_bytes`) and, with LoRA, the frozen base's weights (`frozen_state_bytes`)."""
    trained, frozen = trained_tensors(shape, head, settings)
    state = train_state_bytes(optimizer_groups(trained, settings.split_no_decay), settings.dtype, settings.zero,
                              num_gpus, settings.optimizer, rank=rank, grad_accum_dtype=settings.grad_accum_dtype)
    if not frozen:
        return state
    # The training engine at ZeRO-3 keeps only its partitions of the frozen base (measured with DeepSpeed
    # 0.19.8: no whole copies of the small tensors, unlike an inference engine's persistent ones).
    zero = dataclasses.replace(settings.zero, param_persistence_threshold=0) if settings.zero.stage == 3 \
        else settings.zero
    base = frozen_state_bytes([t.numel for t in frozen], settings.dtype, zero, num_gpus)
    for place in ("device", "host"):
        for key, nbytes in getattr(base, place).items():
            getattr(state, place)[key] = getattr(state, place).get(key, 0) + nbytes
    return state


def plan_trained_role(role: str, shape: ModelShape, head: str, settings: TrainSettings, num_gpus: int) -> RolePlan:
    """The policy (head="lm") or critic (head="scalar") trained with DeepSpeed on
    `num_gpus` data-parallel GPUs (with LoRA: adapters on a frozen base)."""
    tensors = param_tensors(shape, head)
    state = trained_state_bytes(shape, head, settings, num_gpus)
    b, s, dtype = settings.micro_batch_size, settings.seq_len, settings.dtype
    gpu = {**state.device, **state.transient}
    gpu["gathered_params"] = _gathered_params(shape, head, dtype, settings.zero)
    # The train phase holds the activation peak of one micro-step; listed as its logits part and the rest.
    peak = train_activation_bytes(
        shape, b, s, dtype, head,
        gradient_checkpointing=settings.gradient_checkpointing,
        flash_attention=settings.flash_attention,
        dropout=settings.dropout,
        logits_len=settings.logits_len,
    )
    gpu["logits"] = logits_bytes(shape, b, scored_positions(s, settings.logits_len), dtype, head, train=True)
    gpu["activations"] = peak - gpu["logits"]
    resident = sum(state.device.values())
    forward = forward_activation_bytes(shape, b, s, dtype, flash_attention=settings.flash_attention)
    score = forward + logits_bytes(shape, b, s, dtype, head) + gpu["gathered_params"]
    train = gpu["activations"] + gpu["logits"] + gpu["gathered_params"] + sum(state.transient.values())
    notes = [f"ZeRO-{settings.zero.stage} over {num_gpus} GPU(s), {dtype}, micro-batch {b} x {s} tokens"]
    if settings.lora_rank:
        trained = sum(t.numel for t in trained_tensors(shape, head, settings)[0])
        notes.append(f"LoRA rank {settings.lora_rank} on {', '.join(settings.lora_targets)}: {trained:,} trained "
                     f"parameters ({100 * trained / sum(t.numel for t in tensors):.2f}%), the base frozen")
    if settings.zero.offload_optimizer:
        notes.append("optimizer offloaded: fp32 master, Adam states and fp32 grads in host memory")
    return RolePlan(
        role=role, model=shape.name, num_params=sum(t.numel for t in tensors), num_gpus=num_gpus,
        gpu=gpu, resident=resident, phases={"score": score, "train": train}, host=dict(state.host),
        notes=tuple(notes),
    )


def plan_frozen_role(role: str, shape: ModelShape, head: str, settings: InferenceSettings, num_gpus: int) -> RolePlan:
    """Reference (head="lm") or reward model (head="scalar"): weights only,
    optionally ZeRO-3 partitioned over `num_gpus`, and one forward batch."""
    tensors = param_tensors(shape, head)
    state = frozen_state_bytes([t.numel for t in tensors], settings.dtype, settings.zero, num_gpus)
    b, s, dtype = settings.micro_batch_size, settings.seq_len, settings.dtype
    gpu = dict(state.device)
    gpu["gathered_params"] = _gathered_params(shape, head, dtype, settings.zero)
    gpu["activations"] = forward_activation_bytes(shape, b, s, dtype, flash_attention=settings.flash_attention)
    gpu["logits"] = logits_bytes(shape, b, s, dtype, head)
    score = gpu["activations"] + gpu["logits"] + gpu["gathered_params"]
    placement = "ZeRO-3 partitioned" if settings.zero.stage == 3 else "a whole copy"
    if settings.zero.offload_params:
        placement += ", offloaded to host"
    return RolePlan(
        role=role, model=shape.name, num_params=sum(t.numel for t in tensors), num_gpus=num_gpus,
        gpu=gpu, resident=gpu["params"], phases={"score": score}, host=dict(state.host),
        notes=(f"frozen, {placement} over {num_gpus} GPU(s), {dtype}",),
    )


def plan_rollout(shape: ModelShape, settings: RolloutSettings, num_gpus: int, gpu_mem_bytes: int) -> RolePlan:
    """The generation engine on `num_gpus` GPUs: num_gpus / tp instances,
    each holding weights / tp and the KV cache of its share of the sequences."""
    tp = settings.tensor_parallel_size if settings.engine == "vllm" else 1
    if num_gpus % tp:
        raise ValueError(f"rollout: {num_gpus} GPU(s) do not split into vLLM instances of tensor_parallel_size {tp}.")
    instances = num_gpus // tp
    e, h = _e(settings.dtype), shape.hidden_size
    per_instance = math.ceil(settings.num_sequences / instances)
    seq_tokens = settings.prompt_len + settings.response_len
    notes = [f"{settings.engine}: {instances} instance(s) of {tp} GPU(s), {per_instance} sequence(s) each"]
    if settings.engine == "vllm":
        concurrent = min(per_instance, settings.max_num_seqs)
        tokens = concurrent * math.ceil(seq_tokens / settings.block_size) * settings.block_size
        batched = settings.max_num_batched_tokens
        reserved = int(settings.gpu_memory_utilization * gpu_mem_bytes)
        notes.append(
            f"vLLM pre-allocates gpu_memory_utilization={settings.gpu_memory_utilization} of each GPU "
            f"({reserved / GiB:.1f} GiB) at start-up, whatever the batch needs"
        )
    else:
        concurrent, tokens, reserved = per_instance, per_instance * seq_tokens, 0
        batched = per_instance * settings.prompt_len
    # One layer's forward tensors for a scheduler step of `batched` tokens, and fp32 sampling logits.
    layer = 2 * h + shape.q_dim + 2 * shape.kv_dim + 3 * shape.intermediate_size
    gpu = {
        "params": e * sum(t.numel for t in param_tensors(shape, "lm")) // tp,
        "kv_cache": kv_cache_bytes(shape, tokens, settings.dtype, tp),
        "workspace": e * batched * layer // tp + 4 * concurrent * shape.vocab_size,
    }
    total = sum(gpu.values())
    minimum = 0
    if settings.engine == "vllm":
        blocks = math.ceil(seq_tokens / settings.block_size)
        one_sequence = kv_cache_bytes(shape, blocks * settings.block_size, settings.dtype, tp)
        minimum = gpu["params"] + gpu["workspace"] + one_sequence
        if total > reserved:
            notes.append(
                f"the batch needs {total / GiB:.1f} GiB per GPU, more than vLLM's {reserved / GiB:.1f} GiB: it will "
                f"decode fewer sequences at a time; raise gpu_memory_utilization or lower num_sequences to avoid that"
            )
    if per_instance > concurrent:
        notes.append(f"max_num_seqs={settings.max_num_seqs}: {per_instance - concurrent} sequence(s) per instance "
                     "wait their turn")
    if settings.sleep:
        resident, phases = 0, {"generate": total}
        notes.append("sleeps between generations: holds GPU memory only while generating")
    else:
        resident, phases = total, {}
    return RolePlan(
        role="rollout", model=shape.name, num_params=sum(t.numel for t in param_tensors(shape, "lm")),
        num_gpus=num_gpus, gpu=gpu, resident=resident, phases=phases, reserved=reserved, minimum=minimum,
        notes=tuple(notes),
    )
