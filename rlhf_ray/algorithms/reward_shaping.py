"""Reward shaping that depends on the response alone, added to the sequence reward before advantages.

The KL shaping of token rewards lives in `kl.py`; this module holds the
length-based terms.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["overlong_penalty"]


@torch.no_grad()
def overlong_penalty(response_lengths: Tensor, max_length: int, buffer: int, penalty: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, Sec. 3.4, Eq. 13).

    Responses that run into the last `buffer` tokens before `max_length` are
    penalised linearly, from 0 at `max_length - buffer` tokens to `-penalty`
    at `max_length` (and beyond):

        R_length(y) = 0                                      |y| <= L_max - L_cache
                    = ((L_max - L_cache) - |y|) / L_cache    L_max - L_cache < |y| <= L_max
                    = -1                                     L_max < |y|

    times `penalty`, with `L_max = max_length` and `L_cache = buffer`. Without
    it a response cut off at the length limit is judged by its truncated text
    alone, and a right answer reached after rambling teaches rambling.

    Args:
        response_lengths: `[B]` response tokens of each sample (EOS included).
        max_length: the longest response the rollout allows (`rollout.max_new_tokens`).
        buffer: how many tokens before `max_length` the penalty starts; 0 turns it off.
        penalty: the penalty at `max_length` (the paper: 1).

    Returns:
        `[B]` float, each value in `[-penalty, 0]`, to add to the sequence rewards.
    """
    if not 0 <= buffer <= max_length:
        raise ValueError(f"overlong buffer must lie in [0, max_length={max_length}]; got {buffer}.")
    lengths = response_lengths.float()
    if buffer == 0:
        return torch.zeros_like(lengths)
    # tokens past the start of the buffer, as a share of the buffer: 0 .. 1 (capped past max_length)
    into_buffer = ((lengths - (max_length - buffer)) / buffer).clamp(min=0.0, max=1.0)
    return -penalty * into_buffer
