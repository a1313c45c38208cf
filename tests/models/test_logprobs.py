"""Log-prob, entropy and KL helpers: hand-worked tiny cases, equivalence with
the direct ``log_softmax`` computations, and the model-level helper."""

import math

import pytest
import torch

from rlhf_ray.models.logprobs import (
    entropy_from_logits,
    gather_logprobs,
    position_ids_from_mask,
    sequence_kl,
    sequence_lengths,
    sequence_logprobs,
    shift_for_next_token,
    token_kl,
    token_logprobs,
)

LN = math.log


def test_gather_logprobs_hand_worked():
    # Row 0: logits [0, ln 3] -> probs [1/4, 3/4]; label 1 -> ln(3/4).
    # Row 1: logits [0, ln 2, 0] padded with -inf is awkward, so use a
    # separate 3-way case below; here logits [ln 2, ln 2] -> [1/2, 1/2].
    logits = torch.tensor([[[0.0, LN(3)], [LN(2), LN(2)]]])
    labels = torch.tensor([[1, 0]])
    expected = torch.tensor([[LN(3 / 4), LN(1 / 2)]])
    torch.testing.assert_close(gather_logprobs(logits, labels), expected)
    # Three-way: logits [0, ln 2, 0] -> probs [1/4, 1/2, 1/4].
    logits3 = torch.tensor([[0.0, LN(2), 0.0]])
    torch.testing.assert_close(gather_logprobs(logits3, torch.tensor([2])), torch.tensor([LN(1 / 4)]))


def test_gather_logprobs_equals_log_softmax_gather():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=generator) * 4
    labels = torch.randint(0, 11, (3, 5), generator=generator)
    direct = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(gather_logprobs(logits, labels), direct)


def test_gather_logprobs_gradient_equals_direct_gradient():
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(2, 4, 7, generator=generator)
    labels = torch.randint(0, 7, (2, 4), generator=generator)
    weights = torch.randn(2, 4, generator=generator)
    ours, direct = base.clone().requires_grad_(), base.clone().requires_grad_()
    (gather_logprobs(ours, labels) * weights).sum().backward()
    (torch.log_softmax(direct, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1) * weights).sum().backward()
    torch.testing.assert_close(ours.grad, direct.grad)


def test_gather_logprobs_upcasts_bf16_to_float32():
    generator = torch.Generator().manual_seed(2)
    logits = (torch.randn(2, 3, 9, generator=generator) * 3).bfloat16()
    labels = torch.randint(0, 9, (2, 3), generator=generator)
    out = gather_logprobs(logits, labels)
    assert out.dtype == torch.float32
    direct = torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out, direct)


def test_gather_logprobs_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="labels shape"):
        gather_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


def test_entropy_hand_worked():
    # Uniform over 4 tokens: H = ln 4. Probs [1/4, 3/4]: H = -(1/4 ln 1/4 + 3/4 ln 3/4) ~ 0.5623.
    uniform = torch.zeros(1, 1, 4)
    two_way = torch.tensor([[[0.0, LN(3), -float("inf"), -float("inf")]]])
    logits = torch.cat([uniform, two_way], dim=1)
    expected = torch.tensor([[LN(4), -(0.25 * LN(0.25) + 0.75 * LN(0.75))]])
    torch.testing.assert_close(entropy_from_logits(logits), expected)


def test_entropy_equals_direct_computation():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, 13, generator=generator) * 2
    logp = torch.log_softmax(logits, -1)
    direct = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(entropy_from_logits(logits), direct)
    torch.testing.assert_close(entropy_from_logits(logits[0]), direct[0])


def test_token_kl_hand_worked():
    # ref [1/2, 1/2], policy [1/4, 3/4]:
    # KL(ref || policy) = 1/2 ln(2) + 1/2 ln(2/3) = 1/2 ln(4/3) ~ 0.1438.
    ref = torch.tensor([[[0.0, 0.0]]])
    policy = torch.tensor([[[0.0, LN(3)]]])
    torch.testing.assert_close(token_kl(policy, ref), torch.tensor([[0.5 * LN(4 / 3)]]))


def test_sequence_kl_equals_direct_sum_over_response_tokens():
    generator = torch.Generator().manual_seed(4)
    policy = torch.randn(3, 5, 8, generator=generator)
    ref = torch.randn(3, 5, 8, generator=generator)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 1, 0]])
    ref_logp, policy_logp = torch.log_softmax(ref, -1), torch.log_softmax(policy, -1)
    per_token = (ref_logp.exp() * (ref_logp - policy_logp)).sum(-1)
    expected = (per_token * mask).sum(-1)
    torch.testing.assert_close(sequence_kl(policy, ref, mask), expected)
    assert bool((per_token >= 0).all())


def test_sequence_kl_is_zero_for_equal_logits_and_flows_into_policy():
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 4, 6, generator=generator)
    mask = torch.ones(2, 4)
    policy = logits.clone().requires_grad_()
    kl = sequence_kl(policy, logits, mask)
    torch.testing.assert_close(kl, torch.zeros(2), atol=1e-6, rtol=0)
    kl.sum().backward()
    # At the minimum the gradient p_policy - p_ref vanishes.
    torch.testing.assert_close(policy.grad, torch.zeros_like(policy), atol=1e-6, rtol=0)


def test_shift_for_next_token():
    # Tokens [p1 p2 r1 r2], response mask [0 0 1 1]: logits at t=0,1,2 predict
    # p2, r1, r2, of which r1 and r2 count.
    input_ids = torch.tensor([[11, 12, 21, 22]])
    loss_mask = torch.tensor([[0, 0, 1, 1]])
    labels, mask = shift_for_next_token(input_ids, loss_mask)
    assert labels.tolist() == [[12, 21, 22]]
    assert mask.tolist() == [[0, 1, 1]]


def test_position_ids_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


def test_sequence_logprobs_sum_average_and_lengths():
    token_lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -4.0]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    # Row 0: -2 + -3 = -5 over 2 tokens; row 1: -0.5 + -0.5 = -1 over 2 tokens.
    assert sequence_logprobs(token_lp, mask).tolist() == [-5.0, -1.0]
    assert sequence_logprobs(token_lp, mask, average=True).tolist() == [-2.5, -0.5]
    assert sequence_lengths(mask).tolist() == [2, 2]
    empty = torch.zeros(1, 3)
    assert sequence_logprobs(token_lp[:1], empty, average=True).tolist() == [0.0]


@pytest.fixture(scope="module")
def tiny_lm():
    from rlhf_ray.models.loading import load_causal_lm

    torch.manual_seed(0)
    return load_causal_lm("tiny-llama", seed=3)


def test_token_logprobs_equals_direct_computation(tiny_lm):
    input_ids = torch.tensor([[5, 17, 42, 99, 7], [8, 9, 10, 11, 12]])
    mask = torch.ones_like(input_ids)
    logits = tiny_lm(input_ids=input_ids, attention_mask=mask).logits
    direct = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    lp, entropy = token_logprobs(tiny_lm, input_ids, mask, return_entropy=True)
    torch.testing.assert_close(lp, direct, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, entropy_from_logits(logits[:, :-1]), atol=1e-5, rtol=1e-5)
    hot = torch.log_softmax(logits[:, :-1] / 0.7, -1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(token_logprobs(tiny_lm, input_ids, mask, temperature=0.7), hot, atol=1e-5, rtol=1e-5)


def test_token_logprobs_same_under_left_and_right_padding(tiny_lm):
    tokens = [30, 31, 32]
    right = torch.tensor([[40, 41, 42, 43, 44], tokens + [0, 0]])
    right_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    left = torch.tensor([[40, 41, 42, 43, 44], [0, 0] + tokens])
    left_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    from_right = token_logprobs(tiny_lm, right, right_mask)
    from_left = token_logprobs(tiny_lm, left, left_mask)
    torch.testing.assert_close(from_right[1, :2], from_left[1, 2:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_right[0], from_left[0], atol=1e-5, rtol=1e-5)


def test_token_logprobs_rejects_bad_temperature(tiny_lm):
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(tiny_lm, ids, torch.ones_like(ids), temperature=0.0)


def test_kl_with_masked_tokens_stays_finite():
    # A token masked out (-inf) in both distributions contributes 0:
    # ref [1/2, 1/2, 0], policy [1/4, 3/4, 0] -> 1/2 ln(4/3) as in the 2-token case.
    ref = torch.tensor([[[0.0, 0.0, -float("inf")]]])
    policy = torch.tensor([[[0.0, LN(3), -float("inf")]]])
    torch.testing.assert_close(token_kl(policy, ref), torch.tensor([[0.5 * LN(4 / 3)]]))
