"""The Hugging Face rollout engine, in-process: it samples from exactly the distribution the policy
scores, whatever the checkpoint's own generation defaults, and its replicas draw different samples."""

from __future__ import annotations

import torch

from rlhf_ray.config.schema import DataConfig, JobConfig, ModelConfig, RoleConfig, RolloutConfig
from rlhf_ray.models.forward import response_logprobs
from rlhf_ray.models.loading import load_causal_lm
from rlhf_ray.models.tokenizer import load_tokenizer
from rlhf_ray.workers.rollout.hf import HFRolloutWorker


def _checkpoint_with_generation_defaults(path):
    tokenizer = load_tokenizer("tiny")
    model = load_causal_lm("tiny-gpt2", dtype="float32", seed=0, tokenizer=tokenizer)
    # What hub checkpoints ship: these would reshape the sampling distribution if generate applied them.
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.suppress_tokens = list(range(3, 1000))
    model.generation_config.do_sample = True
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer


def _engine(path, rank=0):
    job = JobConfig(policy=RoleConfig(model=ModelConfig(name_or_path=str(path), dtype="float32")),
                    rollout=RolloutConfig(engine="hf", max_new_tokens=8, temperature=0.9),
                    data=DataConfig(max_prompt_length=32, max_length=48))
    engine = HFRolloutWorker(rank, 2, "127.0.0.1", 0, 1)
    engine.setup(job, init_from=str(path))
    return engine, job


def _prompts(tokenizer):
    tokenizer.padding_side = "left"
    batch = tokenizer(["User: hello\nAssistant:", "User: tell me about the weather\nAssistant:"],
                      return_tensors="pt", padding=True)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def test_engine_logprobs_match_the_policy_despite_the_checkpoints_generation_config(tmp_path):
    model, tokenizer = _checkpoint_with_generation_defaults(tmp_path / "ckpt")
    engine, job = _engine(tmp_path / "ckpt")
    out = engine.generate(_prompts(tokenizer), n=4, greedy=False, seed=3)
    with torch.no_grad():
        recomputed = response_logprobs(model, out["input_ids"], out["attention_mask"], 8,
                                       temperature=job.rollout.temperature)["logprobs"]
    mask = out["response_mask"].bool()
    assert float((out["engine_logprobs"][mask] - recomputed[mask]).abs().max()) < 1e-4
    # The checkpoint's suppressed tokens are not suppressed: the untrained model samples them freely.
    sampled = out["input_ids"][:, -8:][mask]
    assert float(((sampled >= 3) & (sampled < 1000)).float().mean()) > 0.5
    assert engine.model.generation_config.repetition_penalty in (None, 1.0)


def test_replicas_given_the_same_step_seed_draw_different_samples(tmp_path):
    _, tokenizer = _checkpoint_with_generation_defaults(tmp_path / "ckpt")
    prompts = _prompts(tokenizer)
    first, _ = _engine(tmp_path / "ckpt", rank=0)
    second, _ = _engine(tmp_path / "ckpt", rank=1)
    a = first.generate(prompts, n=4, greedy=False, seed=11)["input_ids"]
    assert torch.equal(a, first.generate(prompts, n=4, greedy=False, seed=11)["input_ids"])  # seeded
    assert not torch.equal(a, second.generate(prompts, n=4, greedy=False, seed=11)["input_ids"])
