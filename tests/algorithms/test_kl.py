"""KL estimators, KL-shaped rewards and the KL controllers."""

import math

import pytest
import torch

from rlhf_ray.algorithms import (
    AdaptiveKLController,
    FixedKLController,
    kl_loss,
    kl_penalty,
    token_level_rewards,
)

from tensor_helpers import close

torch.set_num_threads(1)


def test_kl_estimators_hand_worked():
    logprobs = torch.log(torch.tensor([[0.5]]))
    ref = torch.log(torch.tensor([[0.25]]))
    # log q - log p = ln 2 = 0.693147
    close(kl_penalty(logprobs, ref, "k1"), [[0.693147]])
    # k2 = 0.5 * (ln 2)^2 = 0.240227
    close(kl_penalty(logprobs, ref, "k2"), [[0.240227]])
    # r = p/q = 0.5: k3 = (0.5 - 1) - ln 0.5 = -0.5 + 0.693147 = 0.193147
    close(kl_penalty(logprobs, ref, "k3"), [[0.193147]])


def test_k2_k3_are_nonnegative_and_zero_at_equality():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    for kind in ("k2", "k3"):
        assert (kl_penalty(a, b, kind) >= 0).all()
        assert torch.equal(kl_penalty(a, a, kind), torch.zeros(4, 6))


def test_unknown_kind_names_the_choices():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


def test_kl_loss_is_coefficient_times_masked_mean():
    logprobs = torch.log(torch.tensor([[0.5, 0.9]])).requires_grad_()
    ref = torch.log(torch.tensor([[0.25, 0.1]]))
    mask = torch.tensor([[1, 0]])
    # only token 0 counts: k3 = 0.193147; loss = 0.1 * 0.193147
    loss, metrics = kl_loss(logprobs, ref, mask, kl_coef=0.1)
    close(loss, 0.0193147)
    close(metrics["policy/kl_loss"], 0.193147)
    loss.backward()
    # d k3 / d logq = 1 - p/q = 1 - 0.5 = 0.5, times 0.1; masked token gets 0
    close(logprobs.grad, [[0.05, 0.0]])


def test_token_level_rewards_hand_worked():
    sequence_rewards = torch.tensor([1.0, 2.0])
    logprobs = torch.full((2, 3), -1.0)
    ref = torch.tensor([[-1.5, -1.0, -1.0], [-1.0, -2.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    # k1 = logprobs - ref = [[0.5, 0, 0], [0, 1, -1]], times -0.1 on response tokens
    # row 0: last response token is t=1 -> [-0.05, 0 + 1.0, 0]
    # row 1: t=1 is padding (0); last response token is t=2 -> -0.1 * -1 + 2.0 = 2.1
    rewards = token_level_rewards(sequence_rewards, logprobs, ref, mask, kl_coef=0.1)
    close(rewards, [[-0.05, 1.0, 0.0], [0.0, 0.0, 2.1]])


def test_token_level_rewards_empty_row_stays_zero():
    rewards = token_level_rewards(
        torch.tensor([5.0, 1.0]), torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([[0, 0], [1, 0]]), kl_coef=0.1
    )
    close(rewards, [[0.0, 0.0], [1.0, 0.0]])


def test_fixed_controller_never_moves():
    ctl = FixedKLController(0.05)
    assert ctl.update(current_kl=100.0, n_steps=64) == 0.05
    assert ctl.value == 0.05


def test_adaptive_controller_follows_ziegler():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10_000)
    # KL 9: e = clip(9/6 - 1 = 0.5) = 0.2; beta = 0.2 * (1 + 0.2 * 100 / 10000) = 0.2004
    assert math.isclose(ctl.update(9.0, n_steps=100), 0.2004, rel_tol=1e-9)
    # KL 3: e = clip(-0.5) = -0.2; beta = 0.2004 * (1 - 0.002) = 0.1999992
    assert math.isclose(ctl.update(3.0, n_steps=100), 0.1999992, rel_tol=1e-9)
    fresh = AdaptiveKLController(0.2, 6.0, 10_000)
    # KL 6.6: e = 0.1 inside the clip; beta = 0.2 * (1 + 0.1 * 1000 / 10000) = 0.202
    assert math.isclose(fresh.update(6.6, n_steps=1000), 0.202, rel_tol=1e-9)
    restored = AdaptiveKLController(0.2, 6.0, 10_000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


def test_adaptive_controller_rejects_bad_target():
    with pytest.raises(ValueError, match="target > 0"):
        AdaptiveKLController(0.1, target=0.0, horizon=100)
