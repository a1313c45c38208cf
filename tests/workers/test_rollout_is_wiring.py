"""The policy's online loss against an engine made to disagree on purpose (a perturbed copy of the weights):
the gradients of `none`, `tis` and `mis` are the formulas', whether PPO's old log-probs come from a scoring
forward or from the training forward itself; at identical weights every weight is 1.

In-process (no Ray, no DeepSpeed) on the shipped tiny model; the Ray/DeepSpeed step around the same loss
function is checked against a hand gradient in test_rl_wiring.py."""

from __future__ import annotations

import copy

import pytest
import torch

from rlhf_ray.algorithms.advantages import masked_mean
from rlhf_ray.algorithms.registry import get_online_algorithm
from rlhf_ray.algorithms.rollout_is import SUM_PREFIX, mismatch_metrics
from rlhf_ray.models.loading import disable_dropout, load_causal_lm
from rlhf_ray.models.tokenizer import load_tokenizer
from rlhf_ray.workers import forward as fw
from rlhf_ray.workers.policy import online_loss

ROWS, PROMPT, RESPONSE, CAP = 8, 5, 6, 1.2


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    policy = load_causal_lm("tiny-gpt2", dtype="float32", seed=0, tokenizer=load_tokenizer("tiny"))
    disable_dropout(policy)
    engine = copy.deepcopy(policy)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the engine's copy of the weights, off by a little everywhere
        for p in engine.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return policy, engine


def _rows() -> dict:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 1000, (ROWS, PROMPT + RESPONSE), generator=g)
    lengths = torch.tensor([1, 6, 2, 5, 3, 6, 4, 2])
    response_mask = (torch.arange(RESPONSE)[None, :] < lengths[:, None]).long()
    attention_mask = torch.cat([torch.ones(ROWS, PROMPT, dtype=torch.long), response_mask], dim=1)
    return {"input_ids": ids, "attention_mask": attention_mask, "response_mask": response_mask,
            "advantages": torch.randn(ROWS, RESPONSE, generator=g) * response_mask}


@torch.no_grad()
def _logprobs(model, rows) -> torch.Tensor:
    model.eval()
    return fw.response_logprobs(model, rows["input_ids"], rows["attention_mask"], RESPONSE)["logprobs"]


def _loss_gradient(model, rows, mode) -> tuple[list[torch.Tensor], dict]:
    """The worker's loss function (PPO clip, one update from the sampling weights) and its gradient."""
    params = {"clip_eps": 0.2, "dual_clip": None, "kl_coef": 0.0, "rollout_is": mode, "rollout_is_cap": CAP,
              "loss_aggregation": "token-mean"}
    model.train()
    model.zero_grad()
    loss, metrics = online_loss(get_online_algorithm("ppo"), params, temperature=1.0)(model, rows)
    loss.backward()
    sums = {k[len(SUM_PREFIX):]: float(v) for k, v in metrics.items() if k.startswith(SUM_PREFIX)}
    return [p.grad.clone() for p in model.parameters()], mismatch_metrics(sums)


def _formula_gradient(model, rows, weight_fn) -> list[torch.Tensor]:
    """grad of -mean_t w_t * A_t * log pi(y_t): at the sampling weights PPO's ratio is 1 with gradient
    grad log pi, inside the clip range, so the loss's gradient is REINFORCE's with each token weighed."""
    model.train()
    model.zero_grad()
    logprobs = fw.response_logprobs(model, rows["input_ids"], rows["attention_mask"], RESPONSE)["logprobs"]
    w = weight_fn(torch.exp(logprobs.detach() - rows["engine_logprobs"]))
    (-masked_mean(w * rows["advantages"] * logprobs, rows["response_mask"])).backward()
    return [p.grad.clone() for p in model.parameters()]


def _assert_same(grads, expected):
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


FORMULAS = {"none": lambda rho: torch.ones_like(rho),
            "tis": lambda rho: rho.clamp(max=CAP),
            "mis": lambda rho: torch.where((rho > CAP) | (rho < 1 / CAP), torch.zeros_like(rho), rho)}


@pytest.mark.parametrize("mode", ["none", "tis", "mis"])
def test_the_gradient_is_the_formulas_against_a_disagreeing_engine(models, mode):
    policy, engine = models
    rows = {**_rows(), "engine_logprobs": _logprobs(engine, _rows())}
    grads, metrics = _loss_gradient(policy, rows, mode)
    _assert_same(grads, _formula_gradient(policy, rows, FORMULAS[mode]))
    assert metrics["rollout/logprob_diff"] > 0.01  # the engine does disagree
    if mode != "none":  # and by enough that the cap acts on some tokens, not all
        assert 0 < metrics["rollout/is_clipped_frac"] < 1
    # Scored old log-probs (a forward before the update) give the same gradient as the training forward's own.
    scored, _ = _loss_gradient(policy, {**rows, "old_logprobs": _logprobs(policy, rows)}, mode)
    _assert_same(scored, grads)


def test_tis_changes_the_gradient_where_none_does_not_correct(models):
    policy, engine = models
    rows = {**_rows(), "engine_logprobs": _logprobs(engine, _rows())}
    none, _ = _loss_gradient(policy, rows, "none")
    tis, _ = _loss_gradient(policy, rows, "tis")
    assert max(float((a - b).abs().max()) for a, b in zip(none, tis)) > 1e-4


def test_at_identical_weights_every_weight_is_one(models):
    policy, _ = models
    rows = {**_rows(), "engine_logprobs": _logprobs(policy, _rows())}
    none, _ = _loss_gradient(policy, rows, "none")
    for mode in ("tis", "mis"):
        grads, metrics = _loss_gradient(policy, rows, mode)
        assert metrics["rollout/is_weight_mean"] == pytest.approx(1.0, abs=1e-6)
        assert metrics["rollout/is_clipped_frac"] == 0.0 and metrics["rollout/is_ess"] == pytest.approx(1.0)
        _assert_same(grads, none)
