"""The smol-* presets: SmolLM2-135M-Instruct (a real model: 49,152-token vocabulary, ChatML chat template,
tied embeddings) on the arithmetic task, end to end on the shared local Ray cluster.

Each preset runs one or two steps on a handful of questions with short answers, so the module stays a few
minutes on two cores: enough to show that the converted model loads in every role, the chat-templated
prompts reach vLLM and the rule, the engine's log-probs are the policy's (fp32), LoRA's adapter-off base
serves as the reference, and held-out evaluation reports the rule's pass rate, recounted here from the
samples on disk. Steps are not timed; the benchmarks time them."""

from __future__ import annotations

import json
import math

import pytest

from rlhf_ray.config import load_config
from rlhf_ray.jobs import run_job
from rlhf_ray.telemetry.metrics import read_metrics

from job_helpers import tiny_config

SMOL_PRESETS = ("smol-sft", "smol-dpo", "smol-dpo-lora", "smol-grpo", "smol-remax", "smol-ppo")
# Four held-out questions, greedy answers of 8 tokens at the end of the run.
EVAL = ["data.eval=arithmetic:prompts_eval", "run.eval_size=4", "rollout.max_new_tokens=8"]
OFFLINE = ["run.batch_size=4", "policy.micro_batch_size=2", "policy.optim.warmup_steps=0",
           "policy.optim.scheduler=constant", "reference.micro_batch_size=4"]
ONLINE = ["run.batch_size=2", "rollout.max_new_tokens=8", "algorithm.num_minibatches=1", "algorithm.ppo_epochs=1",
          "policy.micro_batch_size=4", "reference.micro_batch_size=4", "critic.micro_batch_size=4"]


def samples(run_dir, step):
    return [json.loads(line) for line in (run_dir / "samples" / f"step_{step}.jsonl").read_text().splitlines()]


def test_every_smol_preset_trains_the_real_model_on_the_arithmetic_task():
    for name in SMOL_PRESETS:
        cfg = load_config(name)
        assert cfg.policy.model.name_or_path == "smollm2-135m", name
        assert cfg.data.train.startswith("arithmetic:"), name
        assert cfg.reward.rule == "rlhf_ray.data.arithmetic:answer_reward", name
        assert cfg.judge == "auto", name
    lora = load_config("smol-dpo-lora")
    assert lora.policy_is_reference and lora.policy.lora.target_modules == ("q_proj", "v_proj")
    assert load_config("smol-ppo").critic.init_from == "policy"


def test_smol_sft_evaluates_with_the_tasks_rule(ray_cluster, tmp_path):
    run_dir = tmp_path / "sft"
    summary = run_job(tiny_config("smol-sft", run_dir, "run.total_steps=1", *OFFLINE, *EVAL))
    assert summary["roles"] == ["policy"]
    row = read_metrics(run_dir)[-1]
    # A pretrained model: the answer tokens are far from uniform over 49,152 entries (log 49152 = 10.8).
    assert 0 < row["train/loss"] < 8
    # The held-out pass rate is the rule's verdict on the greedy answers written beside it.
    written = samples(run_dir, 1)
    assert len(written) == 4 and all(set(r) == {"prompt", "response", "judge", "reward"} for r in written)
    assert row["eval/greedy_pass_rate"] == sum(r["reward"] for r in written) / 4
    assert row["eval/alignment_accuracy"] == sum(r["judge"] for r in written) / 4 == row["eval/greedy_pass_rate"]
    assert "<|im_start|>user\nWhat is" in written[0]["prompt"]


@pytest.mark.parametrize("preset, roles", [("smol-dpo", ["policy", "reference"]), ("smol-dpo-lora", ["policy"])])
def test_smol_dpo_starts_at_log_2(ray_cluster, tmp_path, preset, roles):
    summary = run_job(tiny_config(preset, tmp_path / preset, "run.total_steps=1", *OFFLINE))
    assert summary["roles"] == roles  # with LoRA the adapter-off base is the reference: no second model
    row = read_metrics(tmp_path / preset)[0]
    assert row["train/loss"] == pytest.approx(math.log(2), abs=1e-4)  # the policy is the reference


@pytest.mark.parametrize("preset, roles, steps", [
    ("smol-grpo", ["policy", "reference", "reward", "rollout"], 2),
    ("smol-remax", ["policy", "reference", "reward", "rollout"], 1),
    ("smol-ppo", ["critic", "policy", "reference", "reward", "rollout"], 1),
])
def test_smol_online_preset_samples_from_the_real_model(ray_cluster, tmp_path, preset, roles, steps):
    overrides = [f"run.total_steps={steps}", *ONLINE]
    if preset == "smol-grpo":
        overrides += ["algorithm.samples_per_prompt=2", *EVAL]
    run_dir = tmp_path / preset
    summary = run_job(tiny_config(preset, run_dir, *overrides))
    assert summary["roles"] == roles and summary["num_steps"] == steps
    rows = read_metrics(run_dir)
    for row in rows:
        # vLLM's log-probs of its samples are the policy's in fp32, after each sync too.
        assert row["rollout/logprob_diff"] < 1e-4, row["rollout/logprob_diff"]
        assert 0 <= row["rollout/reward_mean"] <= 1
    if preset == "smol-grpo":
        last = rows[-1]
        written = samples(run_dir, steps)
        assert last["eval/greedy_pass_rate"] == sum(r["reward"] for r in written) / len(written)
        assert 0 <= last["eval/pass_rate"] <= 1


def test_a_reward_model_with_another_tokenizer_is_refused(tmp_path):
    """The reward role scores the policy's token ids as they are: a reward model trained with another
    tokenizer (here SmolLM2's under a tiny policy) would score other text, so the job is refused."""
    from rlhf_ray.config import ConfigError
    from rlhf_ray.jobs.validate import validate_online
    from rlhf_ray.models.heads import load_scalar_head_model
    from rlhf_ray.models.loading import load_tokenizer_for

    def reward_model(folder, tokenizer_of):
        load_scalar_head_model("tiny-gpt2").save_pretrained(folder)
        load_tokenizer_for(tokenizer_of).save_pretrained(folder)
        return tiny_config("tiny-ppo", tmp_path / "run", "reward.rule=", f"reward.model.name_or_path={folder}")

    with pytest.raises(ConfigError, match=r"reward\.model: the reward model's tokenizer .*49152 tokens.* is not "
                                          r"the policy's \(tiny-gpt2"):
        validate_online(reward_model(tmp_path / "other", "smollm2-135m"))
    validate_online(reward_model(tmp_path / "same", "tiny-gpt2"))  # the policy's own tokenizer: accepted


def test_an_offline_jobs_rule_that_refuses_its_eval_data_fails_before_training(tmp_path):
    from rlhf_ray.config import ConfigError
    from rlhf_ray.jobs.offline import OfflineJob

    cfg = tiny_config("tiny-dpo", tmp_path / "run", "data.eval=synthetic:preference_eval",
                      "reward.rule=rlhf_ray.data.arithmetic:answer_reward")
    with pytest.raises(ConfigError, match=r"reward\.rule: rlhf_ray\.data\.arithmetic:answer_reward raised on the "
                                          r"first prompt of data\.eval \(synthetic:preference_eval\): ValueError: "
                                          r"answer_reward: the prompt .* asks no question"):
        OfflineJob.from_config(cfg)


def test_smol_segment_dpo_on_chatml_conversations(ray_cluster, tmp_path):
    # Segment-Level DPO on multi-turn chat rows, rendered by SmolLM2's ChatML template: the loss covers the
    # assistant reply that differs ("<reply><|im_end|>\n"), not the shared turns, and starts at log 2.
    from rlhf_ray.data.job_data import JobData, load_job_examples
    from rlhf_ray.models.loading import load_tokenizer_for

    def turn(role, content):
        return {"role": role, "content": content}

    rows = []
    for i in range(4):
        shared = [turn("user", f"What is {i} + 1?"), turn("assistant", f"{i + 1}"), turn("user", "And 2 more?")]
        rows.append({"chosen": shared + [turn("assistant", f"{i + 3}"), turn("user", "Thanks"),
                                         turn("assistant", "Bye")],
                     "rejected": shared + [turn("assistant", f"{i + 4}"), turn("user", "Thanks"),
                                           turn("assistant", "Hm")]})
    data = tmp_path / "conversations.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    overrides = ["algorithm.name=segment_dpo", "algorithm.params={beta: 0.1, segment_turns: 1}", f"data.train={data}",
                 "data.max_length=160", "data.max_prompt_length=120"]
    cfg = tiny_config("smol-dpo", tmp_path / "segment", "run.total_steps=1", *OFFLINE, *overrides)
    tokenizer = load_tokenizer_for("smollm2-135m")
    examples, _ = load_job_examples(str(data), "preference", cfg.data, tokenizer, tmp_path,
                                    kind="multi_turn_preference")
    batch = JobData(examples, "multi_turn_preference", tokenizer, cfg.data, params={"segment_turns": 1}).batch([0])
    mask = batch["chosen_loss_mask"][0].bool()
    assert tokenizer.decode(batch["chosen_input_ids"][0][mask]) == "3<|im_end|>\n"
    assert "<|im_start|>assistant\n1<|im_end|>" in tokenizer.decode(batch["chosen_input_ids"][0])  # shared, unmasked
    run_job(cfg)
    row = read_metrics(tmp_path / "segment")[0]
    assert row["train/loss"] == pytest.approx(math.log(2), abs=1e-4)  # the policy is the reference
