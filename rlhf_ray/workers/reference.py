"""The reference role: a frozen copy of the policy that scores log-probs.

It is the KL anchor of online jobs and the `pi_ref` of the DPO family. Its
scoring methods (`ReferenceScoring`) are shared with a LoRA policy, whose
base with the adapter disabled is the reference without a group of its own. With
`reference.zero_stage: 3` its ranks hold ZeRO-3 partitions and gather on the
fly. SPIN and sDPO move it to the latest policy through `load_weights`.
"""

from __future__ import annotations

from collections.abc import Callable

from rlhf_ray.algorithms.registry import get_offline_objective
from rlhf_ray.config.schema import JobConfig
from rlhf_ray.models import forward as fw
from rlhf_ray.models.loading import dtype_name, load_causal_lm, load_tokenizer_for, resolve_dtype
from rlhf_ray.offline_formats import data_format
from rlhf_ray.runtime.engine import InferenceEngine
from rlhf_ray.runtime.wire import unpack_bucket
from rlhf_ray.workers.base import EngineWorker, ExportMixin, GenerateMixin


class ReferenceScoring:
    """The reference's scoring methods over `reference_eval(batch, fn)`: a `ReferenceWorker` runs them on
    its frozen model, a LoRA policy on its base with the adapter disabled (then the job has no
    reference group: the policy's actors answer the reference's calls)."""

    job: JobConfig
    ROLE: str
    reference_eval: Callable[[dict, Callable], dict]
    """`fn(module, micro_batch)` over `batch` on the reference weights; each class using the mixin defines it."""

    def offline_reference_logps(self, batch: dict, objective_name: str) -> dict:
        """What the reference adds to a batch of offline objective `objective_name`: its data format's
        `reference_logps` (pair log-probs, KTO's with their mismatched pairs, per-token log-probs, ...)."""
        objective = get_offline_objective(objective_name)
        return data_format(objective.data_format).reference_logps(self, batch, objective)

    def pair_logps(self, batch: dict, vocab: bool = False) -> dict:
        """`ref_chosen_logps`, `ref_rejected_logps` `[B]` (and `ref_*_vocab_logps` for TDPO)."""
        shared = getattr(self.job, self.ROLE).shared_prefix  # the policy's setting on a LoRA policy

        def fn(module, mb):
            stats = fw.pair_logps(module, mb, vocab=vocab, shared_prefix=shared)
            keep = ("chosen_logps", "rejected_logps")
            keep += ("chosen_vocab_logps", "rejected_vocab_logps") if vocab else ()
            return {f"ref_{k}": stats[k] for k in keep}
        return self.reference_eval(batch, fn)

    def token_logps(self, batch: dict) -> dict:
        """`ref_token_logps [B, T-1]` and `ref_logps [B]` of right-padded sequences (KL-SFT, KTO)."""
        def fn(module, mb):
            stats = fw.sequence_logps(module, mb["input_ids"], mb["attention_mask"], mb["loss_mask"])
            return {"ref_token_logps": stats["token_logps"], "ref_logps": stats["logps"]}
        return self.reference_eval(batch, fn)

    def kto_logps(self, batch: dict) -> dict:
        """Reference log-probs of KTO's examples and of their mismatched pairs (the KL reference point)."""
        def fn(module, mb):
            main = fw.sequence_logps(module, mb["input_ids"], mb["attention_mask"], mb["loss_mask"])
            kl = fw.sequence_logps(module, mb["kl_input_ids"], mb["kl_attention_mask"], mb["kl_loss_mask"])
            return {"ref_logps": main["logps"], "ref_kl_logps": kl["logps"]}
        return self.reference_eval(batch, fn)

    def ref_rollout_logprobs(self, batch: dict) -> dict:
        """`ref_logprobs [B, R]` of rollout responses (the KL anchor of online jobs)."""
        response_length = batch["response_mask"].shape[1]
        temperature = self.job.rollout.temperature
        shared = getattr(self.job, self.ROLE).shared_prefix  # the policy's setting on a LoRA policy
        return self.reference_eval(batch, lambda m, mb: {"ref_logprobs": fw.response_logprobs(
            m, mb["input_ids"], mb["attention_mask"], response_length, temperature=temperature,
            shared_prefix=shared)["logprobs"]})


class ReferenceWorker(ReferenceScoring, ExportMixin, GenerateMixin, EngineWorker):
    """One rank of the reference group; `export` writes the current reference weights (SPIN/sDPO
    checkpoints need them)."""

    ROLE = "reference"

    def setup(self, job: JobConfig, *, init_from: str) -> dict:
        self.job = job
        model_cfg = job.reference.model
        dtype = resolve_dtype(model_cfg.dtype, self.device)
        self.tokenizer = load_tokenizer_for(model_cfg.tokenizer or init_from,
                                            trust_remote_code=model_cfg.trust_remote_code)
        model = load_causal_lm(init_from, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code,
                               seed=job.run.seed, tokenizer=self.tokenizer)
        self.engine = InferenceEngine(model, zero_stage=job.reference.zero_stage,
                                      micro_batch_size=job.reference.micro_batch_size, world_size=self.world_size,
                                      dtype=dtype_name(dtype), device=self.device, threads=job.placement.threads)
        return self.memory()

    def reference_eval(self, batch: dict, fn) -> dict:
        return self.engine.forward_eval(batch, fn)

    # weight updates (SPIN, sDPO) -------------------------------------------
    def begin_weight_update(self) -> None:
        return None

    def load_weights(self, bucket) -> None:
        self.engine.load_weights(unpack_bucket(bucket))

    def finish_weight_update(self) -> None:
        return None
