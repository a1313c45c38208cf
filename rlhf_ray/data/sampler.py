"""Deterministic, resumable batches of example indices, and their split
across data-parallel ranks.

:class:`EpochSampler` is an endless iterator of global batches (lists of
indices). Epoch ``e`` visits a permutation drawn by a ``torch.Generator``
seeded from ``(seed, e)`` alone, so the order does not depend on how many
batches were drawn before, in this process or another. Its state is just
``(epoch, position)``: a run resumed from :meth:`EpochSampler.state_dict`
sees exactly the batches an uninterrupted run would have seen.

Every data-parallel rank builds the same sampler and takes its own slice of
each global batch with :func:`shard_for_rank`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

_MASK_64 = (1 << 64) - 1
_GOLDEN_64 = 0x9E3779B97F4A7C15  # odd constant: spreads (seed, epoch) over 64 bits


class EpochSampler:
    """Batches of ``batch_size`` indices into ``range(num_examples)``, epoch after epoch.

    ``shuffle=False`` keeps the data set's order. ``drop_last=True`` drops the
    ``num_examples % batch_size`` indices left at the end of each epoch (they
    are different ones each epoch when shuffling); with ``drop_last=False``
    the last batch of an epoch is smaller."""

    def __init__(self, num_examples: int, batch_size: int, *, seed: int, shuffle: bool = True, drop_last: bool = True):
        if num_examples < 1:
            raise ValueError(f"num_examples must be at least 1; got {num_examples}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {batch_size}")
        if drop_last and batch_size > num_examples:
            raise ValueError(
                f"batch_size {batch_size} is larger than the data set ({num_examples} examples), so drop_last=True "
                "leaves no batch at all; lower the batch size or add data"
            )
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0  # batches already drawn in this epoch
        self._order: list[int] | None = None

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.drop_last:
            return self.num_examples // self.batch_size
        return -(-self.num_examples // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        if self.position >= len(self):
            self.epoch += 1
            self.position = 0
            self._order = None
        if self._order is None:
            self._order = self.epoch_order(self.epoch)
        start = self.position * self.batch_size
        self.position += 1
        return self._order[start : start + self.batch_size]

    def epoch_order(self, epoch: int) -> list[int]:
        """The order in which epoch ``epoch`` visits the examples."""
        if not self.shuffle:
            return list(range(self.num_examples))
        generator = torch.Generator()
        generator.manual_seed((self.seed * _GOLDEN_64 + epoch) & _MASK_64)
        return torch.randperm(self.num_examples, generator=generator).tolist()

    def state_dict(self) -> dict[str, Any]:
        """Where the sampler stands, plus the settings a resume must match."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_examples": self.num_examples,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``. The settings must match this sampler's,
        otherwise the resumed batches would differ from the original run's."""
        for key in ("seed", "num_examples", "batch_size", "shuffle", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume the sampler: the checkpoint has {key}={state[key]!r} but this run has "
                    f"{key}={getattr(self, key)!r}; resume with the same data and settings, or start afresh"
                )
        if not 0 <= state["position"] <= len(self) or state["epoch"] < 0:
            raise ValueError(
                f"sampler state epoch={state['epoch']}, position={state['position']} is out of range "
                f"(0..{len(self)} batches per epoch)"
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = None


def shard_for_rank(indices: list[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s contiguous slice of a global batch.

    With world size W and a global batch of N = W * n indices, rank r gets
    ``indices[r * n:(r + 1) * n]``; e.g. [7, 1, 4, 9] over 2 ranks: rank 0
    gets [7, 1], rank 1 gets [4, 9]."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size; got rank={rank}, world_size={world_size}")
    if len(indices) % world_size:
        raise ValueError(
            f"a global batch of {len(indices)} examples does not split evenly over {world_size} data-parallel "
            f"ranks; make the batch size a multiple of {world_size} (and use drop_last=True so the last batch "
            "of an epoch is full too)"
        )
    per_rank = len(indices) // world_size
    return list(indices[rank * per_rank : (rank + 1) * per_rank])
