"""What the roles compute on a batch: log-probs of given tokens, values, scores.

Shared by the policy, reference, critic and reward roles so that each role
file stays a thin shell, and by the data formats' losses (`offline_formats/`);
torch and the model only, no Ray, so it sits with the models. Batches are dicts of tensors; their layouts:

* training sequences (offline): `input_ids`, `attention_mask`, `loss_mask`,
  all `[B, T]`, right-padded; `loss_mask` marks the response tokens.
* pairs: the same with `chosen_` and `rejected_` prefixes, one common `T`.
* rollouts (online): `input_ids`/`attention_mask` `[B, P + R]` (prompt
  left-padded to `P`, response right-padded to `R`) and `response_mask`
  `[B, R]`; per-token quantities are `[B, R]`, aligned with the response.

Position ids always come from the attention mask, so a left-padded row gets
the same positions as in generation.

Shared prefixes: the rollout rows of one prompt (GRPO-style groups, `samples_per_prompt > 1`) repeat
the prompt. `response_logprobs(..., shared_prefix=True)` packs each group into one row, the prompt once
and then every response, and runs the prompt's forward once for the group (`packed_response_logits`);
`pair_logps(..., shared_prefix=True)` does the same for a pair's chosen and rejected rows.
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


SHARED_PREFIX_MODEL_TYPES = frozenset({"llama"})
"""Model types whose packed forward (`packed_response_logits`) a test proves equal to the unshared one.
Their Hugging Face attention takes a custom 4D additive mask and explicit position ids as given. Others
(GPT-2 among them) are not listed until a test shows the same for them: they take the plain forward."""

SHARED_PREFIX_ATTENTION = frozenset({"sdpa", "eager"})
"""Attention implementations that take a 4D float mask (flash attention takes none)."""


def shared_prefix_supported(module) -> bool:
    """Whether `module`'s forward can pack a group's responses behind one prompt: its model type is in
    `SHARED_PREFIX_MODEL_TYPES` and its attention in `SHARED_PREFIX_ATTENTION`."""
    config = getattr(_unwrapped(module), "config", None)
    return (getattr(config, "model_type", None) in SHARED_PREFIX_MODEL_TYPES
            and getattr(config, "_attn_implementation", None) in SHARED_PREFIX_ATTENTION)


def prompt_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int) -> list[list[int]]:
    """Row indices of rollout rows grouped by equal prompts (the tokens the mask keeps of the first
    `prompt_length` columns), in order of each group's first row. Rows need not be contiguous."""
    groups: dict[tuple, list[int]] = {}
    ids, mask = input_ids[:, :prompt_length].tolist(), attention_mask[:, :prompt_length].tolist()
    for row, (tokens, keep) in enumerate(zip(ids, mask)):
        groups.setdefault(tuple(t for t, k in zip(tokens, keep) if k), []).append(row)
    return list(groups.values())


def needed_rollout_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int) -> int:
    """The tokens a forward over rollout rows must compute: each distinct prompt's real tokens once (its
    samples share them) and every row's real response tokens; padding left out. The work a shared-prefix
    forward approaches, and the yardstick for the training and scoring FLOP rates."""
    prompt_length = input_ids.shape[1] - response_length
    return needed_prompt_tokens(input_ids, attention_mask, response_length) + \
        int(attention_mask[:, prompt_length:].sum())


def needed_prompt_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int) -> int:
    """Each distinct prompt's real tokens once: what a rollout's prefill must compute when its samples
    share their prompt (the engine's prefix cache), and the prompt part of `needed_rollout_tokens`."""
    prompt_length = input_ids.shape[1] - response_length
    groups = prompt_groups(input_ids, attention_mask, prompt_length)
    return sum(int(attention_mask[members[0], :prompt_length].sum()) for members in groups)


def needed_pair_tokens(batch: dict) -> int:
    """The same for preference pairs (`chosen_*`/`rejected_*` rows with a `loss_mask`): both rows' real
    tokens, a prompt the two share (the tokens before the first marked one) counted once."""
    total = int(batch["chosen_attention_mask"].sum()) + int(batch["rejected_attention_mask"].sum())
    chosen, rejected = batch["chosen_input_ids"], batch["rejected_input_ids"]
    for row in range(chosen.shape[0]):
        starts = [int(batch[f"{side}_loss_mask"][row].long().argmax()) for side in ("chosen", "rejected")]
        if starts[0] == starts[1] and torch.equal(chosen[row, :starts[0]], rejected[row, :starts[1]]):
            total -= int(batch["chosen_attention_mask"][row, :starts[0]].sum())
    return total


def packed_response_logits(module, input_ids, attention_mask, response_length: int,
                           groups: list[list[int]]) -> torch.Tensor:
    """The logits in fp32 that score each rollout row's response tokens, `[B, R, V]` (entry `t` predicts
    response token `t`), from one packed row per group of rows sharing a prompt.

    Packed row `g` is `[prompt (left-padded to P), response of member 1, ..., of member K]` (each response
    at its full `R` columns; K the largest group, smaller groups' spare slots masked out). A 4D additive
    mask lets each response see the prompt and, causally, itself, never a sibling; its position ids
    continue from the prompt's length, as in its own row. So every response token sees exactly the keys,
    values and positions it sees in the unshared `[B, P + R]` batch, and its logits are the same up to
    float rounding. The first response token of every member is scored at the prompt's last position,
    shared by the group; the LM head runs on the scored positions only (`logits_to_keep` as indices)."""
    rows, total = input_ids.shape
    R = response_length
    P = total - R
    G, K = len(groups), max(len(g) for g in groups)
    device = input_ids.device
    slots = torch.full((G, K), -1, dtype=torch.long)
    for g, members in enumerate(groups):
        slots[g, :len(members)] = torch.tensor(members)
    slots = slots.to(device)
    taken = slots >= 0
    member = slots.clamp(min=0)
    first = member[:, 0]
    prompt_mask = attention_mask[first, :P].long()
    response_mask = attention_mask[member, P:].long() * taken.unsqueeze(-1).long()  # [G, K, R]
    ids = torch.cat([input_ids[first, :P], input_ids[member, P:].reshape(G, K * R)], dim=1)
    key_valid = torch.cat([prompt_mask, response_mask.reshape(G, K * R)], dim=1).bool()  # [G, L]
    prompt_len = prompt_mask.sum(-1)  # [G]
    positions = torch.cat([(prompt_mask.cumsum(-1) - 1).clamp(min=0),
                           ((prompt_len - 1).view(G, 1, 1) + response_mask.cumsum(-1)).reshape(G, K * R)], dim=1)
    segment = torch.cat([torch.full((P,), -1, device=device),
                         torch.arange(K, device=device).repeat_interleave(R)])  # -1: the prompt, j: response j
    length = P + K * R
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    same = (segment.view(1, -1) == -1) | (segment.view(1, -1) == segment.view(-1, 1))
    allowed = (causal & same).unsqueeze(0) & key_valid.unsqueeze(1)  # [G, query, key]
    dtype = _unwrapped(module).dtype
    mask4d = torch.zeros(G, 1, length, length, dtype=dtype, device=device).masked_fill(
        ~allowed.unsqueeze(1), torch.finfo(dtype).min)
    # Scored positions: the prompt's last, then each slot's first R - 1 (its last predicts past the response).
    scored = torch.cat([torch.tensor([P - 1]), (P + torch.arange(K).view(K, 1) * R
                                                 + torch.arange(R - 1).view(1, R - 1)).reshape(-1)]).to(device)
    kwargs = {"logits_to_keep": scored} if _takes_logits_to_keep(type(_unwrapped(module))) else {}
    out = module(input_ids=ids, attention_mask=mask4d, position_ids=positions, use_cache=False, **kwargs)
    logits = out.logits if kwargs else out.logits[:, scored]
    # Back to the rows: row b (group g, slot j) reads kept entry 0, then 1 + j (R - 1) + t.
    group_of = torch.empty(rows, dtype=torch.long, device=device)
    slot_of = torch.empty(rows, dtype=torch.long, device=device)
    group_of[slots[taken]] = torch.arange(G, device=device).view(G, 1).expand(G, K)[taken]
    slot_of[slots[taken]] = torch.arange(K, device=device).view(1, K).expand(G, K)[taken]
    steps = torch.arange(R, device=device).view(1, R)
    index = torch.where(steps == 0, 0, 1 + slot_of.view(rows, 1) * (R - 1) + steps - 1)
    return logits[group_of.view(rows, 1), index].float()


def response_logprobs(module, input_ids, attention_mask, response_length: int, *, temperature: float = 1.0,
                      with_entropy: bool = False, shared_prefix: bool = False) -> dict[str, torch.Tensor]:
    """Per-token log-probs `[B, R]` of the response part of rollout rows.

    Logits at position `t` predict token `t + 1`, so the last `R` tokens are
    scored by the logits at positions `P - 1 ... P + R - 2`. Dividing by the
    sampling temperature makes these the log-probs of the distribution the
    engine sampled from.

    With `shared_prefix`, rows with equal prompts are scored by one packed forward per prompt
    (`packed_response_logits`) where the model supports it (`shared_prefix_supported`) and some prompt
    repeats; otherwise (and always for other models) by the plain `[B, P + R]` forward. Both give the same
    numbers up to float rounding.
    """
    logits = None
    if shared_prefix and input_ids.shape[0] > 1 and shared_prefix_supported(module):
        groups = prompt_groups(input_ids, attention_mask, input_ids.shape[1] - response_length)
        if len(groups) < input_ids.shape[0]:
            logits = packed_response_logits(module, input_ids, attention_mask, response_length, groups)
    if logits is None:
        logits = lm_logits(module, input_ids, attention_mask, keep=response_length + 1)[:, :-1]
    logits = logits / temperature
    out = {"logprobs": gather_logprobs(logits, input_ids[:, -response_length:])}
    if with_entropy:
        out["entropy"] = entropy_from_logits(logits)
    return out


def pair_logps(module, batch: dict, *, vocab: bool = False, shared_prefix: bool = False) -> dict[str, torch.Tensor]:
    """One forward pass over chosen and rejected rows stacked; keys prefixed `chosen_`/`rejected_`.

    With `shared_prefix` (and without `vocab`) a pair whose chosen and rejected rows share their prompt (the
    tokens before the first `loss_mask` one) is scored by one packed row, the prompt once
    (`shared_sequence_logps`), where the model supports it; otherwise by the plain forward."""
    n = batch["chosen_input_ids"].shape[0]
    stacked = [torch.cat([batch[f"chosen_{k}"], batch[f"rejected_{k}"]])
               for k in ("input_ids", "attention_mask", "loss_mask")]
    stats = None
    if shared_prefix and not vocab and shared_prefix_supported(module):
        stats = shared_sequence_logps(module, *stacked)
    if stats is None:
        stats = sequence_logps(module, *stacked, vocab=vocab)
    out = {}
    for key, value in stats.items():
        out[f"chosen_{key}"] = value[:n]
        out[f"rejected_{key}"] = value[n:]
    return out


def shared_sequence_logps(module, input_ids, attention_mask, loss_mask) -> dict[str, torch.Tensor] | None:
    """`sequence_logps`'s statistics of right-padded training rows from packed rows, one per set of rows
    with equal prompts (a prompt: the tokens before a row's first `loss_mask` one); None where no prompt
    repeats or a row marks no token (the caller then takes the plain forward).

    Each row is recast in the rollout layout, its prompt left-padded to the longest and its tail (the
    first marked token onwards) right-padded to the longest, and scored by `packed_response_logits`; its
    log-probs go back to their columns of `[B, T-1]`."""
    rows, total = input_ids.shape
    marked = loss_mask.bool()
    if rows < 2 or not bool(marked.any(-1).all()):
        return None
    device = input_ids.device
    prompt_len = marked.long().argmax(-1)  # [B]: the first marked column
    P = int(prompt_len.max())
    S = int((total - prompt_len).max())
    # Rollout-layout column c < P holds the row's column c - (P - L); column P + u its column L + u.
    cols = torch.arange(P + S, device=device).view(1, -1)
    source = torch.where(cols < P, cols - (P - prompt_len.view(-1, 1)), prompt_len.view(-1, 1) + cols - P)
    inside = (source >= 0) & (source < total)
    source = source.clamp(0, total - 1)
    ids = torch.where(inside, input_ids.gather(1, source), 0)
    mask = torch.where(inside, attention_mask.gather(1, source), 0)
    groups = prompt_groups(ids, mask, P)
    if len(groups) == rows:
        return None
    logits = packed_response_logits(module, ids, mask, S, groups)  # [B, S, V]: entry u predicts tail token u
    tail_logps = gather_logprobs(logits, ids[:, P:])
    # token_logps[:, t] scores column t + 1 = L + u.
    u = torch.arange(total - 1, device=device).view(1, -1) + 1 - prompt_len.view(-1, 1)
    mask_out = loss_mask[:, 1:].float()
    token_logps = torch.where(u >= 0, tail_logps.gather(1, u.clamp(0, S - 1)), 0.0) * mask_out
    return {"token_logps": token_logps, "mask": mask_out, "logps": token_logps.sum(-1), "lengths": mask_out.sum(-1)}


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
