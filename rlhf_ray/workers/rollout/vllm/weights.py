"""The names and sizes of the weights an engine loads, read from the model's structure.

A checkpoint names a tied tensor under each alias while `named_parameters()` names it once, and vLLM's
loaders expect every checkpoint name; LoRA adapters are served up to the ranks vLLM accepts.
"""

from __future__ import annotations

import torch

from rlhf_ray.config.schema import ConfigError

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM accepts as max_lora_rank


def max_lora_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds an adapter of `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ConfigError(f"policy.lora.rank {rank}: vLLM serves adapters of rank <= {VLLM_LORA_RANKS[-1]}")


def tied_aliases(module: torch.nn.Module) -> dict[str, list[str]]:
    """`{parameter name: [the other names of the same tensor]}` of `module`'s tied weights.

    `named_parameters()` names a tied tensor once (GPT-2's `transformer.wte.weight`);
    a checkpoint names it under each alias (`lm_head.weight` too), and vLLM's
    loaders expect every checkpoint name."""
    names_of: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    return {names[0]: names[1:] for names in names_of.values() if len(names) > 1}


def checkpoint_layout(config, trust_remote_code: bool = False) -> tuple[dict[str, list[str]], int]:
    """Tied aliases (`tied_aliases`) and bytes of the unique tensors of a model's checkpoint, from its
    config alone (built on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    tensors = {id(t): t for t in model.state_dict(keep_vars=True).values()}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return tied_aliases(model), nbytes


def with_aliases(bucket: list[tuple[str, torch.Tensor]],
                 aliases: dict[str, list[str]]) -> list[tuple[str, torch.Tensor]]:
    """`bucket` plus `(alias, tensor)` for every tied alias of a name in it."""
    out = list(bucket)
    for name, tensor in bucket:
        out += [(alias, tensor) for alias in aliases.get(name, ())]
    return out
