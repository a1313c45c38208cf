"""Model presets: Hugging Face ``config.json`` files shipped with the package.

A preset is ``rlhf_ray/models/presets/<name>.json``, an ordinary HF model
config (``"model_type": "gpt2"`` or ``"llama"`` and that family's fields)
with two additions that never reach the built config:

- ``"tokenizer"``: the shipped tokenizer the preset is sized for (``"tiny"``
  for ``tiny-gpt2``, ``tiny-llama`` and ``small-llama``); absent for
  shape-only presets such as ``gpt2`` or ``llama-7b``, which exist for the
  memory planner.

``tiny-*`` (about 0.6M parameters) make every job overhead-bound, which is
what the fast tests want; ``small-llama`` (26.2M parameters, the Llama/Qwen2
block: RMSNorm, rotary positions, SwiGLU, grouped-query attention) is large
enough for compute to show in step times and still trains on a laptop CPU.
- ``"auto"`` as the value of ``vocab_size``, ``pad_token_id``,
  ``bos_token_id`` or ``eos_token_id``: read from that tokenizer when the
  config is built (``len(tokenizer)`` and its special-token ids), so a
  retrained tokenizer never leaves an embedding table the wrong size.

Building a model from a preset downloads nothing: weights are a seeded random
initialisation (see :func:`rlhf_ray.models.loading.load_causal_lm`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
"""The folder holding one ``<name>.json`` per preset."""

AUTO = "auto"
_TOKENIZER_KEY = "tokenizer"
_AUTO_FROM_TOKENIZER = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")


def list_presets() -> list[str]:
    """Names of the shipped presets, sorted (e.g. ``["gpt2", "tiny-gpt2", ...]``)."""
    return sorted(path.stem for path in PRESETS_DIR.glob("*.json"))


def is_preset(name: object) -> bool:
    """Whether ``name`` is the name of a shipped preset."""
    return isinstance(name, str) and name in list_presets()


def _preset_path(name: str) -> Path:
    if not is_preset(name):
        known = ", ".join(list_presets()) or "(none)"
        raise ValueError(
            f"Unknown model preset {name!r}. Known presets: {known} "
            f"(the .json files in {PRESETS_DIR}). Use one of them, or give a local "
            "checkpoint directory or a Hugging Face Hub model name instead."
        )
    return PRESETS_DIR / f"{name}.json"


def _read_preset(name: str) -> dict[str, Any]:
    path = _preset_path(name)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"Model preset file {path} could not be read as JSON: {err}") from err
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise ValueError(
            f"Model preset file {path} must hold a JSON object with a string 'model_type' "
            "(a Hugging Face config.json, e.g. \"model_type\": \"llama\")."
        )
    return raw


def preset_tokenizer_name(name: str) -> str | None:
    """The shipped tokenizer a preset is sized for (``"tiny"``), or ``None``
    for a shape-only preset that ships none."""
    return _read_preset(name).get(_TOKENIZER_KEY)


def _tokenizer_values(tokenizer: Any) -> dict[str, int | None]:
    return {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


@functools.lru_cache(maxsize=None)
def _shipped_tokenizer_values(tokenizer_name: str) -> dict[str, int | None]:
    from rlhf_ray.models.tokenizer import load_tokenizer

    return _tokenizer_values(load_tokenizer(tokenizer_name))


def preset_config(name: str, *, tokenizer: Any = None) -> PretrainedConfig:
    """Build the ``transformers`` config of preset ``name``.

    Fields set to ``"auto"`` (``vocab_size`` and the pad/bos/eos token ids) are
    read from ``tokenizer`` when one is given, else from the preset's shipped
    tokenizer. Raises ``ValueError`` naming the known presets for an unknown
    name, and naming the file and key for a malformed preset.
    """
    raw = _read_preset(name)
    path = PRESETS_DIR / f"{name}.json"
    tokenizer_name = raw.pop(_TOKENIZER_KEY, None)
    auto_keys = [key for key in _AUTO_FROM_TOKENIZER if raw.get(key) == AUTO]
    if auto_keys:
        if tokenizer is not None:
            values = _tokenizer_values(tokenizer)
        elif tokenizer_name is not None:
            values = _shipped_tokenizer_values(tokenizer_name)
        else:
            raise ValueError(
                f"Model preset file {path} sets {', '.join(auto_keys)} to \"auto\" but names no "
                "shipped tokenizer to read them from: add \"tokenizer\": \"tiny\" or write the numbers."
            )
        for key in auto_keys:
            raw[key] = values[key]
    leftover = [key for key, value in raw.items() if value == AUTO]
    if leftover:
        raise ValueError(
            f"Model preset file {path}: \"auto\" is only understood for {', '.join(_AUTO_FROM_TOKENIZER)}, "
            f"not for {', '.join(leftover)}. Write a number there."
        )
    model_type = raw.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **raw)
    except (ValueError, TypeError) as err:
        raise ValueError(f"Model preset file {path} is not a valid {model_type!r} config: {err}") from err
    config.name_or_path = name
    return config
