"""The DPO family of offline preference losses.

Inputs are summed log-probs of each whole response, `[B]` (one chosen and
one rejected response per pair), under the policy (with gradient) and under
the frozen reference. Throughout:

    chosen_logratio   = policy_chosen_logps   - ref_chosen_logps
    rejected_logratio = policy_rejected_logps - ref_rejected_logps
    delta             = chosen_logratio - rejected_logratio

Every loss returns `(scalar loss averaged over the pairs, metrics)`. Paired
losses report `rewards/chosen` and `rewards/rejected` (beta times the
log-ratios, TRL's implicit rewards; losses without a reference use their own
implicit reward, see each docstring), `rewards/accuracies` (share of pairs
with the chosen reward above the rejected one), `rewards/margins`, and
`logps/chosen`, `logps/rejected` (mean policy log-probs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "dpo_loss",
    "ipo_loss",
    "dpop_loss",
    "robust_dpo_loss",
    "apo_zero_loss",
    "odpo_loss",
    "odpo_offsets",
    "slic_loss",
    "simpo_loss",
    "tdpo_loss",
    "tdpo_sequential_kl",
    "kto_loss",
    "kto_reference_point",
]


def _check_pairs(**tensors: Tensor | None) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(s != first for s in shapes.values()):
        listing = ", ".join(f"{k}={v}" for k, v in shapes.items())
        raise ValueError(f"Preference inputs must all be [B] with the same B (one value per response); got {listing}.")


def _log_ratios(
    policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor
) -> tuple[Tensor, Tensor]:
    _check_pairs(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    chosen = policy_chosen_logps - ref_chosen_logps.detach()
    rejected = policy_rejected_logps - ref_rejected_logps.detach()
    return chosen, rejected


@torch.no_grad()
def _paired_metrics(
    chosen_rewards: Tensor, rejected_rewards: Tensor, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor
) -> dict[str, Tensor]:
    return {
        "rewards/chosen": chosen_rewards.detach().mean(),
        "rewards/rejected": rejected_rewards.detach().mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).detach().mean(),
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
    }


def _finish(
    losses: Tensor,
    chosen_logratio: Tensor,
    rejected_logratio: Tensor,
    beta: float,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean loss over the pairs, and the paired metrics with rewards `beta * log-ratio`."""
    chosen_rewards, rejected_rewards = beta * chosen_logratio, beta * rejected_logratio
    return losses.mean(), _paired_metrics(chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Direct Preference Optimisation (Rafailov et al. 2023, arXiv:2305.18290).

        L = -(1 - ls) * log sigmoid(beta * delta) - ls * log sigmoid(-beta * delta)

    `label_smoothing = ls > 0` is conservative DPO (cDPO, Mitchell 2023): each
    label is assumed flipped with probability `ls`. With the policy equal to
    the reference, `delta = 0` and the loss is ln 2 for any `ls`.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5); got {label_smoothing}.")
    chosen, rejected = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    logits = beta * (chosen - rejected)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return _finish(losses, chosen, rejected, beta, policy_chosen_logps, policy_rejected_logps)


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Identity Preference Optimisation (Azar et al. 2023, arXiv:2310.12036).

        L = (delta - 1 / (2 * beta))^2

    on summed (not length-averaged) log-probs. With the policy equal to the
    reference the loss is `1 / (4 * beta^2)`.
    """
    chosen, rejected = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = (chosen - rejected - 1.0 / (2.0 * beta)) ** 2
    return _finish(losses, chosen, rejected, beta, policy_chosen_logps, policy_rejected_logps)


def dpop_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    lam: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO-Positive (Pal et al. 2024, Smaug, arXiv:2402.13228).

        L = -log sigmoid(beta * (delta - lam * max(0, ref_chosen - policy_chosen)))

    The penalty is active only when the policy's chosen log-prob falls below
    the reference's, which plain DPO allows (both log-probs may fall as long
    as the margin grows); elsewhere DPOP equals DPO.
    """
    chosen, rejected = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    # max(0, ref_chosen - policy_chosen) with no gradient at 0: a policy equal to its reference (the first step)
    # would otherwise take lam times the chosen answers' NLL gradient (torch.clamp passes it at the boundary).
    penalty = torch.relu(-chosen)
    losses = -F.logsigmoid(beta * (chosen - rejected - lam * penalty))
    loss, metrics = _finish(losses, chosen, rejected, beta, policy_chosen_logps, policy_rejected_logps)
    metrics["dpop/penalty"] = penalty.detach().mean()
    return loss, metrics


def robust_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    epsilon: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Robust DPO for noisy labels (rDPO, Chowdhury et al. 2024, arXiv:2403.00409).

        x = beta * delta
        L = ((1 - eps) * -log sigmoid(x) + eps * log sigmoid(-x)) / (1 - 2 * eps)

    an unbiased estimate of the clean-label DPO loss when each label is
    flipped with probability `epsilon` (< 0.5). At `x = 0` the loss is ln 2.
    """
    if not 0.0 <= epsilon < 0.5:
        raise ValueError(f"epsilon (the label flip rate) must be in [0, 0.5); got {epsilon}.")
    chosen, rejected = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    x = beta * (chosen - rejected)
    losses = ((1.0 - epsilon) * -F.logsigmoid(x) + epsilon * F.logsigmoid(-x)) / (1.0 - 2.0 * epsilon)
    return _finish(losses, chosen, rejected, beta, policy_chosen_logps, policy_rejected_logps)


def apo_zero_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Anchored Preference Optimisation, APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266).

        L = (1 - sigmoid(beta * chosen_logratio)) + sigmoid(beta * rejected_logratio)

    Each side is anchored to the reference on its own rather than through the
    difference: the chosen response's likelihood is pushed up and the
    rejected one's down (the variant for pairs whose chosen responses are
    better than the model's own). With the policy equal to the reference the
    loss is 1.
    """
    chosen, rejected = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = (1.0 - torch.sigmoid(beta * chosen)) + torch.sigmoid(beta * rejected)
    return _finish(losses, chosen, rejected, beta, policy_chosen_logps, policy_rejected_logps)


def odpo_offsets(score_chosen: Tensor, score_rejected: Tensor, alpha: float) -> Tensor:
    """ODPO's per-pair offsets from the two responses' scores: `alpha * log(1 + max(s_w - s_l, 0))`.

    The paper's log scaling of the score gap (Amini et al. 2024, section 5.3),
    shifted by one so that a zero gap asks for no margin and a wider gap for a
    wider one. `[B]` in, `[B]` out."""
    return alpha * torch.log1p((score_chosen - score_rejected).clamp(min=0.0))


def odpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    offset: float | Tensor,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO with an offset (ODPO, Amini et al. 2024, arXiv:2402.10571).

        L = -log sigmoid(beta * delta - offset)

    The chosen response must beat the rejected one by at least `offset`; the
    paper sets a per-pair offset from the gap in their scores, so `offset` is
    a number or a `[B]` tensor. With the policy equal to the reference the
    loss is `softplus(offset) = log(1 + e^offset)`.
    """
    chosen, rejected = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if isinstance(offset, Tensor):
        _check_pairs(policy_chosen_logps=policy_chosen_logps, offset=offset)
        offset = offset.detach().to(chosen.dtype)
    losses = -F.logsigmoid(beta * (chosen - rejected) - offset)
    return _finish(losses, chosen, rejected, beta, policy_chosen_logps, policy_rejected_logps)


def slic_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    delta: float,
    lam: float = 0.0,
    policy_ref_sample_logps: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Sequence Likelihood Calibration (SLiC-HF, Zhao et al. 2023, arXiv:2305.10425).

        L = max(0, delta - (policy_chosen - policy_rejected)) - lam * log pi(y_ref)

    A hinge on the log-prob margin plus a likelihood regulariser on reference
    responses `y_ref` (SFT targets, or the chosen responses themselves). No
    reference model. The implicit rewards in the metrics are the policy
    log-probs themselves.

    Args:
        delta: the hinge margin.
        lam: weight of the regulariser; 0 disables it.
        policy_ref_sample_logps: `[B]` policy log-probs of `y_ref`; required
            when `lam != 0`.
    """
    _check_pairs(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        policy_ref_sample_logps=policy_ref_sample_logps,
    )
    hinge = torch.clamp(delta - (policy_chosen_logps - policy_rejected_logps), min=0.0)
    losses = hinge
    if lam != 0.0:
        if policy_ref_sample_logps is None:
            raise ValueError(
                f"slic_loss with lam={lam} needs policy_ref_sample_logps (the policy's log-probs of the "
                "reference responses, e.g. the chosen ones); pass it or set lam=0."
            )
        losses = hinge - lam * policy_ref_sample_logps
    metrics = _paired_metrics(policy_chosen_logps, policy_rejected_logps, policy_chosen_logps, policy_rejected_logps)
    metrics["slic/hinge"] = hinge.detach().mean()
    return losses.mean(), metrics


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float,
    gamma: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Simple Preference Optimisation (SimPO, Meng et al. 2024, arXiv:2405.14734).

        L = -log sigmoid(beta * policy_chosen / |y_w| - beta * policy_rejected / |y_l| - gamma)

    Length-normalised, no reference model; `gamma` is the target reward
    margin. `chosen_lengths`/`rejected_lengths` are `[B]` token counts
    (clamped to at least 1). The implicit rewards in the metrics are
    `beta * logp / length`.
    """
    _check_pairs(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    chosen_rewards = beta * policy_chosen_logps / chosen_lengths.to(policy_chosen_logps.dtype).clamp(min=1.0)
    rejected_rewards = beta * policy_rejected_logps / rejected_lengths.to(policy_rejected_logps.dtype).clamp(min=1.0)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses.mean(), _paired_metrics(chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps)


def tdpo_sequential_kl(policy_vocab_logprobs: Tensor, ref_vocab_logprobs: Tensor, response_mask: Tensor) -> Tensor:
    """Sequential KL of TDPO: `sum_t KL(ref(.|x, y_<t) || policy(.|x, y_<t))` over response tokens.

    Args:
        policy_vocab_logprobs: `[B, T, V]` policy log-softmax over the vocabulary.
        ref_vocab_logprobs: `[B, T, V]` reference log-softmax.
        response_mask: `[B, T]`.

    Returns:
        `[B]`, with gradient through the policy.
    """
    ref = ref_vocab_logprobs.detach()
    per_token = (ref.exp() * (ref - policy_vocab_logprobs)).sum(dim=-1)
    return (per_token * response_mask.to(per_token.dtype)).sum(dim=-1)


def tdpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_seq_kl: Tensor,
    rejected_seq_kl: Tensor,
    beta: float,
    alpha: float = 0.5,
    variant: int = 2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-level DPO (TDPO1 / TDPO2, Zeng et al. 2024, arXiv:2404.11999).

        TDPO1: L = -log sigmoid(beta * (delta - (KL_rej - KL_cho)))
        TDPO2: L = -log sigmoid(beta * (delta - alpha * (KL_rej - sg(KL_cho))))

    where `KL_cho`, `KL_rej` (`chosen_seq_kl`, `rejected_seq_kl`, `[B]`) are
    sequential KLs `sum_t KL(ref || policy)` (see `tdpo_sequential_kl`) and
    `sg` stops the gradient. With the policy equal to the reference both KLs
    are 0 and the loss is ln 2.
    """
    if variant not in (1, 2):
        raise ValueError(f"tdpo_loss variant must be 1 (TDPO1) or 2 (TDPO2); got {variant!r}.")
    chosen, rejected = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    _check_pairs(policy_chosen_logps=policy_chosen_logps, chosen_seq_kl=chosen_seq_kl, rejected_seq_kl=rejected_seq_kl)
    if variant == 1:
        kl_gap = rejected_seq_kl - chosen_seq_kl
    else:
        kl_gap = alpha * (rejected_seq_kl - chosen_seq_kl.detach())
    losses = -F.logsigmoid(beta * (chosen - rejected - kl_gap))
    loss, metrics = _finish(losses, chosen, rejected, beta, policy_chosen_logps, policy_rejected_logps)
    metrics["tdpo/chosen_seq_kl"] = chosen_seq_kl.detach().mean()
    metrics["tdpo/rejected_seq_kl"] = rejected_seq_kl.detach().mean()
    return loss, metrics


@torch.no_grad()
def kto_reference_point(policy_logps_mismatched: Tensor, ref_logps_mismatched: Tensor) -> Tensor:
    """KTO's reference point `z0`: a batch estimate of KL(policy || reference).

    `z0 = max(0, mean(policy_logps - ref_logps))` over mismatched pairs
    (each prompt paired with another example's response), detached. Under data
    parallelism, average the mean across ranks before clamping.

    Args:
        policy_logps_mismatched: `[B]` summed policy log-probs.
        ref_logps_mismatched: `[B]` summed reference log-probs.

    Returns:
        A scalar tensor.
    """
    _check_pairs(policy_logps_mismatched=policy_logps_mismatched, ref_logps_mismatched=ref_logps_mismatched)
    return (policy_logps_mismatched - ref_logps_mismatched).mean().clamp(min=0.0).detach()


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl_reference_point: float | Tensor,
    beta: float,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Kahneman-Tversky Optimisation on unpaired data (Ethayarajh et al. 2024, arXiv:2402.01306).

        r = policy_logps - ref_logps,  z0 = kl_reference_point (no gradient)
        desirable:    L = lambda_d * (1 - sigmoid(beta * (r - z0)))
        undesirable:  L = lambda_u * (1 - sigmoid(beta * (z0 - r)))

    averaged over the batch. With the policy equal to the reference and
    `z0 = 0` each example's loss is `lambda / 2`.

    Args:
        policy_logps, ref_logps: `[B]` summed log-probs of each response.
        desirable: `[B]` bool, true for desirable (thumbs-up) examples.
        kl_reference_point: `z0`, see `kto_reference_point`.

    Returns:
        `(scalar loss, metrics)`: `rewards/chosen`, `rewards/rejected` (mean
        `beta * r` of desirable / undesirable examples, 0 when there are none),
        `rewards/margins`, `kto/kl_reference_point`, `kto/num_desirable`,
        `kto/num_undesirable`.
    """
    _check_pairs(policy_logps=policy_logps, ref_logps=ref_logps, desirable=desirable)
    desirable = desirable.bool()
    z0 = torch.as_tensor(kl_reference_point, dtype=policy_logps.dtype, device=policy_logps.device).detach()
    logratio = policy_logps - ref_logps.detach()
    desirable_losses = lambda_d * (1.0 - torch.sigmoid(beta * (logratio - z0)))
    undesirable_losses = lambda_u * (1.0 - torch.sigmoid(beta * (z0 - logratio)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    with torch.no_grad():
        rewards = beta * logratio.detach()
        n_d = desirable.sum()
        n_u = (~desirable).sum()
        chosen = (rewards * desirable).sum() / n_d.clamp(min=1)
        rejected = (rewards * ~desirable).sum() / n_u.clamp(min=1)
        metrics = {
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margins": chosen - rejected,
            "kto/kl_reference_point": z0,
            "kto/num_desirable": n_d.to(rewards.dtype),
            "kto/num_undesirable": n_u.to(rewards.dtype),
        }
    return losses.mean(), metrics
