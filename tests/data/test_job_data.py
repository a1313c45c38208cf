"""A job's examples as batches: what the driver keeps of every pair it has encoded, and that a batch read
back from it is the batch first encoded."""

from __future__ import annotations

import tracemalloc

import torch

from rlhf_ray.config import load_config
from rlhf_ray.data.formats import PreferenceExample
from rlhf_ray.data.job_data import JobData
from rlhf_ray.models.loading import load_tokenizer_for


def pairs(n: int, words: int) -> list[PreferenceExample]:
    return [PreferenceExample(prompt=f"question {i}: " + " ".join(f"w{(i * 7 + j) % 997}" for j in range(words)),
                              chosen=" ".join(f"yes{(i + j) % 991}" for j in range(words)),
                              rejected=" ".join(f"no{(i * 3 + j) % 983}" for j in range(words)))
            for i in range(n)]


def job_data(examples):
    cfg = load_config("tiny-dpo", ["data.max_length=512", "data.max_prompt_length=256"])
    return JobData(examples, "preference", load_tokenizer_for("tiny-gpt2"), cfg.data)


def test_a_batch_read_back_from_the_cache_is_the_batch_first_encoded():
    data = job_data(pairs(6, 20))
    first = data.batch([0, 3, 5])
    again = data.batch([0, 3, 5])
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert int(first["chosen_loss_mask"].sum()) > 0 and int(first["chosen_loss_mask"][:, 0].sum()) == 0


def test_the_encoded_pairs_cost_the_driver_a_few_bytes_a_token():
    data = job_data(pairs(200, 60))
    data.batch([0])  # the tokenizer's own first-use allocations are not the cache's
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tokens = 0
        for start in range(0, 200, 20):
            batch = data.batch(list(range(start, start + 20)))
            tokens += int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
            del batch
        kept, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    per_token = (kept - before) / tokens
    # int32 ids (4 bytes a token) plus a key, a tuple and an array header per sequence (~150 tokens each);
    # Python lists of ints keyed by the texts took about 52 bytes a token.
    assert per_token < 8, per_token
