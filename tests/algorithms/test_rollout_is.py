"""Importance correction of the rollout engine's gap to the trainer: weights, masks and metrics by hand."""

import math

import pytest
import torch

from rlhf_ray.algorithms.online import ONLINE_ALGORITHMS
from rlhf_ray.algorithms.registry import get_online_algorithm
from rlhf_ray.algorithms.rollout_is import (
    ROLLOUT_IS_MODES,
    mismatch_metrics,
    mismatch_sums,
    rollout_is_weights,
    weighted_advantages,
)
from rlhf_ray.algorithms.steps import PolicyStep
from rlhf_ray.config.schema import ROLLOUT_IS_MODES as CONFIG_MODES

torch.set_num_threads(1)


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# rho = pi_old / pi_engine = 0.4, 1, 1.5, 3 on the four response tokens; the fifth column is padding.
RHO = [0.4, 1.0, 1.5, 3.0, 5.0]
ENGINE = torch.log(torch.tensor([[0.5, 0.2, 0.4, 0.1, 0.1]]))
OLD = ENGINE + torch.log(torch.tensor([RHO]))
MASK = torch.tensor([[1, 1, 1, 1, 0]])


def test_config_offers_the_modes_the_math_knows():
    assert CONFIG_MODES == ROLLOUT_IS_MODES


def test_tis_truncates_the_ratio_at_the_cap():
    weights, capped = rollout_is_weights(OLD, ENGINE, MASK, "tis", cap=2.0)
    # min(rho, 2): 0.4, 1, 1.5, 2 (3 truncated); padding 0
    close(weights, [[0.4, 1.0, 1.5, 2.0, 0.0]])
    assert capped.tolist() == [[False, False, False, True, False]]


def test_mis_keeps_the_ratio_inside_the_bounds_and_masks_the_rest():
    weights, capped = rollout_is_weights(OLD, ENGINE, MASK, "mis", cap=2.0)
    # [1/2, 2]: 0.4 falls below, 3 above -> 0; 1 and 1.5 kept as they are
    close(weights, [[0.0, 1.0, 1.5, 0.0, 0.0]])
    assert capped.tolist() == [[True, False, False, True, False]]


def test_none_weighs_every_response_token_one():
    weights, capped = rollout_is_weights(OLD, ENGINE, MASK, "none", cap=2.0)
    close(weights, [[1.0, 1.0, 1.0, 1.0, 0.0]])
    assert not capped.any()


def test_bad_mode_and_cap_are_named():
    with pytest.raises(ValueError, match="none, tis, mis"):
        rollout_is_weights(OLD, ENGINE, MASK, "clip", cap=2.0)
    with pytest.raises(ValueError, match="cap must be > 1"):
        rollout_is_weights(OLD, ENGINE, MASK, "tis", cap=1.0)


def test_metrics_hand_worked_for_tis():
    weights, capped = rollout_is_weights(OLD, ENGINE, MASK, "tis", cap=2.0)
    metrics = mismatch_metrics(mismatch_sums(OLD, ENGINE, weights, capped, MASK))
    # |log rho| = 0.9162907, 0, 0.4054651, 1.0986123 -> mean 2.4203681 / 4
    assert metrics["rollout/logprob_diff"] == pytest.approx(0.6050920, abs=1e-6)
    # k3 = rho - 1 - log rho = 0.3162907, 0, 0.0945349, 0.9013877 -> mean 1.3122133 / 4
    assert metrics["rollout/mismatch_kl"] == pytest.approx(0.3280533, abs=1e-6)
    # weights 0.4, 1, 1.5, 2: mean 4.9 / 4; one of four truncated
    assert metrics["rollout/is_weight_mean"] == pytest.approx(1.225)
    assert metrics["rollout/is_clipped_frac"] == 0.25
    # ESS = (sum w)^2 / (N sum w^2) = 4.9^2 / (4 * (0.16 + 1 + 2.25 + 4)) = 24.01 / 29.64
    assert metrics["rollout/is_ess"] == pytest.approx(24.01 / 29.64)


def test_metrics_of_shares_add_up_to_the_whole_batch():
    # Micro-batches and ranks each report their own sums; the driver averages them (one common scale).
    g = torch.Generator().manual_seed(0)
    old, engine = -torch.rand(6, 4, generator=g) * 3, -torch.rand(6, 4, generator=g) * 3
    mask = torch.rand(6, 4, generator=g) > 0.3
    weights, capped = rollout_is_weights(old, engine, mask, "mis", cap=1.5)
    whole = mismatch_metrics(mismatch_sums(old, engine, weights, capped, mask))
    shares = [mismatch_sums(old[i:i + 2], engine[i:i + 2], weights[i:i + 2], capped[i:i + 2], mask[i:i + 2])
              for i in range(0, 6, 2)]
    averaged = {k: sum(float(s[k]) for s in shares) / len(shares) for k in shares[0]}
    assert mismatch_metrics(averaged) == pytest.approx(whole)


def test_at_equal_log_probs_every_weight_is_one():
    g = torch.Generator().manual_seed(1)
    logprobs = -torch.rand(3, 5, generator=g) * 4
    mask = torch.ones(3, 5)
    for mode in ROLLOUT_IS_MODES:
        weights, capped = rollout_is_weights(logprobs, logprobs.clone(), mask, mode, cap=1.01)
        assert torch.equal(weights, torch.ones(3, 5)) and not capped.any()
        metrics = mismatch_metrics(mismatch_sums(logprobs, logprobs.clone(), weights, capped, mask))
        assert metrics == {"rollout/logprob_diff": 0.0, "rollout/mismatch_kl": 0.0, "rollout/is_weight_mean": 1.0,
                           "rollout/is_clipped_frac": 0.0, "rollout/is_ess": 1.0}


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_every_policy_loss_scales_each_token_by_its_weighted_advantage(dual_clip):
    # weighted_advantages relies on L_t(w * A) = w * L_t(A) for w >= 0; one token per row makes the loss
    # that token's own. Ratios inside and outside the clip range, advantages of both signs.
    params = PolicyStep(get_online_algorithm("ppo"), clip_eps=0.2, dual_clip=dual_clip, kl_coef=0.0, temperature=1.0)
    log_ratios = torch.tensor([-1.5, -0.1, 0.0, 0.1, 1.5])
    for loss in {a.policy_loss for a in ONLINE_ALGORITHMS.values()}:
        for log_ratio in log_ratios:
            for advantage in (-2.0, 0.7):
                for w in (0.0, 0.4, 1.0, 2.0):
                    old = torch.tensor([[-1.0]])
                    logprobs = (old + log_ratio).requires_grad_()
                    adv, mask = torch.tensor([[advantage]]), torch.ones(1, 1)
                    weighted, _ = loss(logprobs, old, weighted_advantages(adv, torch.tensor([[w]])), mask, params)
                    (grad_weighted,) = torch.autograd.grad(weighted, logprobs)
                    plain, _ = loss(logprobs, old, adv, mask, params)
                    (grad_plain,) = torch.autograd.grad(plain, logprobs)
                    assert math.isclose(float(weighted), w * float(plain), abs_tol=1e-6), (loss.name, log_ratio, w)
                    close(grad_weighted, w * grad_plain)
