"""Offline jobs end to end on a local Ray cluster: data parallelism, ZeRO stages,
exact resume, the SPIN/sDPO schedules and reward-model training."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray.jobs import run_job
from rlhf_ray.telemetry.metrics import read_metrics

from job_helpers import assert_same_run, final_weights, stopped_before, tiny_config

# One rank or two, each with one CPU; the reference gets its own bundle.
SMALL = ["run.batch_size=8", "policy.micro_batch_size=4", "reference.micro_batch_size=8",
         "policy.optim.warmup_steps=0", "policy.optim.scheduler=constant",
         "policy.num_cpus_per_rank=1", "reference.num_cpus_per_rank=1", "placement.colocate=[]"]


def test_dpo_two_ranks_equal_one_rank_and_zero3_holds_less_per_rank(ray_cluster, tmp_path):
    run_job(tiny_config("tiny-dpo", tmp_path / "one", "run.total_steps=3", *SMALL))
    two = run_job(tiny_config("tiny-dpo", tmp_path / "two", "run.total_steps=3", "policy.num_ranks=2", *SMALL))
    # Same global batch of 8 pairs: one rank accumulates 2 micro-batches of 4, two ranks average 4 each.
    w1, w2 = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert w1.keys() == w2.keys()
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], rtol=1e-4, atol=1e-5)
    first = read_metrics(tmp_path / "one")[0]
    assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step one
    assert read_metrics(tmp_path / "one")[-1]["train/loss"] < first["train/loss"]

    held = {"zero0": two["max"]["memory/policy/held_bytes"]}
    for stage in (2, 3):
        summary = run_job(tiny_config("tiny-dpo", tmp_path / f"z{stage}", "run.total_steps=2", "policy.num_ranks=2",
                                      f"policy.zero_stage={stage}", *SMALL))
        assert summary["num_steps"] == 2
        held[f"zero{stage}"] = summary["max"]["memory/policy/held_bytes"]
    # Per rank, with two ranks: ZeRO-3 partitions parameters, gradients and optimizer state.
    assert held["zero3"] < held["zero0"], held
    assert held["zero2"] < held["zero0"], held


def test_resumed_run_ends_like_the_uninterrupted_one(ray_cluster, tmp_path):
    full = tmp_path / "full"
    run_job(tiny_config("tiny-dpo", full, "run.total_steps=4", "run.save_every=2", *SMALL))
    assert (full / "checkpoints" / "step_2" / "CHECKPOINT_COMPLETE").exists()
    # The same run stopped after step 2: its directory as it was then.
    resumed = stopped_before(full, 4, tmp_path / "resumed")
    run_job(tiny_config("tiny-dpo", resumed, "run.total_steps=4", "run.save_every=2", *SMALL))
    assert_same_run(resumed, full)


def test_spin_and_sdpo_move_the_reference_between_stages(ray_cluster, tmp_path):
    spin = run_job(tiny_config("tiny-spin", tmp_path / "spin", "run.total_steps=2", "algorithm.spin_iterations=2",
                               "data.max_examples=16", "rollout.max_new_tokens=8", *SMALL))
    rows = read_metrics(tmp_path / "spin")
    assert [r["stage"] for r in rows] == [0, 1]
    # At each stage start the reference equals the policy, so DPO's loss is ln 2 again.
    assert all(r["train/loss"] == pytest.approx(math.log(2), abs=1e-4) for r in rows)
    sdpo = run_job(tiny_config("tiny-sdpo", tmp_path / "sdpo", "run.total_steps=4", "algorithm.sdpo_stages=2",
                               *SMALL))
    rows = read_metrics(tmp_path / "sdpo")
    assert [r["stage"] for r in rows] == [0, 0, 1, 1]
    assert rows[2]["train/loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert rows[1]["train/loss"] < math.log(2)
    assert spin["num_steps"] == 2 and sdpo["num_steps"] == 4


def test_reward_model_training_reports_heldout_accuracy_and_centres_rewards(ray_cluster, tmp_path):
    out = tmp_path / "rm"
    summary = run_job(tiny_config("tiny-rm", out, "run.total_steps=3", "run.batch_size=8", "reward.micro_batch_size=8",
                                  "reward.num_cpus_per_rank=1", "data.eval=synthetic:preference_eval",
                                  "run.eval_size=16", "reward.optim.warmup_steps=0",
                                  "reward.optim.scheduler=constant"))
    last = read_metrics(out)[-1]
    assert 0.0 <= last["eval/rm_accuracy"] <= 1.0
    assert (out / "final" / "config.json").exists()
    from rlhf_ray.models.heads import load_scalar_head_model

    model = load_scalar_head_model(str(out / "final"))
    assert model.score_bias != 0.0  # InstructGPT's zero-mean shift was applied
    assert summary["algorithm"] == "rm"


def test_kl_sft_with_precomputed_reference_logprobs(ray_cluster, tmp_path):
    # The cached per-token reference log-probs come from chunks padded to different widths.
    out = tmp_path / "klsft"
    run_job(tiny_config("tiny-kl-sft", out, "run.total_steps=2", *SMALL, "algorithm.precompute_reference=true"))
    rows = read_metrics(out)
    assert len(rows) == 2 and all(math.isfinite(r["train/loss"]) for r in rows)
    assert rows[0]["sft/kl"] == pytest.approx(0.0, abs=1e-6)  # step 1: the policy is the reference
    assert all(r["train/grad_norm"] > 0 and r["train/grad_clipped"] in (0.0, 1.0) for r in rows)


def test_apo_zero_declared_in_one_registry_entry_trains_end_to_end(ray_cluster, tmp_path):
    out = tmp_path / "apo"
    run_job(tiny_config("tiny-dpo", out, "algorithm.name=apo_zero", "algorithm.params.beta=0.5",
                        "run.total_steps=3", *SMALL))
    rows = read_metrics(out)
    assert rows[0]["train/loss"] == pytest.approx(1.0, abs=1e-5)  # step 1: the policy is the reference
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"]


def multi_turn_pairs(path, n=8):
    """Chat rows sharing two exchanges and differing from the assistant's second reply on, as TRL writes them."""
    import json

    def turn(role, content):
        return {"role": role, "content": content}

    rows = []
    for i in range(n):
        shared = [turn("user", f"add {i} and 1"), turn("assistant", f"{i + 1}"), turn("user", "and 2 more?")]
        rows.append({"chosen": shared + [turn("assistant", f"{i + 3}"), turn("user", "thanks"),
                                         turn("assistant", "you are welcome")],
                     "rejected": shared + [turn("assistant", f"{i + 4}"), turn("user", "thanks"),
                                           turn("assistant", "no")]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_segment_dpo_trains_on_multi_turn_pairs_end_to_end(ray_cluster, tmp_path):
    # A shipped DPO preset, with the objective's name, its segment length and chat-message data.
    out = tmp_path / "segment"
    run_job(tiny_config("tiny-dpo", out, "algorithm.name=segment_dpo", "algorithm.params.segment_turns=2",
                        f"data.train={multi_turn_pairs(tmp_path / 'pairs.jsonl')}", "run.total_steps=3", *SMALL))
    rows = read_metrics(out)
    assert len(rows) == 3 and all(math.isfinite(r["train/loss"]) for r in rows)
    assert rows[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)  # step 1: the policy is the reference
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"]


def test_odpo_uses_per_pair_scores_and_refuses_data_without_them(ray_cluster, tmp_path):
    import json

    from rlhf_ray.config import ConfigError

    out = tmp_path / "odpo"
    run_job(tiny_config("tiny-odpo", out, "run.total_steps=1", *SMALL))
    # Offsets alpha * log(1 + 1.25 - 0.25) = log 2 for every synthetic pair: loss log(1 + 2) at the reference.
    assert read_metrics(out)[0]["train/loss"] == pytest.approx(math.log(3.0), abs=1e-4)
    unscored = tmp_path / "pairs.jsonl"
    unscored.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": f"Yes {i}.", "rejected": f"No {i}."})
                                + "\n" for i in range(8)))
    with pytest.raises(ConfigError, match=r"odpo sets each pair's offset from its scores.*algorithm.params.offset"):
        run_job(tiny_config("tiny-odpo", tmp_path / "bad", f"data.train={unscored}", *SMALL))
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()
    constant = tmp_path / "constant"
    run_job(tiny_config("tiny-odpo", constant, f"data.train={unscored}", "algorithm.params.offset=1.0",
                        "run.total_steps=1", *SMALL))
    assert read_metrics(constant)[0]["train/loss"] == pytest.approx(math.log(1 + math.e), abs=1e-4)


@pytest.mark.parametrize("preset, override, message", [
    ("tiny-kl-sft", "algorithm.kl_coef=0.5", r"algorithm.kl_coef: kl_sft does not read .*reads: .*algorithm.params"),
    ("tiny-simpo", "algorithm.params.lam=0.5", r"algorithm.params: simpo has no parameter 'lam'; its parameters: "
                                               r"beta, gamma\..*gamma \(default 1.0, >= 0\): target reward margin"),
    ("tiny-dpop", "algorithm.params.beta=-1", r"algorithm.params.beta: dpop parameter 'beta' must be > 0, got -1"),
    ("tiny-cdpo", "algorithm.params.label_smoothing=0.5", r"algorithm.params.label_smoothing: .* must be \[0, 0.5\)"),
    ("tiny-dpo", "algorithm.simpo_gamma=1.0",
     r"algorithm.simpo_gamma is no longer a key; write algorithm.params.gamma"),
    ("tiny-dpo", "algorithm.params.beta=high", r"algorithm.params.beta: .* expects a number, got 'high'"),
])
def test_settings_an_objective_ignores_are_refused(tmp_path, preset, override, message):
    from rlhf_ray.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        run_job(tiny_config(preset, tmp_path / "bad", override))
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_dpo_with_shared_prefixes_runs_as_without(ray_cluster, tmp_path):
    # A Llama policy and reference score each pair's prompt once for chosen and rejected; the run is the plain
    # one to float rounding. Reference micro-batches as the policy's: at step 1 both then pack alike, their
    # rewards are 0 exactly and the accuracy (a comparison of two rewards) is not decided by rounding.
    args = ["run.total_steps=2", "policy.model.name_or_path=tiny-llama", *SMALL, "reference.micro_batch_size=4"]
    shared, plain = tmp_path / "shared", tmp_path / "plain"
    run_job(tiny_config("tiny-dpo", shared, *args))
    run_job(tiny_config("tiny-dpo", plain, *args, "policy.shared_prefix=false", "reference.shared_prefix=false"))
    assert_same_run(shared, plain)
