"""The policy role's training step, in Ray actors with DeepSpeed, against a hand computation.

* The PPO gradient of one minibatch does not depend on how it is split: the
  global gradient norm DeepSpeed logs (`grad_norm`, before clipping) equals the
  norm of the gradient of the whole minibatch's token-mean loss computed by hand
  on the same tiny model, at micro-batch 16 and 2, on 1 and 2 ranks, at ZeRO-0
  and ZeRO-2. Rows have ragged response lengths, so a per-micro-batch mean
  would weigh tokens differently and change the number.
* Dropout of a checkpoint is off while the policy trains: PPO's ratio at the
  rollout's own weights is exactly 1.
* KTO's reference point z0 is one number for the whole step, averaged over
  micro-batches and ranks before clamping.
* A weight sync copies the weights out of the engine on the sending rank only.
"""

from __future__ import annotations

import pytest
import ray
import torch

from rlhf_ray.algorithms.policy_loss import ppo_policy_loss
from rlhf_ray.algorithms.registry import get_online_algorithm
from rlhf_ray.algorithms.steps import PolicyStep
from rlhf_ray.config import load_config
from rlhf_ray.models import forward as fw
from rlhf_ray.models.loading import load_causal_lm
from rlhf_ray.models.tokenizer import load_tokenizer
from rlhf_ray.runtime.actor_group import ActorGroup
from rlhf_ray.workers.policy import PolicyWorker

ROWS, PROMPT, RESPONSE = 16, 6, 10


def _job(tmp_path, *overrides):
    return load_config("tiny-ppo", [f"run.output_dir={tmp_path}", "policy.optim.grad_clip=0.5",
                                    "policy.optim.warmup_steps=0", *overrides])


def _rollout_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 1000, (ROWS, PROMPT + RESPONSE), generator=g)
    lengths = torch.tensor([1, 10, 2, 9, 3, 8, 4, 7, 5, 6, 10, 1, 2, 2, 10, 3])
    response_mask = (torch.arange(RESPONSE)[None, :] < lengths[:, None]).long()
    attention_mask = torch.cat([torch.ones(ROWS, PROMPT, dtype=torch.long), response_mask], dim=1)
    return {"input_ids": ids, "attention_mask": attention_mask, "response_mask": response_mask,
            "advantages": torch.randn(ROWS, RESPONSE, generator=g)}


def _hand_gradient_norm(job, batch) -> tuple[float, torch.Tensor]:
    """Old log-probs and the global gradient norm of the minibatch's token-mean PPO loss."""
    model = load_causal_lm("tiny-gpt2", dtype="float32", seed=job.run.seed, tokenizer=load_tokenizer("tiny"))
    model.train()
    out = fw.response_logprobs(model, batch["input_ids"], batch["attention_mask"], RESPONSE)
    old = out["logprobs"].detach()
    loss, _ = ppo_policy_loss(out["logprobs"], old, batch["advantages"], batch["response_mask"], clip_eps=0.2)
    loss.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    return float(norm), old


def _step(job, batch) -> PolicyStep:
    return PolicyStep(get_online_algorithm("ppo"), clip_eps=0.2, kl_coef=0.0, temperature=job.rollout.temperature,
                      loss_aggregation="token-mean", loss_denominator=float(batch["response_mask"].sum()))


def _policy_step(job, batch, ranks: int) -> list[dict]:
    step = _step(job, batch)
    with ActorGroup(PolicyWorker, role="policy", num_ranks=ranks, num_cpus_per_rank=1) as policy:
        ray.get(policy.map(lambda a: a.setup.remote(job, init_from="tiny-gpt2", batch_per_rank=ROWS // ranks,
                                                    total_optimizer_steps=1)))
        return ray.get(policy.scatter(lambda a, s: a.train_online.remote(s, step), batch))


@pytest.mark.parametrize("ranks, micro, stage", [(1, 16, 0), (1, 2, 0), (2, 2, 0), (2, 2, 2), (2, 8, 2)])
def test_logged_gradient_norm_is_the_minibatch_gradient_whatever_the_split(ray_cluster, tmp_path, ranks, micro,
                                                                           stage):
    job = _job(tmp_path, f"policy.micro_batch_size={micro}", f"policy.zero_stage={stage}")
    batch = _rollout_batch()
    expected, old = _hand_gradient_norm(job, batch)
    results = _policy_step(job, {**batch, "old_logprobs": old}, ranks)
    for rank, result in enumerate(results):
        assert result["grad_norm"] == pytest.approx(expected, rel=1e-4), (rank, result["grad_norm"], expected)
        assert result["grad_clipped"] == float(expected > 0.5)


def test_the_logged_norm_fires_clipping_only_above_the_threshold(ray_cluster, tmp_path):
    batch = _rollout_batch()
    expected, old = _hand_gradient_norm(_job(tmp_path), batch)
    results = _policy_step(_job(tmp_path, f"policy.optim.grad_clip={expected * 2}", "policy.micro_batch_size=16"),
                           {**batch, "old_logprobs": old}, 1)
    assert results[0]["grad_clipped"] == 0.0 and results[0]["grad_norm"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("disable", [True, False])
def test_dropout_is_off_while_the_policy_trains(ray_cluster, tmp_path, disable):
    # A checkpoint with dropout 0.1 everywhere, as GPT-2 and most hub models ship.
    tokenizer = load_tokenizer("tiny")
    model = load_causal_lm("tiny-gpt2", dtype="float32", seed=0, tokenizer=tokenizer)
    model.config.attn_pdrop = model.config.resid_pdrop = model.config.embd_pdrop = 0.1
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    job = _job(tmp_path / "run", f"policy.model.name_or_path={tmp_path / 'ckpt'}", "policy.micro_batch_size=16",
               f"policy.model.disable_dropout={str(disable).lower()}")
    batch = _rollout_batch()
    step = _step(job, batch)
    with ActorGroup(PolicyWorker, role="policy", num_ranks=1, num_cpus_per_rank=1) as policy:
        ray.get(policy.rank0.setup.remote(job, init_from=str(tmp_path / "ckpt"), batch_per_rank=ROWS,
                                          total_optimizer_steps=1))
        old = ray.get(policy.rank0.rollout_logprobs.remote(batch))["logprobs"]  # eval mode, no gradient
        result = ray.get(policy.rank0.train_online.remote({**batch, "old_logprobs": old}, step))
    # approx_kl is the k3 estimate of KL(old || current) at identical weights: 0 iff the forwards agree.
    if disable:
        assert result["policy/approx_kl"] < 1e-10 and result["policy/clipfrac"] == 0.0
    else:
        assert result["policy/approx_kl"] > 1e-4  # what dropout did to the ratio before it was turned off


def test_kto_reference_point_is_averaged_over_the_whole_step_before_clamping(ray_cluster, tmp_path):
    from rlhf_ray.data.job_data import JobData, load_job_examples

    job = load_config("tiny-kto", [f"run.output_dir={tmp_path}", "policy.micro_batch_size=2",
                                   "policy.optim.warmup_steps=0", "policy.optim.scheduler=constant"])
    tokenizer = load_tokenizer("tiny")
    examples, _ = load_job_examples("synthetic:kto", "kto", job.data, tokenizer, tmp_path / "data")
    batch = JobData(examples, "kto", tokenizer, job.data).batch(list(range(8)))
    # Reference log-probs chosen so that the two ranks' shares disagree in sign: the policy-minus-reference
    # log-ratio is +3 on rank 0's four mismatched pairs and -1 on rank 1's.
    model = load_causal_lm("tiny-gpt2", dtype="float32", seed=job.run.seed, tokenizer=tokenizer)
    with torch.no_grad():
        policy_kl = fw.sequence_logps(model, batch["kl_input_ids"], batch["kl_attention_mask"],
                                      batch["kl_loss_mask"])["logps"]
    batch["ref_kl_logps"] = policy_kl + torch.tensor([-3.0] * 4 + [1.0] * 4)
    batch["ref_logps"] = torch.zeros(8)
    expected = 1.0  # (4 * 3 + 4 * -1) / 8, clamped once
    with ActorGroup(PolicyWorker, role="policy", num_ranks=2, num_cpus_per_rank=1) as policy:
        ray.get(policy.map(lambda a: a.setup.remote(job, init_from="tiny-gpt2", batch_per_rank=4,
                                                    total_optimizer_steps=1)))
        z0 = ray.get(policy.scatter(lambda a, s: a.kto_reference_point.remote(s), batch))
    # Each rank on its own would use 3 and max(0, -1) = 0.
    assert z0[0] == pytest.approx(expected, abs=1e-4) and z0[1] == pytest.approx(expected, abs=1e-4)


def test_only_the_sending_rank_copies_the_weights_out():
    # Rank 1 takes part in the ZeRO-3 gathers but copies nothing to the CPU and builds no buckets.
    class Engine:
        lora = False
        joined = 0

        def join_weight_gathers(self):
            Engine.joined += 1

        def iter_weight_buckets(self, bucket_bytes):
            raise AssertionError("a rank that does not send copied the weights out")

    worker = PolicyWorker.__new__(PolicyWorker)
    worker.rank, worker.engine = 1, Engine()
    assert worker.send_weights([object()], bucket_bytes=2**20) == {"sync/bytes": 0.0}
    assert Engine.joined == 1
