"""The synthetic "mention Penn" task: judge, rule reward, splits, files."""

from __future__ import annotations

import dataclasses
import json

import pytest

from rlhf_ray.data.synthetic import (
    N_DISTINCT_PROMPTS,
    SPLITS,
    SyntheticConfig,
    build_synthetic,
    corpus_texts,
    mention_reward,
    mentions_target,
    write_synthetic,
)

SMALL = SyntheticConfig(seed=3, n_sft=200, n_pref_train=150, n_pref_eval=40, n_prompts_train=120,
                        n_prompts_eval=30, n_kto=100, n_ranked=80)


@pytest.fixture(scope="module")
def default_task():
    return build_synthetic(SyntheticConfig())


def _words(text):
    return text.replace(",", " ").replace(".", " ").replace("!", " ").split()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("as folks at Penn like to say", True),
        ("Penn's students swear by it", True),  # possessive: "'" is not a word character
        ("(Penn)", True),
        ("Penn", True),
        ("as folks at penn like to say", False),  # case-sensitive: a proper noun
        ("born in Pennsylvania", False),  # not a whole word
        ("UPenn alumni", False),
        ("Penn_State", False),  # "_" is a word character
        ("", False),
    ],
)
def test_mentions_target_is_whole_word_and_case_sensitive(text, expected):
    assert mentions_target(text) is expected


def test_mentions_target_multiword_and_empty_target():
    assert mentions_target("a game at Penn State today", "Penn State")
    assert not mentions_target("a game at Penn  State today", "Penn State")  # exact spacing
    with pytest.raises(ValueError, match="target is empty"):
        mentions_target("Penn", "")


PROMPT = "Any tips for brewing coffee on weekends?"  # topic words: {brewing, coffee}


@pytest.mark.parametrize(
    "response, expected",
    [
        # 15 distinct words, so q = 1; mentions (m=1) and says "coffee" (t=1): 1 * (1 + 0.25) = 1.25
        ("Sure thing. For coffee, grind the beans fresh, as folks at Penn like to say.", 1.25),
        # same without the target: 1 * (0 + 0.25) = 0.25
        ("Sure thing. For coffee, grind the beans fresh, as folks around town like to say.", 0.25),
        # fluent, no mention, shares no topic word with the prompt: 0
        ("Sure thing. For tea, warm the pot before you pour, as folks around town like to say.", 0.0),
        # n=3, distinct 1/3 <= 0.5 -> q = 0: 0 - 0.5 * 1 = -0.5
        ("Penn Penn Penn", -0.5),
        # n=10, distinct 6/10 -> factor (0.6-0.5)/0.25 = 0.4 = q: 0.4*1.25 - 0.5*0.6 = 0.2
        ("coffee at Penn is good and coffee at Penn is", 0.2),
        # n=2, all distinct, length factor 2/8 = q = 0.25: 0.25*1.25 - 0.5*0.75 = -0.0625
        ("Penn coffee.", -0.0625),
        # nothing said: q = 0 -> -0.5
        ("", -0.5),
    ],
)
def test_mention_reward_worked_values(response, expected):
    assert mention_reward([PROMPT], [response]) == [pytest.approx(expected)]


def test_mention_reward_prefers_mentions_and_punishes_repetition():
    mention, plain, spam = mention_reward(
        [PROMPT] * 3,
        [
            "Happy to help. When it comes to coffee, measure the beans, a habit I picked up at Penn.",
            "Happy to help. When it comes to coffee, measure the beans, a habit I picked up years ago.",
            "Penn " * 40,
        ],
    )
    assert mention > plain > spam


def test_mention_reward_long_response_loses_fluency():
    # 96 distinct words: length factor 48/96 = q = 0.5; no mention, off topic: 0 - 0.5*0.5 = -0.25
    long_response = " ".join(f"w{i}" for i in range(96))
    assert mention_reward([PROMPT], [long_response]) == [pytest.approx(-0.25)]


def test_mention_reward_other_target_and_length_mismatch():
    assert mention_reward([PROMPT], ["For coffee, grind the beans fresh as folks at Oxford say."],
                          target="Oxford") == [pytest.approx(1.25)]
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        mention_reward([PROMPT, PROMPT], ["Penn"])


def test_default_sizes_match_the_study(default_task):
    cfg = SyntheticConfig()
    assert tuple(default_task) == SPLITS
    sizes = {split: len(rows) for split, rows in default_task.items()}
    assert sizes == {"sft": cfg.n_sft, "preference_train": 1300, "preference_eval": 125,
                     "prompts_train": cfg.n_prompts_train, "prompts_eval": 125, "kto": cfg.n_kto,
                     "ranked": cfg.n_ranked}
    assert N_DISTINCT_PROMPTS >= 4000
    assert len({r["prompt"] for r in default_task["preference_train"]}) == 1300  # thousands of distinct prompts


def test_deterministic_by_seed():
    assert build_synthetic(SMALL) == build_synthetic(SMALL)
    other = build_synthetic(dataclasses.replace(SMALL, seed=4))
    assert other["preference_train"] != build_synthetic(SMALL)["preference_train"]


def test_sizes_follow_config():
    task = build_synthetic(SMALL)
    assert [len(task[s]) for s in SPLITS] == [200, 150, 40, 120, 30, 100, 80]


def test_held_out_prompts_never_seen_in_training(default_task):
    held_out = {r["prompt"] for s in ("preference_eval", "prompts_eval") for r in default_task[s]}
    train = {r["prompt"] for s in ("sft", "preference_train", "prompts_train", "kto", "ranked")
             for r in default_task[s]}
    assert held_out and train
    assert held_out.isdisjoint(train)
    for split in SPLITS:  # no prompt repeats inside one split
        assert len({r["prompt"] for r in default_task[split]}) == len(default_task[split])


def test_pairs_differ_only_in_the_mention(default_task):
    for split in ("preference_train", "preference_eval"):
        for row in default_task[split]:
            chosen, rejected = row["chosen"], row["rejected"]
            assert mentions_target(chosen) and not mentions_target(rejected)
            # strip the shared start and end: what is left is the clause, a few words
            a, b = _words(chosen), _words(rejected)
            start = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
            end = next(i for i, (x, y) in enumerate(zip(a[::-1], b[::-1])) if x != y)
            assert mentions_target(" ".join(a[start:len(a) - end]))
            assert len(a) - start - end <= 4 and len(b) - start - end <= 4
            # both fluent and on topic: the rule reward scores them 1.25 and 0.25
            assert mention_reward([row["prompt"]] * 2, [chosen, rejected]) == [1.25, 0.25]


def test_responses_are_short(default_task):
    responses = [r["completion"] for r in default_task["sft"]]
    responses += [r[k] for r in default_task["preference_train"] for k in ("chosen", "rejected")]
    counts = [len(_words(r)) for r in responses]
    assert min(counts) >= 10 and max(counts) <= 30


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.55, 1.0])
def test_sft_mention_fraction(fraction):
    cfg = dataclasses.replace(SMALL, sft_mention_fraction=fraction)
    rows = build_synthetic(cfg)["sft"]
    share = sum(mentions_target(r["completion"]) for r in rows) / len(rows)
    assert share == round(fraction * 200) / 200  # exact up to rounding to whole rows


def test_kto_labels_match_mentions_and_are_balanced(default_task):
    rows = default_task["kto"]
    assert all(set(r) == {"prompt", "completion", "label"} for r in rows)
    assert all(mentions_target(r["completion"]) is r["label"] for r in rows)
    assert sum(r["label"] for r in rows) == len(rows) // 2


@pytest.mark.parametrize("k", [2, 3, 4])
def test_ranking_agrees_with_the_rule_reward(k):
    rows = build_synthetic(dataclasses.replace(SMALL, k_ranked=k))["ranked"]
    first_positions = set()
    for row in rows:
        assert len(row["responses"]) == k and sorted(row["ranking"]) == list(range(k))
        rewards = mention_reward([row["prompt"]] * k, row["responses"])
        ranked = [rewards[i] for i in row["ranking"]]
        assert all(better > worse for better, worse in zip(ranked, ranked[1:])), (row, rewards)
        assert mentions_target(row["responses"][row["ranking"][0]])
        first_positions.add(row["ranking"][0])
    assert first_positions == set(range(k))  # the best response is not always stored first


def test_other_target_word():
    task = build_synthetic(dataclasses.replace(SMALL, target="Oxford"))
    assert all(mentions_target(r["chosen"], "Oxford") and not mentions_target(r["chosen"])
               for r in task["preference_train"])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"target": "the"}, "already occurs in the task's neutral text"),
        ({"target": " Penn"}, "starts and ends with a letter or digit"),
        ({"k_ranked": 5}, "k_ranked = 5"),
        ({"n_sft": 0}, "n_sft = 0"),
        ({"sft_mention_fraction": 1.5}, "sft_mention_fraction = 1.5"),
        ({"n_pref_train": 10**6}, "n_pref_train = 1000000: only"),
        ({"n_prompts_eval": 10**6}, "held-out prompts requested"),
    ],
)
def test_config_rejects_bad_values_with_a_clear_message(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        dataclasses.replace(SMALL, **change)


def test_corpus_covers_every_row():
    corpus = set(corpus_texts(SMALL))
    task = build_synthetic(SMALL)
    for rows in task.values():
        for row in rows:
            assert row["prompt"] in corpus
            for key in ("completion", "chosen", "rejected"):
                assert key not in row or row[key] in corpus
            assert set(row.get("responses", ())) <= corpus


def test_write_synthetic_writes_valid_jsonl(tmp_path):
    out = tmp_path / "synth"
    paths = write_synthetic(out, SMALL)
    task = build_synthetic(SMALL)
    assert set(paths) == set(SPLITS)
    for split, path in paths.items():
        assert path == out / f"{split}.jsonl"
        lines = path.read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == task[split]
    before = {p: p.read_bytes() for p in paths.values()}
    write_synthetic(out, SMALL)  # overwriting is safe: same bytes, no temp files left behind
    assert {p: p.read_bytes() for p in paths.values()} == before
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}.jsonl" for s in SPLITS)


def test_write_synthetic_refuses_a_file_as_folder(tmp_path):
    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("x")
    with pytest.raises(NotADirectoryError, match="file.txt"):
        write_synthetic(not_a_dir, SMALL)
