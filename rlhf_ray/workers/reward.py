"""The frozen reward role: a scalar-head reward model, or a rule function.

`reward.rule: package.module:function` makes the role call
`function(prompts, responses) -> list[float]` on the decoded texts (the
synthetic task's judge, a unit-test checker, ...); otherwise the reward model
at `reward.model.name_or_path` scores each sequence at its last token.
"""

from __future__ import annotations

import torch

from rlhf_ray.config.imports import import_callable
from rlhf_ray.config.schema import JobConfig
from rlhf_ray.models import forward as fw
from rlhf_ray.models.heads import load_scalar_head_model
from rlhf_ray.models.loading import dtype_name, load_tokenizer_for, resolve_dtype
from rlhf_ray.runtime.engine import InferenceEngine
from rlhf_ray.telemetry.timers import ComputeClock
from rlhf_ray.workers.base import EngineWorker


class RewardWorker(EngineWorker):
    """One rank of the reward group; with a rule there is no engine, and the rule's own clock and the
    process's peak RSS stand in for the engine's."""

    ROLE = "reward"

    def setup(self, job: JobConfig, *, tokenizer_from: str) -> dict:
        self.job = job
        cfg = job.reward
        self.tokenizer = load_tokenizer_for(cfg.model.tokenizer or tokenizer_from,
                                            trust_remote_code=cfg.model.trust_remote_code)
        self.rule = import_callable(cfg.rule) if cfg.rule else None
        self.clock = ComputeClock()  # the rule's seconds; a model's are on its engine's clock
        self.engine = None
        if self.rule is None:
            dtype = resolve_dtype(cfg.model.dtype, self.device)
            model = load_scalar_head_model(cfg.model.name_or_path, dtype=dtype,
                                           trust_remote_code=cfg.model.trust_remote_code, seed=job.run.seed,
                                           tokenizer=self.tokenizer)
            self.engine = InferenceEngine(model, zero_stage=cfg.zero_stage, micro_batch_size=cfg.micro_batch_size,
                                          world_size=self.world_size, dtype=dtype_name(dtype),
                                          device=self.device, threads=job.placement.threads)
        return self.memory()

    def decode(self, batch: dict) -> tuple[list[str], list[str]]:
        """Prompt and response texts of rollout rows (pads and special tokens dropped)."""
        response_length = batch["response_mask"].shape[1]
        prompts, responses = [], []
        for ids, attn, resp_mask in zip(batch["input_ids"], batch["attention_mask"], batch["response_mask"]):
            prompt_ids = ids[:-response_length][attn[:-response_length].bool()]
            response_ids = ids[-response_length:][resp_mask.bool()]
            prompts.append(self.tokenizer.decode(prompt_ids.tolist(), skip_special_tokens=True))
            responses.append(self.tokenizer.decode(response_ids.tolist(), skip_special_tokens=True))
        return prompts, responses

    def score(self, batch: dict) -> dict:
        """`sequence_rewards [B]` of rollout rows (prompt + response)."""
        if self.rule is not None:
            with self.clock.measure("forward"):
                prompts, responses = self.decode(batch)
                try:
                    values = self.rule(prompts, responses)
                except Exception as err:  # the user's function: say which one, on what
                    err.add_note(f"reward.rule {self.job.reward.rule} on {len(responses)} responses")
                    raise
            if len(values) != len(responses):
                raise ValueError(f"reward.rule {self.job.reward.rule!r} returned {len(values)} rewards for "
                                 f"{len(responses)} responses")
            return {"sequence_rewards": torch.tensor([float(v) for v in values], dtype=torch.float32)}
        return self.engine.forward_eval(batch, lambda m, mb: {
            "sequence_rewards": fw.last_token_scores(m, mb["input_ids"], mb["attention_mask"])})

    def compute_time(self) -> dict[str, float]:
        """Seconds of compute by kind since the last call (`ComputeClock.take`)."""
        return super().compute_time() if self.engine is not None else self.clock.take()

    def memory(self) -> dict:
        if self.engine is None:
            from rlhf_ray.telemetry.memory import peak_rss_bytes

            return {f"memory/{self.ROLE}/held_bytes": 0.0, f"memory/{self.ROLE}/peak_bytes": 0.0,
                    f"memory/{self.ROLE}/peak_rss_bytes": float(peak_rss_bytes())}
        return super().memory()
