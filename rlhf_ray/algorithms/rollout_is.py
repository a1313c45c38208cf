"""Importance correction of the gap between the rollout engine and the trainer.

The engine (vLLM, or Hugging Face `generate`) samples with its own kernels and
precision, so its probability of a sampled token, `pi_engine`, is not exactly
the trainer's probability of it under the same weights, `pi_old`. The policy
gradient is an expectation under `pi_old`; the samples come from `pi_engine`.
Each response token's loss is multiplied by a detached weight built from

    rho_t = pi_old(y_t) / pi_engine(y_t) = exp(old_logprobs_t - engine_logprobs_t)

* `none`: w_t = 1 (no correction);
* `tis`, truncated importance sampling (Yao et al. 2025, "Your efficient RL
  framework secretly brings you off-policy RL training"): w_t = min(rho_t, cap);
* `mis`, masked importance sampling (as verl's masked rollout IS): w_t = rho_t
  where 1/cap <= rho_t <= cap, else 0 (the token drops out of the gradient).

PPO's own ratio stays `pi / pi_old`, the trainer's: the weight corrects the
sampling distribution only. It enters the loss as a factor on each token's
advantage (`weighted_advantages`), which is the same as a factor on each
token's loss for every policy loss that is positively homogeneous in the
advantage, `L_t(w * A) = w * L_t(A)` for `w >= 0` (the PPO clip, its dual
clip, REINFORCE).

Shapes: every per-token input is `[B, T]`; `response_mask` is true on the
response tokens. Nothing here needs a gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ROLLOUT_IS_MODES", "rollout_is_weights", "weighted_advantages", "mismatch_sums", "mismatch_metrics",
           "SUM_PREFIX"]

ROLLOUT_IS_MODES = ("none", "tis", "mis")

# exp() of a log-ratio beyond this overflows float16 and is meaningless anyway.
_MAX_LOG_RATIO = 20.0

SUM_PREFIX = "mismatch_sum/"
"""Metric keys under which a trainer reports the sums `mismatch_metrics` turns into ratios."""


@torch.no_grad()
def rollout_is_weights(old_logprobs: Tensor, engine_logprobs: Tensor, response_mask: Tensor, mode: str,
                       cap: float) -> tuple[Tensor, Tensor]:
    """Per-token importance weights of the engine-trainer mismatch, and where the cap acted.

    Args:
        old_logprobs: `[B, T]` the trainer's log-probs of the sampled tokens under the weights the step starts
            from (those that sampled, unless the batch is stale: `rollout.max_staleness`).
        engine_logprobs: `[B, T]` the engine's log-probs of the same tokens.
        response_mask: `[B, T]`.
        mode: `none`, `tis` or `mis` (see the module docstring).
        cap: the truncation (`tis`) or the bound of `[1/cap, cap]` (`mis`), > 1.

    Returns:
        `(weights, capped)`, both `[B, T]` and 0 off the mask: `weights` float, detached; `capped` true
        where the weight is not the ratio (`tis`: rho > cap; `mis`: rho outside [1/cap, cap]; `none`: never).
    """
    if mode not in ROLLOUT_IS_MODES:
        raise ValueError(f"rollout_is mode {mode!r}: expected one of {', '.join(ROLLOUT_IS_MODES)}")
    if cap <= 1.0:
        raise ValueError(f"rollout_is cap must be > 1; got {cap}")
    mask = response_mask.bool()
    # log rho_t = log pi_old(y_t) - log pi_engine(y_t), zero on padding so exp() stays finite
    log_rho = torch.where(mask, old_logprobs.float() - engine_logprobs.float(), torch.zeros_like(old_logprobs.float()))
    rho = torch.exp(log_rho.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    if mode == "none":
        weights, capped = torch.ones_like(rho), torch.zeros_like(mask)
    elif mode == "tis":
        # w_t = min(rho_t, C)
        weights, capped = rho.clamp(max=cap), rho > cap
    else:
        # w_t = rho_t * 1[1/C <= rho_t <= C]
        capped = (rho > cap) | (rho < 1.0 / cap)
        weights = torch.where(capped, torch.zeros_like(rho), rho)
    return weights * mask, capped & mask


def weighted_advantages(advantages: Tensor, weights: Tensor) -> Tensor:
    """`A_t * w_t`: the importance weight as a factor on each token's policy loss.

    For a loss with `L_t(w * A) = w * L_t(A)` whenever `w >= 0` (PPO's clipped surrogate
    `max(-A r, -A clip(r))`, the dual clip `min(., -A c)`, REINFORCE's `-A log pi`), scaling the
    advantage scales the token's loss, and the clip still acts on `pi / pi_old` alone."""
    return advantages * weights.detach().to(advantages.dtype)


@torch.no_grad()
def mismatch_sums(old_logprobs: Tensor, engine_logprobs: Tensor, weights: Tensor, capped: Tensor,
                  response_mask: Tensor) -> dict[str, Tensor]:
    """Sums over the response tokens of a batch (or any share of it) that `mismatch_metrics` turns into
    the logged ratios: shares of one batch add up, so micro-batches and ranks may each report their own.

    Returns scalars `tokens`, `abs_diff` (|log pi_old - log pi_engine|), `kl` (k3 estimate of
    KL(pi_engine || pi_old) on the engine's samples: rho - 1 - log rho), `weight`, `weight_sq` and `capped`.
    """
    mask = response_mask.bool()
    zero = torch.zeros((), dtype=torch.float64, device=mask.device)
    diff = torch.where(mask, old_logprobs.double() - engine_logprobs.double(), zero)
    log_rho = diff.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    w = torch.where(mask, weights.double(), zero)
    return {"tokens": mask.double().sum(), "abs_diff": diff.abs().sum(),
            "kl": torch.where(mask, torch.exp(log_rho) - 1.0 - log_rho, zero).sum(),
            "weight": w.sum(), "weight_sq": (w * w).sum(), "capped": (capped & mask).double().sum()}


def mismatch_metrics(sums: dict[str, float]) -> dict[str, float]:
    """The logged mismatch metrics from `mismatch_sums` (each sum may be scaled by one common factor, as
    when averaged over micro-batches and ranks: every metric is a ratio of sums).

    * `rollout/logprob_diff`: mean |log pi_old - log pi_engine| per response token;
    * `rollout/mismatch_kl`: mean k3 estimate of KL(pi_engine || pi_old) per token;
    * `rollout/is_weight_mean`: mean applied weight (1 with `none`);
    * `rollout/is_clipped_frac`: share of tokens whose weight the cap truncated (`tis`) or masked (`mis`);
    * `rollout/is_ess`: effective sample size of the weights as a share of the tokens,
      (sum w)^2 / (N * sum w^2), 1 when every weight is equal.
    """
    tokens = max(float(sums["tokens"]), 1e-12)
    weight, weight_sq = float(sums["weight"]), float(sums["weight_sq"])
    return {"rollout/logprob_diff": float(sums["abs_diff"]) / tokens,
            "rollout/mismatch_kl": float(sums["kl"]) / tokens,
            "rollout/is_weight_mean": weight / tokens,
            "rollout/is_clipped_frac": float(sums["capped"]) / tokens,
            "rollout/is_ess": weight * weight / (tokens * weight_sq) if weight_sq > 0 else 0.0}
