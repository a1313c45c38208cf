"""Advantage estimators: hand-worked tiny tensors, and loop equivalences."""

import math

import pytest
import torch

from rlhf_ray.algorithms import (
    discounted_returns,
    gae,
    grpo_advantages,
    masked_mean,
    reinforce_pp_advantages,
    remax_advantages,
    rloo_advantages,
    whiten,
)

from tensor_helpers import close

torch.set_num_threads(1)


def test_masked_mean_divides_by_mask_sum_clamped_to_one():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    # (1 + 2 + 4) / 3 = 7/3
    close(masked_mean(x, mask), 7.0 / 3.0)
    # per row: (1 + 2) / 2 = 1.5 and 4 / 1 = 4
    close(masked_mean(x, mask, dim=1), [1.5, 4.0])
    # an all-false mask gives 0 / max(0, 1) = 0, not NaN
    close(masked_mean(x, torch.zeros_like(mask)), 0.0)
    # inf / NaN in padding is selected away, not multiplied by 0
    junk = torch.tensor([[1.0, float("inf")], [float("nan"), 3.0]])
    close(masked_mean(junk, torch.tensor([[1, 0], [0, 1]])), 2.0)


def test_whiten_uses_only_masked_positions():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # mean 2, population variance (1 + 0 + 1) / 3 = 2/3, 1 / sqrt(2/3) = 1.224745
    close(whiten(x, mask), [[-1.224745, 0.0, 1.224745, 0.0]])
    # shift_mean=False adds the mean 2 back; padding stays 0
    close(whiten(x, mask, shift_mean=False), [[0.775255, 2.0, 3.224745, 0.0]])


def test_gae_hand_worked():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.5, 0.5]])
    mask = torch.ones(1, 3)
    # gamma = 1, lam = 0.5, V after the last token = 0:
    # t=2: delta = 1 + 0 - 0.5 = 0.5, A2 = 0.5
    # t=1: delta = 0 + 0.5 - 0.5 = 0,  A1 = 0 + 0.5 * 0.5 = 0.25
    # t=0: delta = 0,                  A0 = 0.5 * 0.25 = 0.125
    # returns = A + V = [0.625, 0.75, 1.0]
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    close(adv, [[0.125, 0.25, 0.5]])
    close(ret, [[0.625, 0.75, 1.0]])


def test_gae_skips_padding_between_tokens():
    # Position 1 is padding with junk reward/value; it must not enter the recursion.
    rewards = torch.tensor([[0.0, 99.0, 1.0]])
    values = torch.tensor([[0.5, 99.0, 0.5]])
    mask = torch.tensor([[1, 0, 1]])
    # gamma = 0.9, lam = 1:
    # t=2: delta = 1 - 0.5 = 0.5, A2 = 0.5
    # t=0 bootstraps from t=2: delta = 0 + 0.9 * 0.5 - 0.5 = -0.05, A0 = -0.05 + 0.9 * 0.5 = 0.4
    # (with lam = 1, A0 = discounted return 0.9 * 1 - V0 0.5 = 0.4)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=1.0)
    close(adv, [[0.4, 0.0, 0.5]])
    close(ret, [[0.9, 0.0, 1.0]])


def _gae_loop(rewards, values, mask, gamma, lam):
    adv = [[0.0] * len(rewards[0]) for _ in rewards]
    for b in range(len(rewards)):
        idx = [t for t in range(len(rewards[b])) if mask[b][t]]
        running, next_v = 0.0, 0.0
        for t in reversed(idx):
            delta = rewards[b][t] + gamma * next_v - values[b][t]
            running = delta + gamma * lam * running
            adv[b][t] = running
            next_v = values[b][t]
    ret = [
        [(adv[b][t] + values[b][t]) if mask[b][t] else 0.0 for t in range(len(rewards[0]))]
        for b in range(len(rewards))
    ]
    return torch.tensor(adv), torch.tensor(ret)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_matches_python_loop_with_ragged_masks(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 9
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.35  # holes anywhere, not just right padding
    mask[0] = False  # an empty response
    mask[1] = True  # a full one
    gamma, lam = 0.97, 0.9
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = _gae_loop(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    torch.testing.assert_close(adv, ref_adv.to(adv.dtype))
    torch.testing.assert_close(ret, ref_ret.to(ret.dtype))


def test_discounted_returns_skip_padding():
    rewards = torch.tensor([[1.0, 5.0, 2.0]])
    mask = torch.tensor([[1, 0, 1]])
    # gamma = 0.5: G2 = 2, G1 masked = 0, G0 = 1 + 0.5 * 2 = 2
    close(discounted_returns(rewards, mask, 0.5), [[2.0, 0.0, 2.0]])


def test_remax_advantages_hand_worked():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # row 0: 1.0 - 0.25 = 0.75 on its two tokens; row 1: 0.5 - 0.5 = 0
    adv = remax_advantages(torch.tensor([1.0, 0.5]), torch.tensor([0.25, 0.5]), mask)
    close(adv, [[0.75, 0.75, 0.0], [0.0, 0.0, 0.0]])


def test_remax_advantages_of_per_token_returns_hand_worked():
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    # token rewards [[-0.1, 0.9, 0], [-0.2, 7, 0.5]] -> reward-to-go G_t = sum of rewards from t on, padding skipped:
    # row 0: [0.8, 0.9, 0]; row 1: [0.3, 0, 0.5]. Minus greedy 0.5 and 0.25: [[0.3, 0.4, 0], [0.05, 0, 0.25]]
    returns = discounted_returns(torch.tensor([[-0.1, 0.9, 0.0], [-0.2, 7.0, 0.5]]), mask, 1.0)
    close(returns, [[0.8, 0.9, 0.0], [0.3, 0.0, 0.5]])
    close(remax_advantages(returns, torch.tensor([0.5, 0.25]), mask), [[0.3, 0.4, 0.0], [0.05, 0.0, 0.25]])
    with pytest.raises(ValueError, match="sampled_returns must have the shape of response_mask"):
        remax_advantages(torch.zeros(2, 4), torch.zeros(2), mask)


def test_remax_advantages_zero_when_greedy_equals_sample():
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(7, generator=g)
    mask = torch.rand(7, 5, generator=g) > 0.3
    assert torch.equal(remax_advantages(rewards, rewards.clone(), mask), torch.zeros(7, 5))


def test_grpo_advantages_hand_worked():
    mask = torch.ones(4, 2)
    rewards = torch.tensor([1.0, 3.0, 5.0, 5.0])
    # group 1: mean 2, sample std sqrt(((-1)^2 + 1^2) / 1) = sqrt(2) -> -+1/sqrt(2) = -+0.707107
    # group 2: mean 5, std 0 -> 0 / (0 + eps) = 0
    adv = grpo_advantages(rewards, group_size=2, response_mask=mask)
    close(adv[:, 0], [-0.707107, 0.707107, 0.0, 0.0])
    close(adv[:, 1], adv[:, 0])
    # without the std: r - mean = [-1, 1, 0, 0]
    close(grpo_advantages(rewards, 2, mask, scale_by_std=False)[:, 0], [-1.0, 1.0, 0.0, 0.0])
    # group of 3: [0, 1, 2] has mean 1 and sample std 1 -> [-1, 0, 1]; masked tail stays 0
    adv3 = grpo_advantages(torch.tensor([0.0, 1.0, 2.0]), 3, torch.tensor([[1, 0], [1, 1], [1, 1]]))
    close(adv3, [[-1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])


def test_grouped_estimators_reject_bad_groups():
    mask = torch.ones(6, 2)
    with pytest.raises(ValueError, match="not a multiple of group_size=4"):
        grpo_advantages(torch.zeros(6), 4, mask)
    with pytest.raises(ValueError, match="at least 2 samples"):
        rloo_advantages(torch.zeros(6), 1, mask)


def test_rloo_advantages_hand_worked():
    # k = 3, rewards [0, 3, 6]: leave-one-out baselines (3+6)/2 = 4.5, (0+6)/2 = 3, (0+3)/2 = 1.5
    adv = rloo_advantages(torch.tensor([0.0, 3.0, 6.0]), 3, torch.ones(3, 2))
    close(adv[:, 0], [-4.5, 0.0, 4.5])
    # equivalently k/(k-1) * (r - mean): 1.5 * ([0, 3, 6] - 3)
    close(adv[:, 1], 1.5 * (torch.tensor([0.0, 3.0, 6.0]) - 3.0))


def test_reinforce_pp_advantages_hand_worked():
    rewards = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    # gamma = 1 returns-to-go: [[1, 1], [2, -]]; batch mean 4/3, variance 2/9, std 0.471405
    # (1 - 4/3) / 0.471405 = -0.707107, (2 - 4/3) / 0.471405 = 1.414214
    adv = reinforce_pp_advantages(rewards, mask, gamma=1.0)
    close(adv, [[-0.707107, -0.707107], [1.414214, 0.0]])
    assert math.isclose(float(masked_mean(adv, mask)), 0.0, abs_tol=1e-6)


def test_aggregation_weights_by_hand():
    from rlhf_ray.algorithms.advantages import aggregation_weights

    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    values = torch.tensor([[1.0, 1.0, 1.0, 1.0], [5.0, 9.0, 9.0, 9.0], [7.0, 7.0, 7.0, 7.0]])
    tokens = aggregation_weights(mask, "token-mean")
    assert float(tokens.sum()) == 5 and float(masked_mean(values, tokens)) == pytest.approx((4 + 5) / 5)
    sequences = aggregation_weights(mask, "seq-mean-token-mean")
    # Row means 1 and 5 (the empty row weighs nothing): (1 + 5) / 2.
    assert float(sequences.sum()) == 2 and float(masked_mean(values, sequences)) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="loss aggregation 'sum'"):
        aggregation_weights(mask, "sum")


def test_aggregation_denominators_by_hand():
    from rlhf_ray.algorithms.advantages import aggregation_denominator, aggregation_weights

    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    values = torch.tensor([[1.0, 1.0, 1.0, 1.0], [5.0, 9.0, 9.0, 9.0], [7.0, 7.0, 7.0, 7.0]])
    assert aggregation_denominator(mask, "token-mean") == 5  # tokens
    assert aggregation_denominator(mask, "seq-mean-token-mean") == 2  # non-empty sequences
    # Dr. GRPO: 3 rows x a constant length of 8, whatever the rows hold. Token weights are 1, so the
    # minibatch loss sum(w * x) / denominator is (1 + 1 + 1 + 1 + 5) / 24 = 0.375: each row's token sum
    # over 8 (4/8 and 5/8, and 0 for the empty row), averaged over the 3 rows.
    weights = aggregation_weights(mask, "seq-mean-token-sum-norm")
    denominator = aggregation_denominator(mask, "seq-mean-token-sum-norm", max_length=8)
    assert torch.equal(weights, mask.float()) and denominator == 24
    assert float((weights * values).sum()) / denominator == pytest.approx(0.375)
    with pytest.raises(ValueError, match="needs max_length >= 1"):
        aggregation_denominator(mask, "seq-mean-token-sum-norm")


def test_constant_length_aggregation_does_not_depend_on_the_micro_batch_split():
    # The worker's share of a micro-batch is masked_mean(x, w) * w.sum() / denominator (TrainEngine.global_loss
    # without the accumulation factor): summed over any split it is the whole minibatch's sum(w * x) / (B * L).
    from rlhf_ray.algorithms.advantages import aggregation_denominator, aggregation_weights

    g = torch.Generator().manual_seed(5)
    mask = torch.rand(6, 5, generator=g) > 0.4
    values = torch.randn(6, 5, generator=g)
    denominator = aggregation_denominator(mask, "seq-mean-token-sum-norm", max_length=5)
    whole = float((values * mask).sum()) / 30
    for split in ([6], [3, 3], [1, 2, 3]):
        total, start = 0.0, 0
        for size in split:
            w = aggregation_weights(mask[start:start + size], "seq-mean-token-sum-norm")
            total += float(masked_mean(values[start:start + size], w)) * float(w.sum()) / denominator
            start += size
        assert total == pytest.approx(whole, abs=1e-6), split


def test_informative_groups_by_hand():
    from rlhf_ray.algorithms import informative_groups

    # groups of 2: [1, 1] all right, [0, 1] a spread, [0, 0] all wrong, [0.5, 0.25] a spread
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.25])
    assert informative_groups(rewards, 2).tolist() == [False, True, False, True]
    # the same rewards as groups of 4: [1, 1, 0, 1] and [0, 0, 0.5, 0.25] both have a spread
    assert informative_groups(rewards, 4).tolist() == [True, True]
    # where a group has no spread its GRPO advantages are zero: the group teaches nothing
    adv = grpo_advantages(rewards, 2, torch.ones(8, 3))
    assert torch.all(adv.view(4, 2, 3)[~informative_groups(rewards, 2)] == 0)
    with pytest.raises(ValueError, match="not a multiple of group_size=3"):
        informative_groups(rewards, 3)
