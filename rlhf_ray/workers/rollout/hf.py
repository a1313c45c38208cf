"""The Hugging Face rollout engine: `generate` in a Ray actor (the CPU default).

The model runs on the GPU Ray gave the actor (`rollout.num_gpus_per_engine`),
else on the CPU.

All prompts of a step go through one batched `generate` call with the KV
cache and left padding; `num_return_sequences` gives the `n` samples of each
prompt, and a second, greedy call in the same actor call gives ReMax's
baseline. Sampling is seeded per call, so a resumed run draws the same
responses as an uninterrupted one.
"""

from __future__ import annotations

import torch

from rlhf_ray.config.schema import JobConfig
from rlhf_ray.models.forward import plain_generation_config, strip_response
from rlhf_ray.models.loading import load_causal_lm, load_tokenizer_for, resolve_dtype
from rlhf_ray.runtime.distributed import current_device
from rlhf_ray.runtime.wire import unpack_bucket
from rlhf_ray.telemetry.memory import measure_memory
from rlhf_ray.telemetry.timers import ComputeClock
from rlhf_ray.workers.rollout.base import assemble_rows, replica_seed


class HFRolloutWorker:
    """One rollout engine replica backed by `transformers` generate."""

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, num_threads: int):
        # Replicas are independent: no process group (the ActorGroup's rendezvous is unused).
        self.rank = rank
        self.clock = ComputeClock()
        self.device = current_device()
        torch.set_num_threads(max(1, int(num_threads)))

    def setup(self, job: JobConfig, *, init_from: str) -> dict:
        self.job = job
        cfg = job.policy.model
        self.tokenizer = load_tokenizer_for(cfg.tokenizer or init_from, trust_remote_code=cfg.trust_remote_code)
        self.model = load_causal_lm(init_from, dtype=resolve_dtype(cfg.dtype, self.device),
                                    trust_remote_code=cfg.trust_remote_code, seed=job.run.seed,
                                    tokenizer=self.tokenizer, device=self.device)
        self.model.requires_grad_(False)
        self.model.eval()
        # Sample from exactly softmax(logits / temperature), what the policy scores: none of the
        # checkpoint's own generation defaults (repetition_penalty, top_k=50, ...) apply.
        self.model.generation_config = plain_generation_config(self.tokenizer)
        self._tensors = dict(self.model.state_dict(keep_vars=True))  # tied aliases resolve to one tensor
        self.version = 0
        return self.memory()

    def ping(self) -> bool:
        return True

    @torch.no_grad()
    def _generate(self, ids, mask, *, n: int, greedy: bool, seed: int):
        r = self.job.rollout
        kwargs = {"max_new_tokens": r.max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id,
                  "eos_token_id": self.tokenizer.eos_token_id, "return_dict_in_generate": True,
                  "output_logits": True, "num_return_sequences": n}
        if greedy:
            kwargs["do_sample"] = False
        else:
            kwargs.update(do_sample=True, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k)
        with torch.random.fork_rng(devices=[self.device.index] if self.device.type == "cuda" else []):
            torch.manual_seed(replica_seed(seed, self.rank))
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        new = out.sequences[:, ids.shape[1]:]
        responses = [strip_response(row, self.tokenizer.eos_token_id) for row in new.tolist()]
        # The engine's own log-probs of its tokens, from the raw logits at the sampling temperature.
        temperature = 1.0 if greedy else r.temperature
        logits = torch.stack(out.logits, dim=1).float() / temperature          # [B*n, L, V]
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        return responses, logprobs.cpu()

    def generate(self, prompts: dict, n: int, greedy: bool, seed: int, sample: bool = True) -> dict:
        """Samples (`n` per prompt) and, with `greedy`, one greedy response per prompt; see `base.py`.
        `sample=False` skips the samples (greedy-only evaluation)."""
        with self.clock.measure("generate"):
            return self._generate_rows(prompts, n, greedy, seed, sample)

    def _generate_rows(self, prompts: dict, n: int, greedy: bool, seed: int, sample: bool) -> dict:
        ids, mask = prompts["input_ids"], prompts["attention_mask"]
        r = self.job.rollout
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        out = {}
        if sample:
            responses, logprobs = self._generate(ids, mask, n=n, greedy=False, seed=seed)
            out = assemble_rows(ids, mask, responses, r.max_new_tokens, pad, eos, repeat=n)
            engine_logprobs = torch.zeros(out["response_mask"].shape)
            engine_logprobs[:, :logprobs.shape[1]] = logprobs[:, :r.max_new_tokens]
            out["engine_logprobs"] = engine_logprobs * out["response_mask"]
        if greedy:
            greedy_responses, _ = self._generate(ids, mask, n=1, greedy=True, seed=seed)
            rows = assemble_rows(ids, mask, greedy_responses, r.max_new_tokens, pad, eos, repeat=1)
            out.update({f"greedy_{k}": v for k, v in rows.items()})
        return out

    def sleep(self) -> None:
        """Nothing to release: `rollout.sleep_between_steps` is vLLM's (the config refuses it here)."""

    # weight sync -------------------------------------------------------------
    def begin_weight_update(self) -> None:
        pass

    @torch.no_grad()
    def load_weights(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in unpack_bucket(bucket):
            if name not in self._tensors:
                raise KeyError(f"rollout engine: the policy sent weights for {name!r}, which this model lacks; "
                               "the engine and policy must load the same architecture")
            self._tensors[name].copy_(tensor.to(self._tensors[name].dtype))

    def finish_weight_update(self) -> None:
        self.version += 1

    @torch.no_grad()
    def greedy_text(self, prompt_ids: list[int]) -> list[int]:
        """Greedy tokens for one prompt (the weight-sync check compares them with the policy's)."""
        ids = torch.tensor([prompt_ids])
        mask = torch.ones_like(ids)
        responses, _ = self._generate(ids, mask, n=1, greedy=True, seed=0)
        return responses[0]

    def compute_time(self) -> dict[str, float]:
        """Seconds of compute by kind since the last call (`ComputeClock.take`)."""
        return self.clock.take()

    def memory(self) -> dict:
        report = measure_memory(self.model, None)
        return report.to_metrics("rollout")

