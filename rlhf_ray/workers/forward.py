"""What the roles compute on a batch: log-probs of given tokens, values, scores.

Shared by the policy, reference, critic and reward roles so that each role
file stays a thin shell. Batches are dicts of tensors; their layouts:

* training sequences (offline): `input_ids`, `attention_mask`, `loss_mask`,
  all `[B, T]`, right-padded; `loss_mask` marks the response tokens.
* pairs: the same with `chosen_` and `rejected_` prefixes, one common `T`.
* rollouts (online): `input_ids`/`attention_mask` `[B, P + R]` (prompt
  left-padded to `P`, response right-padded to `R`) and `response_mask`
  `[B, R]`; per-token quantities are `[B, R]`, aligned with the response.

Position ids always come from the attention mask, so a left-padded row gets
the same positions as in generation.
"""

from __future__ import annotations

import functools
import inspect

import torch

from rlhf_ray.models.logprobs import entropy_from_logits, gather_logprobs, position_ids_from_mask


def _unwrapped(module):
    """The Hugging Face model under a DeepSpeed engine and a peft wrapper."""
    module = getattr(module, "module", module)  # DeepSpeedEngine
    if hasattr(module, "get_base_model"):  # PeftModel
        module = module.get_base_model()
    return module


@functools.lru_cache(maxsize=None)
def _takes_logits_to_keep(model_class) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def lm_logits(module, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int = 0) -> torch.Tensor:
    """Logits in fp32 of a causal LM: `[B, T, V]`, or with `keep > 0` those of the last `keep` positions
    only, `[B, keep, V]`. The LM head then runs on those positions alone (models that accept
    `logits_to_keep`; others compute every position and the rest is cut off): the prompt's positions
    of a rollout are never scored, and the head and its `[B, T, V]` logits are a large share of a small
    model's forward pass and of a large vocabulary's memory."""
    kwargs = {}
    if keep and _takes_logits_to_keep(type(_unwrapped(module))):
        kwargs["logits_to_keep"] = keep
    out = module(input_ids=input_ids, attention_mask=attention_mask,
                 position_ids=position_ids_from_mask(attention_mask), use_cache=False, **kwargs)
    logits = out.logits
    if keep and logits.shape[1] != keep:
        logits = logits[:, -keep:]
    return logits.float()


def sequence_logps(module, input_ids, attention_mask, loss_mask, *, vocab: bool = False) -> dict[str, torch.Tensor]:
    """Log-probs of the tokens `loss_mask` marks, for right-padded training rows.

    Returns `token_logps [B, T-1]` (log p(x_{t+1} | x_<=t), zero off the mask),
    `mask [B, T-1]`, `logps [B]` (their sum), `lengths [B]`, and with
    `vocab=True` also `vocab_logps [B, T-1, V]` (TDPO's full distributions).
    """
    labels = input_ids[:, 1:]
    mask = loss_mask[:, 1:].float()
    # Logits only from the first position that scores a marked token on (the shortest prompt's end),
    # unless TDPO wants every position's distribution.
    marked = mask.any(0).nonzero()
    first = int(marked[0]) if len(marked) and not vocab else 0
    logits = lm_logits(module, input_ids, attention_mask, keep=input_ids.shape[1] - first)[:, :-1]
    token_logps = gather_logprobs(logits, labels[:, first:]) * mask[:, first:]
    if first:
        token_logps = torch.cat([token_logps.new_zeros(token_logps.shape[0], first), token_logps], dim=1)
    out = {"token_logps": token_logps, "mask": mask, "logps": token_logps.sum(-1), "lengths": mask.sum(-1)}
    if vocab:
        out["vocab_logps"] = torch.log_softmax(logits, dim=-1)
    return out


def pair_logps(module, batch: dict, *, vocab: bool = False) -> dict[str, torch.Tensor]:
    """One forward pass over chosen and rejected rows stacked; keys prefixed `chosen_`/`rejected_`."""
    n = batch["chosen_input_ids"].shape[0]
    stats = sequence_logps(
        module,
        torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]),
        torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]]),
        torch.cat([batch["chosen_loss_mask"], batch["rejected_loss_mask"]]),
        vocab=vocab,
    )
    out = {}
    for key, value in stats.items():
        out[f"chosen_{key}"] = value[:n]
        out[f"rejected_{key}"] = value[n:]
    return out


def response_logprobs(module, input_ids, attention_mask, response_length: int, *, temperature: float = 1.0,
                      with_entropy: bool = False) -> dict[str, torch.Tensor]:
    """Per-token log-probs `[B, R]` of the response part of rollout rows.

    Logits at position `t` predict token `t + 1`, so the last `R` tokens are
    scored by the logits at positions `P - 1 ... P + R - 2`. Dividing by the
    sampling temperature makes these the log-probs of the distribution the
    engine sampled from.
    """
    logits = lm_logits(module, input_ids, attention_mask, keep=response_length + 1)[:, :-1] / temperature
    out = {"logprobs": gather_logprobs(logits, input_ids[:, -response_length:])}
    if with_entropy:
        out["entropy"] = entropy_from_logits(logits)
    return out


def response_values(value_module, input_ids, attention_mask, response_length: int) -> torch.Tensor:
    """Critic values `[B, R]`: V(s_t) read at the position just before each response token."""
    values = value_module(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids_from_mask(attention_mask))
    return values.float()[:, -response_length - 1:-1]


def last_token_scores(scalar_module, input_ids, attention_mask) -> torch.Tensor:
    """Reward-model scores `[B]` read at each row's last attended token."""
    return scalar_module.score(input_ids=input_ids, attention_mask=attention_mask).float()


def strip_response(tokens: list[int], eos_id: int) -> list[int]:
    """A generated row up to and including its first EOS.

    Everything before EOS was sampled, the pad token included when the model
    drew it; only what `generate` appends after EOS is padding. A row without
    EOS was cut at the length limit and is kept whole."""
    for index, tok in enumerate(tokens):
        if tok == eos_id:
            return list(tokens[:index + 1])
    return list(tokens)


def plain_generation_config(tokenizer):
    """A `GenerationConfig` with only the tokenizer's special ids: generation then samples from
    softmax(logits / temperature) whatever defaults a checkpoint's own `generation_config` carries."""
    from transformers import GenerationConfig

    return GenerationConfig(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                            bos_token_id=tokenizer.bos_token_id)


@torch.no_grad()
def generate_tokens(module, tokenizer, prompt_batch: dict, *, max_new_tokens: int, seed: int, greedy: bool,
                    temperature: float = 1.0, top_p: float = 1.0, gathered=None) -> list[list[int]]:
    """HF `generate` on left-padded prompts; returns each response's token ids (up to and including EOS).

    `gathered(params)` is a context that materialises ZeRO-3 partitions for the call."""
    from contextlib import nullcontext

    module.eval()
    device = next(module.parameters()).device
    ids = prompt_batch["input_ids"].to(device)
    mask = prompt_batch["attention_mask"].to(device)
    sampling = {} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with (gathered(list(module.parameters())) if gathered else nullcontext()):
            out = module.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                  generation_config=plain_generation_config(tokenizer), do_sample=not greedy,
                                  **sampling)
    finally:
        torch.random.set_rng_state(generator_state)
    return [strip_response(row, tokenizer.eos_token_id) for row in out[:, ids.shape[1]:].tolist()]
