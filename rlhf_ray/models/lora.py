"""Low-rank adapters on a trained role, through `peft`, and the merged weights they stand for.

- `default_target_modules` / `target_modules_for`: which modules get
  adapters, by architecture (`LoraConfig.target_modules` overrides).
- `check_target_modules`: whether a model has those modules, from its config
  alone (built on the meta device), so a bad name fails before weights load.
- `apply_lora`: wrap a model in a `peft` model whose only trainable tensors
  are the adapters and the scalar heads named (a critic's or reward model's).
- `MergedWeights`: the weights the adapted model computes with, `W + s * B A`
  under the base model's own parameter names, built from the peft model's
  tensors one module at a time. Weight sync to vLLM, a reference that moves to
  the latest policy, and the merged export all take them from here, so none
  of them needs `merge_and_unload` (which rewrites the live model, and cannot
  under ZeRO-3 partitions).
- `adapter_state`: only the adapter tensors, named as peft's
  `adapter_model.safetensors` names them, with the `adapter_config.json`
  contents that go with them (the engine's LoRA support loads these).

With the adapter disabled (`peft_model.disable_adapter()`) the model is its
base again: the policy's own reference when the job trains LoRA.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from rlhf_ray.config.schema import DEFAULT_LORA_TARGETS as DEFAULT_TARGETS
from rlhf_ray.config.schema import ConfigError, LoraConfig

PEFT_PREFIX = "base_model.model."
ADAPTER = "default"  # peft's name of the one adapter a role trains


def default_target_modules(model_type: str, key: str = "policy.lora.target_modules") -> tuple[str, ...]:
    if model_type not in DEFAULT_TARGETS:
        raise ConfigError(f"{key}: no default LoRA targets for model type {model_type!r} (defaults exist for "
                          f"{', '.join(sorted(DEFAULT_TARGETS))}); name the modules, e.g. {key}=[q_proj,v_proj]")
    return DEFAULT_TARGETS[model_type]


def target_modules_for(config, settings: LoraConfig, key: str = "policy.lora.target_modules") -> tuple[str, ...]:
    """`settings.target_modules`, or the defaults of the model's architecture (`config`: its HF config)."""
    if settings.target_modules:
        return tuple(settings.target_modules)
    return default_target_modules(config.get_text_config().model_type, key)


def _linear_module_names(config, trust_remote_code: bool = False) -> set[str]:
    """Last name components of the model's Linear-like modules, from its config on the meta device."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):  # a critic's or reward model's config: its backbone's
        model = AutoModelForCausalLM.from_config(config.get_text_config(), trust_remote_code=trust_remote_code)
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, Conv1D)) and name}


def check_target_modules(config, settings: LoraConfig, key: str, trust_remote_code: bool = False) -> tuple[str, ...]:
    """The target modules for `config`'s model, each checked to exist there; a missing one is a ConfigError
    naming `key` and the modules the model has."""
    targets = target_modules_for(config, settings, key)
    have = _linear_module_names(config, trust_remote_code)
    missing = [t for t in targets if t not in have]
    if missing:
        raise ConfigError(f"{key}: the model ({config.get_text_config().model_type}) has no module named "
                          f"{', '.join(missing)}; its linear modules are {', '.join(sorted(have))}")
    return targets


def apply_lora(model: torch.nn.Module, settings: LoraConfig, *, trainable_heads: tuple[str, ...] = (),
               key: str = "policy.lora"):
    """`model` wrapped in a peft model with adapters on the target modules; `trainable_heads` (module
    names, e.g. a scalar head's `score`) stay fully trainable and are saved with the adapter."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = target_modules_for(model.config, settings, f"{key}.target_modules")
    peft_config = PeftLoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                                 target_modules=list(targets), modules_to_save=list(trainable_heads) or None,
                                 fan_in_fan_out=model.config.get_text_config().model_type == "gpt2", bias="none")
    try:
        return get_peft_model(model, peft_config)
    except ValueError as err:  # peft names the targets it did not find
        raise ConfigError(f"{key}.target_modules: {err}") from None


def is_peft_model(module: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(module, PeftModel)


def lora_layers(module: torch.nn.Module) -> dict[str, tuple[float, bool]]:
    """{module name: (scaling, fan_in_fan_out)} of every adapted layer of a peft model (names as in its
    `named_parameters`)."""
    from peft.tuners.lora import LoraLayer

    return {name: (float(layer.scaling[ADAPTER]), bool(getattr(layer, "fan_in_fan_out", False)))
            for name, layer in module.named_modules() if isinstance(layer, LoraLayer)}


def _owner(name: str, layers: dict) -> str:
    """The adapted layer a peft parameter belongs to, or the parameter's own name."""
    for marker in (".base_layer.", ".lora_A.", ".lora_B.", ".lora_dropout.", ".lora_embedding_"):
        if marker in name:
            prefix = name.split(marker, 1)[0]
            if prefix in layers:
                return prefix
    return name


def _base_name(name: str) -> str:
    name = name.removeprefix(PEFT_PREFIX)
    if ".modules_to_save." in name:  # the trained copy of a head
        head, rest = name.split(".modules_to_save.", 1)
        return f"{head}.{rest.split('.', 1)[1]}"
    return name.replace(".base_layer.", ".")


def merge_group(prefix: str, tensors: dict[str, torch.Tensor], layers: dict) -> list[tuple[str, torch.Tensor]]:
    """The merged tensors of one module's peft parameters (`tensors`: peft names to full tensors)."""
    if prefix not in layers:
        out = []
        for name, tensor in tensors.items():
            if ".original_module." in name:  # the frozen copy of a trained head
                continue
            out.append((_base_name(name), tensor))
        return out
    scaling, fan_in_fan_out = layers[prefix]
    a = tensors[f"{prefix}.lora_A.{ADAPTER}.weight"]
    b = tensors[f"{prefix}.lora_B.{ADAPTER}.weight"]
    delta = (b.float() @ a.float()) * scaling  # [out, in]
    if fan_in_fan_out:  # GPT-2's Conv1D stores [in, out]
        delta = delta.T
    out = []
    for name, tensor in tensors.items():
        if ".lora_" in name:
            continue
        if name == f"{prefix}.base_layer.weight":
            tensor = (tensor.float() + delta).to(tensor.dtype)
        out.append((_base_name(name), tensor))
    return out


class MergedWeights:
    """Merged `(base name, tensor)` pairs of a peft model's parameters, streamed in `named_parameters`
    order; a module's adapter and base weights (adjacent there) are merged once all have arrived."""

    def __init__(self, module: torch.nn.Module):
        self.layers = lora_layers(module)

    def stream(self, named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        group: dict[str, torch.Tensor] = {}
        current = None
        for name, tensor in named:
            owner = _owner(name, self.layers)
            if group and owner != current:
                yield from merge_group(current, group, self.layers)
                group = {}
            current = owner
            group[name] = tensor
        if group:
            yield from merge_group(current, group, self.layers)


def adapter_state(module: torch.nn.Module, named: Iterable[tuple[str, torch.Tensor]]) -> tuple[dict, dict]:
    """(`adapter_model.safetensors` tensors, `adapter_config.json` dict) of a peft model from its full
    `(name, tensor)` pairs: the adapter and trained heads only, as `save_pretrained` writes them."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(module, state_dict=dict(named), adapter_name=ADAPTER)
    config = module.peft_config[ADAPTER].to_dict()
    config["target_modules"] = sorted(config["target_modules"]) if config.get("target_modules") else None
    config["modules_to_save"] = sorted(config["modules_to_save"]) if config.get("modules_to_save") else None
    config["peft_type"] = "LORA"
    config["task_type"] = config.get("task_type") or None
    return state, config

