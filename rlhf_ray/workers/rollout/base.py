"""The rollout-engine contract every backend implements (`RolloutEngine`), and the rows it returns.

An engine actor holds a copy of the policy for generation. Per step the
driver calls `generate` on every replica with its share of the prompts; after
each policy update the policy streams its weights in buckets:
`begin_weight_update()`, `load_weights(bucket)` per bucket,
`finish_weight_update()`. With `rollout.sleep_between_steps` the driver calls
`sleep()` after generating, so the roles sharing the engine's GPU train in its
memory.

`generate` returns rows ready for training, every sample of a prompt
consecutive (`n` rows per prompt):

* `input_ids`, `attention_mask` `[B*n, P + R]`: the left-padded prompt then
  the response, right-padded to `R = rollout.max_new_tokens`;
* `response_mask` `[B*n, R]`: response tokens up to and including EOS;
* `finished` `[B*n]`: the response ended with EOS (else it was cut off);
* `engine_logprobs` `[B*n, R]`: the engine's own log-probs of its samples,
  against which the policy's own are measured (`rollout/logprob_diff`) and
  corrected (`algorithm.rollout_is`, `docs/ROLLOUT_CORRECTION.md`);
* with `greedy=True`, the same `greedy_*` fields for one greedy response per
  prompt `[B, ...]` (ReMax's baseline), produced in the same call.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from rlhf_ray.config.schema import JobConfig


@runtime_checkable
class RolloutEngine(Protocol):
    """What the online driver and the policy's weight sync call on an engine actor.

    Constructed by the actor group as `cls(rank, world_size, master_addr,
    master_port, num_threads)`; replicas are independent (no process group)."""

    def setup(self, job: JobConfig, *, init_from: str) -> dict:
        """Load the weights `init_from` names; returns `memory()`."""

    def generate(self, prompts: dict, n: int, greedy: bool, seed: int, sample: bool = True) -> dict:
        """Rows as the module docstring describes, for left-padded `prompts` (`input_ids`, `attention_mask`).
        `seed` is the step's; each replica mixes in its rank."""

    def greedy_text(self, prompt_ids: list[int]) -> list[int]:
        """Greedy response tokens for one prompt."""

    def sleep(self) -> None:
        """Release the accelerator memory the engine holds until it is next used (`generate`,
        `greedy_text` or `begin_weight_update` take it back); a no-op where there is none to release."""

    def begin_weight_update(self) -> None:
        """A weight update starts; buckets follow."""

    def load_weights(self, bucket: list) -> None:
        """One bucket of `(parameter name, full CPU tensor)`, names as `named_parameters()` gives them, as
        `runtime.wire.pack_bucket` packs it (`unpack_bucket` gives the pairs back)."""

    def finish_weight_update(self) -> None:
        """Every bucket arrived: generation uses the new weights from now on."""

    def memory(self) -> dict:
        """`memory/rollout/*` metrics."""

    def compute_time(self) -> dict[str, float]:
        """Seconds of compute by kind since the last call."""

    def ping(self):
        """Liveness check."""


_MASK64 = (1 << 64) - 1


def request_seed(seed: int, rank: int, prompt_index: int) -> int:
    """A 31-bit seed from the step seed, the engine replica and a prompt index.

    Mixed with the SplitMix64 finaliser (Steele, Lea & Flood, 2014) so that
    nearby inputs give unrelated seeds; vLLM seeds a request's k-th sample
    `seed + k`, so samples of different prompts do not share a stream."""
    x = (seed * 0x9E3779B97F4A7C15 + rank * 0xBF58476D1CE4E5B9 + prompt_index * 0x94D049BB133111EB) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & 0x7FFFFFFF


def replica_seed(seed: int, rank: int) -> int:
    """The seed of one engine replica's whole call: replicas given the same step seed draw different samples."""
    return request_seed(seed, rank, 0)


def assemble_rows(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, responses: list[list[int]],
                  response_length: int, pad_id: int, eos_id: int, repeat: int) -> dict[str, torch.Tensor]:
    """Rows of `[prompt | response]` with fixed response width `response_length`.

    `prompt_ids`/`prompt_mask` are `[B, P]` (left-padded); `responses` holds
    `B * repeat` token lists, prompt `i`'s at rows `i*repeat ... i*repeat+repeat-1`."""
    rows = len(responses)
    if rows != prompt_ids.shape[0] * repeat:
        raise ValueError(f"{rows} responses for {prompt_ids.shape[0]} prompts x {repeat} samples")
    response_ids = torch.full((rows, response_length), pad_id, dtype=torch.long)
    response_mask = torch.zeros((rows, response_length), dtype=torch.long)
    finished = torch.zeros(rows, dtype=torch.bool)
    for row, tokens in enumerate(responses):
        tokens = tokens[:response_length]
        if tokens:
            response_ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            response_mask[row, :len(tokens)] = 1
        finished[row] = bool(tokens) and tokens[-1] == eos_id
    input_ids = torch.cat([prompt_ids.repeat_interleave(repeat, dim=0), response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask.repeat_interleave(repeat, dim=0), response_mask], dim=1)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask,
            "finished": finished}

