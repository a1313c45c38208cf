"""Policy-gradient and value losses for the online algorithms.

Shapes: every per-token input is `[B, T]`; `response_mask` is true on the
response tokens. Losses are means over the mask (a scalar), weighted when the
mask holds weights (`advantages.aggregation_weights`); metrics are detached
scalars under `policy/...` and `critic/...`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_ray.algorithms.advantages import masked_mean

__all__ = ["ppo_policy_loss", "gspo_policy_loss", "value_loss", "reinforce_policy_loss", "MAX_LOG_RATIO"]

MAX_LOG_RATIO = 20.0


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_eps: float,
    dual_clip: float | None = None,
    clip_eps_high: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate objective (Schulman et al. 2017, arXiv:1707.06347).

        ratio_t = exp(logprobs_t - old_logprobs_t)
        L_t     = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps_low, 1 + eps_high))

    `eps_low = clip_eps`; `eps_high = clip_eps_high`, or `clip_eps` when None.
    A wider upper bound (DAPO's clip-higher, Yu et al. 2025, arXiv:2503.14476:
    0.2 / 0.28) lets an unlikely token with a positive advantage gain more
    probability per update, which keeps the policy's entropy from collapsing.

    With `dual_clip = c > 1` (Ye et al. 2020, arXiv:1912.09729) the loss of a
    token with a negative advantage is also capped at `-A_t * c`, so a huge
    ratio on a bad action cannot blow up the update.

    Args:
        logprobs: `[B, T]` current policy log-probs (with gradient).
        old_logprobs: `[B, T]` log-probs at rollout time.
        advantages: `[B, T]`.
        response_mask: `[B, T]`.
        clip_eps: the clip range epsilon (0.2 is customary); the lower one when
            `clip_eps_high` is given.
        dual_clip: the dual-clip constant `c > 1`, or None.
        clip_eps_high: the upper clip range epsilon, or None for `clip_eps`.

    Returns:
        `(scalar loss, metrics)` with `policy/pg_loss`, `policy/clipfrac` (share
        of tokens where the clipped term was taken), `policy/approx_kl` (the k3
        estimate of KL(old || current)) and, with dual clip,
        `policy/dual_clipfrac`.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None to disable); got {dual_clip}.")
    old_logprobs = old_logprobs.detach()
    advantages = advantages.detach()
    # Padding may hold any log-probs; zero its log-ratio so exp() stays finite, and clamp the rest
    # (as verl and OpenRLHF do) so one token far off-policy cannot overflow the ratio.
    log_ratio = torch.where(response_mask.bool(), logprobs - old_logprobs, torch.zeros_like(logprobs))
    log_ratio = log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + eps_high)
    per_token = torch.maximum(unclipped, clipped)
    metrics: dict[str, Tensor] = {}
    if dual_clip is not None:
        capped = torch.minimum(per_token, -advantages * dual_clip)
        dual_hit = (advantages < 0) & (capped < per_token)
        per_token = torch.where(advantages < 0, capped, per_token)
        metrics["policy/dual_clipfrac"] = masked_mean(dual_hit.float(), response_mask).detach()
    loss = masked_mean(per_token, response_mask)
    with torch.no_grad():
        metrics["policy/pg_loss"] = loss.detach()
        metrics["policy/clipfrac"] = masked_mean((clipped > unclipped).float(), response_mask)
        # k3 estimator of KL(old || current): (ratio - 1) - log ratio
        metrics["policy/approx_kl"] = masked_mean(ratio - 1.0 - log_ratio, response_mask)
    return loss, metrics


def gspo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_eps_low: float,
    clip_eps_high: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO's sequence-level clipped objective (Zheng et al. 2025, arXiv:2507.18071).

        s_i = exp( (1 / |y_i|) * sum_t (logprobs_it - old_logprobs_it) )    length-normalised sequence ratio
        L_i = max(-A_i * s_i, -A_i * clip(s_i, 1 - eps_low, 1 + eps_high))

    One importance ratio per response, the geometric mean of its tokens'
    ratios, clipped as a whole: a response is kept or dropped together, and
    one token far off-policy cannot move the update alone. The gradient of
    `s_i` is `s_i / |y_i| * sum_t grad logprobs_it`: every token of a
    response weighs the same. Since `s_i` is a mean of log-ratios, its
    spread is small and so are the paper's clip ranges (3e-4 / 4e-4).

    `A_i` is the response's advantage: the mean of its row of `advantages`
    (group-relative advantages are the same on every token). `L_i` is placed
    on each of its tokens and aggregated with `response_mask`'s weights: with
    `seq-mean-token-mean` weights (each row's weights sum to 1) the loss is
    `mean_i L_i`, the paper's objective; with `token-mean` weights responses
    count by their length.

    Args:
        logprobs: `[B, T]` current policy log-probs (with gradient).
        old_logprobs: `[B, T]` log-probs at rollout time.
        advantages: `[B, T]`.
        response_mask: `[B, T]`, true (or a positive weight) on response tokens.
        clip_eps_low, clip_eps_high: the sequence ratio's clip range.

    Returns:
        `(scalar loss, metrics)` with `policy/pg_loss`, `policy/clipfrac` (share
        of responses whose clipped term was taken, weighted as the loss),
        `policy/seq_ratio_mean` (the mean of `s_i`) and `policy/approx_kl` (the
        tokens' k3 estimate of KL(old || current), as PPO's).
    """
    old_logprobs = old_logprobs.detach()
    advantages = advantages.detach()
    mask = response_mask != 0
    lengths = mask.sum(-1).clamp(min=1)
    log_ratio = torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))
    # log s_i = mean over the response's tokens of log(pi / pi_old), clamped as PPO's token ratios are
    seq_log_ratio = (log_ratio.sum(-1) / lengths).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    seq_ratio = torch.exp(seq_log_ratio)
    seq_advantage = torch.where(mask, advantages, torch.zeros_like(advantages)).sum(-1) / lengths
    unclipped = -seq_advantage * seq_ratio
    clipped = -seq_advantage * torch.clamp(seq_ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high)
    per_sequence = torch.maximum(unclipped, clipped)
    loss = masked_mean(per_sequence[:, None].expand_as(logprobs), response_mask)
    with torch.no_grad():
        rows = mask.any(-1)
        token_log_ratio = log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        metrics = {
            "policy/pg_loss": loss.detach(),
            "policy/clipfrac": masked_mean((clipped > unclipped).float()[:, None].expand_as(logprobs),
                                           response_mask),
            "policy/seq_ratio_mean": masked_mean(seq_ratio.detach(), rows),
            # k3 estimator of KL(old || current) over the tokens: (ratio - 1) - log ratio
            "policy/approx_kl": masked_mean(torch.exp(token_log_ratio) - 1.0 - token_log_ratio, mask),
        }
    return loss, metrics


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    response_mask: Tensor,
    clip_eps: float | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss of PPO implementations (lm-human-preferences, OpenAI baselines).

        V_clip = old_values + clip(values - old_values, -eps, eps)
        L_t    = 0.5 * max((values - R)^2, (V_clip - R)^2)

    Args:
        values: `[B, T]` current critic values (with gradient).
        old_values: `[B, T]` values at rollout time.
        returns: `[B, T]` targets, e.g. from `advantages.gae`.
        response_mask: `[B, T]`.
        clip_eps: clip range of the value change; None disables clipping.

    Returns:
        `(scalar loss, metrics)` with `critic/value_loss`, `critic/clipfrac`
        (share of tokens where the clipped error was the larger one) and
        `critic/values_mean`.
    """
    old_values = old_values.detach()
    returns = returns.detach()
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        clipped = unclipped
    else:
        values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
        clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), response_mask)
    with torch.no_grad():
        metrics = {
            "critic/value_loss": loss.detach(),
            "critic/clipfrac": masked_mean((clipped > unclipped).float(), response_mask),
            "critic/values_mean": masked_mean(values.detach(), response_mask),
        }
    return loss, metrics


def reinforce_policy_loss(
    logprobs: Tensor, advantages: Tensor, response_mask: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """REINFORCE loss (Williams 1992) for ReMax-style on-policy updates.

        L = -mean_{response tokens} A_t * log pi(a_t | s_t)

    Args:
        logprobs: `[B, T]` policy log-probs (with gradient).
        advantages: `[B, T]`, e.g. from `advantages.remax_advantages`.
        response_mask: `[B, T]`.

    Returns:
        `(scalar loss, {"policy/pg_loss": ...})`.
    """
    loss = -masked_mean(advantages.detach() * logprobs, response_mask)
    return loss, {"policy/pg_loss": loss.detach()}
