"""Bradley-Terry pairwise and InstructGPT K-way reward-model losses."""

import itertools

import pytest
import torch

from rlhf_ray.algorithms import pairwise_reward_loss, ranked_reward_loss

from tensor_helpers import close

torch.set_num_threads(1)


def test_pairwise_hand_worked():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # gaps [1, -1]: (log(1 + e^-1) + log(1 + e)) / 2 = (0.313262 + 1.313262) / 2 = 0.813262
    loss, m = pairwise_reward_loss(chosen, rejected)
    close(loss, 0.813262)
    close(m["rewards/accuracies"], 0.5)
    close(m["rewards/margins"], 0.0)
    close(m["rewards/chosen"], 1.0)
    # margin 1: gaps [0, -2]: (ln 2 + log(1 + e^2)) / 2 = (0.693147 + 2.126928) / 2 = 1.410038
    close(pairwise_reward_loss(chosen, rejected, margin=1.0)[0], 1.410038)
    close(pairwise_reward_loss(chosen, rejected, margin=torch.tensor([1.0, 1.0]))[0], 1.410038)


def test_ranked_hand_worked_one_prompt():
    rewards = torch.tensor([[3.0, 1.0, 2.0]])
    ranking = torch.tensor([[0, 2, 1]])  # best: response 0, then 2, then 1
    # pairs (0>2): gap 1, (0>1): gap 2, (2>1): gap 1
    # (0.313262 + 0.126928 + 0.313262) / 3 = 0.251150
    loss, m = ranked_reward_loss(rewards, ranking)
    close(loss, 0.251150)
    close(m["rewards/accuracies"], 1.0)
    close(m["rm/num_pairs"], 3.0)
    close(m["rewards/margins"], 4.0 / 3.0)
    # flat [P * K] rewards give the same loss
    close(ranked_reward_loss(rewards.flatten(), ranking)[0], 0.251150)


def test_ranked_weights_each_prompt_equally_with_padding():
    rewards = torch.tensor([[3.0, 1.0, 2.0], [0.0, 1.0, 9.0]])
    ranking = torch.tensor([[0, 2, 1], [0, 1, -1]])  # prompt 2 has two responses; slot 3 is padding
    # prompt 1: 0.251150 (3 pairs); prompt 2: one pair with gap 0 - 1 = -1 -> log(1 + e) = 1.313262
    # mean over prompts: (0.251150 + 1.313262) / 2 = 0.782206 (a mean over the 4 pairs would be 0.516678)
    loss, m = ranked_reward_loss(rewards, ranking)
    close(loss, 0.782206)
    close(m["rewards/accuracies"], 0.75)


def test_ranked_ties_form_no_pair_and_no_pairs_is_an_error():
    rewards = torch.tensor([[1.0, 5.0, 0.0]])
    # responses 0 and 1 tie: pairs (0>2): gap 1, (1>2): gap 5 -> (0.313262 + 0.006715) / 2 = 0.159988
    loss, m = ranked_reward_loss(rewards, torch.tensor([[0, 0, 1]]))
    close(loss, 0.159988)
    close(m["rm/num_pairs"], 2.0)
    with pytest.raises(ValueError, match="no ordered pair"):
        ranked_reward_loss(rewards, torch.tensor([[0, 0, 0]]))


@pytest.mark.parametrize("seed", [0, 1])
def test_ranked_equals_averaged_pairwise(seed):
    g = torch.Generator().manual_seed(seed)
    P, K = 4, 5
    rewards = torch.randn(P, K, generator=g, dtype=torch.float64)
    ranking = torch.stack([torch.randperm(K, generator=g) for _ in range(P)])
    per_prompt = []
    for p in range(P):
        pairs = [(i, j) for i, j in itertools.permutations(range(K), 2) if ranking[p, i] < ranking[p, j]]
        better = torch.stack([rewards[p, i] for i, _ in pairs])
        worse = torch.stack([rewards[p, j] for _, j in pairs])
        per_prompt.append(pairwise_reward_loss(better, worse)[0])
    expected = torch.stack(per_prompt).mean()
    torch.testing.assert_close(ranked_reward_loss(rewards, ranking)[0], expected)


def test_ranked_loss_with_a_margin_by_hand():
    # One pair, gap 1: without a margin -log sigmoid(1) = 0.313262; with margin 0.5, -log sigmoid(0.5) = 0.474077.
    rewards, ranking = torch.tensor([[1.0, 0.0]]), torch.tensor([[0, 1]])
    assert float(ranked_reward_loss(rewards, ranking)[0]) == pytest.approx(0.313262, abs=1e-6)
    loss, metrics = ranked_reward_loss(rewards, ranking, margin=0.5)
    assert float(loss) == pytest.approx(0.474077, abs=1e-6)
    assert float(metrics["rewards/margins"]) == pytest.approx(1.0)  # metrics read the plain gap
