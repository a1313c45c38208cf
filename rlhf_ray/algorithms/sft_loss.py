"""Supervised fine-tuning losses."""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_ray.algorithms.advantages import masked_mean
from rlhf_ray.algorithms.kl import kl_penalty

__all__ = ["sft_loss", "kl_sft_loss"]


def sft_loss(logprobs: Tensor, loss_mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-mean negative log-likelihood of the target tokens.

        L = -mean_{masked tokens} log pi(y_t | x, y_<t)

    Args:
        logprobs: `[B, T]` log-probs of the target tokens under the policy.
        loss_mask: `[B, T]`, true on the tokens that are trained on (the
            response, not the prompt or padding).

    Returns:
        `(scalar loss, {"sft/nll", "sft/num_tokens"})`.
    """
    if logprobs.shape != loss_mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and loss_mask {tuple(loss_mask.shape)} must match.")
    loss = -masked_mean(logprobs, loss_mask)
    metrics = {
        "sft/nll": loss.detach(),
        "sft/num_tokens": loss_mask.to(torch.float32).sum().detach(),
    }
    return loss, metrics


def kl_sft_loss(
    logprobs: Tensor, ref_logprobs: Tensor, loss_mask: Tensor, kl_coef: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """SFT with a penalty on drifting from the reference, in either direction.

        L = -mean log pi(y_t) + kl_coef * mean 0.5 * (log pi(y_t) - log ref(y_t))^2

    The squared log-ratio (Schulman's k2 estimator of the KL) grows whether a
    token's log-prob rises above or falls below the reference's, so the
    penalty keeps SFT from over-sharpening as well as from forgetting (the
    "KL-SFT" baseline of the DPO-vs-SFT study in REFERENCES.md).

    Args:
        logprobs: `[B, T]` policy log-probs of the target tokens.
        ref_logprobs: `[B, T]` frozen reference log-probs of the same tokens.
        loss_mask: `[B, T]`.
        kl_coef: weight of the penalty.

    Returns:
        `(scalar loss, {"sft/nll", "sft/kl", "sft/num_tokens"})`.
    """
    nll, metrics = sft_loss(logprobs, loss_mask)
    kl = masked_mean(kl_penalty(logprobs, ref_logprobs.detach(), "k2"), loss_mask)
    metrics["sft/kl"] = kl.detach()
    return nll + kl_coef * kl, metrics
