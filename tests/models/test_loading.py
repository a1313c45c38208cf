"""Presets, dtype resolution, causal-LM and tokenizer loading, and the errors
a user sees for a wrong name or path."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_ray.models import presets
from rlhf_ray.models.loading import (
    check_model_source,
    load_causal_lm,
    load_tokenizer_for,
    resolve_dtype,
)
from rlhf_ray.models.presets import is_preset, list_presets, preset_config
from rlhf_ray.models.tokenizer import load_tokenizer

TINY = ["tiny-gpt2", "tiny-llama"]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return load_tokenizer("tiny")


def test_list_presets_has_the_tiny_presets_and_is_sorted():
    names = list_presets()
    assert set(TINY) <= set(names)
    assert names == sorted(names)
    assert is_preset("tiny-gpt2") and not is_preset("tiny-gpt3") and not is_preset(None)


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_builds_a_model_without_memory(name):
    # Large presets (gpt2, llama-7b, ...) are shapes for the planner: build them
    # on the meta device, which allocates nothing.
    config = preset_config(name)
    assert config.model_type in ("gpt2", "llama")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert model.get_input_embeddings().weight.shape[0] == config.vocab_size


@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_match_the_shipped_tokenizer(name, tiny_tokenizer):
    config = preset_config(name)
    assert config.vocab_size == len(tiny_tokenizer)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (
        tiny_tokenizer.pad_token_id,
        tiny_tokenizer.bos_token_id,
        tiny_tokenizer.eos_token_id,
    )
    text = config.get_text_config()
    assert 2 <= text.num_hidden_layers <= 4 and 64 <= text.hidden_size <= 256
    assert getattr(text, "max_position_embeddings", None) == 256 or getattr(text, "n_positions", None) == 256


def test_small_llama_is_a_llama_block_of_20_to_30m_parameters_on_the_shipped_tokenizer(tiny_tokenizer):
    # The preset performance runs use: big enough that compute, not per-step overhead, shows in step times.
    config = preset_config("small-llama")
    assert config.model_type == "llama" and config.hidden_act == "silu"  # RMSNorm, rotary, SwiGLU
    assert config.vocab_size == len(tiny_tokenizer) and config.eos_token_id == tiny_tokenizer.eos_token_id
    assert config.num_attention_heads % config.num_key_value_heads == 0
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention
    assert config.max_position_embeddings >= 256  # the synthetic task's prompts and responses fit
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == 26_223_104
    from rlhf_ray.planner.shapes import load_shape, param_count

    assert param_count(load_shape("small-llama")) == 26_223_104


def test_unknown_preset_error_lists_the_known_ones():
    with pytest.raises(ValueError) as err:
        preset_config("tiny-gpt3")
    for name in list_presets():
        assert name in str(err.value)


def test_preset_auto_fields_follow_a_given_tokenizer(tiny_tokenizer):
    grown = load_tokenizer("tiny")
    grown.add_tokens(["<|extra|>"])
    assert preset_config("tiny-gpt2", tokenizer=grown).vocab_size == len(tiny_tokenizer) + 1


def test_malformed_preset_files_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(presets, "PRESETS_DIR", tmp_path)
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "no-type.json").write_text(json.dumps({"n_layer": 2}))
    (tmp_path / "bad-auto.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": "auto"}))
    (tmp_path / "no-tokenizer.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": "auto"}))
    with pytest.raises(ValueError, match=r"broken\.json.*JSON"):
        preset_config("broken")
    with pytest.raises(ValueError, match=r"no-type\.json.*model_type"):
        preset_config("no-type")
    with pytest.raises(ValueError, match=r"bad-auto\.json.*n_layer"):
        preset_config("bad-auto")
    with pytest.raises(ValueError, match=r"no-tokenizer\.json.*vocab_size.*tokenizer"):
        preset_config("no-tokenizer")


@pytest.mark.parametrize(
    "dtype, device, expected",
    [
        ("auto", "cpu", torch.float32),
        ("auto", "cuda", torch.bfloat16),
        ("auto", torch.device("cuda:1"), torch.bfloat16),
        ("float32", "cuda", torch.float32),
        ("bfloat16", "cpu", torch.bfloat16),
        ("bf16", "cpu", torch.bfloat16),
        ("float16", "cpu", torch.float16),
        ("torch.float16", "cpu", torch.float16),
        (torch.float64, "cpu", torch.float64),
    ],
)
def test_resolve_dtype(dtype, device, expected):
    assert resolve_dtype(dtype, device) == expected


def test_resolve_dtype_auto_without_device_follows_cuda_availability():
    expected = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    assert resolve_dtype("auto") == expected


def test_resolve_dtype_errors_name_the_accepted_values():
    with pytest.raises(ValueError, match="auto, float32.*bfloat16"):
        resolve_dtype("float8", "cpu")
    with pytest.raises(TypeError, match="dtype must be a string"):
        resolve_dtype(32, "cpu")


@pytest.mark.parametrize("name", TINY)
def test_tiny_preset_saves_and_reloads_with_identical_logits(name, tmp_path):
    model = load_causal_lm(name, seed=7)
    input_ids = torch.tensor([[1, 40, 41, 42, 43, 2], [1, 50, 51, 52, 53, 2]])
    mask = torch.ones_like(input_ids)
    with torch.no_grad():
        before = model(input_ids=input_ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(before, load_causal_lm(tmp_path)(input_ids=input_ids, attention_mask=mask).logits)
        # Plain transformers computes GPT-2's GELU as a Python formula, where load_causal_lm uses torch's
        # fused kernel of the same function (`fuse_activations`): equal to float rounding.
        plain = AutoModelForCausalLM.from_pretrained(tmp_path)(input_ids=input_ids, attention_mask=mask).logits
    torch.testing.assert_close(plain, before, rtol=0, atol=1e-5)


def test_fused_gelu_is_the_same_function_as_transformers_gelu_new():
    from transformers.activations import NewGELUActivation

    from rlhf_ray.models.loading import fuse_activations

    model = load_causal_lm("tiny-gpt2")
    assert not any(type(m) is NewGELUActivation for m in model.modules())  # swapped at load
    x = torch.linspace(-6, 6, 2001, dtype=torch.float64)
    plain = NewGELUActivation()(x)
    holder = torch.nn.Sequential(NewGELUActivation())
    assert fuse_activations(holder) == 1
    torch.testing.assert_close(holder(x), plain, rtol=0, atol=1e-12)


def test_preset_init_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = load_causal_lm("tiny-gpt2", seed=1)
    assert torch.equal(torch.rand(3), expected_next)
    same = load_causal_lm("tiny-gpt2", seed=1)
    other = load_causal_lm("tiny-gpt2", seed=2)
    first_params, same_params = dict(first.named_parameters()), dict(same.named_parameters())
    assert all(torch.equal(p, same_params[k]) for k, p in first_params.items())
    assert not torch.equal(first.get_input_embeddings().weight, other.get_input_embeddings().weight)
    assert not first.training


def test_dtype_is_applied():
    model = load_causal_lm("tiny-llama", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert load_causal_lm("tiny-llama", dtype="auto", device="cpu").dtype == torch.float32


def test_gradient_checkpointing_gives_the_same_gradients():
    input_ids = torch.tensor([[1, 60, 61, 62, 63, 64, 2]])
    grads = []
    for checkpointing in (False, True):
        model = load_causal_lm("tiny-llama", seed=4, gradient_checkpointing=checkpointing)
        model.train()
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) == checkpointing
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    for key, grad in grads[0].items():
        torch.testing.assert_close(grads[1][key], grad, atol=1e-6, rtol=1e-5)


def test_a_tokenizer_with_more_tokens_grows_a_checkpoint_embedding(tmp_path):
    load_causal_lm("tiny-gpt2").save_pretrained(tmp_path)
    grown = load_tokenizer("tiny")
    grown.add_tokens(["<|tool|>", "<|end_tool|>"])
    model = load_causal_lm(tmp_path, tokenizer=grown)
    assert model.get_input_embeddings().weight.shape[0] == len(grown)


def test_missing_local_path_error_says_neither_preset_nor_directory(tmp_path):
    missing = tmp_path / "runs" / "sft" / "checkpoints"
    with pytest.raises(FileNotFoundError) as err:
        load_causal_lm(missing)
    message = str(err.value)
    assert str(missing) in message and "neither a model preset" in message and "tiny-gpt2" in message


def test_a_file_is_not_a_checkpoint(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="it is a file"):
        load_causal_lm(weights)


def test_unknown_hub_name_offline_gives_the_same_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as err:
        load_causal_lm("no-such-owner/no-such-model-rlhf-ray")
    assert "neither a model preset" in str(err.value) and "Hugging Face Hub" in str(err.value)


def test_check_model_source(tmp_path):
    assert check_model_source(tmp_path) == "directory"
    assert check_model_source("tiny-llama") == "preset"
    assert check_model_source("openai-community/gpt2") == "hub"
    with pytest.raises(FileNotFoundError):
        check_model_source("./not/here")


def test_load_tokenizer_for_presets_and_checkpoints(tmp_path, tiny_tokenizer):
    tokenizer = load_tokenizer_for("tiny-llama", padding_side="left")
    assert len(tokenizer) == len(tiny_tokenizer) and tokenizer.padding_side == "left"
    with pytest.raises(ValueError, match="shape-only.*ships no tokenizer"):
        load_tokenizer_for("llama-7b")
    tiny_tokenizer.save_pretrained(tmp_path)
    reloaded = load_tokenizer_for(tmp_path)
    text = "Any tips for brewing coffee?"
    assert reloaded(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
