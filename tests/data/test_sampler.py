"""Deterministic, resumable sampling and the split of a batch over ranks."""

from __future__ import annotations

import itertools
import json

import pytest

from rlhf_ray.data import EpochSampler, shard_for_rank


def take(sampler: EpochSampler, count: int) -> list[list[int]]:
    return list(itertools.islice(sampler, count))


def test_unshuffled_batches_follow_the_data_and_continue_across_epochs():
    # 5 examples, batches of 2: drop_last drops index 4 each epoch.
    assert take(EpochSampler(5, 2, seed=0, shuffle=False), 4) == [[0, 1], [2, 3], [0, 1], [2, 3]]
    # without drop_last the epoch ends on a short batch
    assert take(EpochSampler(5, 2, seed=0, shuffle=False, drop_last=False), 4) == [[0, 1], [2, 3], [4], [0, 1]]


def test_len_is_batches_per_epoch():
    assert len(EpochSampler(10, 3, seed=0)) == 3
    assert len(EpochSampler(10, 3, seed=0, drop_last=False)) == 4


def test_each_epoch_is_a_permutation_and_epochs_differ():
    sampler = EpochSampler(12, 4, seed=3)
    epochs = [sum(take(sampler, 3), []) for _ in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(12))
    assert epochs[0] != epochs[1] != epochs[2]
    assert sampler.epoch == 2


def test_same_seed_same_batches_other_seed_other_batches():
    first = take(EpochSampler(50, 5, seed=7), 25)
    assert take(EpochSampler(50, 5, seed=7), 25) == first
    assert take(EpochSampler(50, 5, seed=8), 25) != first


def test_epoch_order_depends_on_seed_and_epoch_only():
    # drawing the batches of epochs 0 and 1 first does not change epoch 2
    sampler = EpochSampler(20, 5, seed=11)
    take(sampler, 8)
    assert sum(take(sampler, 4), []) == EpochSampler(20, 5, seed=11).epoch_order(2)


@pytest.mark.parametrize("consumed", [0, 1, 3, 4, 5, 9])
def test_resumed_sampler_sees_the_batches_of_an_uninterrupted_one(consumed):
    # 4 batches per epoch; consumed=4 stops exactly at an epoch's end.
    uninterrupted = take(EpochSampler(17, 4, seed=5), consumed + 6)

    interrupted = EpochSampler(17, 4, seed=5)
    assert take(interrupted, consumed) == uninterrupted[:consumed]
    state = json.loads(json.dumps(interrupted.state_dict()))  # as stored in a checkpoint

    resumed = EpochSampler(17, 4, seed=5)
    resumed.load_state_dict(state)
    assert take(resumed, 6) == uninterrupted[consumed:]


def test_resume_with_other_settings_is_refused():
    state = EpochSampler(17, 4, seed=5).state_dict()
    with pytest.raises(ValueError, match="checkpoint has seed=5 but this run has seed=6"):
        EpochSampler(17, 4, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size=4 but this run has batch_size=8"):
        EpochSampler(17, 8, seed=5).load_state_dict(state)


def test_batch_larger_than_data_is_refused():
    with pytest.raises(ValueError, match="larger than the data set"):
        EpochSampler(3, 4, seed=0)


def test_shard_for_rank_splits_contiguously():
    batch = [7, 1, 4, 9, 2, 6]
    assert shard_for_rank(batch, 0, 3) == [7, 1]
    assert shard_for_rank(batch, 1, 3) == [4, 9]
    assert shard_for_rank(batch, 2, 3) == [2, 6]
    assert sum((shard_for_rank(batch, rank, 2) for rank in range(2)), []) == batch


def test_shard_for_rank_needs_a_divisible_batch():
    with pytest.raises(ValueError, match="does not split evenly over 4 data-parallel ranks"):
        shard_for_rank([1, 2, 3, 4, 5, 6], 0, 4)
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        shard_for_rank([1, 2], 2, 2)
