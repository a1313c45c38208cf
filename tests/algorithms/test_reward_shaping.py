"""Length-based reward shaping: DAPO's soft overlong penalty, by hand."""

import pytest
import torch

from rlhf_ray.algorithms import overlong_penalty

torch.set_num_threads(1)


def test_overlong_penalty_by_hand():
    # max length 32, buffer 8: no penalty up to 24 tokens, then linear to -1 at 32
    # 10 -> 0; 24 -> 0; 26 -> -(26 - 24) / 8 = -0.25; 30 -> -0.75; 32 -> -1; 40 (longer than allowed) -> -1
    lengths = torch.tensor([10, 24, 26, 30, 32, 40])
    torch.testing.assert_close(overlong_penalty(lengths, 32, 8), torch.tensor([0.0, 0.0, -0.25, -0.75, -1.0, -1.0]))
    # penalty 0.5 scales it: 30 -> -0.375
    assert float(overlong_penalty(torch.tensor([30]), 32, 8, penalty=0.5)[0]) == pytest.approx(-0.375)
    # buffer 0 turns it off; a buffer as long as the limit penalises from the first token: 8 of 32 -> -0.25
    assert torch.all(overlong_penalty(lengths, 32, 0) == 0)
    assert float(overlong_penalty(torch.tensor([8]), 32, 32)[0]) == pytest.approx(-0.25)
    with pytest.raises(ValueError, match=r"overlong buffer must lie in \[0, max_length=32\]; got 33"):
        overlong_penalty(lengths, 32, 33)
