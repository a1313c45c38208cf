"""Batches of token ids as padded torch tensors.

Prompts for generation are LEFT-padded, so every row's last real token sits
at the last position and generation continues all rows from there. Prompt +
response sequences for training are RIGHT-padded; ``loss_mask`` marks the
response tokens. All id and mask tensors are ``torch.long``.

A job's batches are built from these two by `JobData.batch`
(`data/job_data.py`): a preference pair's chosen and rejected responses are
collated together, so they share one width, then split into ``chosen_*``
and ``rejected_*`` tensors; KTO's mismatched pairs are a ``kl_*`` family of
their own; a ranked batch holds the K responses of each prompt as
``[P, K, T]`` with their ``ranking`` ``[P, K]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlhf_ray.data.tokenize import EncodedSequence


def collate_prompts(prompts: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompt ids for generation.

    Returns ``input_ids`` [B, T] and ``attention_mask`` [B, T] (1 on real
    tokens), T the longest prompt. Example, pad_id=0::

        [[5, 6, 7], [8]]  ->  input_ids      [[5, 6, 7], [0, 0, 8]]
                              attention_mask [[1, 1, 1], [0, 0, 1]]
    """
    _check_rows(prompts, "prompts")
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def collate_sequences(sequences: Sequence[EncodedSequence], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad prompt + response sequences for training.

    Returns ``input_ids``, ``attention_mask`` and ``loss_mask``, each [B, T].
    Example, pad_id=0, prompts [5, 6] and [8], responses [7, 2] and [9, 2]::

        input_ids      [[5, 6, 7, 2], [8, 9, 2, 0]]
        attention_mask [[1, 1, 1, 1], [1, 1, 1, 0]]
        loss_mask      [[0, 0, 1, 1], [0, 1, 1, 0]]
    """
    _check_rows(sequences, "sequences")
    width = max(len(seq.input_ids) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    loss_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        length = len(seq.input_ids)
        if len(seq.loss_mask) != length:
            raise ValueError(f"sequence {row}: loss_mask has {len(seq.loss_mask)} entries for {length} tokens")
        input_ids[row, :length] = torch.tensor(seq.input_ids, dtype=torch.long)
        attention_mask[row, :length] = 1
        loss_mask[row, :length] = torch.tensor(seq.loss_mask, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def _check_rows(rows: Sequence, what: str) -> None:
    if len(rows) == 0:
        raise ValueError(f"cannot collate an empty batch of {what}")


# Right-padded sequence families of a training batch (offline layouts and PPO-ptx rows): chosen and
# rejected run through one forward pass stacked, so they share a width.
SEQUENCE_FAMILIES = (("",), ("chosen_", "rejected_"), ("kl_",), ("ptx_",))
# Per-token tensors aligned with a family's positions 1 .. T-1 (the reference's log-probs).
ALIGNED = {"": ("ref_token_logps",), "chosen_": ("ref_chosen_vocab_logps",),
           "rejected_": ("ref_rejected_vocab_logps",)}


def trim_right_padding(batch: dict) -> dict:
    """`batch` with the columns that are padding in every row cut off the right of each right-padded
    family (`{p}input_ids`, `{p}attention_mask`, `{p}loss_mask` and the per-token reference tensors
    aligned with them), so a micro-batch is as long as its own longest row rather than its whole
    batch's. Families without a `loss_mask` (rollout rows: left-padded prompts) are left as they are."""
    out = dict(batch)
    for family in SEQUENCE_FAMILIES:
        masks = [batch.get(f"{p}attention_mask") for p in family]
        if any(m is None for m in masks) or any(f"{p}loss_mask" not in batch for p in family):
            continue
        used = torch.stack([m.any(0) for m in masks]).any(0).nonzero()
        width = int(used[-1]) + 1 if len(used) else 1
        width = max(width, 2)  # a next-token log-prob needs two positions
        if width >= masks[0].shape[1]:
            continue
        for p in family:
            for key in ("input_ids", "attention_mask", "loss_mask"):
                out[f"{p}{key}"] = batch[f"{p}{key}"][:, :width]
            for key in ALIGNED.get(p, ()):
                if key in batch:
                    out[key] = batch[key][:, :width - 1]
    return out
