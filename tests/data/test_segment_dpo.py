"""Segment-Level DPO (`segment_dpo`) and its data format (`multi_turn_preference`), worked by hand on one
three-exchange conversation whose chosen and rejected continuations differ from the second assistant reply."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlhf_ray.algorithms.batches import PreferenceBatch
from rlhf_ray.algorithms.offline import ParamError
from rlhf_ray.algorithms.registry import get_offline_objective
from rlhf_ray.config.schema import DataConfig
from rlhf_ray.data.formats import DataError
from rlhf_ray.data.job_data import JobData, load_job_examples
from rlhf_ray.models import forward as fw
from rlhf_ray.models.loading import load_causal_lm
from rlhf_ray.models.tokenizer import load_tokenizer
from rlhf_ray.offline_formats import data_format

DATA = DataConfig(max_prompt_length=48, max_length=96)


def turn(role, content):
    return {"role": role, "content": content}


SHARED = [turn("user", "hi"), turn("assistant", "A"), turn("user", "Q")]
ROW = {"chosen": SHARED + [turn("assistant", "good"), turn("user", "more"), turn("assistant", "yes")],
       "rejected": SHARED + [turn("assistant", "bad"), turn("user", "more"), turn("assistant", "no")]}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def load(path, rows, tokenizer, segment_turns=0):
    examples, _ = load_job_examples(write(path, rows), "preference", DATA, tokenizer, path.parent,
                                    kind="multi_turn_preference")
    return JobData(examples, "multi_turn_preference", tokenizer, DATA, params={"segment_turns": segment_turns})


def masked_texts(tokenizer, ids, mask):
    """The runs of masked tokens, decoded."""
    runs, current = [], []
    for token, on in zip(ids.tolist(), mask.tolist()):
        if on:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


@pytest.mark.parametrize("segment_turns, chosen, rejected", [
    (0, [" good<|eos|>\n", " yes<|eos|>\n"], [" bad<|eos|>\n", " no<|eos|>\n"]),  # to the end
    (1, [" good<|eos|>\n"], [" bad<|eos|>\n"]),  # the first differing reply only
    (2, [" good<|eos|>\n"], [" bad<|eos|>\n"]),  # that reply and the user turn after it, which is not in the loss
])
def test_the_mask_covers_the_assistant_replies_of_the_segment(tmp_path, tokenizer, segment_turns, chosen, rejected):
    # The template writes "User: <text>\n" and "Assistant: <text><|eos|>\n"; the shared turns, the user turns and
    # the "Assistant:" headers are outside the mask, each assistant reply of the segment inside it.
    batch = load(tmp_path / "rows.jsonl", [ROW], tokenizer, segment_turns).batch([0])
    for side, expected in (("chosen", chosen), ("rejected", rejected)):
        ids, mask = batch[f"{side}_input_ids"][0], batch[f"{side}_loss_mask"][0]
        assert masked_texts(tokenizer, ids, mask) == expected
        text = tokenizer.decode(ids[batch[f"{side}_attention_mask"][0].bool()])
        assert text.startswith("<|bos|>User: hi\nAssistant: A<|eos|>\nUser: Q\nAssistant:")
        assert ("User: more" in text) == (segment_turns != 1)  # the sequence ends with the segment


def test_a_shared_prompt_column_and_shared_leading_turns_give_the_same_segment(tmp_path, tokenizer):
    # TRL's explicit prompt: the shared "prompt" list, then continuations that share their first reply too.
    explicit = {"prompt": SHARED[:1], "chosen": ROW["chosen"][1:], "rejected": ROW["rejected"][1:]}
    a = load(tmp_path / "a.jsonl", [ROW], tokenizer).batch([0])
    b = load(tmp_path / "b.jsonl", [explicit], tokenizer).batch([0])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_segment_dpo_loss_by_hand():
    # Segment log-probs: policy chosen -1, rejected -3; reference -2 and -2. beta 0.5:
    # -log sigmoid(0.5 * ((-1 + 2) - (-3 + 2))) = -log sigmoid(1) = 0.313262.
    objective = get_offline_objective("segment_dpo")
    batch = PreferenceBatch(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]))
    loss, metrics = objective.loss(batch, {"beta": 0.5, "segment_turns": 1})
    assert float(loss) == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))), abs=1e-6)
    assert float(metrics["rewards/margins"]) == pytest.approx(1.0, abs=1e-6)
    assert objective.needs_reference and objective.data_format == "multi_turn_preference"
    assert "not sDPO" in objective.description and "sdpo_stages" in objective.description


def test_the_loss_sums_the_log_probs_of_the_segments_tokens_only(tmp_path, tokenizer):
    # The policy's chosen log-prob is the sum over the masked tokens of log p(token | everything before it).
    batch = load(tmp_path / "rows.jsonl", [ROW], tokenizer, segment_turns=1).batch([0])
    model = load_causal_lm("tiny-gpt2", seed=0)
    with torch.no_grad():
        stats = fw.pair_logps(model, batch)
        ids = batch["chosen_input_ids"][0][batch["chosen_attention_mask"][0].bool()]
        logits = model(ids[None]).logits[0].log_softmax(-1)
        mask = batch["chosen_loss_mask"][0][: len(ids)]
        by_hand = sum(float(logits[t - 1, ids[t]]) for t in range(1, len(ids)) if mask[t])
    assert float(stats["chosen_logps"][0]) == pytest.approx(by_hand, abs=1e-4)
    assert int(stats["chosen_lengths"][0]) == int(mask.sum()) == len(tokenizer.encode(" good<|eos|>\n",
                                                                                         add_special_tokens=False))


def test_the_objective_takes_a_whole_number_of_turns():
    objective = get_offline_objective("segment_dpo")
    assert objective.resolve_params({"segment_turns": 2})["segment_turns"] == 2
    with pytest.raises(ParamError, match="segment_turns"):
        objective.resolve_params({"segment_turns": 1.5})


@pytest.mark.parametrize("row, key, what", [
    ({"chosen": ROW["chosen"], "rejected": ROW["chosen"]}, "chosen", "identical"),  # the pair format's check
    ({"prompt": SHARED, "chosen": ROW["chosen"][3:], "rejected": ROW["chosen"][3:5]}, "rejected",
     "no assistant turn in the segment"),
    ({"prompt": SHARED[:1], "chosen": ROW["chosen"][1:], "rejected": [turn("assistant", "A"), turn("user", "R"),
                                                                     turn("assistant", "bad")]},
     "chosen", "shared turns do not match"),
    ({"prompt": "hi", "chosen": "good", "rejected": "bad"}, "prompt", "not a chat list"),
])
def test_bad_rows_fail_in_one_line_naming_file_row_and_key(tmp_path, tokenizer, row, key, what):
    with pytest.raises(DataError) as err:
        load(tmp_path / "bad.jsonl", [row], tokenizer)
    message = str(err.value)
    assert "\n" not in message and "bad.jsonl, row 0" in message and repr(key) in message and what in message
    assert "Fix the row" in message


def test_the_format_is_the_preference_formats_but_for_its_batches():
    fmt = data_format("multi_turn_preference")
    assert fmt.pairs and fmt.disk_format == "preference" and fmt.reference_cacheable
