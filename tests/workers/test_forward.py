"""What the roles compute on rows: the response cut of generated tokens, dropout switched off."""

from __future__ import annotations

import torch

from rlhf_ray.models.forward import strip_response
from rlhf_ray.models.loading import disable_dropout, load_causal_lm, read_model_config

PAD, EOS = 0, 2  # the shipped tiny tokenizer's ids


def test_strip_response_keeps_a_sampled_pad_token_and_cuts_after_eos():
    # The model sampled the pad id mid-response: it is part of the response; only what follows EOS goes.
    assert strip_response([333, PAD, 504, EOS, PAD, PAD], EOS) == [333, PAD, 504, EOS]
    assert strip_response([333, PAD, 504], EOS) == [333, PAD, 504]  # cut at the length limit: kept whole
    assert strip_response([EOS, 5], EOS) == [EOS]
    assert strip_response([5, 2, 9], eos_id=2) == [5, 2]


def test_disable_dropout_makes_train_mode_deterministic_for_gpt2_and_llama():
    for preset, rates in (("tiny-gpt2", {"attn_pdrop": 0.3, "resid_pdrop": 0.3, "embd_pdrop": 0.3}),
                          ("tiny-llama", {"attention_dropout": 0.3})):
        config = read_model_config(preset)
        for key, value in rates.items():
            setattr(config, key, value)
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").train()
        ids = torch.randint(3, 500, (2, 12))
        with torch.no_grad():
            assert not torch.equal(model(ids).logits, model(ids).logits), preset  # dropout is on
            assert disable_dropout(model) > 0
            assert torch.equal(model(ids).logits, model(ids).logits), preset
            assert disable_dropout(model) == 0  # nothing left to turn off


def test_read_model_config_gives_positions_without_loading_weights():
    from rlhf_ray.models.loading import max_positions

    assert max_positions(read_model_config("tiny-gpt2")) == 256
    assert load_causal_lm("tiny-gpt2").config.n_positions == 256
