"""The policy (actor) role: a DeepSpeed ZeRO engine over a causal LM.

One Ray actor per data-parallel rank. It trains every offline objective whose
registry entry says `trains == "policy"` and the online policy update, scores
log-probs, generates (SPIN), exports with `save_pretrained`, checkpoints, and
streams its weights to rollout engines and to the reference role. With LoRA
(`policy.lora.rank > 0`) only the adapters train, the weights it streams are
merged (or, `lora.sync: adapter`, only the adapters), and its base with the
adapter disabled scores the reference's log-probs.
"""

from __future__ import annotations

import torch

from rlhf_ray.algorithms.advantages import aggregation_weights
from rlhf_ray.algorithms.rollout_is import SUM_PREFIX, mismatch_sums, rollout_is_weights, weighted_advantages
from rlhf_ray.algorithms.sft_loss import sft_loss
from rlhf_ray.algorithms.steps import OfflineStep, PolicyStep
from rlhf_ray.config.schema import JobConfig
from rlhf_ray.models import forward as fw
from rlhf_ray.models.loading import load_causal_lm, load_tokenizer_for, resolve_dtype
from rlhf_ray.offline_formats import data_format
from rlhf_ray.workers.base import ExportMixin, GenerateMixin, TrainableWorker
from rlhf_ray.workers.reference import ReferenceScoring


def online_loss(step: PolicyStep, engine=None, shared_prefix: bool = False):
    """`loss_fn(module, micro_batch) -> (loss, metrics)` of an online algorithm's policy update: `step`'s
    algorithm, with its values (checked when the driver built it).

    The micro-batch holds input_ids, attention_mask, response_mask and advantages, and:

    * `old_logprobs`: the policy's log-probs of the sampled tokens under the weights the step starts from
      (those that sampled them, unless `rollout.max_staleness` lets the batch be stale; PPO's old log-probs,
      from a scoring forward). Absent at the first update from those weights, where
      this forward's own log-probs, detached, are the same numbers (dropout is off), and PPO's ratio is 1;
    * `engine_logprobs`: the rollout engine's log-probs of the same tokens. Each token's policy loss is
      multiplied by the importance weight of the engine-trainer mismatch (`step.rollout_is`,
      `rollout_is_cap`: `algorithms.rollout_is`), and the metrics carry the sums the driver turns into
      `rollout/logprob_diff`, `rollout/mismatch_kl` and `rollout/is_*` (`mismatch_metrics`);
    * `ref_logprobs` when the KL sits in the loss, `ptx_*` rows when PPO-ptx is on.

    With `engine` (training) the loss is this micro-batch's share of the minibatch's (`global_loss`). With
    `shared_prefix` the micro-batch's rows of one prompt share its forward (`fw.response_logprobs`); the
    loss is the same, only its log-probs come from the packed forward."""
    algorithm, mode = step.algorithm, step.loss_aggregation
    if engine is not None and step.loss_denominator is None:
        raise ValueError(f"policy step of {algorithm.name}: training needs loss_denominator, the minibatch's "
                         "aggregation weight over all its rows (aggregation_denominator)")

    def loss_fn(module, mb):
        response_length = mb["response_mask"].shape[1]
        out = fw.response_logprobs(module, mb["input_ids"], mb["attention_mask"], response_length,
                                   temperature=step.temperature, with_entropy=True, shared_prefix=shared_prefix)
        mask = mb["response_mask"]
        weights = aggregation_weights(mask, mode)
        old = mb["old_logprobs"] if "old_logprobs" in mb else out["logprobs"].detach()
        advantages, metrics = mb["advantages"], {}
        if "engine_logprobs" in mb:
            is_weights, capped = rollout_is_weights(old, mb["engine_logprobs"], mask, step.rollout_is,
                                                    step.rollout_is_cap)
            advantages = weighted_advantages(advantages, is_weights)  # = w_t times each token's loss
            sums = mismatch_sums(old, mb["engine_logprobs"], is_weights, capped, mask)
            metrics.update({SUM_PREFIX + k: v for k, v in sums.items()})
        loss, loss_metrics = algorithm.policy_loss(out["logprobs"], old, advantages, weights, step)
        metrics.update(loss_metrics)
        kl_term = algorithm.kl.loss_term(out["logprobs"], mb.get("ref_logprobs"), weights, step.kl_coef,
                                         step.kl_estimator)
        if kl_term is not None:
            loss = loss + kl_term[0]
            metrics.update(kl_term[1])
        if engine is not None:
            loss = engine.global_loss(loss, weights.sum(), step.loss_denominator)
        if step.ptx_coef > 0 and "ptx_input_ids" in mb:
            ptx = fw.sequence_logps(module, mb["ptx_input_ids"], mb["ptx_attention_mask"], mb["ptx_loss_mask"])
            ptx_weights = aggregation_weights(ptx["mask"], mode)
            ptx_loss, _ = sft_loss(ptx["token_logps"], ptx_weights)
            if engine is not None and step.ptx_denominator is None:
                raise ValueError(f"policy step of {algorithm.name}: ptx rows need ptx_denominator, their "
                                 "aggregation weight over the minibatch")
            share = ptx_loss if engine is None else engine.global_loss(ptx_loss, ptx_weights.sum(),
                                                                       step.ptx_denominator)
            loss = loss + step.ptx_coef * share
            metrics["policy/ptx_loss"] = ptx_loss.detach()
        metrics["policy/entropy"] = (out["entropy"] * mask).sum().detach() / mask.sum().clamp(min=1)
        return loss, metrics
    return loss_fn


class PolicyWorker(ReferenceScoring, ExportMixin, GenerateMixin, TrainableWorker):
    """One rank of the policy group; with LoRA also the job's reference (`ReferenceScoring` on its base,
    the adapter disabled)."""

    ROLE = "policy"

    def reference_eval(self, batch: dict, fn) -> dict:
        """`fn` over `batch` on the base weights: the adapter off for the forward passes, on again after."""
        if not self.engine.lora:
            raise RuntimeError("the policy answers the reference's calls only with policy.lora.rank > 0 (its base "
                               "with the adapter off); this job needs a reference group")
        with self.engine.module.disable_adapter():
            return self.engine.forward_eval(batch, fn)

    def setup(self, job: JobConfig, *, init_from: str, batch_per_rank: int, total_optimizer_steps: int) -> dict:
        """Load the model from `init_from` (preset, path or hub name) and build the DeepSpeed engine."""
        self.job = job
        self.set_seed(job.run.seed)
        model_cfg = job.policy.model
        self.tokenizer = load_tokenizer_for(model_cfg.tokenizer or init_from,
                                            trust_remote_code=model_cfg.trust_remote_code)
        model = load_causal_lm(init_from, dtype=resolve_dtype(model_cfg.dtype, self.device),
                               gradient_checkpointing=model_cfg.gradient_checkpointing,
                               trust_remote_code=model_cfg.trust_remote_code, seed=job.run.seed,
                               tokenizer=self.tokenizer)
        return self.build_engine(model, job.policy, batch_per_rank=batch_per_rank,
                                 total_optimizer_steps=total_optimizer_steps)

    # offline ---------------------------------------------------------------
    def train_offline(self, batch: dict, step: OfflineStep) -> dict:
        """One optimizer step of an offline objective on this rank's share of the batch."""
        fmt = data_format(step.objective.data_format)
        step = fmt.rank_step(self, batch, step)  # KTO: its reference point, once per step
        return self.engine.train_batch(batch, fmt.loss_fn(step, self.engine,
                                                          shared_prefix=self.job.policy.shared_prefix))

    def kto_reference_point(self, batch: dict) -> float:
        """KTO's z0 for a whole step: the mean policy-minus-reference log-ratio of the mismatched pairs over
        every micro-batch and rank, clamped at 0 after averaging (as TRL gathers before clamping)."""
        import torch.distributed as dist

        out = self.engine.forward_eval(batch, lambda m, mb: {"logps": fw.sequence_logps(
            m, mb["kl_input_ids"], mb["kl_attention_mask"], mb["kl_loss_mask"])["logps"]})
        total = torch.tensor([float((out["logps"] - batch["ref_kl_logps"]).sum()), float(len(out["logps"]))],
                             dtype=torch.float64, device=self.engine.device)  # NCCL reduces device tensors only
        if self.world_size > 1:
            dist.all_reduce(total)
        return max(0.0, float(total[0] / total[1]))

    def eval_preference(self, batch: dict, step: OfflineStep) -> dict:
        """The objective's loss and reward metrics on held-out pairs, without gradients."""
        loss_fn = data_format(step.objective.data_format).loss_fn(step, shared_prefix=self.job.policy.shared_prefix)

        def fn(module, mb):
            loss, metrics = loss_fn(module, mb)
            return {"loss": loss.detach().reshape(1), **{k: v.detach().float().reshape(1) for k, v in metrics.items()}}

        out = self.engine.forward_eval(batch, fn)
        return {k: float(v.mean()) for k, v in out.items()}

    # online ----------------------------------------------------------------
    def rollout_logprobs(self, batch: dict) -> dict:
        """Log-probs `[B, R]` of rollout responses under the current weights (PPO's old log-probs)."""
        temperature = self.job.rollout.temperature
        response_length = batch["response_mask"].shape[1]
        shared = self.job.policy.shared_prefix
        return self.engine.forward_eval(batch, lambda m, mb: fw.response_logprobs(
            m, mb["input_ids"], mb["attention_mask"], response_length, temperature=temperature,
            shared_prefix=shared))

    def train_online(self, batch: dict, step: PolicyStep) -> dict:
        """One optimizer step of the policy loss (PPO clip or REINFORCE) on a minibatch: `online_loss`'s
        batch and step. `step.loss_denominator` (and `ptx_denominator`) is the minibatch's aggregation
        weight over all ranks (`aggregation_weights(...).sum()`): the loss is the minibatch's mean whatever
        the micro-batch size and rank count."""
        loss_fn = online_loss(step, self.engine, shared_prefix=self.job.policy.shared_prefix)
        return self.engine.train_batch(batch, loss_fn)

    # weight sync -----------------------------------------------------------
    def connect_vllm_engines(self, engines: list, tensor_parallel_size: int, bucket_bytes: int) -> None:
        """Join the NCCL weight-transfer group with the vLLM engines (`rollout.weight_transfer: nccl`);
        every rank calls it, rank 0 becomes the sender, the others only take part in ZeRO-3 gathers."""
        from rlhf_ray.workers.rollout.vllm.sender import VLLMWeightSender

        self._vllm_sender = VLLMWeightSender.connect(
            engines, rank=self.rank, module=self.engine.module, tensor_parallel_size=tensor_parallel_size,
            bucket_bytes=bucket_bytes, gathered=self.engine.gathered)

    def send_weights(self, targets: list, bucket_bytes: int, role: str = "rollout") -> dict:
        """Stream the full weights in buckets to each target actor's `load_weights` (rank 0 sends); with
        LoRA the merged weights, or with `policy.lora.sync: adapter` only the adapter, to the rollout
        engines' `load_adapter`.

        Every rank takes part in the ZeRO-3 gathers; only rank 0 copies the weights out and sends them.
        The driver never holds the weights. Returns bytes sent."""
        import ray

        from rlhf_ray.runtime.actor_group import wait_all
        from rlhf_ray.runtime.wire import pack_bucket

        def _target(index: int) -> str:
            return f"role {role!r} rank {index} of {len(targets)} (a weight-sync target)"

        if getattr(self, "_vllm_sender", None) is not None:
            return self._vllm_sender.send()
        sender = self.rank == 0 and bool(targets)
        if role == "rollout" and self.engine.lora and self.job.policy.lora.sync == "adapter":
            tensors, config = self.engine.adapter()  # every rank gathers (ZeRO-3)
            if sender:
                wait_all([t.load_adapter.remote(tensors, config) for t in targets], _target)
            sent = sum(t.numel() * t.element_size() for t in tensors.values()) * len(targets) if sender else 0
            return {"sync/bytes": float(sent)}
        if not sender:  # the gathers are collective; the copies and buckets are the sender's alone
            self.engine.join_weight_gathers()
            return {"sync/bytes": 0.0}
        sent = 0
        wait_all([t.begin_weight_update.remote() for t in targets], _target)
        # Two buckets in flight: the next is gathered, copied and serialised while the targets load the
        # one before (a target runs its calls in the order sent); at most two buckets are held at once.
        # Buckets travel as raw bytes (`runtime.wire`), put in the object store once for every target.
        in_flight: list[list] = []
        for bucket in self.engine.iter_weight_buckets(bucket_bytes):
            if len(in_flight) == 2:
                wait_all(in_flight.pop(0), _target)
            packed = ray.put(pack_bucket(bucket))
            in_flight.append([t.load_weights.remote(packed) for t in targets])
            sent += sum(w.numel() * w.element_size() for _, w in bucket) * len(targets)
        for refs in in_flight:
            wait_all(refs, _target)
        wait_all([t.finish_weight_update.remote() for t in targets], _target)
        return {"sync/bytes": float(sent)}
