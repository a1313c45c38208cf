"""The rollout-engine interface every backend implements, and the tensors it returns.

An engine actor holds a copy of the policy for generation. Per step the
driver calls `generate` on every replica with its share of the prompts; after
each policy update the policy streams its weights in buckets:
`begin_weight_update()`, `load_weights(bucket)` per bucket,
`finish_weight_update()`.

`generate` returns rows ready for training, every sample of a prompt
consecutive (`n` rows per prompt):

* `input_ids`, `attention_mask` `[B*n, P + R]`: the left-padded prompt then
  the response, right-padded to `R = rollout.max_new_tokens`;
* `response_mask` `[B*n, R]`: response tokens up to and including EOS;
* `finished` `[B*n]`: the response ended with EOS (else it was cut off);
* `engine_logprobs` `[B*n, R]`: the engine's own log-probs of its samples,
  logged against the policy's recomputed ones (`rollout/logprob_diff`);
* with `greedy=True`, the same `greedy_*` fields for one greedy response per
  prompt `[B, ...]` (ReMax's baseline), produced in the same call.
"""

from __future__ import annotations

import torch


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

