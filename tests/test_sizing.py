"""ZeRO bucket sizes: the rule's worked example, its cap, and that the DeepSpeed config and the
planner both take their sizes from it."""

from __future__ import annotations

from rlhf_ray.sizing import DEFAULT_BUCKET, zero_buckets


def test_tiny_gpt2_buckets_by_hand():
    # 560,640 parameters, largest tensor the 1,024 x 128 token embedding.
    assert zero_buckets(2, 560_640, 131_072) == {"reduce_bucket_size": 140_160, "allgather_bucket_size": 140_160}
    assert zero_buckets(3, 560_640, 131_072) == {"reduce_bucket_size": 140_160,
                                                 "stage3_prefetch_bucket_size": 140_160,
                                                 "stage3_param_persistence_threshold": 560}


def test_buckets_hold_the_largest_tensor_and_stop_at_deepspeeds_default():
    assert zero_buckets(1, 1_000, 600)["reduce_bucket_size"] == 600
    assert zero_buckets(3, 10**12, 10**9) == {"reduce_bucket_size": DEFAULT_BUCKET,
                                              "stage3_prefetch_bucket_size": DEFAULT_BUCKET,
                                              "stage3_param_persistence_threshold": 100_000}


def test_the_deepspeed_config_and_the_planner_use_the_same_sizes():
    from rlhf_ray.config import load_config
    from rlhf_ray.planner.from_config import planned_roles
    from rlhf_ray.planner.shapes import param_tensors
    from rlhf_ray.runtime.deepspeed_config import build_deepspeed_config

    cfg = load_config("tiny-ppo", ["policy.zero_stage=3"])
    spec = next(s for s in planned_roles(cfg) if s.role == "policy")
    numels = [t.numel for t in param_tensors(spec.shape, spec.head)]
    expected = zero_buckets(3, sum(numels), max(numels))
    zero = build_deepspeed_config(zero_stage=3, micro_batch_size_per_rank=1, world_size=1, on_cuda=False,
                                  model_numel=sum(numels), largest_param_numel=max(numels))["zero_optimization"]
    assert {key: zero[key] for key in expected} == expected
    planned = spec.settings.zero
    assert (planned.reduce_bucket_size, planned.prefetch_bucket_size, planned.param_persistence_threshold) == (
        expected["reduce_bucket_size"], expected["stage3_prefetch_bucket_size"],
        expected["stage3_param_persistence_threshold"])
