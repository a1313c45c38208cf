"""The critic role (PPO): a DeepSpeed ZeRO engine over a per-token value head.

Initialised from the reward model (InstructGPT) or from the policy's weights
with a fresh head (`critic.init_from`), trained with the clipped value loss.
"""

from __future__ import annotations

from rlhf_ray.algorithms.advantages import aggregation_weights
from rlhf_ray.algorithms.policy_loss import value_loss
from rlhf_ray.algorithms.steps import CriticStep
from rlhf_ray.config.schema import JobConfig
from rlhf_ray.models import forward as fw
from rlhf_ray.models.heads import load_scalar_head_model
from rlhf_ray.models.loading import load_tokenizer_for, resolve_dtype
from rlhf_ray.workers.base import TrainableWorker


class CriticWorker(TrainableWorker):
    """One rank of the critic group."""

    ROLE = "critic"

    def setup(self, job: JobConfig, *, init_from: str, tokenizer_from: str, batch_per_rank: int,
              total_optimizer_steps: int) -> dict:
        self.job = job
        self.set_seed(job.run.seed)
        cfg = job.critic
        tokenizer = load_tokenizer_for(cfg.model.tokenizer or tokenizer_from,
                                       trust_remote_code=cfg.model.trust_remote_code)
        model = load_scalar_head_model(init_from, dtype=resolve_dtype(cfg.model.dtype, self.device),
                                       gradient_checkpointing=cfg.model.gradient_checkpointing,
                                       trust_remote_code=cfg.model.trust_remote_code, seed=job.run.seed,
                                       tokenizer=tokenizer)
        return self.build_engine(model, cfg, batch_per_rank=batch_per_rank,
                                 total_optimizer_steps=total_optimizer_steps, heads=("value_head",))

    def values(self, batch: dict) -> dict:
        """`values [B, R]` of rollout rows: V(s_t) before each response token."""
        response_length = batch["response_mask"].shape[1]
        return self.engine.forward_eval(batch, lambda m, mb: {
            "values": fw.response_values(m, mb["input_ids"], mb["attention_mask"], response_length)})

    def train_values(self, batch: dict, step: CriticStep) -> dict:
        """One optimizer step of the clipped value loss on a minibatch (`old_values`, `returns`); with
        `step.loss_denominator` (the minibatch's aggregation weight over all ranks) the loss is the
        minibatch's mean whatever the micro-batch size and rank count."""
        def loss_fn(module, mb):
            values = fw.response_values(module, mb["input_ids"], mb["attention_mask"], mb["response_mask"].shape[1])
            weights = aggregation_weights(mb["response_mask"], step.loss_aggregation)
            loss, metrics = value_loss(values, mb["old_values"], mb["returns"], weights, clip_eps=step.clip_eps)
            if step.loss_denominator is not None:
                loss = self.engine.global_loss(loss, weights.sum(), step.loss_denominator)
            return loss, metrics
        return self.engine.train_batch(batch, loss_fn)
