"""The online step's rewards and advantages, as a function of the rollout, its scores and the config.

`compute_advantages` reads no job and no actor: the driver passes the KL
coefficient of the step (its controller's value) and the running reward std,
and gets the std back updated, so the step's arithmetic is tested on
hand-made tensors (tests/jobs/test_online_advantages.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rlhf_ray.algorithms.advantages import masked_mean
from rlhf_ray.algorithms.kl import AdaptiveKLController, FixedKLController, kl_penalty, token_level_rewards
from rlhf_ray.algorithms.registry import get_online_algorithm
from rlhf_ray.algorithms.reward_shaping import overlong_penalty
from rlhf_ray.config.schema import JobConfig
from rlhf_ray.jobs.validate import samples_per_prompt

ROLLOUT_KEYS = ("input_ids", "attention_mask", "response_mask")


class RunningStd:
    """Running standard deviation of rewards (reward normalisation, lm-human-preferences)."""

    def __init__(self, state: dict | None = None):
        self.count, self.mean, self.m2 = (state or {}).get("count", 0), (state or {}).get("mean", 0.0), \
            (state or {}).get("m2", 0.0)

    def update(self, values: torch.Tensor) -> None:
        for v in values.tolist():
            self.count += 1
            delta = v - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (v - self.mean)

    def updated(self, values: torch.Tensor) -> RunningStd:
        """A copy that has seen `values` too (this one is left as it was)."""
        new = RunningStd(self.state_dict())
        new.update(values)
        return new

    @property
    def std(self) -> float:
        return (self.m2 / max(self.count - 1, 1)) ** 0.5 if self.count > 1 else 1.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}


def fresh_controllers(cfg: JobConfig) -> tuple[FixedKLController | AdaptiveKLController, RunningStd]:
    """The KL coefficient's controller and the running reward std as a run starts (a checkpoint's replace
    them on resume)."""
    a = cfg.algorithm
    kl = AdaptiveKLController(a.kl_coef, a.kl_target, a.kl_horizon) if a.adaptive_kl else FixedKLController(a.kl_coef)
    return kl, RunningStd()


def kl_estimator(cfg: JobConfig) -> str:
    """The KL estimator with `auto` resolved: k1 in the rewards, k3 in the loss."""
    return get_online_algorithm(cfg.algorithm.name).kl.estimator(cfg.algorithm.kl_estimator)


def scores_old_logprobs(cfg: JobConfig) -> bool:
    """Whether the policy scores the old log-probs before the update.

    PPO's old log-probs are the policy's own under the weights the step starts from (those that sampled,
    on-policy; the rollout importance weights correct the engine's gap to them, and a stale batch's lag).
    With one pass over one minibatch the update starts from those weights, so its training forward gives
    them and the scoring forward is skipped; the policy scores them first where the update runs from other
    weights, where the step may be skipped for the mismatch (known before the update), or where dropout
    makes the training forward another function."""
    a, policy = cfg.algorithm, cfg.policy
    dropout = not policy.model.disable_dropout or (policy.lora.enabled and policy.lora.dropout > 0)
    return a.ppo_epochs > 1 or a.num_minibatches > 1 or a.max_logprob_diff > 0 or dropout


class Advantages(NamedTuple):
    """What the update trains on, the step's metrics, and the running reward std after this batch."""

    batch: dict
    metrics: dict
    reward_std: RunningStd


def compute_advantages(rollout: dict, scores: dict, cfg: JobConfig, kl_coef: float,
                       reward_std: RunningStd) -> Advantages:
    """KL-shaped rewards with this step's coefficient `kl_coef` and the algorithm's advantages.

    `rollout`: the engines' rows (`input_ids`, `attention_mask`, `response_mask`, `finished`,
    `engine_logprobs`; `greedy_finished` and `greedy_response_mask` with a greedy baseline); `scores`: the
    roles' (`sequence_rewards`, `logprobs`; `ref_logprobs`, `values`, `greedy_rewards` where the job has
    them). With `algorithm.normalize_rewards` the rewards are divided by the std of every reward so far,
    this batch's included: the returned `reward_std`."""
    a = cfg.algorithm
    algorithm = get_online_algorithm(a.name)
    n = samples_per_prompt(cfg)
    mask = rollout["response_mask"].float()
    rewards = scores["sequence_rewards"] + a.no_eos_penalty * (~rollout["finished"]).float()
    overlong = overlong_penalty(mask.sum(-1), cfg.rollout.max_new_tokens, a.overlong_buffer, a.overlong_penalty)
    rewards = rewards + overlong
    greedy = scores.get("greedy_rewards")
    if greedy is not None:
        shaped = a.no_eos_penalty * (~rollout["greedy_finished"]).float()
        if a.overlong_buffer:
            shaped = shaped + overlong_penalty(rollout["greedy_response_mask"].sum(-1), cfg.rollout.max_new_tokens,
                                               a.overlong_buffer, a.overlong_penalty)
        greedy = greedy + shaped.repeat_interleave(n)
    if a.normalize_rewards:
        reward_std = reward_std.updated(rewards)
        rewards = rewards / reward_std.std
        greedy = None if greedy is None else greedy / reward_std.std
    old = scores["logprobs"]
    ref = scores.get("ref_logprobs", old)
    token_rewards = token_level_rewards(rewards, old, ref, mask, algorithm.kl.reward_coef(kl_coef),
                                        kind=kl_estimator(cfg))
    advantages, returns = algorithm.compute_advantages(
        response_mask=mask, token_rewards=token_rewards, sequence_rewards=rewards, greedy_rewards=greedy,
        values=scores.get("values"), group_size=n, gamma=a.gamma, lam=a.lam, whiten_advantages=a.whiten_advantages)
    sequence_kl = (kl_penalty(old, ref, "k1") * mask).sum(-1)
    batch = {k: rollout[k] for k in ROLLOUT_KEYS}
    batch.update(engine_logprobs=rollout["engine_logprobs"], advantages=advantages, ref_logprobs=ref)
    if scores_old_logprobs(cfg):
        batch["old_logprobs"] = old
    if returns is not None:
        batch.update(returns=returns, old_values=scores["values"])
    metrics = {"rollout/kl": float(sequence_kl.mean()), "policy/kl_coef": kl_coef,
               "rollout/advantage_mean": float(masked_mean(advantages, mask))}
    if a.overlong_buffer:
        metrics["rollout/overlong_penalty_mean"] = float(overlong.mean())
    return Advantages(batch, metrics, reward_std)


__all__ = ["Advantages", "RunningStd", "compute_advantages", "fresh_controllers", "kl_estimator",
           "scores_old_logprobs"]
