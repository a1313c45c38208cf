"""The reward-model trainer role: a DeepSpeed engine over a scalar-head model.

Trains on ranked data (K responses per prompt, all K-choose-2 pairs from one
forward pass; a preference pair is K = 2), reports pairwise accuracy on
held-out data, and can add a bias so that the mean reward on a reference set
is zero (InstructGPT; the driver's `zero_mean_preferred_rewards`, for
`algorithm.rm_zero_mean`).
"""

from __future__ import annotations

import torch

from rlhf_ray.algorithms.batches import RankedRewardBatch
from rlhf_ray.algorithms.steps import OfflineStep
from rlhf_ray.config.schema import JobConfig
from rlhf_ray.models import forward as fw
from rlhf_ray.models.heads import load_scalar_head_model
from rlhf_ray.models.loading import load_tokenizer_for, resolve_dtype
from rlhf_ray.workers.base import ExportMixin, TrainableWorker


def ranked_scores(module, mb: dict) -> torch.Tensor:
    """Scores `[B, K]` of `input_ids`/`attention_mask` `[B, K, T]` in one forward pass."""
    b, k, t = mb["input_ids"].shape
    flat = fw.last_token_scores(module, mb["input_ids"].reshape(b * k, t), mb["attention_mask"].reshape(b * k, t))
    return flat.reshape(b, k)


def pairwise_accuracy(scores: torch.Tensor, ranking: torch.Tensor) -> torch.Tensor:
    """Share of ordered pairs (i better than j by `ranking`, 0 = best) with score_i > score_j."""
    better = ranking.unsqueeze(-1) < ranking.unsqueeze(-2)             # [B, K, K]: i ranked above j
    correct = (scores.unsqueeze(-1) > scores.unsqueeze(-2)) & better
    return correct.sum().float() / better.sum().clamp(min=1).float()


class RewardTrainerWorker(ExportMixin, TrainableWorker):
    """One rank of the reward-model trainer group."""

    ROLE = "reward"

    def setup(self, job: JobConfig, *, init_from: str, batch_per_rank: int, total_optimizer_steps: int) -> dict:
        self.job = job
        self.set_seed(job.run.seed)
        cfg = job.reward
        self.tokenizer = load_tokenizer_for(cfg.model.tokenizer or init_from,
                                            trust_remote_code=cfg.model.trust_remote_code)
        model = load_scalar_head_model(init_from, dtype=resolve_dtype(cfg.model.dtype, self.device),
                                       gradient_checkpointing=cfg.model.gradient_checkpointing,
                                       trust_remote_code=cfg.model.trust_remote_code, seed=job.run.seed,
                                       tokenizer=self.tokenizer)
        return self.build_engine(model, cfg, batch_per_rank=batch_per_rank,
                                 total_optimizer_steps=total_optimizer_steps, heads=("value_head",))

    def train_offline(self, batch: dict, step: OfflineStep) -> dict:
        """One optimizer step of the reward-model objective on this rank's share of the ranked batch."""
        def loss_fn(module, mb):
            scores = ranked_scores(module, mb)
            loss, metrics = step.loss(RankedRewardBatch(scores, mb["ranking"]))
            metrics["rm/accuracy"] = pairwise_accuracy(scores.detach(), mb["ranking"])
            return loss, metrics

        return self.engine.train_batch(batch, loss_fn)

    def scores(self, batch: dict) -> dict:
        """`scores [B, K]` of ranked rows, without gradients."""
        return self.engine.forward_eval(batch, lambda m, mb: {"scores": ranked_scores(m, mb)})

    def shift_bias(self, delta: float) -> None:
        """Add `delta` to the bias the score subtracts (InstructGPT's zero-mean normalisation)."""
        module = self.engine.module
        module.set_score_bias(module.score_bias + float(delta))


def zero_mean_preferred_rewards(trainer, data) -> float:
    """InstructGPT's normalisation of a trained reward model: shift the bias of the `trainer` group's model
    so the mean reward of the preferred responses of `data` (its first 512 rows) is zero. Returns the shift.
    Runs on the driver, before the model is exported."""
    n = min(len(data), 512)
    batch = data.batch(list(range(n)))
    scores = trainer.scatter_padded(lambda a, shard: a.scores.remote(shard), batch).merged()["scores"]
    best = scores.gather(1, batch["ranking"].argmin(dim=1, keepdim=True)).squeeze(1)
    shift = float(best.mean())
    trainer.call(lambda a: a.shift_bias.remote(shift))
    return shift
