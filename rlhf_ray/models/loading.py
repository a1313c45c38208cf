"""Load causal language models and their tokenizers.

``name_or_path`` is resolved in this order:

1. an existing local directory: a checkpoint written by ``save_pretrained``;
   a ``.gguf`` file or a named source (``smollm2-135m``) stands for the folder
   it is converted into once (:mod:`rlhf_ray.models.sources`);
2. a preset name (:func:`rlhf_ray.models.presets.list_presets`): the model is
   built from the shipped config with a seeded random initialisation, nothing
   is downloaded (``gpt2`` here is the *shape* of GPT-2; the pretrained
   weights are ``openai-community/gpt2`` on the Hub);
3. a Hugging Face Hub name, through ``from_pretrained`` (on a user's machine;
   with ``HF_HUB_OFFLINE=1`` only names already in the local cache load).

Remote code from the Hub runs only when ``trust_remote_code=True`` is asked for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from rlhf_ray.models.presets import is_preset, list_presets, preset_config, preset_tokenizer_name
from rlhf_ray.models.sources import NAMED_SOURCES, local_model_path

SCALAR_HEAD_MODEL_TYPE = "rlhf_ray_scalar_head"
"""``model_type`` of :class:`rlhf_ray.models.heads.ScalarHeadModel` checkpoints."""

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def default_device() -> torch.device:
    """``cuda`` when this process sees a GPU, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device | None = None) -> torch.dtype:
    """Turn a config's dtype string into a ``torch.dtype``.

    ``"auto"`` is float32 on CPU (bf16 matmuls are slow there and fp16 is not
    supported by every CPU kernel) and bfloat16 on CUDA (the mixed-precision
    format DeepSpeed and vLLM use for RLHF). ``device=None`` means the device
    :func:`default_device` picks. Also accepted: ``float32``/``fp32``,
    ``bfloat16``/``bf16``, ``float16``/``fp16`` and a ``torch.dtype``.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(dtype, str):
        raise TypeError(f"dtype must be a string such as 'auto' or 'bfloat16', got {type(dtype).__name__}: {dtype!r}")
    name = dtype.strip().lower().removeprefix("torch.")
    if name == "auto":
        device_type = torch.device(device).type if device is not None else default_device().type
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    if name not in DTYPE_NAMES:
        accepted = ", ".join(["auto", *DTYPE_NAMES])
        raise ValueError(f"Unknown dtype {dtype!r}: expected one of {accepted}.")
    return DTYPE_NAMES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The name of a ``torch.dtype`` as DeepSpeed's config and vLLM take it: ``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def _looks_like_local_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else is meant as a path.
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or "\\" in name
        or os.path.exists(name)
    )


def _not_found_message(name: str, reason: str) -> str:
    return (
        f"Cannot load model {name!r}: it is neither a model preset (known: {', '.join(list_presets())}), "
        f"a shipped model ({', '.join(NAMED_SOURCES)}), a .gguf file nor an existing checkpoint "
        f"directory{reason}. Check the path in the config, or use a preset name."
    )


def check_model_source(name_or_path: str | os.PathLike) -> str:
    """Classify ``name_or_path`` as ``"directory"``, ``"preset"`` or ``"hub"`` (a GGUF file or named
    source is the ``"directory"`` it converts into).

    Raises ``FileNotFoundError`` for something meant as a local path that does
    not exist (or is a file, not a checkpoint directory).
    """
    name = local_model_path(name_or_path)
    if os.path.isdir(name):
        return "directory"
    if is_preset(name):
        return "preset"
    if os.path.isfile(name):
        raise FileNotFoundError(_not_found_message(name, "; it is a file, and a checkpoint is a directory"))
    if _looks_like_local_path(name):
        raise FileNotFoundError(_not_found_message(name, " (no such directory)"))
    return "hub"


def read_model_config(name_or_path: str | os.PathLike, *, trust_remote_code: bool = False):
    """The ``transformers`` config of a preset or a checkpoint directory, without loading weights;
    ``None`` for a hub name (reading it could download)."""
    name = local_model_path(name_or_path)
    source = check_model_source(name)
    if source == "preset":
        return preset_config(name)
    if source == "directory":
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    return None


def max_positions(config) -> int | None:
    """The longest sequence a model's position embeddings cover (``None`` when unbounded or unknown)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def checkpoint_model_type(path: str | os.PathLike) -> str | None:
    """The ``model_type`` in ``path/config.json``, or ``None`` when there is
    no readable config there."""
    config_file = Path(path) / "config.json"
    try:
        return json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def disable_dropout(model: torch.nn.Module) -> int:
    """Turn every dropout of `model` off (in train mode too); returns how many were on.

    RL and preference losses compare the training forward with log-probs,
    values or reference scores computed without gradients (in eval mode): with
    dropout on, PPO's ratio at identical weights is not 1 and DPO's policy and
    reference disagree at step 0. Covers `nn.Dropout` modules and the float
    attention-dropout rates attention modules keep (Llama's `attention_dropout`)."""
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            module.p = 0.0
            changed += 1
        for name in ("attention_dropout", "dropout"):
            value = getattr(module, name, None)
            if isinstance(value, float) and value > 0:
                setattr(module, name, 0.0)
                changed += 1
    return changed


def fuse_activations(model: torch.nn.Module) -> int:
    """Swap Hugging Face's Python-level tanh-approximate GELU (`NewGELUActivation`, GPT-2's `gelu_new`:
    seven elementwise ops, each a pass over the MLP's widest tensor, forward and backward) for torch's
    fused kernel of the same function (`gelu(approximate="tanh")`, what `gelu_pytorch_tanh` configs
    use). The logits move by about 5e-7; a small model's forward pass gets about a fifth faster on a
    CPU. Returns how many modules were swapped."""
    from transformers.activations import NewGELUActivation, PytorchGELUTanh

    swapped = 0
    for module in model.modules():
        for name, child in list(module.named_children()):
            if type(child) is NewGELUActivation:
                setattr(module, name, PytorchGELUTanh())
                swapped += 1
    return swapped


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute activations in the backward pass (non-reentrant torch
    checkpointing), and turn off the KV cache, which training never uses."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def load_causal_lm(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    seed: int = 0,
    tokenizer: Any = None,
) -> PreTrainedModel:
    """Load a causal LM (``AutoModelForCausalLM``) from a checkpoint
    directory, a preset or a Hub name (see the module docstring for the order).

    Args:
        dtype: ``"auto"`` (fp32 on CPU, bf16 on CUDA), ``"float32"``,
            ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``.
        device: where the model will run; decides ``"auto"``, and the model is
            moved there when given. ``None`` leaves it on the CPU (DeepSpeed
            and vLLM place it themselves) and decides ``"auto"`` by whether
            this process sees a GPU.
        gradient_checkpointing: recompute activations in backward.
        trust_remote_code: run modelling code shipped with a Hub checkpoint.
        seed: seeds the random initialisation of a preset; the global torch
            RNG is left as it was.
        tokenizer: for a preset, the tokenizer its ``"auto"`` vocabulary size
            and special-token ids are read from (default: the preset's shipped
            one); for a checkpoint, the embedding table is grown to
            ``len(tokenizer)`` when the tokenizer has more tokens than it.

    Returns the model in eval mode, as ``from_pretrained`` leaves it, for a
    preset too; trainers call ``model.train()`` themselves.
    """
    name = local_model_path(name_or_path)
    torch_dtype = resolve_dtype(dtype, device)
    source = check_model_source(name)
    if source == "preset":
        config = preset_config(name, tokenizer=tokenizer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        model.eval()
    else:
        if source == "directory" and checkpoint_model_type(name) == SCALAR_HEAD_MODEL_TYPE:
            raise ValueError(
                f"Checkpoint directory {name} holds a reward model or critic (a scalar-head model), not a "
                "causal LM. Use it as reward_model/critic, loaded with load_scalar_head_model, or point the "
                "policy at a causal-LM checkpoint."
            )
        try:
            model = AutoModelForCausalLM.from_pretrained(
                name, dtype=torch_dtype, trust_remote_code=trust_remote_code
            )
        except OSError as err:
            if source == "hub":
                raise FileNotFoundError(
                    _not_found_message(name, f", and loading it as a Hugging Face Hub model failed: {err}")
                ) from err
            raise OSError(f"Cannot load the causal LM checkpoint in directory {name}: {err}") from err
        if tokenizer is not None:
            _fit_embeddings_to_tokenizer(model, tokenizer)
    fuse_activations(model)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if device is not None:
        model.to(device)
    return model


def _fit_embeddings_to_tokenizer(model: PreTrainedModel, tokenizer: Any) -> None:
    # A tokenizer that gained tokens (e.g. a pad token) needs rows for them.
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer))
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id


def load_tokenizer_for(
    name_or_path: str | os.PathLike, *, trust_remote_code: bool = False, padding_side: str = "right"
) -> Any:
    """The tokenizer that goes with model ``name_or_path``.

    A preset gets its shipped tokenizer (the tiny one for ``tiny-*`` and
    ``small-llama``); a
    shape-only preset (``gpt2``, ``llama-7b``, ...) ships none, and asking for
    it raises ``ValueError``. A checkpoint directory or Hub name loads through
    :func:`rlhf_ray.models.tokenizer.load_tokenizer` (pad token set, EOS as
    pad when the tokenizer has none). ``padding_side``: ``"right"`` for
    training batches, ``"left"`` for generation prompts.
    """
    from rlhf_ray.models.tokenizer import load_tokenizer

    name = local_model_path(name_or_path)
    if check_model_source(name) == "preset":
        shipped = preset_tokenizer_name(name)
        if shipped is None:
            raise ValueError(
                f"Model preset {name!r} is a shape-only config and ships no tokenizer. Give a tokenizer "
                "path or Hub name in the config (e.g. the tokenizer of the pretrained model it stands for)."
            )
        name = shipped
    return load_tokenizer(name, trust_remote_code=trust_remote_code, padding_side=padding_side)
