"""Model shapes read from Hugging Face `config.json` files, and exact
parameter counts for the HF implementations of GPT-2 and Llama.

A shape is all the planner needs to know about a model: the sizes that decide
how many bytes its weights, optimizer states, activations and KV cache take.
`param_tensors` lists every parameter tensor in the order of the HF model's
`named_parameters()`, because DeepSpeed's ZeRO-1/2 flattens parameters in that
order and pads each flat group, and the planner reproduces that layout exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

SUPPORTED_MODEL_TYPES = ("gpt2", "llama")

Head = Literal["lm", "scalar"]


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer, as its HF config states them."""

    model_type: str
    """HF `model_type`: "gpt2" or "llama"."""
    vocab_size: int
    """Rows of the token embedding (and of the LM head)."""
    hidden_size: int
    """Width of the residual stream, h."""
    num_layers: int
    """Transformer blocks, L."""
    num_heads: int
    """Query heads, a."""
    num_kv_heads: int
    """Key/value heads (fewer than `num_heads` under grouped-query attention)."""
    head_dim: int
    """Width of one attention head."""
    intermediate_size: int
    """Width of the MLP's inner layer."""
    tie_word_embeddings: bool
    """Whether the LM head shares the token embedding's weight."""
    max_positions: int
    """Longest sequence the model's position scheme was built for."""
    attention_bias: bool = False
    """Llama only: biases on q/k/v/o projections (GPT-2 always has them)."""
    mlp_bias: bool = False
    """Llama only: biases on gate/up/down projections (GPT-2 always has them)."""
    hidden_act: str = ""
    """The MLP's activation as the HF config names it (GPT-2 `activation_function`,
    Llama `hidden_act`); "" is the model type's default (gelu_new, silu). It
    decides what the MLP stores for backward (`planner.memory`)."""
    name: str = ""
    """Where the shape came from: a preset name or a config path."""

    @property
    def kv_dim(self) -> int:
        """Width of the key (or value) projection output: kv_heads * head_dim."""
        return self.num_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        """Width of the query projection output: heads * head_dim."""
        return self.num_heads * self.head_dim


@dataclass(frozen=True)
class ParamTensor:
    """One parameter tensor: its HF name and shape."""

    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _require(config: Mapping[str, Any], key: str, source: str) -> Any:
    if key not in config or config[key] is None:
        raise ValueError(
            f"{source}: HF config of model_type {config.get('model_type')!r} has no {key!r}; "
            f"add it (see the model's config.json on the Hub) or pass a complete config."
        )
    return config[key]


def shape_from_config(config: Mapping[str, Any], name: str = "", vocab_size: int | None = None) -> ModelShape:
    """Build a `ModelShape` from an HF config dict (the contents of config.json).

    `vocab_size`, when given, replaces the config's own (the shipped tiny
    presets write "auto" there: the size of the tokenizer they ship with).

    GPT-2 keys: vocab_size, n_embd, n_layer, n_head, n_inner (None means
    4 * n_embd), n_positions; its LM head is always tied. Llama keys:
    vocab_size, hidden_size, num_hidden_layers, num_attention_heads,
    num_key_value_heads (None means no GQA), head_dim (None means
    hidden_size / heads), intermediate_size, tie_word_embeddings (default
    False), max_position_embeddings, attention_bias, mlp_bias. Both: the
    activation (`activation_function` / `hidden_act`).
    """
    source = name or "config"
    if vocab_size is not None:
        config = {**config, "vocab_size": vocab_size}
    if not isinstance(config.get("vocab_size", 0), int):
        raise ValueError(
            f"{source}: vocab_size is {config.get('vocab_size')!r}, not a number; "
            f"pass vocab_size= (the tokenizer's len()) to size the embedding."
        )
    model_type = config.get("model_type")
    if model_type == "gpt2":
        hidden = int(_require(config, "n_embd", source))
        heads = int(_require(config, "n_head", source))
        inner = config.get("n_inner")
        return ModelShape(
            model_type="gpt2",
            vocab_size=int(_require(config, "vocab_size", source)),
            hidden_size=hidden,
            num_layers=int(_require(config, "n_layer", source)),
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            intermediate_size=int(inner) if inner is not None else 4 * hidden,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
            max_positions=int(_require(config, "n_positions", source)),
            hidden_act=str(config.get("activation_function", "gelu_new")),
            name=name,
        )
    if model_type == "llama":
        hidden = int(_require(config, "hidden_size", source))
        heads = int(_require(config, "num_attention_heads", source))
        kv_heads = config.get("num_key_value_heads")
        head_dim = config.get("head_dim")
        return ModelShape(
            model_type="llama",
            vocab_size=int(_require(config, "vocab_size", source)),
            hidden_size=hidden,
            num_layers=int(_require(config, "num_hidden_layers", source)),
            num_heads=heads,
            num_kv_heads=int(kv_heads) if kv_heads is not None else heads,
            head_dim=int(head_dim) if head_dim is not None else hidden // heads,
            intermediate_size=int(_require(config, "intermediate_size", source)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_positions=int(config.get("max_position_embeddings", 2048)),
            attention_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
            hidden_act=str(config.get("hidden_act", "silu")),
            name=name,
        )
    raise ValueError(
        f"{source}: model_type {model_type!r} is not one the planner knows; "
        f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}. Llama-architecture models "
        f"(Llama 2/3, TinyLlama, ...) use model_type 'llama'."
    )


def presets_dir() -> Path:
    """The folder of shipped HF configs (`rlhf_ray/models/presets/`)."""
    import rlhf_ray.models

    return Path(rlhf_ray.models.__file__).parent / "presets"


def preset_names() -> list[str]:
    """Names of the shipped presets, e.g. ["gpt2", "llama-7b", ...]."""
    return sorted(p.stem for p in presets_dir().glob("*.json"))


def load_shape(name_or_path: str | Path, *, vocab_size: int | None = None) -> ModelShape:
    """Read a shape from a preset name ("llama-7b"), a config.json file, or a
    model folder holding a config.json.

    A preset whose vocab_size is "auto" takes it from `vocab_size` or, when
    that is None, from the preset's shipped tokenizer (through
    `rlhf_ray.models.presets.preset_config`, which owns that rule).
    """
    path = Path(name_or_path)
    preset_name = None
    if path.is_dir():
        path = path / "config.json"
    elif not path.exists():
        preset = presets_dir() / f"{name_or_path}.json"
        if not preset.exists():
            raise FileNotFoundError(
                f"model {str(name_or_path)!r} is neither a shipped preset "
                f"({', '.join(preset_names())}) nor an existing config.json or model folder."
            )
        path, preset_name = preset, str(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file; point at a config.json or a folder holding one.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); expected an HF config.json.") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object (an HF config.json), got {type(config).__name__}.")
    if vocab_size is None and config.get("vocab_size") == "auto" and preset_name is not None:
        try:
            from rlhf_ray.models.presets import preset_config

            vocab_size = int(preset_config(preset_name).vocab_size)
        except ImportError as err:
            raise ValueError(
                f"preset {preset_name!r} takes vocab_size from its shipped tokenizer, which could not be "
                f"loaded ({err}); pass vocab_size= explicitly."
            ) from err
    return shape_from_config(config, name=preset_name or str(path), vocab_size=vocab_size)


def _linear(name: str, out_features: int, in_features: int, bias: bool) -> list[ParamTensor]:
    tensors = [ParamTensor(f"{name}.weight", (out_features, in_features))]
    if bias:
        tensors.append(ParamTensor(f"{name}.bias", (out_features,)))
    return tensors


def _conv1d(name: str, in_features: int, out_features: int) -> list[ParamTensor]:
    # GPT-2's Conv1D stores its weight (in_features, out_features), always with a bias.
    return [ParamTensor(f"{name}.weight", (in_features, out_features)), ParamTensor(f"{name}.bias", (out_features,))]


def _layer_norm(name: str, width: int) -> list[ParamTensor]:
    return [ParamTensor(f"{name}.weight", (width,)), ParamTensor(f"{name}.bias", (width,))]


def _gpt2_backbone(shape: ModelShape, prefix: str) -> list[ParamTensor]:
    h, inner = shape.hidden_size, shape.intermediate_size
    tensors = [
        ParamTensor(f"{prefix}wte.weight", (shape.vocab_size, h)),
        ParamTensor(f"{prefix}wpe.weight", (shape.max_positions, h)),
    ]
    for i in range(shape.num_layers):
        block = f"{prefix}h.{i}."
        tensors += _layer_norm(f"{block}ln_1", h)
        tensors += _conv1d(f"{block}attn.c_attn", h, 3 * h)
        tensors += _conv1d(f"{block}attn.c_proj", h, h)
        tensors += _layer_norm(f"{block}ln_2", h)
        tensors += _conv1d(f"{block}mlp.c_fc", h, inner)
        tensors += _conv1d(f"{block}mlp.c_proj", inner, h)
    tensors += _layer_norm(f"{prefix}ln_f", h)
    return tensors


def _llama_backbone(shape: ModelShape, prefix: str) -> list[ParamTensor]:
    h, inner = shape.hidden_size, shape.intermediate_size
    attn_bias, mlp_bias = shape.attention_bias, shape.mlp_bias
    tensors = [ParamTensor(f"{prefix}embed_tokens.weight", (shape.vocab_size, h))]
    for i in range(shape.num_layers):
        block = f"{prefix}layers.{i}."
        tensors += _linear(f"{block}self_attn.q_proj", shape.q_dim, h, attn_bias)
        tensors += _linear(f"{block}self_attn.k_proj", shape.kv_dim, h, attn_bias)
        tensors += _linear(f"{block}self_attn.v_proj", shape.kv_dim, h, attn_bias)
        tensors += _linear(f"{block}self_attn.o_proj", h, shape.q_dim, attn_bias)
        tensors += _linear(f"{block}mlp.gate_proj", inner, h, mlp_bias)
        tensors += _linear(f"{block}mlp.up_proj", inner, h, mlp_bias)
        tensors += _linear(f"{block}mlp.down_proj", h, inner, mlp_bias)
        tensors += [
            ParamTensor(f"{block}input_layernorm.weight", (h,)),
            ParamTensor(f"{block}post_attention_layernorm.weight", (h,)),
        ]
    tensors.append(ParamTensor(f"{prefix}norm.weight", (h,)))
    return tensors


def param_tensors(shape: ModelShape, head: Head = "lm") -> list[ParamTensor]:
    """Every parameter tensor of the model, in HF `named_parameters()` order.

    head="lm": the causal LM (`GPT2LMHeadModel` / `LlamaForCausalLM`); a tied
    LM head shares the embedding and is not listed again, as in PyTorch.
    head="scalar": the backbone without the LM head plus `score`, a
    Linear(hidden, 1) with bias: a reward model or a critic (value head).
    """
    if shape.model_type == "gpt2":
        tensors = _gpt2_backbone(shape, "transformer.")
    elif shape.model_type == "llama":
        tensors = _llama_backbone(shape, "model.")
    else:
        raise ValueError(f"model_type {shape.model_type!r} unsupported; supported: {SUPPORTED_MODEL_TYPES}")
    if head == "scalar":
        return tensors + _linear("score", 1, shape.hidden_size, bias=True)
    if head != "lm":
        raise ValueError(f"head must be 'lm' or 'scalar', got {head!r}")
    if not shape.tie_word_embeddings:
        tensors.append(ParamTensor("lm_head.weight", (shape.vocab_size, shape.hidden_size)))
    return tensors


def lora_tensors(shape: ModelShape, rank: int, targets: tuple[str, ...], head: Head = "lm") -> list[ParamTensor]:
    """The adapter tensors LoRA of `rank` adds to the `targets` modules (last name components), in
    `named_parameters()` order after each target's weight: `lora_A` [rank, in] and `lora_B` [out, rank]
    (GPT-2's Conv1D weights are stored [in, out])."""
    out = []
    for t in param_tensors(shape, head):
        module, leaf = t.name.rsplit(".", 1)
        if leaf != "weight" or module.rsplit(".", 1)[-1] not in targets or len(t.shape) != 2:
            continue
        fan_in, fan_out = (t.shape[0], t.shape[1]) if shape.model_type == "gpt2" else (t.shape[1], t.shape[0])
        out.append(ParamTensor(f"{module}.lora_A.weight", (rank, fan_in)))
        out.append(ParamTensor(f"{module}.lora_B.weight", (fan_out, rank)))
    return out


def param_count(shape: ModelShape) -> int:
    """Parameters of the causal LM, exactly as `sum(p.numel() for p in model.parameters())`."""
    return sum(t.numel for t in param_tensors(shape, "lm"))


def scalar_head_param_count(shape: ModelShape) -> int:
    """Parameters of a reward/critic model: the backbone without the LM head
    plus a Linear(hidden, 1) with bias."""
    return sum(t.numel for t in param_tensors(shape, "scalar"))


def matmul_param_count(shape: ModelShape, head: Head = "lm") -> int:
    """Parameters that take part in a matrix multiply for every token: the
    2-D weights other than the input lookups (token and position embeddings),
    with a tied LM head counted as the matmul it is. This is the N of the
    2N (forward) and 6N (training) FLOPs-per-token rule (Kaplan et al., 2020)."""
    lookups = {"transformer.wte.weight", "transformer.wpe.weight", "model.embed_tokens.weight"}
    n = sum(t.numel for t in param_tensors(shape, head) if len(t.shape) == 2 and t.name not in lookups)
    if head == "lm" and shape.tie_word_embeddings:
        n += shape.vocab_size * shape.hidden_size
    return n
