"""The registry: declarations, uniform advantage adapters, offline loss adapters, name errors."""

import math

import pytest
import torch

from rlhf_ray.algorithms import (
    OFFLINE_OBJECTIVES,
    ONLINE_ALGORITHMS,
    KTOBatch,
    PreferenceBatch,
    RankedRewardBatch,
    SFTBatch,
    UnknownAlgorithmError,
    discounted_returns,
    dpo_loss,
    gae,
    get_offline_objective,
    get_online_algorithm,
    grpo_advantages,
    reinforce_pp_advantages,
    remax_advantages,
    rloo_advantages,
    whiten,
)
from rlhf_ray.algorithms.online import GSPO_CLIP, KL_IN_LOSS, KL_IN_REWARD, PPO_CLIP, REINFORCE
from rlhf_ray.algorithms.registry import ParamError

from tensor_helpers import close

torch.set_num_threads(1)
LN2 = math.log(2.0)


def test_all_names_are_declared():
    assert set(ONLINE_ALGORITHMS) == {"ppo", "remax", "grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp"}
    assert set(OFFLINE_OBJECTIVES) == {
        "sft", "kl_sft", "rm", "dpo", "cdpo", "ipo", "dpop", "rdpo", "apo_zero", "odpo", "slic", "simpo", "tdpo1",
        "tdpo2", "kto", "segment_dpo"
    }


def test_online_declarations():
    ppo, remax, grpo = get_online_algorithm("ppo"), get_online_algorithm("remax"), get_online_algorithm("grpo")
    assert ppo.needs_critic and not remax.needs_critic and not grpo.needs_critic
    assert remax.needs_greedy and not ppo.needs_greedy
    assert grpo.kl is KL_IN_LOSS and ppo.kl is KL_IN_REWARD
    assert remax.policy_loss is REINFORCE and grpo.policy_loss is PPO_CLIP
    assert not REINFORCE.uses_ratio and PPO_CLIP.uses_ratio
    assert KL_IN_LOSS.reward_coef(0.3) == 0.0 and KL_IN_REWARD.reward_coef(0.3) == 0.3
    assert get_online_algorithm("rloo").min_samples_per_prompt == 2
    assert all(a.needs_reference for a in ONLINE_ALGORITHMS.values())


def test_grpo_family_declarations():
    from dataclasses import fields

    from rlhf_ray.algorithms.registry import online_defaults
    from rlhf_ray.config.schema import AlgorithmConfig

    dr_grpo, dapo, gspo = (get_online_algorithm(name) for name in ("dr_grpo", "dapo", "gspo"))
    assert all(a.min_samples_per_prompt == 2 and not a.needs_critic and a.kl is KL_IN_LOSS
               for a in (dr_grpo, dapo, gspo))
    assert dr_grpo.policy_loss is PPO_CLIP and dapo.policy_loss is PPO_CLIP and gspo.policy_loss is GSPO_CLIP
    # GSPO's clip range is narrower than the engine's log-probs may be off: the policy recomputes them
    assert GSPO_CLIP.uses_ratio and GSPO_CLIP.policy_old_logprobs and not PPO_CLIP.policy_old_logprobs
    assert dr_grpo.defaults == {"loss_aggregation": "seq-mean-token-sum-norm"}
    assert dapo.defaults == {"clip_eps_low": 0.2, "clip_eps_high": 0.28, "kl_coef": 0.0,
                             "loss_aggregation": "token-mean", "dynamic_sampling": True}
    assert (gspo.defaults["clip_eps_low"], gspo.defaults["clip_eps_high"]) == (3e-4, 4e-4)
    assert online_defaults("grpo") == {} and online_defaults("dpo") == {} and online_defaults("nope") == {}
    # every default is an algorithm.* key, and a config made of them is valid
    keys = {f.name for f in fields(AlgorithmConfig)}
    for algorithm in ONLINE_ALGORITHMS.values():
        assert set(algorithm.defaults) <= keys, algorithm.name
        AlgorithmConfig(name=algorithm.name, **algorithm.defaults)


def test_grpo_family_adapters_hand_worked():
    mask = torch.ones(4, 2)
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    # groups [1, 0] and [0, 0]: Dr. GRPO's r - mean = [0.5, -0.5, 0, 0], no division by the std
    adv, returns = get_online_algorithm("dr_grpo").compute_advantages(
        response_mask=mask, sequence_rewards=rewards, group_size=2)
    close(adv[:, 0], [0.5, -0.5, 0.0, 0.0])
    assert returns is None
    # DAPO and GSPO keep GRPO's: the std of [1, 0] is 0.707107 -> +-0.707107
    for name in ("dapo", "gspo"):
        adv, _ = get_online_algorithm(name).compute_advantages(
            response_mask=mask, sequence_rewards=rewards, group_size=2)
        close(adv[:, 1], [0.707107, -0.707107, 0.0, 0.0])


def test_each_kl_placement_resolves_its_own_estimator():
    # auto: k1 shaped into the rewards (Ziegler et al.), k3 as GRPO's loss term; a set value is kept.
    assert KL_IN_REWARD.estimator("auto") == "k1" and KL_IN_LOSS.estimator("auto") == "k3"
    assert KL_IN_LOSS.estimator("k2") == "k2" and KL_IN_REWARD.estimator("k3") == "k3"
    with pytest.raises(ValueError, match="k1 as a loss term has no KL gradient"):
        KL_IN_LOSS.estimator("k1")
    with pytest.raises(ValueError, match="expected auto or one of k1, k2, k3"):
        KL_IN_LOSS.estimator("k4")


def test_the_kl_loss_term_uses_the_configured_estimator():
    logprobs = torch.log(torch.tensor([[0.5, 0.9]])).requires_grad_()
    ref = torch.log(torch.tensor([[0.25, 0.1]]))
    mask = torch.tensor([[1.0, 0.0]])
    # only token 0 counts, log q - log p = ln 2: k2 = 0.5 * (ln 2)^2 = 0.240227; loss = 0.1 * 0.240227
    loss, metrics = KL_IN_LOSS.loss_term(logprobs, ref, mask, kl_coef=0.1, kind="k2")
    close(loss, 0.0240227)
    close(metrics["policy/kl_loss"], 0.240227)
    loss.backward()
    # d k2 / d log q = log q - log p = ln 2, times 0.1
    close(logprobs.grad, [[0.0693147, 0.0]])
    # auto in the loss is k3: (0.5 - 1) - ln 0.5 = 0.193147
    close(KL_IN_LOSS.loss_term(logprobs, ref, mask, kl_coef=0.1)[1]["policy/kl_loss"], 0.193147)
    assert KL_IN_REWARD.loss_term(logprobs, ref, mask, kl_coef=0.1, kind="k2") is None


def test_offline_declarations():
    assert get_offline_objective("rm").trains == "reward_model"
    assert get_offline_objective("tdpo2").needs_sequence_kl and not get_offline_objective("dpo").needs_sequence_kl
    assert not get_offline_objective("simpo").needs_reference and get_offline_objective("kto").data_format == "kto"
    assert get_offline_objective("cdpo").param_defaults["label_smoothing"] == 0.1


def test_unknown_names_list_the_known_ones_and_suggest():
    with pytest.raises(KeyError) as info:
        get_online_algorithm("grp")
    message = str(info.value)
    assert "ppo, remax, grpo, dr_grpo, dapo, gspo, rloo, reinforce_pp" in message
    assert "Did you mean 'grpo'" in message
    with pytest.raises(ValueError, match="Known: sft, kl_sft, rm, dpo"):
        get_offline_objective("dpoo")
    assert isinstance(info.value, UnknownAlgorithmError)
    assert get_online_algorithm("REINFORCE++").name == "reinforce_pp"
    assert get_online_algorithm("Dr-GRPO").name == "dr_grpo"


def _rollout(seed=0, prompts=2, group=3, T=5):
    g = torch.Generator().manual_seed(seed)
    B = prompts * group
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[:, 0] = True
    return dict(
        response_mask=mask,
        token_rewards=torch.randn(B, T, generator=g) * mask,
        sequence_rewards=torch.randn(B, generator=g),
        greedy_rewards=torch.randn(B, generator=g),
        values=torch.randn(B, T, generator=g),
        group_size=group,
        gamma=0.99,
        lam=0.95,
        whiten_advantages=False,
    )


def test_every_algorithm_runs_through_the_same_call():
    inputs = _rollout()
    for algo in ONLINE_ALGORITHMS.values():
        advantages, returns = algo.compute_advantages(**inputs)
        assert advantages.shape == inputs["response_mask"].shape
        assert (returns is not None) == algo.needs_critic
        assert torch.all(advantages[~inputs["response_mask"]] == 0)


def test_adapters_call_their_own_estimators():
    x = _rollout(seed=1)
    mask, tok = x["response_mask"], x["token_rewards"]
    ret_sum = (tok * mask).sum(-1)  # undiscounted KL-shaped return of each sample

    adv, ret = get_online_algorithm("ppo").compute_advantages(**{**x, "whiten_advantages": True})
    ref_adv, ref_ret = gae(tok, x["values"], mask, 0.99, 0.95)
    torch.testing.assert_close(adv, whiten(ref_adv, mask))
    torch.testing.assert_close(ret, ref_ret)

    # ReMax: each token's undiscounted reward-to-go, not the whole return (gamma = 0.99 is not ReMax's)
    adv, _ = get_online_algorithm("remax").compute_advantages(**x)
    reward_to_go = discounted_returns(tok, mask, 1.0)
    torch.testing.assert_close(adv, remax_advantages(reward_to_go, x["greedy_rewards"], mask))

    adv, _ = get_online_algorithm("grpo").compute_advantages(**x)
    torch.testing.assert_close(adv, grpo_advantages(x["sequence_rewards"], 3, mask))

    adv, _ = get_online_algorithm("rloo").compute_advantages(**x)
    torch.testing.assert_close(adv, rloo_advantages(ret_sum, 3, mask))

    adv, _ = get_online_algorithm("reinforce_pp").compute_advantages(**x)
    torch.testing.assert_close(adv, reinforce_pp_advantages(tok, mask, 0.99))


def test_remax_adapter_hand_worked():
    # Reward-to-go of the KL-shaped token rewards: token 0 gets -0.25 + 1.0 = 0.75, token 1 only its own 1.0
    # (the KL charged at token 0 came before it); minus the greedy reward 0.5 -> [0.25, 0.5]. The whole return
    # on every token, as before, charged token 1 for token 0's KL: [0.25, 0.25].
    adv, returns = get_online_algorithm("remax").compute_advantages(
        response_mask=torch.tensor([[1, 1, 0]]),
        token_rewards=torch.tensor([[-0.25, 1.0, 0.0]]),
        greedy_rewards=torch.tensor([0.5]),
    )
    close(adv, [[0.25, 0.5, 0.0]])
    assert returns is None


def test_missing_inputs_and_small_groups_are_reported():
    x = _rollout()
    with pytest.raises(ValueError, match="'ppo' .* values was not given"):
        get_online_algorithm("ppo").compute_advantages(**{**x, "values": None})
    with pytest.raises(ValueError, match="at least 2 samples per prompt"):
        get_online_algorithm("grpo").compute_advantages(**{**x, "group_size": 1})


def _equal_pair_batch(n=4, **extra):
    g = torch.Generator().manual_seed(7)
    c, r = -torch.rand(n, generator=g) * 10 - 1, -torch.rand(n, generator=g) * 10 - 1
    return PreferenceBatch(policy_chosen_logps=c, policy_rejected_logps=r, ref_chosen_logps=c.clone(),
                           ref_rejected_logps=r.clone(), chosen_seq_kl=torch.zeros(n), rejected_seq_kl=torch.zeros(n),
                           **extra)


def test_offline_adapters_at_policy_equal_reference():
    batch = _equal_pair_batch()
    # delta = 0 everywhere; defaults beta 0.1 (ipo: (0 - 5)^2 = 25), odpo's constant offset 1: log(1 + e) = 1.313262
    expected = {"dpo": LN2, "cdpo": LN2, "rdpo": LN2, "dpop": LN2, "tdpo1": LN2, "tdpo2": LN2, "ipo": 25.0,
                "odpo": 1.313262, "apo_zero": 1.0}
    for name, value in expected.items():
        loss, metrics = get_offline_objective(name).loss(batch, {"offset": 1.0} if name == "odpo" else {})
        close(loss, value)
        close(metrics["rewards/margins"], 0.0)
    with pytest.raises(ValueError, match=r"'odpo' needs PreferenceBatch.offsets .* or params\['offset'\]"):
        get_offline_objective("odpo").loss(batch, {})


def test_offline_params_override_defaults_and_refuse_other_keys():
    c, r = torch.tensor([-1.0]), torch.tensor([-3.0])
    batch = PreferenceBatch(c, r, torch.tensor([-2.0]), torch.tensor([-2.0]))
    # beta 0.5, delta 2: -log sigmoid(1) = 0.313262
    loss, _ = get_offline_objective("dpo").loss(batch, {"beta": 0.5})
    close(loss, 0.313262)
    cdpo, _ = get_offline_objective("cdpo").loss(batch, {"beta": 0.5})
    torch.testing.assert_close(cdpo, dpo_loss(c, r, torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5, 0.1)[0])
    assert get_offline_objective("tdpo2").resolve_params({"beta": 0.2}) == {"beta": 0.2, "alpha": 0.5}
    with pytest.raises(ParamError, match=r"tdpo2 has no parameter 'gamma'; its parameters: beta, alpha"):
        get_offline_objective("tdpo2").resolve_params({"beta": 0.2, "gamma": 3})
    with pytest.raises(ParamError, match=r"dpo parameter 'beta' must be > 0, got 0"):
        get_offline_objective("dpo").loss(batch, {"beta": 0})


def test_reference_free_objectives_need_no_reference():
    c, r = torch.tensor([-6.0]), torch.tensor([-8.0])
    no_ref = PreferenceBatch(c, r, chosen_lengths=torch.tensor([3.0]), rejected_lengths=torch.tensor([2.0]))
    # simpo with beta 1, gamma 1: -log sigmoid(-2 - -4 - 1) = 0.313262
    close(get_offline_objective("simpo").loss(no_ref, {"beta": 1.0, "gamma": 1.0})[0], 0.313262)
    # slic regularises the chosen responses: hinge max(0, 1 - 2) = 0, plus -0.1 * -6 = 0.6
    close(get_offline_objective("slic").loss(no_ref, {})[0], 0.6)


def test_offline_adapters_report_missing_fields_and_wrong_batches():
    with pytest.raises(ValueError, match="'dpo' needs PreferenceBatch.ref_chosen_logps, ref_rejected_logps"):
        get_offline_objective("dpo").loss(PreferenceBatch(torch.zeros(2), torch.zeros(2)), {})
    with pytest.raises(ValueError, match="chosen_seq_kl"):
        get_offline_objective("tdpo1").loss(PreferenceBatch(*[torch.zeros(2)] * 4), {})
    with pytest.raises(TypeError, match="takes a PreferenceBatch; got SFTBatch"):
        get_offline_objective("ipo").loss(SFTBatch(torch.zeros(1, 2), torch.ones(1, 2)), {})
    with pytest.raises(ValueError, match="kl_reference_point"):
        get_offline_objective("kto").loss(KTOBatch(torch.zeros(2), torch.zeros(2), torch.tensor([True, False])), {})


def test_sft_rm_and_kto_adapters():
    logprobs = torch.tensor([[-1.0, -2.0]])
    # sft: (1 + 2) / 2 = 1.5; kl_sft at the reference adds nothing
    close(get_offline_objective("sft").loss(SFTBatch(logprobs, torch.ones(1, 2)), {})[0], 1.5)
    close(get_offline_objective("kl_sft").loss(SFTBatch(logprobs, torch.ones(1, 2), logprobs.clone()), {})[0], 1.5)
    rm = get_offline_objective("rm")
    # a pair (K = 2) with gap 0: ln 2; scores [[1, 0]] with ranking [[0, 1]]: gap 1 -> 0.313262
    close(rm.loss(RankedRewardBatch(torch.tensor([[1.0, 1.0]]), torch.tensor([[0, 1]])), {})[0], LN2)
    close(rm.loss(RankedRewardBatch(torch.tensor([[1.0, 0.0]]), torch.tensor([[0, 1]])), {})[0], 0.313262)
    # kto: z0 from mismatched pairs = max(0, mean(1, -3)) = 0; equal policy and ref: loss 0.5
    kto = KTOBatch(torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -2.0]), torch.tensor([True, False]),
                   policy_logps_mismatched=torch.tensor([0.0, -4.0]), ref_logps_mismatched=torch.tensor([-1.0, -1.0]))
    loss, metrics = get_offline_objective("kto").loss(kto, {})
    close(loss, 0.5)
    close(metrics["kto/kl_reference_point"], 0.0)
