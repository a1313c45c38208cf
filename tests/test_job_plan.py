"""`plan_job`: one answer, from the config alone, to which role groups a job has."""

import pytest

from rlhf_ray.config import load_config
from rlhf_ray.config.schema import ConfigError
from rlhf_ray.job_plan import plan_job, with_algorithm


def plan(preset, *overrides):
    return plan_job(load_config(preset, list(overrides)))


def test_ppo_has_the_four_models_and_the_engine():
    p = plan("tiny-ppo")
    assert p.kind == "online" and p.declaration.name == "ppo"
    assert p.groups == ("policy", "rollout", "reward", "reference", "critic")
    assert p.trained == ("policy", "critic")
    assert p.frozen == ("reference",) + (() if load_config("tiny-ppo").reward.rule else ("reward",))
    assert p.uses_reference and not p.lora_reference and p.borrowed == {}


def test_online_frozen_models_follow_the_kl_and_the_reward():
    without_kl = plan("tiny-grpo", "algorithm.kl_coef=0")
    assert "reference" not in without_kl.groups and not without_kl.uses_reference
    rule = plan("tiny-grpo", "reward.rule=rlhf_ray.data.arithmetic:answer_reward")
    assert "reward" in rule.groups and "reward" not in rule.frozen  # the rule runs in the reward group
    lora = plan("tiny-grpo", "policy.lora.rank=8", "policy.lora.alpha=16")
    assert lora.uses_reference and lora.lora_reference and "reference" not in lora.groups


def test_offline_roles():
    dpo = plan("tiny-dpo")
    assert (dpo.kind, dpo.groups, dpo.trained, dpo.frozen, dpo.lendable) == \
        ("offline", ("policy", "reference"), ("policy",), ("reference",), ("reference",))
    rm = plan("tiny-rm")
    assert rm.groups == rm.trained == ("reward",) and rm.frozen == () and not rm.uses_reference
    sft = plan("tiny-sft")
    assert sft.groups == ("policy",) and not sft.uses_reference
    lora = plan("tiny-dpo", "policy.lora.rank=8", "policy.lora.alpha=16")
    assert lora.groups == ("policy",) and lora.lora_reference


@pytest.mark.parametrize("override", ["algorithm.precompute_reference=true", "algorithm.sdpo_stages=2"])
def test_a_reference_moved_or_freed_during_the_run_is_not_lent(override):
    p = plan("tiny-dpo", override)
    assert "reference" in p.frozen and p.lendable == ()


def test_a_borrowed_group_is_named_and_not_lent_again():
    p = plan("tiny-dpo", "reference.share_with=other")
    assert p.borrowed == {"reference": "other"} and p.lendable == ()
    assert "reference" in p.groups  # the owner's actors answer the borrower's calls


def test_an_unknown_algorithm_names_both_families():
    with pytest.raises(ConfigError, match=r"algorithm.name: .*Online and offline names: .*ppo.*dpo"):
        plan("tiny-ppo", "algorithm.name=nope")


def test_with_algorithm_replaces_the_name_only():
    cfg = load_config("tiny-ppo")
    assert with_algorithm(cfg, None) is cfg
    assert plan_job(with_algorithm(cfg, "remax")).trained == ("policy",)
