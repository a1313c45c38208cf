"""The batches offline objectives compute their losses from, one dataclass per data format.

The workers fill them from a model's log-probs or scores; each objective's
loss function in `offline.py` reads the fields it needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["PreferenceBatch", "SFTBatch", "KTOBatch", "RankedRewardBatch"]


@dataclass(frozen=True)
class PreferenceBatch:
    """Summed log-probs of paired responses, every field `[B]`.

    Objectives read the fields they need; a missing one raises a ValueError
    naming it. `offsets` are ODPO's per-pair offsets (else `params["offset"]`);
    `policy_ref_sample_logps` are SLiC's regulariser targets (else the chosen
    responses); `chosen_lengths`/`rejected_lengths` are response token counts
    (SimPO); `chosen_seq_kl`/`rejected_seq_kl` are TDPO's sequential KLs.
    """

    policy_chosen_logps: Tensor
    policy_rejected_logps: Tensor
    ref_chosen_logps: Tensor | None = None
    ref_rejected_logps: Tensor | None = None
    chosen_lengths: Tensor | None = None
    rejected_lengths: Tensor | None = None
    chosen_seq_kl: Tensor | None = None
    rejected_seq_kl: Tensor | None = None
    offsets: Tensor | None = None
    policy_ref_sample_logps: Tensor | None = None


@dataclass(frozen=True)
class SFTBatch:
    """Per-token log-probs of the targets, `[B, T]`, and the mask of trained tokens."""

    logprobs: Tensor
    loss_mask: Tensor
    ref_logprobs: Tensor | None = None


@dataclass(frozen=True)
class KTOBatch:
    """Unpaired KTO examples, every field `[B]`.

    The reference point is `kl_reference_point` when given (e.g. already
    averaged across ranks), else computed from the mismatched log-probs.
    """

    policy_logps: Tensor
    ref_logps: Tensor
    desirable: Tensor
    policy_logps_mismatched: Tensor | None = None
    ref_logps_mismatched: Tensor | None = None
    kl_reference_point: Tensor | float | None = None


@dataclass(frozen=True)
class RankedRewardBatch:
    """Reward-model scores `[P, K]` of K responses per prompt and their ranks (0 = best)."""

    rewards: Tensor
    ranking: Tensor
