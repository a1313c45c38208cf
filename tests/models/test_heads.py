"""The scalar-head model: last-token reading under both paddings, save/load
with the score bias, the critic initialised from a reward model, and a
reward model that learns a preference."""

import math

import pytest
import torch
from transformers import AutoModel

from rlhf_ray.models.heads import (
    ScalarHeadModel,
    is_scalar_head_checkpoint,
    last_token_indices,
    load_scalar_head_model,
)
from rlhf_ray.models.loading import load_causal_lm

TINY = ["tiny-gpt2", "tiny-llama"]
PAD = 0


def test_last_token_indices_hand_worked():
    # Right padded: last 1 at index 2; left padded: index 3; no padding: 3.
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert last_token_indices(mask).tolist() == [2, 3, 3, 0]


def test_last_token_indices_rejects_an_empty_row():
    with pytest.raises(ValueError, match=r"rows \[1\] have no tokens"):
        last_token_indices(torch.tensor([[1, 1], [0, 0]]))


@pytest.fixture(scope="module", params=TINY)
def head_model(request):
    return ScalarHeadModel.from_backbone(request.param, seed=3)


def _padded(rows, side):
    width = max(len(r) for r in rows)
    ids, mask = [], []
    for row in rows:
        pad = [PAD] * (width - len(row))
        ids.append(row + pad if side == "right" else pad + row)
        mask.append([1] * len(row) + [0] * len(pad) if side == "right" else [0] * len(pad) + [1] * len(row))
    return torch.tensor(ids), torch.tensor(mask)


def test_score_reads_the_last_real_token_under_left_and_right_padding(head_model):
    # Rows end in EOS (id 2), the pad id of GPT-2-style tokenizers; the mask, not
    # the ids, decides where a row ends.
    rows = [[1, 40, 41, 42, 2], [1, 50, 2], [1, 60, 61, 2]]
    with torch.no_grad():
        right = head_model.score(*_padded(rows, "right"))
        left = head_model.score(*_padded(rows, "left"))
        alone = torch.cat([head_model.score(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)) for r in rows])
    torch.testing.assert_close(right, left, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)
    assert right.shape == (3,) and right.dtype == torch.float32


def test_forward_gives_per_token_values_matching_the_score(head_model):
    ids, mask = _padded([[1, 40, 41, 2], [1, 50, 2]], "right")
    with torch.no_grad():
        values = head_model(ids, mask)
        scores = head_model.score(ids, mask)
    assert values.shape == ids.shape
    torch.testing.assert_close(scores, torch.stack([values[0, 3], values[1, 2]]))


def test_score_bias_is_subtracted_from_scores_not_values(head_model):
    ids, mask = _padded([[1, 40, 41, 2]], "right")
    with torch.no_grad():
        values, raw = head_model(ids, mask), head_model.score(ids, mask)
        head_model.set_score_bias(0.75)
        try:
            torch.testing.assert_close(head_model.score(ids, mask), raw - 0.75)
            torch.testing.assert_close(head_model(ids, mask), values)
        finally:
            head_model.set_score_bias(0.0)
    with pytest.raises(ValueError, match="finite"):
        head_model.set_score_bias(math.nan)


@pytest.mark.parametrize("name", TINY)
def test_save_and_reload_is_identical_and_keeps_the_bias(name, tmp_path):
    model = ScalarHeadModel.from_backbone(name, seed=5, score_bias=-1.25)
    ids, mask = _padded([[1, 40, 41, 42, 2], [1, 50, 2]], "left")
    with torch.no_grad():
        values, scores = model(ids, mask), model.score(ids, mask)
    model.save_pretrained(tmp_path)
    assert is_scalar_head_checkpoint(tmp_path)
    for reloaded in (ScalarHeadModel.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)):
        assert isinstance(reloaded, ScalarHeadModel)
        assert reloaded.score_bias == -1.25
        assert all(torch.equal(t, model.state_dict()[k]) for k, t in reloaded.state_dict().items())
        with torch.no_grad():
            # Same weights, same values up to the last bit of float32: weights
            # read from safetensors sit at another memory alignment, and the
            # BLAS kernel may then sum in another order.
            torch.testing.assert_close(reloaded(ids, mask), values, atol=1e-6, rtol=0)
            torch.testing.assert_close(reloaded.score(ids, mask), scores, atol=1e-6, rtol=0)


def test_from_backbone_keeps_the_lm_weights_and_seeds_the_head(tmp_path):
    lm = load_causal_lm("tiny-llama", seed=9)
    lm.save_pretrained(tmp_path)
    model = ScalarHeadModel.from_backbone(tmp_path, seed=1)
    lm_base = lm.base_model.state_dict()
    for key, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, lm_base[key]), key
    # Head init N(0, 1/(hidden+1)) and zero bias, the same for the same seed.
    again = ScalarHeadModel.from_backbone(tmp_path, seed=1)
    other = ScalarHeadModel.from_backbone(tmp_path, seed=2)
    assert torch.equal(model.value_head.weight, again.value_head.weight)
    assert not torch.equal(model.value_head.weight, other.value_head.weight)
    assert torch.count_nonzero(model.value_head.bias) == 0
    hidden = model.config.text_config.hidden_size
    assert 0.5 / math.sqrt(hidden + 1) < model.value_head.weight.std().item() < 2.0 / math.sqrt(hidden + 1)


def test_critic_initialised_from_a_reward_model_checkpoint(tmp_path):
    reward_model = ScalarHeadModel.from_backbone("tiny-gpt2", seed=11, score_bias=0.3)
    reward_model.save_pretrained(tmp_path / "rm")
    critic = load_scalar_head_model(tmp_path / "rm", gradient_checkpointing=True)
    assert torch.equal(critic.value_head.weight, reward_model.value_head.weight)
    assert critic.score_bias == 0.3
    assert any(getattr(m, "gradient_checkpointing", False) for m in critic.modules())
    # A causal-LM directory or a preset gets a new head instead.
    fresh = load_scalar_head_model("tiny-gpt2", seed=11)
    assert torch.equal(fresh.value_head.weight, reward_model.value_head.weight)
    assert fresh.score_bias == 0.0


def test_dtype_reaches_backbone_and_head_but_values_are_float32():
    model = ScalarHeadModel.from_backbone("tiny-llama", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = torch.tensor([[1, 40, 41, 2]])
    with torch.no_grad():
        assert model(ids, torch.ones_like(ids)).dtype == torch.float32


def test_a_reward_model_checkpoint_is_not_loaded_as_a_policy(tmp_path):
    ScalarHeadModel.from_backbone("tiny-gpt2").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"reward model or critic.*load_scalar_head_model"):
        load_causal_lm(tmp_path)


def test_missing_path_error_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a model preset"):
        load_scalar_head_model(tmp_path / "no" / "such" / "rm")


def test_a_reward_model_learns_a_preference():
    # Bradley-Terry loss -log sigmoid(r_chosen - r_rejected) on two pairs, chosen
    # right-padded and rejected left-padded: each margin grows by more than 1.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a second thread only waits on a busy two-core machine
    try:
        _train_reward_model_on_two_pairs()
    finally:
        torch.set_num_threads(threads)


def _train_reward_model_on_two_pairs():
    model = ScalarHeadModel.from_backbone("tiny-gpt2", seed=0)
    model.train()
    chosen_ids, chosen_mask = _padded([[1, 40, 41, 42, 2], [1, 70, 2]], "right")
    rejected_ids, rejected_mask = _padded([[1, 40, 41, 43, 2], [1, 71, 72, 2]], "left")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def margin():
        return model.score(chosen_ids, chosen_mask) - model.score(rejected_ids, rejected_mask)

    with torch.no_grad():
        start = margin()
    for _ in range(15):
        loss = -torch.nn.functional.logsigmoid(margin()).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        end = margin()
    assert bool((end > start + 1.0).all()), (start, end)
