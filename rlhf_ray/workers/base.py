"""What the model roles share: a rank over one engine (`self.engine`, built by `setup`).

- `EngineWorker`: `compute_time` and `memory` of the engine, the memory
  metrics named by the class's `ROLE` (`memory/<ROLE>/...`). The reference
  role is one as it is; the reward role overrides both for its rule.
- `TrainableWorker`: an `EngineWorker` over a `TrainEngine`, with
  `save_checkpoint` / `load_checkpoint` of its DeepSpeed state (policy,
  critic, reward trainer).
- `ExportMixin`: `export`, the `save_pretrained` of the engine's weights and
  `self.tokenizer`, for the roles that keep their tokenizer (policy, reward
  trainer, reference).
- `GenerateMixin`: `generate`, Hugging Face generation on the engine's
  weights, for the causal-LM roles (the policy for evaluation, the reference
  for SPIN).

Ray makes every method of these bases a remote method of the role's actor.
"""

from __future__ import annotations

from rlhf_ray.config.schema import RoleConfig
from rlhf_ray.models.forward import generate_tokens
from rlhf_ray.models.loading import disable_dropout, dtype_name, resolve_dtype
from rlhf_ray.runtime.distributed import DistributedWorker
from rlhf_ray.runtime.engine import InferenceEngine, TrainEngine


class EngineWorker(DistributedWorker):
    """One rank of a role over one engine; a subclass sets `ROLE`."""

    ROLE: str
    engine: TrainEngine | InferenceEngine

    def compute_time(self) -> dict[str, float]:
        """Seconds of compute by kind since the last call (`ComputeClock.take`), and under `threads` the
        fewest torch threads a call ran with meanwhile (`CoreFollower.take_fewest`), where they follow
        the free cores and a call ran."""
        out = self.engine.clock.take()
        fewest = self.engine.follower.take_fewest()
        if fewest is not None:
            out["threads"] = fewest
        return out

    def memory(self) -> dict:
        return self.engine.memory().to_metrics(self.ROLE)


class TrainableWorker(EngineWorker):
    """One rank of a trained role: its DeepSpeed state goes into and comes out of checkpoints."""

    engine: TrainEngine

    def build_engine(self, model, settings: RoleConfig, *, batch_per_rank: int, total_optimizer_steps: int,
                     heads: tuple[str, ...] = ()) -> dict:
        """Make `model` this rank's `TrainEngine` under the role's config (dropout off unless
        `model.disable_dropout` is false; with `lora.rank > 0`, LoRA adapters on the frozen base, the
        `heads` modules fully trained); returns the rank's memory metrics."""
        if settings.model.disable_dropout:
            disable_dropout(model)  # before the adapters, whose own dropout is `lora.dropout`
        if settings.lora.enabled:
            from rlhf_ray.models.lora import apply_lora

            model = apply_lora(model, settings.lora, trainable_heads=heads, key=f"{self.ROLE}.lora")
        dtype = dtype_name(resolve_dtype(settings.model.dtype, self.device))
        self.engine = TrainEngine(model, settings, world_size=self.world_size, batch_per_rank=batch_per_rank,
                                  total_optimizer_steps=total_optimizer_steps, dtype=dtype, device=self.device,
                                  threads=self.job.placement.threads)
        return self.memory()

    def save_checkpoint(self, directory: str) -> None:
        self.engine.save_checkpoint(directory)

    def load_checkpoint(self, directory: str) -> None:
        self.engine.load_checkpoint(directory)


class ExportMixin:
    """`export` for an `EngineWorker` that keeps its tokenizer as `self.tokenizer`."""

    def export(self, directory: str) -> None:
        """`save_pretrained` of the model and tokenizer (rank 0 writes; all ranks gather for ZeRO-3)."""
        job = getattr(self, "job", None)
        self.engine.export(directory, self.tokenizer, self.rank, merge=job.export.merge if job else True)


class GenerateMixin:
    """`generate` for an `EngineWorker` over a causal LM that keeps `self.tokenizer` and `self.job`."""

    def generate(self, prompt_batch: dict, max_new_tokens: int, seed: int, greedy: bool = False) -> list[list[int]]:
        """Responses of the current weights to left-padded prompts (HF generate): the policy's for
        evaluation; the reference's for SPIN, whose generator is the previous iterate."""
        return generate_tokens(self.engine.module, self.tokenizer, prompt_batch, max_new_tokens=max_new_tokens,
                               seed=seed + self.rank, greedy=greedy, temperature=self.job.rollout.temperature,
                               top_p=self.job.rollout.top_p, gathered=self.engine.gathered)
