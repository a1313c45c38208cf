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
