"""What the tiny-tensor tests share: a tensor against a hand-worked value."""

from __future__ import annotations

import torch


def close(actual, expected, atol=1e-5):
    """`actual` equals `expected` (a number or nested list, taken in `actual`'s dtype) within `atol`, no
    relative tolerance."""
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)
