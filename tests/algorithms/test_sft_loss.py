"""SFT and KL-regularised SFT losses."""

import torch

from rlhf_ray.algorithms import kl_sft_loss, sft_loss

from tensor_helpers import close

torch.set_num_threads(1)


def test_sft_loss_hand_worked():
    logprobs = torch.tensor([[-1.0, -2.0, -9.0]])
    # the third token is a prompt/padding token: -(-1 - 2) / 2 = 1.5
    loss, m = sft_loss(logprobs, torch.tensor([[1, 1, 0]]))
    close(loss, 1.5)
    close(m["sft/num_tokens"], 2.0)


def test_kl_sft_loss_hand_worked_and_two_sided():
    logprobs = torch.tensor([[-1.0, -2.0, -9.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    # nll 1.5; k2 per token: 0.5 * (0.5)^2 = 0.125 and 0.5 * (-1)^2 = 0.5 -> mean 0.3125; kl_coef 1 -> 1.8125
    loss, m = kl_sft_loss(logprobs, ref, mask, kl_coef=1.0)
    close(loss, 1.8125)
    close(m["sft/kl"], 0.3125)
    loss.backward()
    # d/dlogp: NLL -1/2, penalty (logp - ref)/2: token 0 above ref: -0.5 + 0.25 = -0.25;
    # token 1 below ref: -0.5 - 0.5 = -1.0 (the penalty pulls both towards the reference)
    close(logprobs.grad, [[-0.25, -1.0, 0.0]])


def test_kl_sft_equals_sft_at_reference():
    logprobs = torch.tensor([[-1.0, -2.0]])
    mask = torch.ones(1, 2)
    close(kl_sft_loss(logprobs, logprobs.clone(), mask, kl_coef=5.0)[0], sft_loss(logprobs, mask)[0])
