"""Shared prefixes: the rollout rows of one prompt scored by one packed forward give the log-probs,
entropies, losses and gradients of the plain `[B, P + R]` forward, to float rounding."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.algorithms.registry import get_online_algorithm
from rlhf_ray.algorithms.steps import PolicyStep
from rlhf_ray.models import forward as fw
from rlhf_ray.models.loading import load_causal_lm
from rlhf_ray.workers.policy import online_loss

P, R = 7, 5


def _model(preset: str, attention: str = "sdpa"):
    model = load_causal_lm(preset)
    model.config._attn_implementation = attention
    return model.float().train()


def _rollout(prompt_rows=(0, 0, 1, 2, 1, 1, 0, 2)):
    """Rows in the rollout layout: three prompts (two left-padded) repeated out of order, responses
    right-padded (one empty)."""
    torch.manual_seed(1)
    prompts = torch.randint(3, 400, (3, P))
    prompt_mask = torch.ones(3, P, dtype=torch.long)
    prompt_mask[1, :3] = 0
    prompt_mask[2, :1] = 0
    which = torch.tensor(prompt_rows)
    rows = len(which)
    ids = torch.cat([prompts[which], torch.randint(3, 400, (rows, R))], 1)
    mask = torch.cat([prompt_mask[which], torch.ones(rows, R, dtype=torch.long)], 1)
    for row, length in ((1, 3), (4, 1), (5, 0)):
        if row < rows:
            mask[row, P + length:] = 0
    return ids, mask


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _scored(model, ids, mask, shared):
    model.zero_grad()
    out = fw.response_logprobs(model, ids, mask, R, temperature=0.7, with_entropy=True, shared_prefix=shared)
    (out["logprobs"] * mask[:, P:]).mean().backward()
    return out, _grads(model)


@pytest.mark.parametrize("preset, attention", [("tiny-llama", "sdpa"), ("tiny-llama", "eager"),
                                               ("small-llama", "sdpa")])
def test_packed_log_probs_entropy_and_gradients_equal_the_plain_forward(preset, attention):
    model = _model(preset, attention)
    ids, mask = _rollout()
    assert fw.prompt_groups(ids, mask, P) == [[0, 1, 6], [2, 4, 5], [3, 7]]
    plain, plain_grads = _scored(model, ids, mask, shared=False)
    shared, shared_grads = _scored(model, ids, mask, shared=True)
    # Every position, padding included: a padded response token sees what it sees in its own row.
    torch.testing.assert_close(shared["logprobs"], plain["logprobs"], atol=1e-5, rtol=0)
    torch.testing.assert_close(shared["entropy"], plain["entropy"], atol=1e-5, rtol=0)
    assert plain_grads.keys() == shared_grads.keys() and len(plain_grads) == len(list(model.parameters()))
    for name in plain_grads:
        torch.testing.assert_close(shared_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_the_packed_forward_runs_the_prompt_once_per_group(monkeypatch):
    model = _model("tiny-llama")
    ids, mask = _rollout()
    seen = []
    original = model.forward

    def forward(*args, **kwargs):
        seen.append((tuple(kwargs["input_ids"].shape), kwargs["attention_mask"].dim(), kwargs.get("logits_to_keep")))
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    with torch.no_grad():
        fw.response_logprobs(model, ids, mask, R, shared_prefix=True)
    (shape, mask_dims, keep), = seen
    assert shape == (3, P + 3 * R) and mask_dims == 4  # 3 prompts, the largest group has 3 responses
    assert keep.tolist() == [P - 1] + [P + j * R + t for j in range(3) for t in range(R - 1)]


def test_the_online_loss_and_its_gradients_are_the_same_with_shared_prefixes():
    model = _model("tiny-llama")
    ids, mask = _rollout()
    torch.manual_seed(2)
    mb = {"input_ids": ids, "attention_mask": mask, "response_mask": mask[:, P:].float(),
          "advantages": torch.randn(len(ids), R), "ref_logprobs": -torch.rand(len(ids), R),
          "old_logprobs": -torch.rand(len(ids), R)}
    step = PolicyStep(get_online_algorithm("grpo"), clip_eps=0.2, clip_eps_high=0.28, kl_coef=0.05,
                      kl_estimator="k3", temperature=0.9)
    results = []
    for shared in (False, True):
        model.zero_grad()
        loss, metrics = online_loss(step, shared_prefix=shared)(model, mb)
        loss.backward()
        results.append((loss.detach(), metrics, _grads(model)))
    (plain_loss, plain_metrics, plain_grads), (loss, metrics, grads) = results
    torch.testing.assert_close(loss, plain_loss, atol=1e-6, rtol=1e-5)
    for key in plain_metrics:
        torch.testing.assert_close(metrics[key], plain_metrics[key], atol=1e-5, rtol=1e-5, msg=key)
    for name in plain_grads:
        torch.testing.assert_close(grads[name], plain_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_a_lora_policy_and_its_disabled_adapter_base_score_alike_packed_and_plain():
    from rlhf_ray.config.schema import LoraConfig
    from rlhf_ray.models.lora import apply_lora

    model = apply_lora(_model("tiny-llama"), LoraConfig(rank=4))
    for name, p in model.named_parameters():  # a trained adapter, not a zero one
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    assert fw.shared_prefix_supported(model)
    ids, mask = _rollout()
    plain, plain_grads = _scored(model, ids, mask, shared=False)
    shared, shared_grads = _scored(model, ids, mask, shared=True)
    torch.testing.assert_close(shared["logprobs"], plain["logprobs"], atol=1e-5, rtol=0)
    assert plain_grads and plain_grads.keys() == shared_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(shared_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    with torch.no_grad(), model.disable_adapter():
        base_plain = fw.response_logprobs(model, ids, mask, R)["logprobs"]
        base_shared = fw.response_logprobs(model, ids, mask, R, shared_prefix=True)["logprobs"]
    torch.testing.assert_close(base_shared, base_plain, atol=1e-5, rtol=0)
    assert not torch.allclose(base_plain, plain["logprobs"])  # the adapter was really off


def _packed_calls(monkeypatch) -> list:
    calls = []
    original = fw.packed_response_logits
    monkeypatch.setattr(fw, "packed_response_logits", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_gpt2_and_flash_attention_take_the_plain_forward(monkeypatch):
    calls = _packed_calls(monkeypatch)
    ids, mask = _rollout()
    gpt2 = load_causal_lm("tiny-gpt2")
    assert not fw.shared_prefix_supported(gpt2)
    with torch.no_grad():
        torch.testing.assert_close(fw.response_logprobs(gpt2, ids, mask, R, shared_prefix=True)["logprobs"],
                                   fw.response_logprobs(gpt2, ids, mask, R)["logprobs"], atol=0, rtol=0)
    llama = _model("tiny-llama")
    llama.config._attn_implementation = "flash_attention_2"
    assert not fw.shared_prefix_supported(llama)
    assert calls == []


def test_rows_without_a_repeated_prompt_take_the_plain_forward(monkeypatch):
    calls = _packed_calls(monkeypatch)
    model = _model("tiny-llama")
    ids, mask = _rollout((0, 1, 2))
    with torch.no_grad():
        fw.response_logprobs(model, ids, mask, R, shared_prefix=True)
        fw.response_logprobs(model, ids[:1], mask[:1], R, shared_prefix=True)
        assert calls == []
        fw.response_logprobs(model, *_rollout((0, 0)), R, shared_prefix=True)
    assert calls == [1]


def _pairs():
    """Right-padded pairs of one length T: chosen and rejected share the prompt (the tokens before the first
    marked one), except the last pair, whose rejected prompt differs; responses of different lengths."""
    torch.manual_seed(3)
    T, prompts, responses = 14, (4, 6, 3, 5), ((5, 2), (3, 8), (1, 11), (4, 4))
    batch = {f"{side}_{k}": torch.zeros(len(prompts), T, dtype=torch.long) for side in ("chosen", "rejected")
             for k in ("input_ids", "attention_mask", "loss_mask")}
    for i, (length, pair) in enumerate(zip(prompts, responses)):
        prompt = torch.randint(3, 400, (length,))
        for side, response in zip(("chosen", "rejected"), pair):
            ids = torch.cat([prompt, torch.randint(3, 400, (response,))])
            if side == "rejected" and i == len(prompts) - 1:
                ids[0] += 1
            batch[f"{side}_input_ids"][i, :len(ids)] = ids
            batch[f"{side}_attention_mask"][i, :len(ids)] = 1
            batch[f"{side}_loss_mask"][i, length:len(ids)] = 1
    return batch


@pytest.mark.parametrize("preset", ["tiny-llama", "small-llama"])
def test_packed_pairs_give_the_plain_pair_log_probs_and_gradients(preset, monkeypatch):
    calls = _packed_calls(monkeypatch)
    model = _model(preset)
    batch = _pairs()
    results = []
    for shared in (False, True):
        model.zero_grad()
        stats = fw.pair_logps(model, batch, shared_prefix=shared)
        (stats["chosen_logps"] - 0.7 * stats["rejected_logps"]).mean().backward()
        results.append((stats, _grads(model)))
    assert calls == [1]
    (plain, plain_grads), (shared, shared_grads) = results
    assert plain.keys() == shared.keys()
    for key in plain:
        torch.testing.assert_close(shared[key], plain[key], atol=1e-5, rtol=1e-6, msg=key)
    for name in plain_grads:
        torch.testing.assert_close(shared_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_pairs_take_the_plain_forward_for_tdpo_and_unmarked_rows(monkeypatch):
    calls = _packed_calls(monkeypatch)
    model = _model("tiny-llama")
    batch = _pairs()
    with torch.no_grad():
        vocab = fw.pair_logps(model, batch, vocab=True, shared_prefix=True)
        assert "chosen_vocab_logps" in vocab and calls == []
        batch["rejected_loss_mask"][1] = 0  # a row without a marked token
        assert fw.shared_sequence_logps(model, torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]),
                                        torch.cat([batch["chosen_attention_mask"],
                                                   batch["rejected_attention_mask"]]),
                                        torch.cat([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])) is None
    assert calls == []


def test_needed_rollout_tokens_count_a_shared_prompt_once_and_no_padding():
    ids = torch.tensor([[0, 5, 6, 7, 8], [0, 5, 6, 9, 0], [4, 5, 6, 7, 7]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    # rows 0 and 1 share the prompt [5, 6] (2 tokens once), row 2 has [4, 5, 6]; responses 2 + 1 + 2
    assert fw.needed_rollout_tokens(ids, mask, response_length=2) == 2 + 3 + 5
    assert fw.needed_prompt_tokens(ids, mask, response_length=2) == 2 + 3  # what prefill computes


def test_needed_pair_tokens_count_the_prompt_a_pair_shares_once():
    batch = {"chosen_input_ids": torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]]),
             "rejected_input_ids": torch.tensor([[1, 2, 5, 0], [9, 2, 5, 0]]),
             "chosen_attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1]]),
             "rejected_attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]]),
             "chosen_loss_mask": torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]]),
             "rejected_loss_mask": torch.tensor([[0, 0, 1, 0], [0, 0, 1, 0]])}
    # pair 0 shares its 2-token prompt; pair 1's prompts differ, so both are counted
    assert fw.needed_pair_tokens(batch) == (4 + 3 - 2) + (4 + 3)
