"""The online driver's step without actors: which KL estimator and coefficient each step uses, where the
rollout-mismatch check stops an update. The roles are stand-ins; the math is the driver's own."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.config import ConfigError
from rlhf_ray.jobs.validate import validate_online

from job_helpers import tiny_config

HF = ["rollout.engine=hf"]  # nothing here generates; the HF engine needs no vLLM checks


def test_grpo_refuses_k1_as_its_kl_loss_and_takes_k2(tmp_path):
    with pytest.raises(ConfigError, match=r"algorithm.kl_estimator: grpo puts the KL in its loss, and k1 as a loss "
                                          r"term has no KL gradient"):
        validate_online(tiny_config("tiny-grpo", tmp_path, *HF, "algorithm.kl_estimator=k1"))
    validate_online(tiny_config("tiny-grpo", tmp_path, *HF, "algorithm.kl_estimator=k2"))
    validate_online(tiny_config("tiny-ppo", tmp_path, *HF, "algorithm.kl_estimator=k1"))  # in the rewards: fine


class _Policy:
    """A policy group of one rank that records what `train_online` is sent."""

    def __init__(self):
        self.sent = []
        self.train_online = type("Remote", (), {"remote": lambda _, batch, name, params: self._train(batch, params)})()

    def _train(self, batch, params):
        self.sent.append((batch, params))
        return {"loss": 0.0}

    def scatter(self, fn, batch):
        return [fn(self, batch)]

    def gather(self, pending):
        return pending


class _Roles:
    def __init__(self):
        self.groups = {"policy": _Policy()}

    def __getitem__(self, name):
        return self.groups[name]

    def in_turns(self, launch, finish):
        return {name: finish(name, fn()) for name, fn in launch.items()}


def _stand_in_job(job):
    from contextlib import nullcontext
    from types import SimpleNamespace

    job.timeline = SimpleNamespace(record=lambda *args: None)
    return SimpleNamespace(phase=lambda name: nullcontext())


def test_adaptive_kl_uses_the_coefficient_before_its_update_for_rewards_and_loss_alike(tmp_path):
    from rlhf_ray.jobs.online import OnlineJob

    job = OnlineJob(tiny_config("tiny-remax", tmp_path / "remax", *HF, "algorithm.adaptive_kl=true",
                                "algorithm.kl_coef=0.5", "algorithm.kl_target=1.0", "algorithm.kl_horizon=4",
                                "algorithm.whiten_advantages=false", "run.batch_size=2"))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    rollout = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5, dtype=torch.long),
               "response_mask": mask, "finished": torch.ones(2, dtype=torch.bool),
               "greedy_finished": torch.ones(2, dtype=torch.bool), "engine_logprobs": torch.zeros(2, 3)}
    # k1 = log pi - log pi_ref: row 0 [0, 1] (on its last token only), row 1 [-0.5]; sequence KLs 1 and -0.5
    scores = {"sequence_rewards": torch.tensor([1.0, 2.0]), "greedy_rewards": torch.tensor([0.25, 1.0]),
              "logprobs": torch.zeros(2, 3), "ref_logprobs": torch.tensor([[0.0, -1.0, 0.0], [0.5, 0.0, 0.0]])}
    before = job.kl.value
    batch, metrics = job.compute_advantages(rollout, scores, before)
    # With beta = 0.5: row 0 returns 1.0 - 0.5 * 1 = 0.5, minus greedy 0.25 -> 0.25 on both tokens;
    # row 1 returns 2.0 - 0.5 * -0.5 = 2.25, minus greedy 1.0 -> 1.25.
    torch.testing.assert_close(batch["advantages"], torch.tensor([[0.25, 0.25, 0.0], [1.25, 0.0, 0.0]]))
    assert job.kl.value == before == 0.5 and metrics["policy/kl_coef"] == 0.5  # the controller has not moved
    roles = _Roles()
    job.update(roles, batch, step=1, timer=_stand_in_job(job), kl_coef=before)
    assert [params["kl_coef"] for _, params in roles["policy"].sent] == [0.5]  # the loss's coefficient too
    # Then the loop moves it for the next step: mean KL 0.25 nats against a target of 1 -> error clipped to
    # -0.2, beta = 0.5 * (1 - 0.2 * 2 samples / horizon 4) = 0.45.
    job.kl.update(metrics["rollout/kl"], 2)
    assert job.kl.value == pytest.approx(0.45)
