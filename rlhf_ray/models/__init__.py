"""Models: causal LMs and their tokenizers, the scalar-head reward model and
critic, the shipped tiny presets, and log-prob helpers.

Names are imported on first use (PEP 562), so ``rlhf_ray.models.logprobs``,
which needs torch only, can be imported without loading ``transformers``.
Importing :mod:`rlhf_ray.models.heads` (which ``from rlhf_ray.models import
ScalarHeadModel`` does) registers the scalar-head model with
``AutoConfig``/``AutoModel``, so ``AutoModel.from_pretrained`` then loads a
saved reward model or critic.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "heads": (
        "ScalarHeadConfig",
        "ScalarHeadModel",
        "is_scalar_head_checkpoint",
        "last_token_indices",
        "load_scalar_head_model",
    ),
    "loading": ("load_causal_lm", "load_tokenizer_for", "resolve_dtype"),
    "logprobs": (
        "entropy_from_logits",
        "gather_logprobs",
        "position_ids_from_mask",
        "sequence_kl",
        "sequence_lengths",
        "sequence_logprobs",
        "shift_for_next_token",
        "token_kl",
        "token_logprobs",
    ),
    "presets": ("is_preset", "list_presets", "preset_config"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'rlhf_ray.models' has no attribute {name!r}")
    module = importlib.import_module(f"rlhf_ray.models.{_MODULE_OF[name]}")
    return getattr(module, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
