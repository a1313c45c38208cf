"""KL estimators, KL-shaped rewards and KL-coefficient controllers.

The per-token estimators follow Schulman's note "Approximating KL
Divergence" (2020). With samples from the policy `q` and the reference `p`,
`log r = log p(x) - log q(x) = ref_logprobs - logprobs`:

    k1 = -log r                  unbiased, high variance, can be negative
    k2 = 0.5 * (log r)^2         biased, low variance, >= 0
    k3 = (r - 1) - log r         unbiased, low variance, >= 0 (GRPO's choice)
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_ray.algorithms.advantages import masked_mean

__all__ = [
    "KL_KINDS",
    "kl_penalty",
    "kl_loss",
    "token_level_rewards",
    "FixedKLController",
    "AdaptiveKLController",
]

KL_KINDS = ("k1", "k2", "k3")

# exp() of a log-ratio beyond this overflows float16 and is meaningless anyway.
_MAX_LOG_RATIO = 20.0


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str) -> Tensor:
    """Per-token estimate of `KL(policy || reference)`.

    Args:
        logprobs: `[B, T]` log-probs of the sampled tokens under the policy.
        ref_logprobs: `[B, T]` log-probs of the same tokens under the reference.
        kind: `"k1"`, `"k2"` or `"k3"` (see the module docstring).

    Returns:
        `[B, T]`, unmasked (the caller applies its response mask).
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} must have the same shape."
        )
    log_ratio = logprobs - ref_logprobs.to(logprobs.dtype)  # log q - log p = -log r
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        # (r - 1) - log r with log r = -log_ratio
        neg = (-log_ratio).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        return torch.exp(neg) - 1.0 - neg
    raise ValueError(f"Unknown KL estimator kind={kind!r}; expected one of {', '.join(KL_KINDS)}.")


def kl_loss(
    logprobs: Tensor, ref_logprobs: Tensor, response_mask: Tensor, kl_coef: float, kind: str = "k3"
) -> tuple[Tensor, dict[str, Tensor]]:
    """KL to the reference as a loss term, as GRPO adds it to the policy loss.

    `loss = kl_coef * mean_{response tokens} KL_kind`; gradients flow through
    `logprobs` only.

    Returns:
        `(scalar loss, {"policy/kl_loss": mean KL, "policy/kl_coef": kl_coef})`.
    """
    kl = kl_penalty(logprobs, ref_logprobs.detach(), kind)
    mean_kl = masked_mean(kl, response_mask)
    metrics = {
        "policy/kl_loss": mean_kl.detach(),
        "policy/kl_coef": torch.tensor(float(kl_coef)),
    }
    return kl_coef * mean_kl, metrics


@torch.no_grad()
def token_level_rewards(
    sequence_rewards: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    response_mask: Tensor,
    kl_coef: float,
    kind: str = "k1",
) -> Tensor:
    """KL-shaped per-token rewards (Ziegler et al. 2019; Ouyang et al. 2022).

    `r_t = -kl_coef * KL_t` on every response token, and the sequence reward
    is added on the last response token (the one where the reward model read
    the whole response).

    Args:
        sequence_rewards: `[B]` reward of each response.
        logprobs: `[B, T]` policy log-probs of the sampled tokens (at rollout).
        ref_logprobs: `[B, T]` reference log-probs of the same tokens.
        response_mask: `[B, T]`.
        kl_coef: the KL penalty coefficient beta.
        kind: KL estimator, see `kl_penalty`.

    Returns:
        `[B, T]` rewards, zero where the mask is false. A row with no response
        token has nowhere to put its reward and stays all zero.
    """
    if response_mask.dim() != 2 or sequence_rewards.shape != response_mask.shape[:1]:
        raise ValueError(
            f"sequence_rewards must be [B] and response_mask [B, T] with the same B; got "
            f"{tuple(sequence_rewards.shape)} and {tuple(response_mask.shape)}."
        )
    mask = response_mask.bool()
    kl = kl_penalty(logprobs, ref_logprobs, kind)
    rewards = torch.where(mask, -kl_coef * kl, torch.zeros_like(kl))
    # Index of the last true position of each row (0 for an empty row).
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=1).values
    has_tokens = last >= 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has_tokens]
    rewards[rows, last[has_tokens]] += sequence_rewards[has_tokens].to(rewards.dtype)
    return rewards


class FixedKLController:
    """A constant KL coefficient, with the same interface as the adaptive one."""

    def __init__(self, kl_coef: float):
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0; got {kl_coef}.")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Ignore the measurement; return the (unchanged) coefficient."""
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 (arXiv:1909.08593).

    After each batch of `n_steps` samples with measured KL `current_kl`:

        e    = clip(current_kl / target - 1, -0.2, 0.2)
        beta = beta * (1 + e * n_steps / horizon)

    so beta grows when the policy drifts past `target` nats and shrinks below.
    lm-human-preferences uses init 0.2, target 6, horizon 10,000.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be >= 0; got {init_kl_coef}.")
        if target <= 0 or horizon <= 0:
            raise ValueError(
                f"AdaptiveKLController needs target > 0 and horizon > 0; got target={target}, horizon={horizon}."
            )
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move the coefficient towards the KL target; returns the new value."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
