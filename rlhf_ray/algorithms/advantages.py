"""Advantage estimators for the online algorithms.

Every function here works on right- or ragged-padded batches: `response_mask`
is `[B, T]` (bool or 0/1), true on the response tokens the policy generated.
Masked positions of every returned `[B, T]` tensor are zero, and the backward
recursions skip them, so padding between two response tokens (a tool output,
an interleaved turn) never leaks into a bootstrap or a return.

All estimators run without gradient: advantages and returns are targets.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "LOSS_AGGREGATIONS",
    "aggregation_weights",
    "aggregation_denominator",
    "masked_mean",
    "masked_var",
    "whiten",
    "discounted_returns",
    "gae",
    "remax_advantages",
    "grpo_advantages",
    "informative_groups",
    "rloo_advantages",
    "reinforce_pp_advantages",
]


def _as_float_mask(mask: Tensor, like: Tensor) -> Tensor:
    return mask.to(dtype=like.dtype if like.is_floating_point() else torch.float32)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over the positions where `mask` is true.

    Args:
        x: any shape.
        mask: same shape as `x` (bool or 0/1).
        dim: reduce over this dimension only; `None` reduces over everything.

    The denominator is the mask sum clamped to at least 1, so an all-false
    mask gives 0 rather than NaN. Masked positions are selected away, not
    multiplied by 0, so an inf or NaN in padding cannot poison the mean.
    """
    m = _as_float_mask(mask, x)
    x = torch.where(m != 0, x, torch.zeros_like(x))
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1.0)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1.0)


LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def aggregation_weights(mask: Tensor, mode: str = "token-mean") -> Tensor:
    """Per-token weights that make a weighted token mean the chosen loss aggregation.

    `token-mean`: every response token weighs 1, so `masked_mean(loss, w)`
    is the mean over tokens (long responses count more). `seq-mean-token-mean`:
    a row's tokens weigh 1 / its length, so the same weighted mean is the mean
    over sequences of each sequence's token mean. `seq-mean-token-sum-norm`
    (Dr. GRPO): every token weighs 1, as for `token-mean`; what differs is the
    denominator (`aggregation_denominator`). Summed over a whole minibatch,
    the denominator lets every micro-batch and rank scale its share of the
    loss so that the optimised objective does not depend on how the minibatch
    is split (see `TrainEngine.global_loss`)."""
    m = mask.float()
    if mode in ("token-mean", "seq-mean-token-sum-norm"):
        return m
    if mode == "seq-mean-token-mean":
        return m / m.sum(-1, keepdim=True).clamp(min=1.0)
    raise ValueError(f"loss aggregation {mode!r}: expected one of {', '.join(LOSS_AGGREGATIONS)}")


def aggregation_denominator(mask: Tensor, mode: str = "token-mean", max_length: int | None = None) -> float:
    """What a minibatch's summed, weighted per-token loss is divided by: `sum(loss * w) / denominator`.

    `token-mean` and `seq-mean-token-mean`: the weights' sum (the minibatch's
    tokens, or its non-empty sequences), so the loss is a weighted mean.
    `seq-mean-token-sum-norm` (Dr. GRPO, Liu et al. 2025, arXiv:2503.20783):
    `rows * max_length`, a constant for a given batch shape, so each sequence
    contributes its token sum over the longest response allowed and a long
    response's tokens are not weighed down by its length (the bias of a
    per-sequence token mean).

    Args:
        mask: `[B, T]` response (or loss) mask of the whole minibatch.
        mode: one of `LOSS_AGGREGATIONS`.
        max_length: the constant length (`rollout.max_new_tokens` for
            responses); needed by `seq-mean-token-sum-norm` only.
    """
    if mode == "seq-mean-token-sum-norm":
        if not max_length or max_length < 1:
            raise ValueError("loss aggregation seq-mean-token-sum-norm needs max_length >= 1 (the constant length "
                             "every sequence's token sum is divided by)")
        # sum_i sum_t loss_it / (B * L_max): the mean over sequences of token sums over L_max
        return float(mask.shape[0] * max_length)
    return float(aggregation_weights(mask, mode).sum())


def masked_var(x: Tensor, mask: Tensor) -> Tensor:
    """Population variance (no Bessel correction) of `x` where `mask` is true."""
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise `x` to zero mean and unit variance over the masked positions.

    Args:
        x: `[B, T]` (any shape works).
        mask: same shape as `x`; statistics use only the true positions.
        shift_mean: if False, the mean is added back (scale only), as for
            rewards whose sign carries meaning.
        eps: added to the variance before the square root.

    Returns:
        Same shape as `x`, zero where `mask` is false.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(_as_float_mask(mask, out) != 0, out, torch.zeros_like(out))


def _check_rows(name: str, values: Tensor, response_mask: Tensor) -> None:
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be [B, T]; got shape {tuple(response_mask.shape)}.")
    if values.shape != response_mask.shape[:1]:
        raise ValueError(
            f"{name} must be [B] with B={response_mask.shape[0]} (one per response, matching "
            f"response_mask's rows); got shape {tuple(values.shape)}."
        )


def _check_same_shape(name: str, x: Tensor, response_mask: Tensor) -> None:
    if x.shape != response_mask.shape:
        raise ValueError(
            f"{name} must have the shape of response_mask {tuple(response_mask.shape)}; "
            f"got {tuple(x.shape)}."
        )


@torch.no_grad()
def discounted_returns(token_rewards: Tensor, response_mask: Tensor, gamma: float) -> Tensor:
    """Returns-to-go `G_t = r_t + gamma * G_{next response token}`.

    Args:
        token_rewards: `[B, T]` per-token rewards.
        response_mask: `[B, T]`; masked positions are skipped by the recursion.
        gamma: discount factor.

    Returns:
        `[B, T]` returns, zero on masked positions.
    """
    _check_same_shape("token_rewards", token_rewards, response_mask)
    mask = response_mask.bool()
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros_like(token_rewards[:, 0])
    for t in reversed(range(token_rewards.shape[1])):
        # G_t = r_t + gamma * G_{t'} where t' is the next unmasked position.
        candidate = token_rewards[:, t] + gamma * running
        running = torch.where(mask[:, t], candidate, running)
        returns[:, t] = torch.where(mask[:, t], candidate, torch.zeros_like(candidate))
    return returns


@torch.no_grad()
def gae(
    token_rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016, arXiv:1506.02438).

    The recursion runs backwards over the response tokens only; the value
    after the last response token is 0 (the episode ends there):

        delta_t = r_t + gamma * V(s_{t'}) - V(s_t)      t' = next response token
        A_t     = delta_t + gamma * lam * A_{t'}
        R_t     = A_t + V(s_t)                          (the critic's target)

    Args:
        token_rewards: `[B, T]`, e.g. from `kl.token_level_rewards`.
        values: `[B, T]` critic values of the state before each token.
        response_mask: `[B, T]`, true on response tokens.
        gamma: discount factor (1.0 in RLHF practice).
        lam: GAE lambda (0.95 in lm-human-preferences).

    Returns:
        `(advantages, returns)`, both `[B, T]`, zero where the mask is false.
    """
    _check_same_shape("token_rewards", token_rewards, response_mask)
    _check_same_shape("values", values, response_mask)
    mask = response_mask.bool()
    values = values.to(token_rewards.dtype)
    advantages = torch.zeros_like(token_rewards)
    next_value = torch.zeros_like(token_rewards[:, 0])
    next_advantage = torch.zeros_like(token_rewards[:, 0])
    for t in reversed(range(token_rewards.shape[1])):
        # delta_t = r_t + gamma * V(s_{t'}) - V(s_t)
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        # A_t = delta_t + gamma * lam * A_{t'}
        advantage = delta + gamma * lam * next_advantage
        valid = mask[:, t]
        advantages[:, t] = torch.where(valid, advantage, torch.zeros_like(advantage))
        next_value = torch.where(valid, values[:, t], next_value)
        next_advantage = torch.where(valid, advantage, next_advantage)
    returns = (advantages + values) * mask.to(advantages.dtype)
    return advantages, returns


@torch.no_grad()
def remax_advantages(sampled_returns: Tensor, greedy_rewards: Tensor, response_mask: Tensor) -> Tensor:
    """ReMax advantages (Li et al. 2023, arXiv:2310.10505).

    REINFORCE whose baseline is the reward of the greedy-decoded response to
    the same prompt: `A_t = G_t - r(x, y_greedy)` on every response token,
    where `G_t` is the sample's return from token t on (`[B, T]`, e.g. the
    reward-to-go of KL-shaped token rewards), or one return for the whole
    response (`[B]`, the same on every token).

    Args:
        sampled_returns: `[B, T]` return of each sampled response from each token on, or `[B]`.
        greedy_rewards: `[B]` reward of the greedy response to the same prompt.
        response_mask: `[B, T]`.

    Returns:
        `[B, T]` advantages, zero where the mask is false.
    """
    _check_rows("greedy_rewards", greedy_rewards, response_mask)
    if sampled_returns.dim() == 2:
        _check_same_shape("sampled_returns", sampled_returns, response_mask)
    else:
        _check_rows("sampled_returns", sampled_returns, response_mask)
        sampled_returns = sampled_returns[:, None]
    # A_t = G_t - r(x, y_greedy)
    gap = sampled_returns - greedy_rewards.to(sampled_returns.dtype)[:, None]
    return gap * _as_float_mask(response_mask, gap)


def _grouped(sequence_rewards: Tensor, group_size: int, response_mask: Tensor, who: str) -> Tensor:
    _check_rows("sequence_rewards", sequence_rewards, response_mask)
    if group_size < 2:
        raise ValueError(
            f"{who} needs at least 2 samples per prompt to form a baseline; got group_size={group_size}. "
            "Raise the number of samples per prompt."
        )
    if sequence_rewards.shape[0] % group_size != 0:
        raise ValueError(
            f"{who}: {sequence_rewards.shape[0]} rewards is not a multiple of group_size={group_size}; "
            "the rollout must return group_size samples per prompt, one prompt's samples consecutively."
        )
    return sequence_rewards.view(-1, group_size)


@torch.no_grad()
def grpo_advantages(
    sequence_rewards: Tensor,
    group_size: int,
    response_mask: Tensor,
    scale_by_std: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """Group-relative advantages of GRPO (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300).

    `A_i = (r_i - mean(group)) / (std(group) + eps)` on every response token,
    where the group is the `group_size` samples of one prompt and `std` is
    the sample standard deviation (Bessel-corrected). `scale_by_std=False`
    keeps only the mean baseline (Dr. GRPO, Liu et al. 2025).

    Args:
        sequence_rewards: `[B]` with `B = n_prompts * group_size`, each
            prompt's samples consecutive.
        group_size: samples per prompt (>= 2).
        response_mask: `[B, T]`.

    Returns:
        `[B, T]` advantages, zero where the mask is false.
    """
    groups = _grouped(sequence_rewards, group_size, response_mask, "grpo_advantages")
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    flat = centred.reshape(-1, 1)
    return flat * _as_float_mask(response_mask, flat)


@torch.no_grad()
def informative_groups(sequence_rewards: Tensor, group_size: int) -> Tensor:
    """Which prompts' groups carry a learning signal: not every reward of the group equal.

    A group whose rewards are all equal (every sample right, or every one
    wrong, under a verifiable reward) has group-relative advantages of zero
    on every token, so it adds nothing to the gradient but still counts in
    the loss's denominator. DAPO's dynamic sampling (Yu et al. 2025,
    arXiv:2503.14476, Sec. 3.2) drops such groups and draws more prompts.

    Args:
        sequence_rewards: `[B]` with `B = n_prompts * group_size`, each
            prompt's samples consecutive.
        group_size: samples per prompt (>= 2).

    Returns:
        `[n_prompts]` bool, true where the group's rewards are not all equal.
    """
    if sequence_rewards.dim() != 1:
        raise ValueError(f"sequence_rewards must be [B]; got shape {tuple(sequence_rewards.shape)}.")
    mask = torch.ones(sequence_rewards.shape[0], 1, dtype=torch.bool)
    groups = _grouped(sequence_rewards, group_size, mask, "informative_groups")
    # max > min: at least two different rewards within the group
    return groups.max(dim=1).values > groups.min(dim=1).values


@torch.no_grad()
def rloo_advantages(sequence_rewards: Tensor, group_size: int, response_mask: Tensor) -> Tensor:
    """REINFORCE Leave-One-Out advantages (Ahmadian et al. 2024, arXiv:2402.14740).

    Each sample's baseline is the mean reward of the other `k - 1` samples of
    its prompt: `A_i = r_i - (sum_j r_j - r_i) / (k - 1)`, on every token.

    Args:
        sequence_rewards: `[B]` with `B = n_prompts * group_size`, each
            prompt's samples consecutive.
        group_size: samples per prompt `k` (>= 2).
        response_mask: `[B, T]`.

    Returns:
        `[B, T]` advantages, zero where the mask is false.
    """
    groups = _grouped(sequence_rewards, group_size, response_mask, "rloo_advantages")
    baseline = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    flat = (groups - baseline).reshape(-1, 1)
    return flat * _as_float_mask(response_mask, flat)


@torch.no_grad()
def reinforce_pp_advantages(token_rewards: Tensor, response_mask: Tensor, gamma: float) -> Tensor:
    """REINFORCE++ advantages (Hu 2025, arXiv:2501.03262).

    Returns-to-go of the (KL-shaped) token rewards, whitened over every
    response token of the whole batch: no critic and no per-prompt baseline.

    Args:
        token_rewards: `[B, T]`, e.g. from `kl.token_level_rewards`.
        response_mask: `[B, T]`.
        gamma: discount factor.

    Returns:
        `[B, T]` advantages, zero where the mask is false.
    """
    returns = discounted_returns(token_rewards, response_mask, gamma)
    return whiten(returns, response_mask, shift_mean=True)
