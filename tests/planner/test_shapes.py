"""Model shapes from HF configs and exact parameter counts, checked against
the real transformers models and the published counts."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf_ray.planner.shapes import (
    load_shape,
    matmul_param_count,
    param_count,
    param_tensors,
    preset_names,
    presets_dir,
    scalar_head_param_count,
    shape_from_config,
)

TINY_GPT2 = {"model_type": "gpt2", "vocab_size": 50, "n_embd": 8, "n_layer": 2, "n_head": 2, "n_positions": 16}
TINY_LLAMA = {
    "model_type": "llama", "vocab_size": 50, "hidden_size": 8, "intermediate_size": 20, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 16,
}


def _hf_model(config: dict, head: str = "lm") -> torch.nn.Module:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    torch.manual_seed(0)
    kwargs = {k: v for k, v in config.items() if k not in ("model_type", "tokenizer")}
    hf_config = AutoConfig.for_model(config["model_type"], **kwargs)
    if head == "lm":
        return AutoModelForCausalLM.from_config(hf_config)
    backbone = AutoModel.from_config(hf_config)
    return torch.nn.ModuleDict({"backbone": backbone, "score": torch.nn.Linear(hf_config.hidden_size, 1)})


@pytest.mark.parametrize(
    "config",
    [
        TINY_GPT2,
        {**TINY_GPT2, "n_inner": 12},
        TINY_LLAMA,
        {**TINY_LLAMA, "tie_word_embeddings": True},
        {**TINY_LLAMA, "attention_bias": True, "mlp_bias": True, "num_key_value_heads": 1},
    ],
    ids=["gpt2", "gpt2-n_inner", "llama-gqa", "llama-tied", "llama-biases-mqa"],
)
def test_param_tensors_match_transformers_named_parameters(config):
    model = _hf_model(config)
    expected = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    shape = shape_from_config(config)
    assert [(t.name, t.shape) for t in param_tensors(shape)] == expected
    assert param_count(shape) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("config", [TINY_GPT2, TINY_LLAMA], ids=["gpt2", "llama"])
def test_scalar_head_count_is_backbone_plus_linear_with_bias(config):
    model = _hf_model(config, head="scalar")
    shape = shape_from_config(config)
    assert scalar_head_param_count(shape) == sum(p.numel() for p in model.parameters())
    # The LM head (untied for llama) is gone, the 8 + 1 parameters of score are in.
    lm_head = 0 if shape.tie_word_embeddings else shape.vocab_size * shape.hidden_size
    assert scalar_head_param_count(shape) == param_count(shape) - lm_head + shape.hidden_size + 1


def test_shipped_tiny_presets_build_the_same_model_as_transformers():
    # The tiny presets write vocab_size "auto" (their tokenizer's size); give one.
    for name in [n for n in preset_names() if n.startswith("tiny-")]:
        raw = json.loads((presets_dir() / f"{name}.json").read_text())
        config = {k: v for k, v in raw.items() if v != "auto"}
        config["vocab_size"] = 96
        shape = load_shape(name, vocab_size=96)
        assert shape.name == name
        assert param_count(shape) == sum(p.numel() for p in _hf_model(config).parameters())


def test_gpt2_hand_count():
    # Tiny GPT-2: V=50, h=8, L=2, positions 16, inner 4h=32, tied head.
    # wte 400 + wpe 128 + per layer (ln_1 16, c_attn 8*24+24=216, c_proj 72,
    # ln_2 16, c_fc 8*32+32=288, c_proj 32*8+8=264) = 872 * 2 + ln_f 16 = 2288.
    assert param_count(shape_from_config(TINY_GPT2)) == 2288


def test_llama_hand_count_with_gqa():
    # Tiny Llama: V=50, h=8, 4 heads of 2, 2 KV heads -> kv width 4, I=20, L=2.
    # embed 400; per layer q 64 + k 32 + v 32 + o 64 + gate 160 + up 160 + down 160
    # + 2 norms 16 = 688; *2 = 1376; final norm 8; lm_head 400 -> 2184.
    shape = shape_from_config(TINY_LLAMA)
    assert (shape.head_dim, shape.kv_dim) == (2, 4)
    assert param_count(shape) == 2184


@pytest.mark.parametrize(
    "name, published",
    [
        ("gpt2", 124_439_808),
        ("llama-7b", 6_738_415_616),
        ("llama-13b", 13_015_864_320),
        ("llama-70b", 68_976_648_192),
    ],
)
def test_large_presets_match_published_counts(name, published):
    # Published: GPT-2 small 124M (HF model card), Llama-2 7B/13B/70B ("6.74e9",
    # "1.30e10", "6.9e10"): the exact numbers of the HF checkpoints.
    assert param_count(load_shape(name)) == published


def test_llama_70b_has_grouped_query_attention():
    shape = load_shape("llama-70b")
    assert (shape.num_heads, shape.num_kv_heads, shape.head_dim) == (64, 8, 128)
    assert shape.kv_dim == 1024
    assert 6.85e10 < param_count(shape) < 6.95e10


def test_matmul_params_exclude_lookups_but_count_the_tied_head():
    gpt2 = shape_from_config(TINY_GPT2)
    # All 2-D weights but wte and wpe: per layer 192 + 64 + 256 + 256 = 768, *2 = 1536,
    # plus the tied head 50*8 = 400.
    assert matmul_param_count(gpt2) == 1936
    llama = shape_from_config(TINY_LLAMA)
    # Per layer q 64 + k 32 + v 32 + o 64 + 3*160 = 672, *2 = 1344; lm_head 400.
    assert matmul_param_count(llama) == 1744
    # Scalar head: no LM head, a 1x8 score weight.
    assert matmul_param_count(llama, "scalar") == 1344 + 8


def test_load_shape_reads_a_config_file_and_a_model_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    from_dir = load_shape(tmp_path)
    from_file = load_shape(tmp_path / "config.json")
    assert from_dir.hidden_size == from_file.hidden_size == 8
    assert param_count(from_dir) == 2184


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a shipped preset"):
        load_shape("llama-9000b")
    with pytest.raises(ValueError, match="model_type 'mamba'"):
        shape_from_config({"model_type": "mamba", "vocab_size": 10})
    with pytest.raises(ValueError, match="'n_embd'"):
        shape_from_config({"model_type": "gpt2", "vocab_size": 10, "n_layer": 1, "n_head": 1, "n_positions": 8})
    with pytest.raises(ValueError, match="vocab_size"):
        shape_from_config({**TINY_LLAMA, "vocab_size": "auto"})
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_shape(bad)
