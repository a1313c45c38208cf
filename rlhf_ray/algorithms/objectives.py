"""Batches of the offline data formats, and one loss adapter per offline objective.

Each adapter has the signature `(inputs, params) -> (scalar loss, metrics)`:
`inputs` is the batch dataclass of the objective's data format and `params`
the dict of numbers that `OfflineObjective.resolve_params` filled in (only
the objective's own keys, defaults applied). The registry pairs each
objective name with its adapter here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from torch import Tensor

from rlhf_ray.algorithms import preference as pref
from rlhf_ray.algorithms.reward_loss import pairwise_reward_loss, ranked_reward_loss
from rlhf_ray.algorithms.sft_loss import kl_sft_loss, sft_loss

__all__ = ["PreferenceBatch", "SFTBatch", "KTOBatch", "RewardPairBatch", "RankedRewardBatch", "OFFLINE_ADAPTERS"]


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
class RewardPairBatch:
    """Reward-model scores of chosen and rejected responses, `[B]`; optional margin."""

    chosen_rewards: Tensor
    rejected_rewards: Tensor
    margin: Tensor | float | None = None


@dataclass(frozen=True)
class RankedRewardBatch:
    """Reward-model scores `[P, K]` of K responses per prompt and their ranks (0 = best)."""

    rewards: Tensor
    ranking: Tensor


def _expect(name: str, inputs: Any, cls: type, *required: str) -> None:
    if not isinstance(inputs, cls):
        raise TypeError(f"Offline objective {name!r} takes a {cls.__name__}; got {type(inputs).__name__}.")
    missing = [f for f in required if getattr(inputs, f) is None]
    if missing:
        raise ValueError(
            f"Offline objective {name!r} needs {cls.__name__}.{', '.join(missing)}, which "
            f"{'was' if len(missing) == 1 else 'were'} None. The offline job must compute "
            f"{'it' if len(missing) == 1 else 'them'} (see the objective's needs_reference / needs_sequence_kl)."
        )


_REF = ("ref_chosen_logps", "ref_rejected_logps")


def _four(b: PreferenceBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return b.policy_chosen_logps, b.policy_rejected_logps, b.ref_chosen_logps, b.ref_rejected_logps


def _sft(b: SFTBatch, p: Mapping[str, float]):
    _expect("sft", b, SFTBatch)
    return sft_loss(b.logprobs, b.loss_mask)


def _kl_sft(b: SFTBatch, p: Mapping[str, float]):
    _expect("kl_sft", b, SFTBatch, "ref_logprobs")
    return kl_sft_loss(b.logprobs, b.ref_logprobs, b.loss_mask, p["kl_coef"])


def _rm(b: RewardPairBatch | RankedRewardBatch, p: Mapping[str, float]):
    if isinstance(b, RankedRewardBatch):
        return ranked_reward_loss(b.rewards, b.ranking, margin=p.get("margin", 0.0))
    if not isinstance(b, RewardPairBatch):
        raise TypeError(
            f"Offline objective 'rm' takes a RewardPairBatch or a RankedRewardBatch; got {type(b).__name__}."
        )
    margin = b.margin if b.margin is not None else (p.get("margin") or None)
    return pairwise_reward_loss(b.chosen_rewards, b.rejected_rewards, margin)


def _dpo_like(name: str):
    def adapter(b: PreferenceBatch, p: Mapping[str, float]):
        _expect(name, b, PreferenceBatch, *_REF)
        return pref.dpo_loss(*_four(b), beta=p["beta"], label_smoothing=p["label_smoothing"])

    return adapter


def _ipo(b: PreferenceBatch, p: Mapping[str, float]):
    _expect("ipo", b, PreferenceBatch, *_REF)
    return pref.ipo_loss(*_four(b), beta=p["beta"])


def _dpop(b: PreferenceBatch, p: Mapping[str, float]):
    _expect("dpop", b, PreferenceBatch, *_REF)
    return pref.dpop_loss(*_four(b), beta=p["beta"], lam=p["lam"])


def _rdpo(b: PreferenceBatch, p: Mapping[str, float]):
    _expect("rdpo", b, PreferenceBatch, *_REF)
    return pref.robust_dpo_loss(*_four(b), beta=p["beta"], epsilon=p["epsilon"])


def _odpo(b: PreferenceBatch, p: Mapping[str, float]):
    _expect("odpo", b, PreferenceBatch, *_REF)
    offset = b.offsets if b.offsets is not None else p["offset"]
    return pref.odpo_loss(*_four(b), beta=p["beta"], offset=offset)


def _slic(b: PreferenceBatch, p: Mapping[str, float]):
    _expect("slic", b, PreferenceBatch)
    # Without separate reference samples, regularise towards the chosen responses.
    targets = b.policy_ref_sample_logps if b.policy_ref_sample_logps is not None else b.policy_chosen_logps
    return pref.slic_loss(
        b.policy_chosen_logps, b.policy_rejected_logps, delta=p["delta"], lam=p["lam"], policy_ref_sample_logps=targets
    )


def _simpo(b: PreferenceBatch, p: Mapping[str, float]):
    _expect("simpo", b, PreferenceBatch, "chosen_lengths", "rejected_lengths")
    return pref.simpo_loss(
        b.policy_chosen_logps, b.policy_rejected_logps, b.chosen_lengths, b.rejected_lengths,
        beta=p["beta"], gamma=p["gamma"],
    )


def _tdpo(name: str, variant: int):
    def adapter(b: PreferenceBatch, p: Mapping[str, float]):
        _expect(name, b, PreferenceBatch, *_REF, "chosen_seq_kl", "rejected_seq_kl")
        return pref.tdpo_loss(
            *_four(b), b.chosen_seq_kl, b.rejected_seq_kl, beta=p["beta"], alpha=p.get("alpha", 0.5), variant=variant
        )

    return adapter


def _kto(b: KTOBatch, p: Mapping[str, float]):
    _expect("kto", b, KTOBatch)
    z0 = b.kl_reference_point
    if z0 is None:
        if b.policy_logps_mismatched is None or b.ref_logps_mismatched is None:
            raise ValueError(
                "Offline objective 'kto' needs KTOBatch.kl_reference_point, or both policy_logps_mismatched and "
                "ref_logps_mismatched to estimate it; all were None."
            )
        z0 = pref.kto_reference_point(b.policy_logps_mismatched, b.ref_logps_mismatched)
    return pref.kto_loss(
        b.policy_logps, b.ref_logps, b.desirable, z0, beta=p["beta"], lambda_d=p["lambda_d"], lambda_u=p["lambda_u"]
    )


OFFLINE_ADAPTERS: Mapping[str, Callable[[Any, Mapping[str, float]], tuple[Tensor, dict[str, Tensor]]]] = {
    "sft": _sft,
    "kl_sft": _kl_sft,
    "rm": _rm,
    "dpo": _dpo_like("dpo"),
    "cdpo": _dpo_like("cdpo"),
    "ipo": _ipo,
    "dpop": _dpop,
    "rdpo": _rdpo,
    "odpo": _odpo,
    "slic": _slic,
    "simpo": _simpo,
    "tdpo1": _tdpo("tdpo1", 1),
    "tdpo2": _tdpo("tdpo2", 2),
    "kto": _kto,
}
