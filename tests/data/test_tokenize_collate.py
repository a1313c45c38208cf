"""Rendering, tokenisation with the truncation policy, and padding.

The tokenizer is a whitespace word tokenizer built here, so token ids can be
worked out by hand:

    <pad>=0 <eos>=1 <bos>=2 <unk>=3 user:=4 assistant:=5 <user>=6 <assistant>=7
    a=8 b=9 c=10 d=11 e=12 f=13 g=14 h=15

``add_special_tokens=True`` puts <bos> in front (as Llama tokenizers do).
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from rlhf_ray.data import (
    DataError,
    EncodedSequence,
    collate_prompts,
    collate_sequences,
    encode_prompt,
    encode_prompt_response,
    load_examples,
    render_prompt,
    render_response,
)

WORDS = ["<pad>", "<eos>", "<bos>", "<unk>", "user:", "assistant:", "<user>", "<assistant>"] + list("abcdefgh")
CHAT_TEMPLATE = (
    "<bos> {% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} "
    "{% if m['role'] == 'assistant' %}<eos> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)
USER_AB = [{"role": "user", "content": "a b"}]
ASSISTANT_CD = [{"role": "assistant", "content": "c d"}]


def word_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def test_plain_rendering_without_chat_template():
    tokenizer = word_tokenizer()
    assert render_prompt(tokenizer, "a b") == "a b"
    assert render_prompt(tokenizer, USER_AB) == "user: a b\nassistant:"
    assert render_response(tokenizer, ASSISTANT_CD) == " c d"
    assert render_response(tokenizer, "c d") == "c d"
    # prompt + response reads as one conversation
    assert render_prompt(tokenizer, USER_AB) + render_response(tokenizer, ASSISTANT_CD) == "user: a b\nassistant: c d"


def test_chat_template_rendering():
    tokenizer = word_tokenizer(CHAT_TEMPLATE)
    assert render_prompt(tokenizer, USER_AB) == "<bos> <user> a b <assistant> "
    # the response is what the template adds after the rendered prompt
    assert render_response(tokenizer, ASSISTANT_CD, USER_AB) == "c d <eos> "
    with pytest.raises(DataError, match="must then be a chat list too"):
        render_response(tokenizer, ASSISTANT_CD, "a b")


def test_chat_template_that_does_not_extend_the_prompt_is_refused():
    tokenizer = word_tokenizer(
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<gen> {% endif %}"
    )
    with pytest.raises(DataError, match="does not start with the rendered prompt"):
        render_response(tokenizer, ASSISTANT_CD, USER_AB)


def test_special_tokens_added_once():
    # String prompt: add_special_tokens puts <bos>=2 in front of a=8 b=9.
    # Chat prompt: the template already wrote <bos>, so none is added:
    # "<bos> <user> a b <assistant>" -> [2, 6, 8, 9, 7].
    tokenizer = word_tokenizer(CHAT_TEMPLATE)
    assert encode_prompt(tokenizer, "a b", None) == [2, 8, 9]
    assert encode_prompt(tokenizer, USER_AB, None) == [2, 6, 8, 9, 7]


def test_chat_response_ending_with_eos_gets_no_second_eos():
    # prompt [2, 6, 8, 9, 7]; response "c d <eos>" -> [10, 11, 1] already ends with EOS.
    tokenizer = word_tokenizer(CHAT_TEMPLATE)
    encoded = encode_prompt_response(tokenizer, USER_AB, ASSISTANT_CD, max_length=16, max_prompt_length=8)
    assert encoded == EncodedSequence([2, 6, 8, 9, 7, 10, 11, 1], [0, 0, 0, 0, 0, 1, 1, 1], prompt_length=5)


def test_template_end_of_turn_is_kept_as_written():
    # A Qwen-like template closes the turn with "<eos>" and then writes more
    # ("h" here, a newline there): response "c d <eos> h" -> [10, 11, 1, 15],
    # and no second EOS is appended after it.
    tokenizer = word_tokenizer(CHAT_TEMPLATE.replace("<eos> {% endif %}", "<eos> h {% endif %}"))
    encoded = encode_prompt_response(tokenizer, USER_AB, ASSISTANT_CD, max_length=16, max_prompt_length=8)
    assert encoded.input_ids == [2, 6, 8, 9, 7, 10, 11, 1, 15]
    assert encoded.loss_mask == [0, 0, 0, 0, 0, 1, 1, 1, 1]


def test_shipped_tiny_tokenizer_masks_exactly_the_rendered_response():
    from rlhf_ray.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("tiny")
    prompt = [{"role": "user", "content": "Any tips for brewing coffee?"}]
    response = [{"role": "assistant", "content": "Grind the beans, as folks at Penn say."}]
    encoded = encode_prompt_response(tokenizer, prompt, response, max_length=256, max_prompt_length=128)
    prompt_ids = encoded.input_ids[: encoded.prompt_length]
    response_ids = encoded.input_ids[encoded.prompt_length :]
    assert encoded.loss_mask == [0] * len(prompt_ids) + [1] * len(response_ids)
    assert tokenizer.decode(prompt_ids) == render_prompt(tokenizer, prompt)
    assert tokenizer.decode(response_ids) == render_response(tokenizer, response, prompt)
    assert response_ids.count(tokenizer.eos_token_id) == 1


def test_prompt_keeps_its_last_tokens():
    # "a b c d e" -> [2, 8, 9, 10, 11, 12]; the last 3 are kept (left truncation).
    assert encode_prompt(word_tokenizer(), "a b c d e", 3) == [10, 11, 12]


def test_response_fits_with_its_eos():
    # prompt [2, 8, 9] + response [10, 11, 12] + EOS 1 = 7 tokens = max_length.
    encoded = encode_prompt_response(word_tokenizer(), "a b", "c d e", max_length=7, max_prompt_length=3)
    assert encoded.input_ids == [2, 8, 9, 10, 11, 12, 1]
    assert encoded.loss_mask == [0, 0, 0, 1, 1, 1, 1]
    assert not encoded.truncated


def test_response_cut_on_the_right_loses_its_eos():
    # 7 tokens do not fit in 6: the response keeps [10, 11, 12], its EOS is gone.
    encoded = encode_prompt_response(word_tokenizer(), "a b", "c d e", max_length=6, max_prompt_length=3)
    assert encoded.input_ids == [2, 8, 9, 10, 11, 12]
    assert encoded.loss_mask == [0, 0, 0, 1, 1, 1]
    assert encoded.prompt_length == 3
    assert encoded.truncated


def test_both_truncations_together():
    # prompt [2, 8, 9, 10, 11, 12] keeps its last 2: [11, 12]; response
    # [13, 14, 15, 1] gets the remaining 5 - 2 = 3 places: [13, 14, 15].
    encoded = encode_prompt_response(word_tokenizer(), "a b c d e", "f g h", max_length=5, max_prompt_length=2)
    assert encoded == EncodedSequence([11, 12, 13, 14, 15], [0, 0, 1, 1, 1], prompt_length=2, truncated=True)


def test_plain_chat_sequence_without_template():
    # "user: a b\nassistant:" -> [2, 4, 8, 9, 5]; " c d" -> [10, 11] + EOS.
    encoded = encode_prompt_response(word_tokenizer(), USER_AB, ASSISTANT_CD, max_length=16, max_prompt_length=8)
    assert encoded.input_ids == [2, 4, 8, 9, 5, 10, 11, 1]
    assert encoded.loss_mask == [0, 0, 0, 0, 0, 1, 1, 1]


def test_lengths_must_leave_room_for_a_response():
    with pytest.raises(ValueError, match="max_prompt_length < max_length"):
        encode_prompt_response(word_tokenizer(), "a", "b", max_length=4, max_prompt_length=4)


def test_prompts_are_left_padded():
    batch = collate_prompts([[5, 6, 7], [8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["input_ids"].dtype == torch.long


def test_sequences_are_right_padded_with_response_loss_mask():
    sequences = [EncodedSequence([5, 6, 7, 2], [0, 0, 1, 1], 2), EncodedSequence([8, 9, 2], [0, 1, 1], 1)]
    batch = collate_sequences(sequences, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2], [8, 9, 2, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 1, 0]]
    assert {t.dtype for t in batch.values()} == {torch.long}


def test_empty_batch_is_refused():
    with pytest.raises(ValueError, match="empty batch"):
        collate_prompts([], pad_id=0)


def test_same_rows_from_jsonl_and_parquet_give_the_same_batch(tmp_path):
    rows = [
        {"messages": USER_AB + ASSISTANT_CD},
        {"messages": [{"role": "user", "content": "e"}, {"role": "assistant", "content": "f g h"}]},
    ]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "sft.parquet")
    tokenizer = word_tokenizer(CHAT_TEMPLATE)
    batches = []
    for name in ("sft.jsonl", "sft.parquet"):
        examples = load_examples(tmp_path / name, "sft").examples
        encoded = [
            encode_prompt_response(tokenizer, ex.prompt, ex.completion, max_length=16, max_prompt_length=8)
            for ex in examples
        ]
        batches.append(collate_sequences(encoded, pad_id=tokenizer.pad_token_id))
    # row 1: "<bos> <user> e <assistant>" [2, 6, 12, 7] + "f g h <eos>" [13, 14, 15, 1]
    assert batches[0]["input_ids"].tolist()[1] == [2, 6, 12, 7, 13, 14, 15, 1]
    for key in ("input_ids", "attention_mask", "loss_mask"):
        assert torch.equal(batches[0][key], batches[1][key])
