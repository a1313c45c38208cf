"""Config loading: YAML + dotted overrides, type checks, helpful errors."""

import dataclasses

import pytest

from rlhf_ray.config import ConfigError, JobConfig, dump_yaml, load_config, to_dict
from rlhf_ray.config.loader import build


def write(tmp_path, text, name="job.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_yaml_and_overrides_build_a_frozen_typed_config(tmp_path):
    path = write(tmp_path, "algorithm:\n  name: dpo\n  params: {beta: 0.2}\n"
                           "policy:\n  num_ranks: 2\n  optim: {lr: 1.0e-5}\n")
    cfg = load_config(path, ["algorithm.params.beta=0.3", "run.sinks=jsonl,tensorboard",
                             "placement.colocate=[[policy, reference]]"])
    assert isinstance(cfg, JobConfig)
    assert cfg.algorithm.params == {"beta": 0.3}
    assert cfg.policy.num_ranks == 2 and cfg.policy.optim.lr == 1e-5
    assert cfg.run.sinks == ("jsonl", "tensorboard")
    assert cfg.placement.colocate == (("policy", "reference"),)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.algorithm.kl_coef = 1.0  # type: ignore[misc]


def test_int_is_accepted_for_float_and_dump_round_trips(tmp_path):
    cfg = load_config(None, ["algorithm.kl_coef=1", "policy.optim.betas=[0.9, 0.99]"])
    assert cfg.algorithm.kl_coef == 1.0 and isinstance(cfg.algorithm.kl_coef, float)
    again = load_config(write(tmp_path, dump_yaml(cfg)))
    assert to_dict(again) == to_dict(cfg)


def test_unknown_key_suggests_the_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'algorithm.kl_coeff'.*did you mean 'algorithm.kl_coef'"):
        load_config(None, ["algorithm.kl_coeff=0.1"])
    with pytest.raises(ConfigError, match=r"unknown key 'polcy'"):
        load_config(write(tmp_path, "polcy:\n  num_ranks: 2\n"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("policy.num_ranks=two", r"policy.num_ranks expects an integer, got 'two'"),
        ("run.progress=maybe", r"run.progress expects true or false"),
        ("algorithm.kl_coef=[1]", r"algorithm.kl_coef expects a number"),
        ("algorithm.params=3", r"algorithm.params expects a mapping"),
        ("algorithm.dpop_lambda=3", r"algorithm.dpop_lambda is no longer a key; write algorithm.params.lam"),
        ("policy.zero_stage=4", r"policy.zero_stage: got 4; expected 0, 1, 2 or 3"),
        ("policy.model.dtype=fp8", r"policy.model.dtype: got 'fp8'"),
        ("rollout.engine=tgi", r"rollout.engine: got 'tgi'; expected hf or vllm"),
        ("algorithm.loss_aggregation=sum",
         r"algorithm.loss_aggregation: got 'sum'; expected token-mean, seq-mean-token-mean, seq-mean-token-sum-norm"),
        ("algorithm.clip_eps_low=1.5", r"algorithm.clip_eps_low: must lie in \[0, 1\)"),
        ("algorithm.overlong_buffer=-1", r"algorithm.overlong_buffer: must be >= 0"),
    ],
)
def test_wrong_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "algorithm:\n  name: dpo\n beta: [\n")
    with pytest.raises(ConfigError, match=r"job.yaml: YAML syntax error at line \d+"):
        load_config(path)


def test_missing_file_and_unknown_preset_are_clear(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match=r"neither a YAML file nor a shipped preset"):
        load_config("no-such-preset")


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match=r"section.key=value"):
        load_config(None, ["algorithm.params.beta"])


def test_build_rejects_non_mapping_section():
    with pytest.raises(ConfigError, match=r"policy must be a mapping"):
        build(JobConfig, {"policy": 3}, prefix="")


def test_an_online_algorithm_fills_in_its_own_defaults_and_keeps_what_is_given(tmp_path):
    # dapo starts from its paper's settings where the config says nothing ...
    dapo = load_config(None, ["algorithm.name=dapo"]).algorithm
    assert (dapo.clip_eps_low, dapo.clip_eps_high, dapo.kl_coef, dapo.dynamic_sampling) == (0.2, 0.28, 0.0, True)
    assert dapo.clip_range == (0.2, 0.28)
    # ... and a value the file or an override gives wins over it
    path = write(tmp_path, "algorithm:\n  name: dapo\n  kl_coef: 0.01\n")
    given = load_config(path, ["algorithm.clip_eps_high=0.3"]).algorithm
    assert (given.kl_coef, given.clip_eps_low, given.clip_eps_high) == (0.01, 0.2, 0.3)
    assert load_config(None, ["algorithm.name=Dr-GRPO"]).algorithm.loss_aggregation == "seq-mean-token-sum-norm"
    # grpo has none of its own: clip_eps on both sides; the resolved config round-trips
    grpo = load_config(None, ["algorithm.name=grpo", "algorithm.clip_eps_high=0.28"]).algorithm
    assert grpo.clip_range == (0.2, 0.28) and grpo.kl_coef == 0.05 and not grpo.dynamic_sampling
    cfg = load_config("tiny-gspo")
    assert to_dict(load_config(write(tmp_path, dump_yaml(cfg), "again.yaml"))) == to_dict(cfg)


def test_the_config_knows_every_loss_aggregation():
    from rlhf_ray.algorithms.advantages import LOSS_AGGREGATIONS as MODES
    from rlhf_ray.config.schema import LOSS_AGGREGATIONS

    assert LOSS_AGGREGATIONS == MODES
