"""The shipped tiny tokenizer and load_tokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rlhf_ray.data.synthetic import SyntheticConfig, build_synthetic, corpus_texts
from rlhf_ray.models.build_tokenizer import CHAT_TEMPLATE, build_tokenizer, train_tokenizer
from rlhf_ray.models.tokenizer import TINY_TOKENIZER_PATH, load_tokenizer


@pytest.fixture(scope="module")
def tiny():
    return load_tokenizer("tiny")


def test_shipped_files_load_with_auto_tokenizer():
    names = {p.name for p in TINY_TOKENIZER_PATH.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= names
    tok = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_PATH))
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<|pad|>", "<|bos|>", "<|eos|>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert 1000 <= len(tok) <= 2000
    assert tok.chat_template == CHAT_TEMPLATE


def test_round_trips_the_whole_synthetic_corpus(tiny):
    texts = list(corpus_texts(SyntheticConfig()))
    ids = tiny(texts, add_special_tokens=False)["input_ids"]
    decoded = tiny.batch_decode(ids)
    mismatches = [(x, y) for x, y in zip(texts, decoded) if x != y]
    assert not mismatches, mismatches[:3]
    # Learned on the corpus: most words are one token, so rows stay short.
    assert max(len(i) for i in ids) <= 64


def test_round_trips_text_outside_the_corpus(tiny):
    # Byte-level BPE: nothing maps to an unknown token, spacing is kept exactly.
    text = "naïve café, 東京 🙂\n\ttabs  and  double spaces ."
    assert tiny.decode(tiny(text)["input_ids"]) == text


def test_no_special_tokens_added_to_plain_text(tiny):
    ids = tiny("Penn")["input_ids"]
    assert tiny.pad_token_id not in ids and tiny.bos_token_id not in ids and tiny.eos_token_id not in ids
    assert tiny.convert_ids_to_tokens(tiny(" Penn")["input_ids"]) == ["ĠPenn"]  # one learned token


def test_chat_template_renders_roles_and_generation_prompt(tiny):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Any tips for baking bread?"},
        {"role": "assistant", "content": "Sure thing. Weigh the flour."},
    ]
    full = tiny.apply_chat_template(messages, tokenize=False)
    assert full == (
        "<|bos|>System: Be brief.\nUser: Any tips for baking bread?\n"
        "Assistant: Sure thing. Weigh the flour.<|eos|>\n"
    )
    prompt = tiny.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|bos|>System: Be brief.\nUser: Any tips for baking bread?\nAssistant:"
    # The prompt is a prefix of the conversation in tokens too, so a response mask is a prefix length.
    full_ids = tiny(full, add_special_tokens=False)["input_ids"]
    prompt_ids = tiny(prompt, add_special_tokens=False)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids
    assert full_ids[0] == tiny.bos_token_id and tiny.eos_token_id in full_ids[len(prompt_ids):]


def test_chat_template_rejects_unknown_role(tiny):
    with pytest.raises(Exception, match="role tool"):
        tiny.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_synthetic_rows_in_chat_form_stay_short(tiny):
    rows = build_synthetic(SyntheticConfig())["preference_train"]
    lengths = [
        len(tiny.apply_chat_template([{"role": "user", "content": r["prompt"]},
                                      {"role": "assistant", "content": r["chosen"]}], tokenize=True)["input_ids"])
        for r in rows
    ]
    assert max(lengths) <= 64


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_side(side):
    tok = load_tokenizer("tiny", padding_side=side)
    batch = tok(["Penn", "Sure thing, as folks at Penn like to say."], padding=True)
    short_ids, short_mask = batch["input_ids"][0], batch["attention_mask"][0]
    n_pad = short_mask.count(0)
    assert n_pad > 0
    if side == "left":  # pads first, text last
        assert short_ids[:n_pad] == [0] * n_pad and short_mask[n_pad:] == [1] * (len(short_mask) - n_pad)
    else:
        assert short_ids[-n_pad:] == [0] * n_pad and short_mask[:-n_pad] == [1] * (len(short_mask) - n_pad)


def test_bad_arguments_give_clear_errors(tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
        load_tokenizer(str(missing))
    with pytest.raises(ValueError, match="padding_side='middle'"):
        load_tokenizer("tiny", padding_side="middle")
    with pytest.raises(ValueError, match="name_or_path=''"):
        load_tokenizer("")


def test_pad_falls_back_to_eos(tmp_path, caplog):
    # A GPT-2-style tokenizer: eos but no pad token.
    raw = train_tokenizer(["hello world", "hello there"] * 10, vocab_size=300)
    raw.add_special_tokens(["<|endoftext|>"])
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>").save_pretrained(tmp_path)
    with caplog.at_level("INFO", logger="rlhf_ray.models.tokenizer"):
        tok = load_tokenizer(str(tmp_path), padding_side="left")
    assert "no pad token; padding with its eos token" in caplog.text
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == tok.eos_token_id
    assert tok.padding_side == "left"


def test_build_tokenizer_writes_a_loadable_tokenizer(tmp_path):
    out = build_tokenizer(tmp_path / "tok")
    rebuilt = load_tokenizer(str(out))
    shipped = load_tokenizer("tiny")
    assert (rebuilt.pad_token_id, rebuilt.bos_token_id, rebuilt.eos_token_id) == (0, 1, 2)
    assert rebuilt.chat_template == shipped.chat_template
    assert len(rebuilt) == len(shipped)
    assert not (out / "chat_template.jinja").exists()  # the template lives in tokenizer_config.json
