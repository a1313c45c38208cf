"""Requests in, rows out: a step's prompts as `LLM.generate` requests, vLLM's outputs as the rows of `base.py`.

Pure functions over token ids and vLLM's output objects (nothing here imports vLLM), so they are
tested with plain stand-ins.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlhf_ray.config.schema import RolloutConfig
from rlhf_ray.workers.rollout.base import assemble_rows, request_seed
from rlhf_ray.workers.rollout.vllm.checks import check_sampling


def prompt_token_lists(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """The real tokens of each left-padded prompt row: `[B, P]` -> B lists."""
    return [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]


def sampling_kwargs(rollout: RolloutConfig, *, eos_id: int, n: int = 1, greedy: bool = False,
                    seed: int | None = None) -> dict:
    """Keyword arguments of `vllm.SamplingParams` for one request.

    Samples: `n` per request at `rollout.temperature`, seeded, with the sampled
    token's log-prob (`logprobs=0`). Greedy: temperature 0, one response, no
    log-probs. Both stop at the tokenizer's EOS only and return token ids (no
    detokenising): vLLM would also stop at every EOS id the model's
    `generation_config.json` lists (Llama-3's end-of-turn beside its EOS)
    unless `ignore_eos` is set, and the rows, the HF engine and the policy know
    one EOS; `ignore_eos` keeps the generation config's ids out of the stop
    ids, and `stop_token_ids` stops at the tokenizer's. Settings the log-prob
    check cannot honour raise (`check_sampling`)."""
    if n < 1:
        raise ValueError(f"n={n}: a request needs at least one sample")
    common = {"max_tokens": rollout.max_new_tokens, "stop_token_ids": [eos_id], "ignore_eos": True,
              "detokenize": False}
    if greedy:
        return {"n": 1, "temperature": 0.0, **common}
    check_sampling(rollout)
    return {"n": n, "temperature": rollout.temperature, "seed": seed, "logprobs": 0, **common}


def completion_response(completion, *, eos_id: int, with_logprobs: bool) -> tuple[list[int], list[float]]:
    """Tokens (up to and including the first EOS) and their log-probs from one vLLM `CompletionOutput`.

    Every sampled token before EOS is kept, the pad token too when the model
    sampled it (`strip_response` does the same for the HF engine), so the row
    the policy trains on is the one the engine generated. `completion.logprobs[t]`
    maps token id -> `Logprob` for position t; the sampled token is always in it
    when `logprobs=0` was asked."""
    token_ids = list(completion.token_ids)
    positions = completion.logprobs if with_logprobs else None
    if with_logprobs and (positions is None or len(positions) < len(token_ids)):
        raise RuntimeError(f"vLLM returned log-probs for {0 if positions is None else len(positions)} of "
                           f"{len(token_ids)} tokens; the request must set logprobs=0")
    tokens, logprobs = [], []
    for position, token in enumerate(token_ids):
        tokens.append(token)
        if with_logprobs:
            entry = positions[position]
            if not entry or token not in entry:
                raise RuntimeError(f"vLLM's log-probs at position {position} lack the sampled token {token}")
            logprobs.append(float(entry[token].logprob))
        if token == eos_id:
            break
    return tokens, logprobs


def responses_from_outputs(request_outputs: Sequence, n: int, *, eos_id: int,
                           with_logprobs: bool) -> tuple[list[list[int]], list[list[float]]]:
    """Flatten vLLM `RequestOutput`s, `n` completions each, into rows: request i's at `i*n ... i*n+n-1`,
    ordered by completion index."""
    responses, logprobs = [], []
    for request in request_outputs:
        completions = sorted(request.outputs, key=lambda c: c.index)
        if len(completions) != n:
            raise RuntimeError(f"vLLM returned {len(completions)} completions for request {request.request_id}, "
                               f"expected n={n}")
        for completion in completions:
            tokens, lps = completion_response(completion, eos_id=eos_id, with_logprobs=with_logprobs)
            responses.append(tokens)
            logprobs.append(lps)
    return responses, logprobs


def logprob_rows(logprobs: list[list[float]], response_length: int) -> torch.Tensor:
    """`[rows, response_length]` float32, each row's log-probs from the left, zeros after."""
    out = torch.zeros(len(logprobs), response_length)
    for row, values in enumerate(logprobs):
        values = values[:response_length]
        if values:
            out[row, :len(values)] = torch.tensor(values, dtype=torch.float32)
    return out


def request_batch(token_lists: list[list[int]], rollout: RolloutConfig, *, n: int, sample: bool, greedy: bool,
                  seed: int, rank: int, eos_id: int) -> tuple[list[list[int]], list[dict]]:
    """Prompts and `SamplingParams` kwargs of one `generate` call: a sampling request (n samples, its own
    seed) per prompt first, then a greedy request per prompt."""
    prompts, kwargs = [], []
    if sample:
        prompts += token_lists
        kwargs += [sampling_kwargs(rollout, eos_id=eos_id, n=n, seed=request_seed(seed, rank, i))
                   for i in range(len(token_lists))]
    if greedy:
        prompts += token_lists
        kwargs += [sampling_kwargs(rollout, eos_id=eos_id, greedy=True) for _ in token_lists]
    return prompts, kwargs


def rows_from_outputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, request_outputs: Sequence, *, n: int,
                      sample: bool, greedy: bool, response_length: int, pad_id: int,
                      eos_id: int) -> dict[str, torch.Tensor]:
    """The rows `generate` returns (see `base.py`) from the `RequestOutput`s of a `request_batch`."""
    prompts = input_ids.shape[0]
    out = {}
    if sample:
        responses, logprobs = responses_from_outputs(request_outputs[:prompts], n, eos_id=eos_id, with_logprobs=True)
        out = assemble_rows(input_ids, attention_mask, responses, response_length, pad_id, eos_id, repeat=n)
        out["engine_logprobs"] = logprob_rows(logprobs, response_length) * out["response_mask"]
    if greedy:
        greedy_outputs = request_outputs[prompts:] if sample else request_outputs
        responses, _ = responses_from_outputs(greedy_outputs, 1, eos_id=eos_id, with_logprobs=False)
        rows = assemble_rows(input_ids, attention_mask, responses, response_length, pad_id, eos_id, repeat=1)
        out.update({f"greedy_{k}": v for k, v in rows.items()})
    return out
