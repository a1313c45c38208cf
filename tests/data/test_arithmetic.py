"""The shipped arithmetic task: its rule, its splits, and how job data checks chat rows and prompt lengths."""

from __future__ import annotations

import json

import pytest

from rlhf_ray.config.schema import DataConfig
from rlhf_ray.data.arithmetic import (
    ArithmeticConfig,
    answer_is_right,
    answer_reward,
    answered,
    asked,
    build_arithmetic,
    near_miss,
    question,
)
from rlhf_ray.data.formats import DataError
from rlhf_ray.data.job_data import load_job_examples
from rlhf_ray.data.tasks import TASKS, as_judge, resolve_task_source, task_of

# SmolLM2's chat template renders a question like this; the reward role sees it decoded without the
# special tokens.
RENDERED = ("system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face\nuser\n"
            "What is 17 + 25? Reply with the number only.\nassistant\n")


def test_the_rule_reads_the_last_number_of_the_response_against_the_last_question():
    assert asked(RENDERED) == 42
    assert asked("What is 3 - 9? then What is 12 * 11?") == 132  # the last question counts
    assert asked("no question here") is None
    assert answered("17 + 25 = 42.") == 42 and answered("-7") == -7 and answered("none") is None
    responses = ["42", "17 + 25 = 42.", "The answer is 42", "17 + 25 = 32.", "42, or maybe 43", "", "forty-two"]
    #            right  restated sum     words around it     wrong sum        last number 43    no number
    assert answer_reward([RENDERED] * len(responses), responses) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert answer_reward.max_reward == 1.0
    assert answer_is_right(RENDERED, "= 42") and not answer_is_right("hello", "42")


def test_the_rule_refuses_data_of_another_task():
    with pytest.raises(ValueError, match="asks no question of the form"):
        answer_reward(["Any tips for brewing coffee?"], ["42"])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        answer_reward([RENDERED, RENDERED], ["42"])


def test_splits_hold_chat_turns_right_answers_and_near_misses_and_hold_out_their_questions():
    cfg = ArithmeticConfig(n_sft=50, n_pref_train=50, n_pref_eval=20, n_prompts_train=100, n_prompts_eval=20)
    splits = build_arithmetic(cfg)
    assert splits == build_arithmetic(cfg)  # deterministic
    sft = splits["sft"][0]
    assert sft["prompt"][0]["role"] == "user" and sft["completion"][0]["role"] == "assistant"
    assert answer_reward([sft["prompt"][0]["content"]], [sft["completion"][0]["content"]]) == [1.0]
    for row in splits["preference_train"] + splits["preference_eval"]:
        q = row["prompt"][0]["content"]
        assert answer_reward([q, q], [row["chosen"][0]["content"], row["rejected"][0]["content"]]) == [1.0, 0.0]
    held_out = {r["prompt"][0]["content"] for r in splits["prompts_eval"] + splits["preference_eval"]}
    train = {r["prompt"][0]["content"] for split in ("sft", "preference_train", "prompts_train")
             for r in splits[split]}
    assert len({r["prompt"][0]["content"] for r in splits["prompts_eval"]}) == 20 and not held_out & train
    for row in splits["prompts_train"]:
        a, _, b = row["prompt"][0]["content"].removeprefix("What is ").split("?")[0].split()
        assert 10 <= int(a) <= 99 and 10 <= int(b) <= 99


def test_near_misses_are_close_and_wrong():
    import random

    rng = random.Random(0)
    for answer in (10, 42, 99, 131, 198):
        miss = near_miss(rng, answer)
        assert miss != answer and abs(miss - answer) <= 90


def test_operations_and_sizes_are_checked():
    three = build_arithmetic(ArithmeticConfig(digits=1, operations=("*", "-"), n_sft=5, n_pref_train=5,
                                              n_pref_eval=5, n_prompts_train=5, n_prompts_eval=5))
    q = three["prompts_eval"][0]["prompt"][0]["content"]
    assert ("*" in q or "-" in q) and asked(q) is not None
    with pytest.raises(ValueError, match="operations"):
        ArithmeticConfig(operations=("/",))
    with pytest.raises(ValueError, match="hold out at most"):
        ArithmeticConfig(digits=1, n_prompts_eval=80)
    assert question(3, "+", 4) == "What is 3 + 4? Reply with the number only."


def test_task_sources_write_once_into_the_data_folder(tmp_path):
    path = resolve_task_source("arithmetic:prompts_eval", tmp_path)
    assert path == str(tmp_path / "arithmetic" / "prompts_eval.jsonl")
    rows = [json.loads(line) for line in open(path)]
    assert len(rows) == ArithmeticConfig().n_prompts_eval
    assert resolve_task_source("mine.jsonl", tmp_path) == "mine.jsonl"
    with pytest.raises(ValueError, match="has no split 'kto'; use one of arithmetic:prefe"):
        resolve_task_source("arithmetic:kto", tmp_path)
    assert task_of("arithmetic:sft") is TASKS["arithmetic"] and task_of("data/x.jsonl") is None


def test_data_synth_writes_the_arithmetic_task(tmp_path, capsys):
    from cli_helpers import run

    code, out, err = run(["data", "synth", "--task", "arithmetic", "--out", str(tmp_path), "--operations", "+", "-"],
                         capsys)
    assert code == 0, err
    assert "prompts_eval" in out and (tmp_path / "preference_train.jsonl").is_file()
    ops = {json.loads(line)["prompt"][0]["content"].split()[3] for line in open(tmp_path / "prompts_train.jsonl")}
    assert ops == {"+", "-"}


def test_judges_see_the_prompt_and_older_one_argument_judges_still_work():
    from rlhf_ray.data.synthetic import mentions_target

    judge = as_judge(mentions_target)
    assert judge("any prompt", "as folks at Penn say") and not judge("Penn", "no mention")
    assert as_judge(answer_is_right)(RENDERED, "42")


def test_chat_rows_need_a_chat_template(tmp_path):
    from rlhf_ray.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("tiny")
    tokenizer.chat_template = None
    with pytest.raises(DataError, match=r"prompts_eval\.jsonl holds chat messages .* no chat template"):
        load_job_examples("arithmetic:prompts_eval", "prompt", DataConfig(), tokenizer, tmp_path)


def test_a_prompt_longer_than_max_prompt_length_fails_naming_the_file_and_row(tmp_path):
    from rlhf_ray.models.loading import load_tokenizer_for

    tokenizer = load_tokenizer_for("smollm2-135m")  # the real tokenizer and its chat template (~47 tokens)
    with pytest.raises(DataError, match=r"prompts_train\.jsonl, row 0 .* longer than max_prompt_length=16"):
        load_job_examples("arithmetic:prompts_train", "prompt", DataConfig(max_prompt_length=16), tokenizer, tmp_path)
    examples, skipped = load_job_examples("arithmetic:prompts_eval", "prompt",
                                          DataConfig(max_prompt_length=64), tokenizer, tmp_path)
    assert len(examples) == 64 and not skipped
