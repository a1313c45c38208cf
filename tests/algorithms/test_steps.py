"""The steps a driver sends its trainer ranks: a bad value is refused when the step is built, naming the key,
and a step pickles (plainly and as Ray sends it) with the registry's own declaration on the other side."""

from __future__ import annotations

import pickle
from dataclasses import replace

import pytest

from rlhf_ray.algorithms.registry import get_offline_objective, get_online_algorithm
from rlhf_ray.algorithms.steps import CriticStep, OfflineStep, ParamError, PolicyStep


def _policy_step(**overrides) -> PolicyStep:
    values = {"clip_eps": 0.2, "kl_coef": 0.05, "temperature": 1.0, **overrides}
    return PolicyStep(get_online_algorithm(values.pop("algorithm", "grpo")), **values)


@pytest.mark.parametrize("build, key, message", [
    (lambda: _policy_step(clip_eps=-0.1), "clip_eps", "policy step of grpo: clip_eps must be > 0, got -0.1"),
    (lambda: _policy_step(dual_clip=0.5), "dual_clip", "dual_clip must be > 1"),
    (lambda: _policy_step(loss_aggregation="seq-sum"), "loss_aggregation",
     "loss_aggregation must be one of token-mean, seq-mean-token-mean, seq-mean-token-sum-norm, got 'seq-sum'"),
    (lambda: _policy_step(rollout_is_cap=1.0), "rollout_is_cap", "rollout_is_cap must be > 1, got 1.0"),
    (lambda: _policy_step(kl_estimator="k1"), "kl_estimator", "k1 as a loss term has no KL gradient"),
    (lambda: _policy_step(loss_denominator="12"), "loss_denominator", "expects a number or None, got '12'"),
    (lambda: CriticStep(0.2, loss_aggregation="sum"), "loss_aggregation", "critic step: loss_aggregation"),
    (lambda: OfflineStep(get_offline_objective("dpo"), {"beta": -1.0}), "beta", "dpo parameter 'beta' must be > 0"),
    (lambda: OfflineStep(get_offline_objective("dpo"), {"gamma": 1.0}), "gamma", "dpo has no parameter 'gamma'"),
])
def test_a_step_refuses_a_bad_value_when_built_naming_the_key(build, key, message):
    with pytest.raises(ParamError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        build()
    assert err.value.key == key


def test_a_later_step_built_from_a_checked_one_is_checked_too():
    with pytest.raises(ParamError, match="loss_denominator"):
        replace(_policy_step(), loss_denominator=-1.0)


def test_the_kl_estimator_is_resolved_once_and_the_objectives_params_completed():
    assert _policy_step().kl_estimator == "k3" and _policy_step(algorithm="ppo").kl_estimator == "k1"
    step = OfflineStep(get_offline_objective("odpo"), {"beta": 0.2})
    assert dict(step.params) == {"beta": 0.2, "alpha": 1.0, "offset": None}
    with pytest.raises(TypeError):
        step.params["beta"] = 0.3  # read-only: the trainer takes the numbers the driver checked
    with pytest.raises(TypeError, match="get_online_algorithm"):
        PolicyStep("grpo", clip_eps=0.2, kl_coef=0.0, temperature=1.0)


def test_steps_pickle_with_the_registrys_declarations_on_the_other_side():
    from ray import cloudpickle

    steps = [_policy_step(loss_denominator=12.0, ptx_coef=0.1, ptx_denominator=30.0),
             CriticStep(0.2, "token-mean", 4.0),
             replace(OfflineStep(get_offline_objective("kto")), kl_reference_point=0.25)]
    for dumps in (pickle.dumps, cloudpickle.dumps):
        for step in steps:
            back = pickle.loads(dumps(step))
            assert back == step
        policy, _, offline = (pickle.loads(dumps(step)) for step in steps)
        assert policy.algorithm is get_online_algorithm("grpo")  # its lambdas stay home
        assert offline.objective is get_offline_objective("kto") and offline.params == {"beta": 0.1, "lambda_d": 1.0,
                                                                                        "lambda_u": 1.0}
