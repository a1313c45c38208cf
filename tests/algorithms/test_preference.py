"""The DPO family: hand-worked values, invariants at policy == reference, gradients."""

import math

import pytest
import torch

from rlhf_ray.algorithms import (
    apo_zero_loss,
    dpo_loss,
    dpop_loss,
    ipo_loss,
    kto_loss,
    kto_reference_point,
    odpo_loss,
    robust_dpo_loss,
    simpo_loss,
    slic_loss,
    tdpo_loss,
    tdpo_sequential_kl,
)

from tensor_helpers import close

torch.set_num_threads(1)
LN2 = math.log(2.0)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


# One pair used by several tests: chosen log-ratio -1 - (-2) = 1, rejected -3 - (-2) = -1, delta = 2.
PAIR = dict(
    policy_chosen_logps=t(-1.0), policy_rejected_logps=t(-3.0), ref_chosen_logps=t(-2.0), ref_rejected_logps=t(-2.0)
)


def random_logps(seed, n=8):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=g, dtype=torch.float64) * 20 + 1) for _ in range(4)]


def test_dpo_hand_worked_and_metrics():
    # beta 0.1: logits 0.2, loss = -log sigmoid(0.2) = log(1 + e^-0.2) = 0.598139
    loss, m = dpo_loss(**PAIR, beta=0.1)
    close(loss, 0.598139)
    close(m["rewards/chosen"], 0.1)  # 0.1 * 1
    close(m["rewards/rejected"], -0.1)  # 0.1 * -1
    close(m["rewards/margins"], 0.2)
    close(m["rewards/accuracies"], 1.0)
    close(m["logps/chosen"], -1.0)
    # cDPO, ls 0.1: 0.9 * 0.598139 + 0.1 * log(1 + e^0.2) = 0.538325 + 0.079814 = 0.618139
    close(dpo_loss(**PAIR, beta=0.1, label_smoothing=0.1)[0], 0.618139)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pc, pr, rc, rr = random_logps(0)
    pc.requires_grad_()
    pr.requires_grad_()
    dpo_loss(pc, pr, rc, rr, beta=0.1)[0].backward()
    # gradient descent moves against the gradient: chosen up, rejected down
    assert (pc.grad < 0).all()
    assert (pr.grad > 0).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_losses_with_a_reference_at_policy_equal_reference(seed):
    chosen, rejected, _, _ = random_logps(seed)
    same = dict(policy_chosen_logps=chosen, policy_rejected_logps=rejected, ref_chosen_logps=chosen.clone(),
                ref_rejected_logps=rejected.clone())
    zero_kl = torch.zeros_like(chosen)
    # every log-ratio is 0, so delta = 0:
    close(dpo_loss(**same, beta=0.1)[0], LN2)  # -log sigmoid(0)
    close(dpo_loss(**same, beta=0.1, label_smoothing=0.2)[0], LN2)  # both terms are ln 2
    close(ipo_loss(**same, beta=0.1)[0], 25.0)  # (0 - 1/0.2)^2 = 25 = 1 / (4 beta^2)
    close(dpop_loss(**same, beta=0.1, lam=50.0)[0], LN2)  # the penalty max(0, 0) is 0
    close(robust_dpo_loss(**same, beta=0.1, epsilon=0.2)[0], LN2)  # ((0.8 - 0.2) ln 2) / 0.6
    close(odpo_loss(**same, beta=0.1, offset=1.0)[0], 1.313262)  # -log sigmoid(-1) = log(1 + e)
    for variant in (1, 2):
        close(tdpo_loss(**same, chosen_seq_kl=zero_kl, rejected_seq_kl=zero_kl, beta=0.1, variant=variant)[0], LN2)
    # KTO at z0 = 0: each example loses lambda * (1 - sigmoid(0)) = 0.5
    desirable = torch.arange(8) % 2 == 0
    close(kto_loss(chosen, chosen.clone(), desirable, 0.0, beta=0.1)[0], 0.5)


def test_apo_zero_hand_worked_anchors_each_side():
    # beta 0.5, chosen log-ratio 1, rejected -1: (1 - sigmoid(0.5)) + sigmoid(-0.5) = 0.377541 + 0.377541
    loss, m = apo_zero_loss(**PAIR, beta=0.5)
    close(loss, 0.755082)
    close(m["rewards/margins"], 1.0)  # 0.5 * (1 - -1)
    # Both log-ratios 2 lower, the same delta: DPO's loss does not change, APO-zero's rises because the
    # chosen response fell below the reference: (1 - sigmoid(-0.5)) + sigmoid(-1.5) = 0.622459 + 0.182426
    lower = dict(PAIR, policy_chosen_logps=t(-3.0), policy_rejected_logps=t(-5.0))
    close(apo_zero_loss(**lower, beta=0.5)[0], 0.804885)
    close(dpo_loss(**lower, beta=0.5)[0], dpo_loss(**PAIR, beta=0.5)[0])
    # at the reference: (1 - 1/2) + 1/2 = 1; the gradient raises the chosen and lowers the rejected log-prob
    pc, pr, rc, rr = random_logps(2)
    close(apo_zero_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1)[0], 1.0)
    pc.requires_grad_()
    pr.requires_grad_()
    apo_zero_loss(pc, pr, rc, rr, beta=0.1)[0].backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_ipo_hand_worked():
    # beta 0.5: (delta - 1/(2 * 0.5))^2 = (2 - 1)^2 = 1
    close(ipo_loss(**PAIR, beta=0.5)[0], 1.0)


def test_dpop_penalises_a_falling_chosen_logprob():
    # chosen fell below the reference by 1 (-3 vs -2), rejected log-ratio -5 - -4 = -1: delta = -1 - -1 = 0
    # penalty max(0, -2 - -3) = 1; beta 0.5, lam 2: logits 0.5 * (0 - 2) = -1 -> log(1 + e) = 1.313262
    args = dict(
        policy_chosen_logps=t(-3.0), policy_rejected_logps=t(-5.0), ref_chosen_logps=t(-2.0), ref_rejected_logps=t(-4.0)
    )
    loss, m = dpop_loss(**args, beta=0.5, lam=2.0)
    close(loss, 1.313262)
    close(m["dpop/penalty"], 1.0)
    close(dpo_loss(**args, beta=0.5)[0], LN2)  # plain DPO sees delta = 0 and does not mind


def test_dpop_equals_dpo_when_chosen_above_reference():
    pc, pr, rc, rr = random_logps(4)
    pc = rc + torch.rand_like(rc)  # policy chosen log-prob above the reference's
    torch.testing.assert_close(dpop_loss(pc, pr, rc, rr, beta=0.3, lam=50.0)[0], dpo_loss(pc, pr, rc, rr, beta=0.3)[0])


def test_dpop_has_dpo_gradient_where_the_policy_equals_its_reference():
    # The first step: policy and reference log-probs equal to the bit, the penalty at its kink.
    pc, pr, _, _ = random_logps(4)
    grads = []
    for loss_fn in (lambda c, r: dpop_loss(c, r, pc.detach(), pr.detach(), beta=0.1, lam=50.0)[0],
                    lambda c, r: dpo_loss(c, r, pc.detach(), pr.detach(), beta=0.1)[0]):
        c, r = pc.detach().clone().requires_grad_(), pr.detach().clone().requires_grad_()
        loss_fn(c, r).backward()
        grads.append((c.grad, r.grad))
    torch.testing.assert_close(grads[0], grads[1])


def test_robust_dpo_hand_worked_and_reduces_to_dpo():
    # beta 0.5, delta 2 -> x = 1, eps 0.1:
    # (0.9 * log(1 + e^-1) - 0.1 * log(1 + e)) / 0.8 = (0.281936 - 0.131326) / 0.8 = 0.188262
    close(robust_dpo_loss(**PAIR, beta=0.5, epsilon=0.1)[0], 0.188262)
    close(robust_dpo_loss(**PAIR, beta=0.5, epsilon=0.0)[0], dpo_loss(**PAIR, beta=0.5)[0])
    with pytest.raises(ValueError, match="epsilon"):
        robust_dpo_loss(**PAIR, beta=0.5, epsilon=0.5)


def test_odpo_hand_worked_with_per_pair_offsets():
    two = {k: torch.cat([v, v]) for k, v in PAIR.items()}
    # beta 0.5 -> beta * delta = 1; offsets [0, 1]:
    # pair 1: -log sigmoid(1) = 0.313262; pair 2: -log sigmoid(0) = ln 2; mean 0.503204
    close(odpo_loss(**two, beta=0.5, offset=t(0.0, 1.0))[0], 0.503204)
    close(odpo_loss(**PAIR, beta=0.5, offset=0.0)[0], dpo_loss(**PAIR, beta=0.5)[0])


def test_slic_hand_worked():
    pc, pr = t(-2.0), t(-2.5)
    # hinge max(0, 1 - (-2 - -2.5)) = 0.5; regulariser -0.5 * -2 = 1; total 1.5
    loss, m = slic_loss(pc, pr, delta=1.0, lam=0.5, policy_ref_sample_logps=pc)
    close(loss, 1.5)
    close(m["slic/hinge"], 0.5)
    close(slic_loss(pc, pr, delta=1.0)[0], 0.5)
    # a margin of 5 clears the hinge
    close(slic_loss(t(0.0), t(-5.0), delta=1.0)[0], 0.0)
    with pytest.raises(ValueError, match="policy_ref_sample_logps"):
        slic_loss(pc, pr, delta=1.0, lam=0.5)


def test_simpo_hand_worked():
    # chosen -6 over 3 tokens = -2, rejected -8 over 2 tokens = -4; beta 1, gamma 1:
    # -log sigmoid(-2 - -4 - 1) = -log sigmoid(1) = 0.313262
    loss, m = simpo_loss(t(-6.0), t(-8.0), t(3.0), t(2.0), beta=1.0, gamma=1.0)
    close(loss, 0.313262)
    close(m["rewards/chosen"], -2.0)
    close(m["rewards/rejected"], -4.0)


def test_tdpo_hand_worked_and_stop_gradient():
    # delta 2, KL chosen 0.5, rejected 1.5, beta 0.5
    # TDPO1: 0.5 * (2 - (1.5 - 0.5)) = 0.5 -> log(1 + e^-0.5) = 0.474077
    # TDPO2 (alpha 0.5): 0.5 * (2 - 0.5 * 1) = 0.75 -> log(1 + e^-0.75) = 0.386871
    for variant, expected in ((1, 0.474077), (2, 0.386871)):
        kl_c, kl_r = t(0.5).requires_grad_(), t(1.5).requires_grad_()
        loss, m = tdpo_loss(**PAIR, chosen_seq_kl=kl_c, rejected_seq_kl=kl_r, beta=0.5, alpha=0.5, variant=variant)
        close(loss, expected)
        close(m["tdpo/rejected_seq_kl"], 1.5)
        loss.backward()
        assert kl_r.grad is not None and kl_r.grad.item() != 0.0
        # TDPO2 stops the gradient through the chosen KL, TDPO1 does not
        assert (kl_c.grad is None or kl_c.grad.item() == 0.0) == (variant == 2)
    with pytest.raises(ValueError, match="variant"):
        tdpo_loss(**PAIR, chosen_seq_kl=t(0.0), rejected_seq_kl=t(0.0), beta=0.5, variant=3)


def test_tdpo_sequential_kl_hand_worked():
    ref = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))
    policy = torch.log(torch.tensor([[[0.25, 0.75], [0.1, 0.9]]]))
    # token 0: 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.346574 - 0.202733 = 0.143841; token 1 is masked
    close(tdpo_sequential_kl(policy, ref, torch.tensor([[1, 0]])), [0.143841])
    assert float(tdpo_sequential_kl(ref, ref, torch.ones(1, 2))) == pytest.approx(0.0, abs=1e-7)


def test_kto_hand_worked():
    policy, ref = t(-1.0, -3.0), t(-2.0, -2.0)  # log-ratios [1, -1]
    desirable = torch.tensor([True, False])
    # beta 1, z0 0.5:
    # desirable:   1 - sigmoid(1 - 0.5) = 1 - 0.622459 = 0.377541
    # undesirable: 1 - sigmoid(0.5 - -1) = 1 - 0.817574 = 0.182426; mean 0.279983
    loss, m = kto_loss(policy, ref, desirable, 0.5, beta=1.0)
    close(loss, 0.279983)
    close(m["rewards/chosen"], 1.0)
    close(m["rewards/rejected"], -1.0)
    close(m["kto/kl_reference_point"], 0.5)
    # lambda_u = 2 doubles the undesirable term: (0.377541 + 0.364851) / 2 = 0.371196
    close(kto_loss(policy, ref, desirable, 0.5, beta=1.0, lambda_u=2.0)[0], 0.371196)


def test_kto_reference_point_is_clamped_mean_without_gradient():
    policy = t(-1.0, -2.0).requires_grad_()
    # mean(-1 - -2, -2 - -2) = mean(1, 0) = 0.5
    z0 = kto_reference_point(policy, t(-2.0, -2.0))
    close(z0, 0.5)
    assert not z0.requires_grad
    # mean(-3 - -2) = -1, clamped to 0
    close(kto_reference_point(t(-3.0), t(-2.0)), 0.0)


def test_mismatched_shapes_are_reported():
    with pytest.raises(ValueError, match="ref_rejected_logps=\\(3,\\)"):
        dpo_loss(t(-1.0, -1.0), t(-1.0, -1.0), t(-1.0, -1.0), t(-1.0, -1.0, -1.0), beta=0.1)


def test_odpo_offsets_from_scores_by_hand():
    from rlhf_ray.algorithms.preference import odpo_offsets

    offsets = odpo_offsets(torch.tensor([1.25, 2.0, 0.0]), torch.tensor([0.25, 2.0, 1.0]), alpha=2.0)
    # 2 * log(1 + 1), 2 * log(1 + 0), and a negative gap asks for no margin either.
    assert torch.allclose(offsets, torch.tensor([2 * math.log(2.0), 0.0, 0.0]))
