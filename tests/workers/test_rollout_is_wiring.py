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
from rlhf_ray.algorithms.steps import PolicyStep
from rlhf_ray.models import forward as fw
from rlhf_ray.models.loading import disable_dropout, load_causal_lm
from rlhf_ray.models.tokenizer import load_tokenizer
from rlhf_ray.workers.policy import online_loss

ROWS, PROMPT, RESPONSE, CAP = 8, 5, 6, 1.2

torch.set_num_threads(1)


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


class Setup:
    """The policy, its log-probs and those of an engine holding a perturbed copy of its weights."""

    def __init__(self):
        torch.manual_seed(0)
        self.policy = load_causal_lm("tiny-gpt2", dtype="float32", seed=0, tokenizer=load_tokenizer("tiny"))
        disable_dropout(self.policy)
        engine = copy.deepcopy(self.policy)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # the engine's copy of the weights, off by a little everywhere
            for p in engine.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        self.rows = _rows()
        self.engine_logprobs = _logprobs(engine, self.rows)
        self.policy_logprobs = _logprobs(self.policy, self.rows)  # a scoring forward before the update

    def loss_gradient(self, mode: str, engine_logprobs: torch.Tensor, old_logprobs=None) -> tuple[list, dict]:
        """The worker's loss function (PPO clip, one update from the sampling weights) and its gradient."""
        step = PolicyStep(get_online_algorithm("ppo"), clip_eps=0.2, kl_coef=0.0, temperature=1.0, rollout_is=mode,
                          rollout_is_cap=CAP, loss_aggregation="token-mean")
        rows = {**self.rows, "engine_logprobs": engine_logprobs}
        if old_logprobs is not None:
            rows["old_logprobs"] = old_logprobs
        self.policy.train()
        self.policy.zero_grad()
        loss, metrics = online_loss(step)(self.policy, rows)
        loss.backward()
        sums = {k[len(SUM_PREFIX):]: float(v) for k, v in metrics.items() if k.startswith(SUM_PREFIX)}
        return [p.grad.clone() for p in self.policy.parameters()], mismatch_metrics(sums)

    def formula_gradients(self) -> dict[str, list]:
        """grad of -mean_t w_t * A_t * log pi(y_t) for each mode's w: at the sampling weights PPO's ratio is
        1 with gradient grad log pi, inside the clip range, so the loss's gradient is REINFORCE's with each
        token weighed."""
        self.policy.train()
        logprobs = fw.response_logprobs(self.policy, self.rows["input_ids"], self.rows["attention_mask"],
                                        RESPONSE)["logprobs"]
        rho = torch.exp(logprobs.detach() - self.engine_logprobs)
        out = {}
        for mode, weight_fn in FORMULAS.items():
            loss = -masked_mean(weight_fn(rho) * self.rows["advantages"] * logprobs, self.rows["response_mask"])
            out[mode] = list(torch.autograd.grad(loss, list(self.policy.parameters()), retain_graph=True))
        return out


FORMULAS = {"none": lambda rho: torch.ones_like(rho),
            "tis": lambda rho: rho.clamp(max=CAP),
            "mis": lambda rho: torch.where((rho > CAP) | (rho < 1 / CAP), torch.zeros_like(rho), rho)}


@pytest.fixture(scope="module")
def setup():
    return Setup()


@pytest.fixture(scope="module")
def disagreeing(setup):
    """Each mode's gradient and metrics against the perturbed engine, and the formulas' gradients."""
    return {mode: setup.loss_gradient(mode, setup.engine_logprobs) for mode in FORMULAS}, setup.formula_gradients()


def _assert_same(grads, expected):
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("mode", ["none", "tis", "mis"])
def test_the_gradient_is_the_formulas_against_a_disagreeing_engine(disagreeing, mode):
    losses, formulas = disagreeing
    grads, metrics = losses[mode]
    _assert_same(grads, formulas[mode])
    assert metrics["rollout/logprob_diff"] > 0.01  # the engine does disagree
    if mode != "none":  # and by enough that the cap acts on some tokens, not all
        assert 0 < metrics["rollout/is_clipped_frac"] < 1
    else:
        assert metrics["rollout/is_weight_mean"] == 1.0 and metrics["rollout/is_clipped_frac"] == 0.0


def test_scored_old_log_probs_give_the_training_forwards_gradient(setup, disagreeing):
    # A scoring forward before the update (several epochs or minibatches) or the training forward's own
    # detached log-probs (one pass): the same old log-probs, so the same gradient.
    scored, _ = setup.loss_gradient("tis", setup.engine_logprobs, old_logprobs=setup.policy_logprobs)
    _assert_same(scored, disagreeing[0]["tis"][0])


def test_tis_changes_the_gradient_where_none_does_not_correct(disagreeing):
    losses, _ = disagreeing
    assert max(float((a - b).abs().max()) for a, b in zip(losses["none"][0], losses["tis"][0])) > 1e-4


def test_at_identical_weights_every_weight_is_one(setup, disagreeing):
    none = disagreeing[0]["none"][0]  # no weights: the same gradient whatever the engine says
    for mode in ("tis", "mis"):
        grads, metrics = setup.loss_gradient(mode, setup.policy_logprobs)
        assert metrics["rollout/is_weight_mean"] == pytest.approx(1.0, abs=1e-6)
        assert metrics["rollout/is_clipped_frac"] == 0.0 and metrics["rollout/is_ess"] == pytest.approx(1.0)
        _assert_same(grads, none)
