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
    """A policy group of one rank that records what `train_online` is sent (the step's fields by name)."""

    def __init__(self):
        self.sent = []
        self.train_online = type("Remote", (), {"remote": lambda _, batch, step: self._train(batch, vars(step))})()

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

    cfg = tiny_config("tiny-remax", tmp_path / "remax", *HF, "algorithm.adaptive_kl=true",
                      "algorithm.kl_coef=0.5", "algorithm.kl_target=1.0", "algorithm.kl_horizon=4",
                      "algorithm.whiten_advantages=false", "run.batch_size=2")
    job = OnlineJob.from_config(cfg)
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


def _rollout(engine_gap: float) -> tuple[dict, dict]:
    """Two rows of three response slots; the policy's scored log-probs are `engine_gap` above the engine's."""
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    engine = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]]) * mask
    rollout = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5, dtype=torch.long),
               "response_mask": mask, "finished": torch.ones(2, dtype=torch.bool), "engine_logprobs": engine}
    scores = {"sequence_rewards": torch.tensor([1.0, 0.0]), "logprobs": (engine + engine_gap) * mask,
              "ref_logprobs": engine.clone()}
    return rollout, scores


def test_the_training_forward_gives_the_old_log_probs_of_a_single_pass(tmp_path):
    from rlhf_ray.jobs.online import OnlineJob

    job = OnlineJob.from_config(tiny_config("tiny-reinforce-pp", tmp_path / "one", *HF, "run.batch_size=2"))
    assert not job.scores_old_logprobs and job.check_mismatch(*_rollout(0.5)) == {}
    batch, _ = job.compute_advantages(*_rollout(0.0))
    assert "old_logprobs" not in batch and torch.equal(batch["engine_logprobs"], _rollout(0.0)[0]["engine_logprobs"])
    # A second epoch, a second minibatch, or the mismatch check need them before the update: scored.
    for extra in ("algorithm.ppo_epochs=2", "algorithm.num_minibatches=2", "algorithm.max_logprob_diff=0.1"):
        job = OnlineJob.from_config(tiny_config("tiny-reinforce-pp", tmp_path / extra, *HF, "run.batch_size=2", extra))
        assert job.scores_old_logprobs, extra
        batch, _ = job.compute_advantages(*_rollout(0.0))
        assert torch.equal(batch["old_logprobs"], _rollout(0.0)[1]["logprobs"])


def test_a_step_too_far_from_the_engine_is_skipped_and_counted(tmp_path):
    from rlhf_ray.jobs.common import BadSteps
    from rlhf_ray.jobs.online import OnlineJob

    cfg = tiny_config("tiny-reinforce-pp", tmp_path / "skip", *HF, "run.batch_size=2",
                      "algorithm.max_logprob_diff=0.1")
    job = OnlineJob.from_config(cfg)
    # Every response token 0.05 nats apart: under the limit, trained on; 0.2 apart: over it, skipped.
    kept = job.check_mismatch(*_rollout(0.05))
    assert kept["rollout/skipped"] == 0.0 and kept["rollout/logprob_diff"] == pytest.approx(0.05)
    skipped = job.check_mismatch(*_rollout(0.2))
    assert skipped["rollout/skipped"] == 1.0 and skipped["rollout/logprob_diff"] == pytest.approx(0.2)
    # rho = e^0.2 = 1.2214 on all three tokens, under the cap of 2: weights e^0.2, none truncated
    assert skipped["rollout/is_weight_mean"] == pytest.approx(1.221403) and skipped["rollout/is_clipped_frac"] == 0
    # k3 = rho - 1 - log rho = 0.221403 - 0.2
    assert skipped["rollout/mismatch_kl"] == pytest.approx(0.021403, abs=1e-6)
    bad = BadSteps(limit=2)
    assert bad.update(1, dict(skipped), ("policy/skipped", "rollout/skipped"), "train/skipped_steps") is None
    metrics = dict(skipped)
    why = bad.update(2, metrics, ("policy/skipped", "rollout/skipped"), "train/skipped_steps")
    assert metrics["train/skipped_steps"] == 2.0
    assert "rollout/logprob_diff 0.2 > algorithm.max_logprob_diff" in why


def test_the_update_turns_the_policys_mismatch_sums_into_ratios(tmp_path):
    from rlhf_ray.algorithms.rollout_is import SUM_PREFIX
    from rlhf_ray.jobs.online import OnlineJob

    job = OnlineJob.from_config(tiny_config("tiny-reinforce-pp", tmp_path / "sums", *HF, "run.batch_size=2"))
    roles = _Roles()
    # The rank's micro-batch means of its sums: 4 tokens, weights summing to 4.9 (squares 7.41), one truncated.
    sums = {"tokens": 4.0, "abs_diff": 2.420368, "kl": 1.312214, "weight": 4.9, "weight_sq": 7.41, "capped": 1.0}
    roles["policy"]._train = lambda batch, params: roles["policy"].sent.append(params) or \
        {"loss": 0.0, **{SUM_PREFIX + k: v for k, v in sums.items()}}
    batch, _ = job.compute_advantages(*_rollout(0.0))
    out = job.update(roles, batch, step=1, timer=_stand_in_job(job), kl_coef=0.05)
    assert not any(k.startswith(SUM_PREFIX) for k in out)
    assert out["rollout/is_weight_mean"] == pytest.approx(1.225) and out["rollout/is_clipped_frac"] == 0.25
    assert out["rollout/is_ess"] == pytest.approx(24.01 / 29.64)
    assert out["rollout/logprob_diff"] == pytest.approx(0.605092)
    params = roles["policy"].sent[0]
    assert (params["rollout_is"], params["rollout_is_cap"]) == ("tis", 2.0)  # the defaults reach the loss
