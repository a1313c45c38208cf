"""PPO clipped surrogate (with DAPO's decoupled clip range), GSPO's sequence-level loss, clipped value loss
and REINFORCE loss."""

import math

import pytest
import torch

from rlhf_ray.algorithms import gspo_policy_loss, ppo_policy_loss, reinforce_policy_loss, value_loss
from rlhf_ray.algorithms.advantages import aggregation_weights

from tensor_helpers import close

torch.set_num_threads(1)


def test_ppo_policy_loss_hand_worked():
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.0]])).requires_grad_()
    old = torch.zeros(1, 3)  # ratios are [1.5, 0.5, 1.0]
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3)
    # clip 0.2:
    # t0: A=1, ratio 1.5: max(-1.5, -1.2) = -1.2 (clipped term taken)
    # t1: A=1, ratio 0.5: max(-0.5, -0.8) = -0.5
    # t2: A=-1, ratio 1:  max(1, 1) = 1
    # loss = (-1.2 - 0.5 + 1) / 3 = -0.233333, clipfrac = 1/3
    # approx_kl = mean((r - 1) - ln r) = (0.094535 + 0.193147 + 0) / 3 = 0.095894
    loss, m = ppo_policy_loss(logprobs, old, adv, mask, clip_eps=0.2)
    close(loss, -0.7 / 3)
    close(m["policy/pg_loss"], -0.7 / 3)
    close(m["policy/clipfrac"], 1 / 3)
    close(m["policy/approx_kl"], 0.095894)
    loss.backward()
    # d/dlogp of -A * ratio is -A * ratio: t0 clipped -> 0; t1 -0.5 / 3; t2 +1 / 3
    close(logprobs.grad, [[0.0, -0.5 / 3, 1.0 / 3]])


def test_ppo_policy_loss_ignores_masked_tokens():
    logprobs = torch.tensor([[0.0, 3.0]])
    adv = torch.tensor([[2.0, -50.0]])
    # only t0: ratio 1, loss = -2
    loss, m = ppo_policy_loss(logprobs, torch.zeros(1, 2), adv, torch.tensor([[1, 0]]), clip_eps=0.2)
    close(loss, -2.0)
    close(m["policy/clipfrac"], 0.0)


def test_ppo_policy_loss_survives_junk_in_padding():
    # padding log-probs far apart would give exp(200) = inf; the masked token must not turn the loss NaN
    logprobs = torch.tensor([[0.0, 100.0]], requires_grad=True)
    old = torch.tensor([[0.0, -100.0]])
    loss, m = ppo_policy_loss(logprobs, old, torch.tensor([[1.0, 0.0]]), torch.tensor([[1, 0]]), clip_eps=0.2)
    close(loss, -1.0)  # only t0: -A * ratio = -1
    loss.backward()
    assert torch.isfinite(logprobs.grad).all() and torch.isfinite(m["policy/approx_kl"])


def test_ppo_dual_clip_caps_negative_advantages():
    logprobs = torch.log(torch.tensor([[5.0, 5.0]]))
    adv = torch.tensor([[-1.0, 1.0]])
    # t0: A=-1, ratio 5: max(5, 1.2) = 5, capped at -A * 3 = 3
    # t1: A=+1, ratio 5: max(-5, -1.2) = -1.2, dual clip does not apply
    # without dual clip: (5 - 1.2) / 2 = 1.9; with: (3 - 1.2) / 2 = 0.9
    plain, _ = ppo_policy_loss(logprobs, torch.zeros(1, 2), adv, torch.ones(1, 2), clip_eps=0.2)
    dual, m = ppo_policy_loss(logprobs, torch.zeros(1, 2), adv, torch.ones(1, 2), clip_eps=0.2, dual_clip=3.0)
    close(plain, 1.9)
    close(dual, 0.9)
    close(m["policy/dual_clipfrac"], 0.5)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        ppo_policy_loss(logprobs, torch.zeros(1, 2), adv, torch.ones(1, 2), clip_eps=0.2, dual_clip=0.5)


def test_ppo_loss_on_policy_equals_reinforce_gradient():
    g = torch.Generator().manual_seed(0)
    logprobs = torch.randn(3, 5, generator=g, dtype=torch.float64)
    adv = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 5, generator=g) > 0.3
    a = logprobs.clone().requires_grad_()
    b = logprobs.clone().requires_grad_()
    # at ratio 1 nothing is clipped, so the PPO gradient is the REINFORCE gradient
    ppo_policy_loss(a, logprobs, adv, mask, clip_eps=0.2)[0].backward()
    reinforce_policy_loss(b, adv, mask)[0].backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_ppo_decoupled_clip_range_hand_worked():
    logprobs = torch.log(torch.tensor([[1.5, 1.25, 0.7]])).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    # DAPO's clip range [1 - 0.2, 1 + 0.28] = [0.8, 1.28]:
    # t0: A=1,  ratio 1.5:  max(-1.5, -1.28) = -1.28 (clipped above)
    # t1: A=1,  ratio 1.25: inside the range -> -1.25 (a symmetric 0.2 would clip it to -1.2)
    # t2: A=-1, ratio 0.7:  max(0.7, 0.8) = 0.8 (clipped below)
    # loss = (-1.28 - 1.25 + 0.8) / 3 = -0.576667, clipfrac 2/3
    loss, m = ppo_policy_loss(logprobs, torch.zeros(1, 3), adv, torch.ones(1, 3), clip_eps=0.2, clip_eps_high=0.28)
    close(loss, -1.73 / 3)
    close(m["policy/clipfrac"], 2 / 3)
    loss.backward()
    # only t1 is unclipped: d(-A * ratio)/dlogp = -1.25, over 3 tokens
    close(logprobs.grad, [[0.0, -1.25 / 3, 0.0]])
    symmetric, _ = ppo_policy_loss(logprobs.detach(), torch.zeros(1, 3), adv, torch.ones(1, 3), clip_eps=0.2)
    close(symmetric, (-1.2 - 1.2 + 0.8) / 3)  # clip_eps_high None: 0.2 on both sides


def test_gspo_policy_loss_hand_worked():
    old = torch.zeros(2, 3)
    # row 0: token log-ratios [0.3, -0.1, 0.1], mean 0.1 -> s0 = e^0.1 = 1.105171, A0 = 1
    # row 1: [0.2, -0.3] and a padding token whose junk log-ratio must not count: mean -0.05 -> s1 = 0.951229, A1 = -2
    logprobs = torch.tensor([[0.3, -0.1, 0.1], [0.2, -0.3, 5.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, 0.0]])
    weights = aggregation_weights(mask, "seq-mean-token-mean")
    # clip range [0.95, 1.1]:
    # row 0: max(-1.105171, -1.1) = -1.1, the clipped term: the whole response drops out of the gradient
    # row 1: s1 inside the range: 2 * 0.951229 = 1.902459
    # loss = mean over the two responses = (-1.1 + 1.902459) / 2 = 0.401229
    loss, m = gspo_policy_loss(logprobs, old, adv, weights, clip_eps_low=0.05, clip_eps_high=0.1)
    close(loss, 0.401229)
    close(m["policy/pg_loss"], 0.401229)
    close(m["policy/clipfrac"], 0.5)
    close(m["policy/seq_ratio_mean"], (1.105171 + 0.951229) / 2)
    loss.backward()
    # row 1: dL1/dlogp_t = -A1 * s1 / |y1| = 2 * 0.951229 / 2 on each of its 2 tokens, halved by the mean
    # over responses: 0.475615; row 0 and the padding token: 0
    close(logprobs.grad, [[0.0, 0.0, 0.0], [0.475615, 0.475615, 0.0]])


def test_gspo_on_one_token_responses_is_ppo():
    # A one-token response's sequence ratio is its token ratio: GSPO and PPO then agree, loss and gradient.
    g = torch.Generator().manual_seed(2)
    logprobs = torch.randn(6, 1, generator=g, dtype=torch.float64) * 0.3
    old = torch.randn(6, 1, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(6, 1, generator=g, dtype=torch.float64)
    mask = torch.ones(6, 1)
    a, b = logprobs.clone().requires_grad_(), logprobs.clone().requires_grad_()
    gspo, _ = gspo_policy_loss(a, old, adv, mask, clip_eps_low=0.1, clip_eps_high=0.15)
    ppo, _ = ppo_policy_loss(b, old, adv, mask, clip_eps=0.1, clip_eps_high=0.15)
    torch.testing.assert_close(gspo, ppo)
    gspo.backward()
    ppo.backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_value_loss_hand_worked():
    values = torch.tensor([[1.0, 0.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5]])
    returns = torch.tensor([[2.0, 0.0]])
    # clip 0.2:
    # t0: (1 - 2)^2 = 1; clipped value 0.7 -> (0.7 - 2)^2 = 1.69 -> 1.69
    # t1: (0 - 0)^2 = 0; clipped value 0.3 -> 0.09 -> 0.09
    # loss = 0.5 * (1.69 + 0.09) / 2 = 0.445, both tokens took the clipped error
    loss, m = value_loss(values, old, returns, torch.ones(1, 2), clip_eps=0.2)
    close(loss, 0.445)
    close(m["critic/value_loss"], 0.445)
    close(m["critic/clipfrac"], 1.0)
    loss.backward()
    # the clipped branch is flat in `values`: no gradient on either token
    close(values.grad, [[0.0, 0.0]])


def test_value_loss_inside_clip_and_unclipped():
    # |0.6 - 0.5| < 0.2: both errors are (0.6 - 1)^2 = 0.16, loss 0.5 * 0.16 = 0.08
    loss, m = value_loss(torch.tensor([[0.6]]), torch.tensor([[0.5]]), torch.tensor([[1.0]]), torch.ones(1, 1), 0.2)
    close(loss, 0.08)
    close(m["critic/clipfrac"], 0.0)
    # clip_eps=None: 0.5 * mean((1 - 2)^2, (0 - 0)^2) = 0.25
    values, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    loss, _ = value_loss(values, torch.zeros(1, 2), returns, torch.ones(1, 2), clip_eps=None)
    close(loss, 0.25)


def test_reinforce_policy_loss_hand_worked():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 0]])
    # -(1 * -1 + -1 * -2) / 2 = -(-1 + 2) / 2 = -0.5
    loss, m = reinforce_policy_loss(logprobs, adv, mask)
    close(loss, -0.5)
    assert math.isclose(float(m["policy/pg_loss"]), -0.5)
    loss.backward()
    # gradient -A / 2 on response tokens
    close(logprobs.grad, [[-0.5, 0.5, 0.0]])


def test_ppo_log_ratio_is_clamped_so_one_far_off_token_stays_finite():
    from rlhf_ray.algorithms.policy_loss import MAX_LOG_RATIO

    logprobs = torch.tensor([[-0.1, 0.0]], requires_grad=True)
    old = torch.tensor([[-200.0, 0.0]])  # log-ratio 199.9: exp() overflows float32 without the clamp
    loss, metrics = ppo_policy_loss(logprobs, old, torch.tensor([[-1.0, 1.0]]), torch.ones(1, 2), clip_eps=0.2)
    assert torch.isfinite(loss) and torch.isfinite(metrics["policy/approx_kl"])
    # The clamped ratio e^20 on the negative-advantage token: loss (e^20 * 1 + -(1 * 1)) / 2.
    assert float(loss) == pytest.approx((math.exp(MAX_LOG_RATIO) - 1.0) / 2, rel=1e-5)
    loss.backward()
    assert torch.isfinite(logprobs.grad).all()
