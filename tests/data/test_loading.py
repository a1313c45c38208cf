"""Loading every format from local files, and catching bad input at load time."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rlhf_ray.data import (
    FORMATS,
    DataError,
    KTOExample,
    PreferenceExample,
    PromptExample,
    RankedExample,
    SFTExample,
    load_examples,
)

USER_HI = {"role": "user", "content": "Hi there"}
SYSTEM = {"role": "system", "content": "Be brief."}
HELLO = {"role": "assistant", "content": "Hello!"}
GO_AWAY = {"role": "assistant", "content": "Go away."}


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` in the format named by the path's extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".csv":
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("not a data file\n")
    return path


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace word tokenizer: every word of the tests is one token."""
    words = ["<pad>", "<eos>", "<unk>", "one", "two", "three", "four", "five"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


# format -> (rows as stored, examples expected, whether CSV can hold them)
ROUND_TRIPS = {
    "prompt": (
        [{"prompt": "What is two plus two?"}, {"prompt": "Name a colour."}],
        [PromptExample("What is two plus two?"), PromptExample("Name a colour.")],
        True,
    ),
    "prompt_messages": (
        # A trailing assistant turn is dropped: the prompt is what comes before it.
        [{"messages": [USER_HI]}, {"messages": [SYSTEM, USER_HI, HELLO]}],
        [PromptExample([USER_HI]), PromptExample([SYSTEM, USER_HI])],
        False,
    ),
    "sft": (
        [{"prompt": "Say hi.", "completion": "Hi!"}, {"prompt": "Count: one", "completion": "two"}],
        [SFTExample("Say hi.", "Hi!"), SFTExample("Count: one", "two")],
        True,
    ),
    "sft_messages": (
        [{"messages": [SYSTEM, USER_HI, HELLO]}],
        [SFTExample([SYSTEM, USER_HI], [HELLO])],
        False,
    ),
    "preference": (
        [{"prompt": "Greet me.", "chosen": "Hello!", "rejected": "No."}],
        [PreferenceExample("Greet me.", "Hello!", "No.")],
        True,
    ),
    "preference_chat": (
        [{"prompt": [USER_HI], "chosen": [HELLO], "rejected": [GO_AWAY]}],
        [PreferenceExample([USER_HI], [HELLO], [GO_AWAY])],
        False,
    ),
    "preference_implicit_chat": (
        # No prompt column: the shared leading messages are the prompt.
        [{"chosen": [SYSTEM, USER_HI, HELLO], "rejected": [SYSTEM, USER_HI, GO_AWAY]}],
        [PreferenceExample([SYSTEM, USER_HI], [HELLO], [GO_AWAY])],
        False,
    ),
    "preference_hh": (
        # Anthropic HH: the prompt runs up to and including the last "\n\nAssistant:"
        # of the shared prefix ("...Assistant: Hel" is shared in row 1, cut back).
        [
            {
                "chosen": "\n\nHuman: Hi\n\nAssistant: Hello there.",
                "rejected": "\n\nHuman: Hi\n\nAssistant: Go away.",
            },
            {
                "chosen": "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: Hello",
                "rejected": "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: Help",
            },
        ],
        [
            PreferenceExample("\n\nHuman: Hi\n\nAssistant:", " Hello there.", " Go away."),
            PreferenceExample("\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant:", " Hello", " Help"),
        ],
        True,
    ),
    "kto": (
        [
            {"prompt": "Greet me.", "completion": "Hello!", "label": True},
            {"prompt": "Greet me.", "completion": "No.", "label": False},
        ],
        [KTOExample("Greet me.", "Hello!", True), KTOExample("Greet me.", "No.", False)],
        True,
    ),
    "ranked": (
        [{"prompt": "Greet me.", "responses": ["No.", "Hello!", "Hi."], "ranking": [1, 2, 0]}],
        [RankedExample("Greet me.", ["No.", "Hello!", "Hi."], [1, 2, 0])],
        False,
    ),
}


@pytest.mark.parametrize("case", sorted(ROUND_TRIPS))
def test_each_format_loads_to_the_same_examples_from_every_file_type(tmp_path, case):
    rows, expected, csv_ok = ROUND_TRIPS[case]
    fmt = case.split("_")[0]
    extensions = [".jsonl", ".json", ".parquet"] + ([".csv"] if csv_ok else [])
    for extension in extensions:
        path = write_rows(tmp_path / f"{case}{extension}", rows)
        loaded = load_examples(path, fmt)
        assert loaded.examples == expected, extension
        assert loaded.skipped == {}
        assert loaded.source == str(path)


def test_csv_cells_are_text(tmp_path):
    # pandas alone would read "2" as the number 2.0 and "NA" as a missing value
    path = tmp_path / "sums.csv"
    path.write_text("prompt,completion\nWhat is 1+1?,2\nNA,None\n")
    loaded = load_examples(path, "sft")
    assert loaded.examples == [SFTExample("What is 1+1?", "2"), SFTExample("NA", "None")]


def test_column_map_and_prompt_template_apply(tmp_path):
    # stack-exchange-paired uses question / response_j (better) / response_k (worse).
    rows = [{"qid": 7, "question": "Why tabs?", "response_j": "Taste.", "response_k": "Tabs."}]
    path = write_rows(tmp_path / "se.parquet", rows)
    loaded = load_examples(
        path,
        "preference",
        column_map={"question": "prompt", "response_j": "chosen", "response_k": "rejected"},
        prompt_template="Question: {prompt}\n\nAnswer: ",
    )
    assert loaded.examples == [PreferenceExample("Question: Why tabs?\n\nAnswer: ", "Taste.", "Tabs.")]


def test_column_map_may_swap_names(tmp_path):
    path = write_rows(tmp_path / "swap.jsonl", [{"prompt": "Done.", "completion": "Do it?"}])
    loaded = load_examples(path, "sft", column_map={"prompt": "completion", "completion": "prompt"})
    assert loaded.examples == [SFTExample("Do it?", "Done.")]


@pytest.mark.parametrize(
    ("template", "complaint"),
    [("Answer this:", "must contain the field {prompt}"), ("{context}: {prompt}", "'context'")],
)
def test_bad_prompt_template_is_refused(tmp_path, template, complaint):
    path = write_rows(tmp_path / "p.jsonl", [{"prompt": "x"}])
    with pytest.raises(DataError, match=complaint):
        load_examples(path, "prompt", prompt_template=template)


def test_prompt_template_refuses_chat_prompts(tmp_path):
    path = write_rows(tmp_path / "chat.jsonl", [{"messages": [USER_HI]}])
    with pytest.raises(DataError, match=r"chat.jsonl, row 0 \(0-based\).*chat list"):
        load_examples(path, "prompt", prompt_template="Q: {prompt}")


def test_literal_braces_in_template(tmp_path):
    path = write_rows(tmp_path / "p.jsonl", [{"prompt": "x"}])
    loaded = load_examples(path, "prompt", prompt_template="{{json}} {prompt}")
    assert loaded.examples == [PromptExample("{json} x")]


def test_unknown_format_lists_the_known_ones(tmp_path):
    path = write_rows(tmp_path / "p.jsonl", [{"prompt": "x"}])
    with pytest.raises(DataError, match="unknown data format 'dpo'") as caught:
        load_examples(path, "dpo")
    assert all(fmt in str(caught.value) for fmt in FORMATS)


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "prefs.jsonl"
    with pytest.raises(DataError, match="prefs.jsonl: no such file or folder"):
        load_examples(missing, "preference")


def test_unreadable_file_is_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "fine"}\n{"prompt": "no closing brace"\n')
    with pytest.raises(DataError, match=r"broken.jsonl: could not read it as json: row 1 \(0-based; line 2\)"):
        load_examples(path, "prompt")


def test_unknown_extension_lists_the_known_ones(tmp_path):
    path = write_rows(tmp_path / "prompts.txt", [])
    with pytest.raises(DataError, match=r"prompts.txt: unknown file type '.txt'.*\.csv, \.json, \.jsonl, \.parquet"):
        load_examples(path, "prompt")


def test_missing_column_lists_columns_and_suggests_a_column_map(tmp_path):
    path = write_rows(tmp_path / "se.jsonl", [{"question": "Why?", "response_j": "Because.", "response_k": "No."}])
    with pytest.raises(DataError) as caught:
        load_examples(path, "preference")
    message = str(caught.value)
    assert "se.jsonl" in message and "'chosen' + 'rejected'" in message
    assert "['question', 'response_j', 'response_k']" in message
    assert "column_map" in message and "'response_j': 'chosen'" in message


def test_hub_name_that_cannot_be_loaded_says_so():
    # Tests run with HF_DATASETS_OFFLINE=1 (tests/conftest.py): nothing is downloaded.
    with pytest.raises(DataError, match="no-such-user/no-such-data: could not load split 'train'"):
        load_examples("no-such-user/no-such-data", "preference")


# kind of bad row -> (format, rows with the bad one at index 1, reason, words the message must hold)
BAD_ROWS = {
    "wrong_type": (
        "sft",
        [{"prompt": "ok", "completion": "ok"}, {"prompt": 42, "completion": "ok"}],
        "'prompt' must be",
    ),
    "missing_value": ("sft", [{"prompt": "ok", "completion": "ok"}, {"prompt": "ok", "completion": None}], "missing"),
    "empty_prompt": (
        "sft",
        [{"prompt": "ok", "completion": "ok"}, {"prompt": "  ", "completion": "ok"}],
        "'prompt' is empty",
    ),
    "empty_response": (
        "kto",
        [{"prompt": "a", "completion": "b", "label": True}, {"prompt": "a", "completion": "", "label": True}],
        "'completion' is empty",
    ),
    "chosen_equals_rejected": (
        "preference",
        [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b", "rejected": "b"}],
        "identical",
    ),
    "bad_ranking": (
        "ranked",
        [
            {"prompt": "a", "responses": ["x", "y"], "ranking": [0, 1]},
            {"prompt": "a", "responses": ["x", "y"], "ranking": [0, 0]},
        ],
        "exactly once",
    ),
    "bad_label": (
        "kto",
        [{"prompt": "a", "completion": "b", "label": True}, {"prompt": "a", "completion": "b", "label": "yes"}],
        "true or false",
    ),
    "too_few_responses": (
        "ranked",
        [
            {"prompt": "a", "responses": ["x", "y"], "ranking": [1, 0]},
            {"prompt": "a", "responses": ["x"], "ranking": [0]},
        ],
        "at least 2",
    ),
    "no_shared_prompt": (
        "preference",
        [
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
            {"chosen": "b", "rejected": "c"},
        ],
        "no 'prompt' column",
    ),
    "bad_messages": (
        "sft",
        [{"messages": [USER_HI, HELLO]}, {"messages": [HELLO, USER_HI]}],
        "must end with an assistant turn",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_bad_row_is_reported_with_file_and_row(tmp_path, kind):
    fmt, rows, words = BAD_ROWS[kind]
    path = write_rows(tmp_path / f"{kind}.jsonl", rows)
    with pytest.raises(DataError) as caught:
        load_examples(path, fmt)
    message = str(caught.value)
    assert f"{kind}.jsonl, row 1 (0-based)" in message
    assert words in message
    assert "skip_bad_rows" in message


def test_prompt_longer_than_limit_is_reported_with_file_and_row(tmp_path):
    # "one two three" is 3 tokens, "one two three four" is 4 > max_prompt_length=3.
    rows = [{"prompt": "one two three", "completion": "five"}, {"prompt": "one two three four", "completion": "five"}]
    path = write_rows(tmp_path / "long.jsonl", rows)
    with pytest.raises(
        DataError, match=r"long.jsonl, row 1 \(0-based\): the prompt is 4 tokens, longer than max_prompt_length=3"
    ):
        load_examples(path, "sft", max_prompt_length=3, tokenizer=word_tokenizer())
    loaded = load_examples(path, "sft", max_prompt_length=4, tokenizer=word_tokenizer())
    assert len(loaded) == 2


def test_prompt_length_limit_needs_a_tokenizer(tmp_path):
    path = write_rows(tmp_path / "p.jsonl", [{"prompt": "one"}])
    with pytest.raises(DataError, match="needs the tokenizer"):
        load_examples(path, "prompt", max_prompt_length=3)


def test_skip_bad_rows_drops_and_counts_by_reason(tmp_path):
    rows = [
        {"prompt": "one", "chosen": "two", "rejected": "three"},  # kept
        {"prompt": "one", "chosen": "two", "rejected": "two"},  # chosen_equals_rejected
        {"prompt": "", "chosen": "two", "rejected": "three"},  # empty
        {"prompt": "one", "chosen": "two", "rejected": "two"},  # chosen_equals_rejected
        {"prompt": "one two three four", "chosen": "two", "rejected": "three"},  # prompt_too_long
        {"prompt": "four", "chosen": "five", "rejected": "one"},  # kept
    ]
    path = write_rows(tmp_path / "prefs.jsonl", rows)
    loaded = load_examples(path, "preference", skip_bad_rows=True, max_prompt_length=3, tokenizer=word_tokenizer())
    assert loaded.examples == [PreferenceExample("one", "two", "three"), PreferenceExample("four", "five", "one")]
    assert loaded.skipped == {"chosen_equals_rejected": 2, "empty": 1, "prompt_too_long": 1}


def test_skip_bad_rows_fails_when_nothing_is_left(tmp_path):
    path = write_rows(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "b"}])
    with pytest.raises(DataError, match=r"no usable 'preference' examples are left \(1 chosen_equals_rejected\)"):
        load_examples(path, "preference", skip_bad_rows=True)


def test_folder_uses_the_files_that_name_the_split(tmp_path):
    write_rows(tmp_path / "data" / "train-00000.jsonl", [{"prompt": "a"}])
    write_rows(tmp_path / "data" / "train-00001.parquet", [{"prompt": "b"}])
    write_rows(tmp_path / "data" / "test.jsonl", [{"prompt": "c"}])
    assert load_examples(tmp_path, "prompt").examples == [PromptExample("a"), PromptExample("b")]
    assert load_examples(tmp_path, "prompt", split="test").examples == [PromptExample("c")]
    with pytest.raises(DataError, match="no file names the split 'validation'"):
        load_examples(tmp_path, "prompt", split="validation")


def test_folder_without_split_names_is_the_train_split(tmp_path):
    write_rows(tmp_path / "part_a.jsonl", [{"prompt": "a"}])
    write_rows(tmp_path / "part_b.csv", [{"prompt": "b"}])
    assert load_examples(tmp_path, "prompt").examples == [PromptExample("a"), PromptExample("b")]


def test_bad_row_in_a_folder_names_its_own_file(tmp_path):
    write_rows(tmp_path / "part_a.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    write_rows(tmp_path / "part_b.jsonl", [{"prompt": "c"}, {"prompt": ""}])
    with pytest.raises(DataError, match=r"part_b.jsonl, row 1 \(0-based\)"):
        load_examples(tmp_path, "prompt")
