"""Reward-model losses: Bradley-Terry on pairs and InstructGPT's K-way ranking loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["pairwise_reward_loss", "ranked_reward_loss"]


def pairwise_reward_loss(
    chosen_rewards: Tensor, rejected_rewards: Tensor, margin: float | Tensor | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Bradley-Terry pairwise loss (Stiennon et al. 2020; Ouyang et al. 2022).

        L = -mean log sigmoid(r_chosen - r_rejected - margin)

    `margin` (a number or `[B]`, Llama 2's preference-strength margin) asks
    the chosen reward to lead by at least that much; None means 0.

    Args:
        chosen_rewards: `[B]` scalar rewards of the chosen responses.
        rejected_rewards: `[B]` scalar rewards of the rejected responses.

    Returns:
        `(scalar loss, metrics)` with `rewards/chosen`, `rewards/rejected`
        (mean rewards), `rewards/accuracies`, `rewards/margins`.
    """
    if chosen_rewards.dim() != 1 or chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            f"chosen_rewards and rejected_rewards must both be [B]; got {tuple(chosen_rewards.shape)} "
            f"and {tuple(rejected_rewards.shape)}. Squeeze the reward head's last dimension."
        )
    gap = chosen_rewards - rejected_rewards
    if margin is not None:
        gap = gap - (margin.detach() if isinstance(margin, Tensor) else margin)
    loss = -F.logsigmoid(gap).mean()
    with torch.no_grad():
        metrics = {
            "rewards/chosen": chosen_rewards.detach().mean(),
            "rewards/rejected": rejected_rewards.detach().mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).detach().mean(),
        }
    return loss, metrics


def ranked_reward_loss(rewards: Tensor, ranking: Tensor, margin: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """InstructGPT's K-way ranking loss (Ouyang et al. 2022, arXiv:2203.02155, eq. 1).

    The K responses of a prompt are scored in one forward pass; every pair
    `(better, worse)` of them contributes `-log sigmoid(r_better - r_worse)`.
    Each prompt's pairs are averaged first (the paper's `1 / (K choose 2)`),
    then prompts are averaged, so a prompt with many responses does not
    outweigh one with few and the pairs of one prompt do not overfit.

    Args:
        rewards: `[P, K]` rewards of the K responses of each of P prompts
            (a flat `[P * K]`, prompt-major, is accepted too).
        ranking: `[P, K]` integer rank of each response within its prompt,
            0 for the best; equal ranks (ties) form no pair; a negative rank
            marks a padding slot (a prompt with fewer than K responses).
        margin: subtracted from every pair's gap inside the loss (0: none).

    Returns:
        `(scalar loss, metrics)` with `rewards/accuracies` (share of all
        ordered pairs whose better response scored higher), `rewards/margins`
        (mean `r_better - r_worse` over pairs) and `rm/num_pairs`.
    """
    if rewards.dim() == 1 and ranking.dim() == 2 and rewards.numel() == ranking.numel():
        rewards = rewards.view(ranking.shape)  # flat [P * K] scores, prompt-major
    if rewards.dim() != 2 or ranking.shape != rewards.shape:
        raise ValueError(
            f"rewards and ranking must both be [P, K] (prompts x responses); got {tuple(rewards.shape)} "
            f"and {tuple(ranking.shape)}."
        )
    valid = ranking >= 0
    # pair_mask[p, i, j]: response i of prompt p is ranked strictly above response j.
    pair_mask = valid[:, :, None] & valid[:, None, :] & (ranking[:, :, None] < ranking[:, None, :])
    pairs_per_prompt = pair_mask.sum(dim=(1, 2))
    if int(pairs_per_prompt.sum()) == 0:
        raise ValueError(
            "ranked_reward_loss found no ordered pair: every prompt has fewer than 2 ranked responses or only ties. "
            "Check the ranking column of the reward-model data."
        )
    gap = rewards[:, :, None] - rewards[:, None, :]  # r_i - r_j
    # `margin` (algorithm.rm_margin): the better response must win by at least this much (Llama 2's
    # margin loss with one constant margin); metrics use the plain gap.
    pair_losses = -F.logsigmoid(gap - margin) * pair_mask
    has_pairs = pairs_per_prompt > 0
    per_prompt = pair_losses.sum(dim=(1, 2))[has_pairs] / pairs_per_prompt[has_pairs]
    loss = per_prompt.mean()
    with torch.no_grad():
        n_pairs = pairs_per_prompt.sum().to(rewards.dtype)
        metrics = {
            "rewards/accuracies": ((gap > 0) & pair_mask).sum().to(rewards.dtype) / n_pairs,
            "rewards/margins": (gap.detach() * pair_mask).sum() / n_pairs,
            "rm/num_pairs": n_pairs,
        }
    return loss, metrics
