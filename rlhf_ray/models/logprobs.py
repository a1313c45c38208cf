"""Per-token log-probabilities, entropies and KL terms from logits.

Shapes: ``B`` batch, ``T`` sequence positions, ``V`` vocabulary. A ``[B, T, V]``
log-softmax copy of the logits is the largest tensor in an RLHF step after
the logits themselves (V = 32k-150k), so these helpers work on chunks of batch
rows whose float32 temporaries stay under ``sizing.LOGPROB_CHUNK_BYTES`` (one
``[T, V]`` row at a time for a large vocabulary, the whole batch at once for a
small model, where a Python loop over rows would cost more than the
arithmetic). Rows in bf16/fp16 are upcast to float32 a chunk at a time;
results are float32. Logits of ``-inf`` (masked tokens) are allowed.

Log-probabilities at position ``t`` score token ``t + 1`` (next-token
prediction): :func:`shift_for_next_token` lines the labels and the loss mask
up with ``logits[:, :-1]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_ray.sizing import logprob_chunk_rows


def _rows(logits: Tensor) -> Tensor:
    # [B, T, V] stays as is; [N, V] is one row of N positions.
    if logits.dim() == 2:
        return logits.unsqueeze(0)
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V] or [N, V], got shape {tuple(logits.shape)}")
    return logits


def _chunks(*tensors: Tensor) -> list[tuple[Tensor, ...]]:
    """The tensors (`[B, ...]` each, the first `[B, T, V]` logits) cut along dim 0 into chunks of rows
    whose float32 copy of the logits stays under the chunk size (`sizing.logprob_chunk_rows`)."""
    size = logprob_chunk_rows(4 * tensors[0][0].numel() if len(tensors[0]) else 1)
    return list(zip(*(t.split(size) for t in tensors)))


def _finite_float(row: Tensor) -> Tensor:
    # float32 copy with -inf (masked tokens) clamped to the lowest finite
    # value: their probability stays 0 and 0 * logit stays 0, not NaN.
    return row.float().clamp(min=torch.finfo(torch.float32).min)


def gather_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-probability of ``labels`` under ``softmax(logits)``.

    ``log p(y) = z_y - logsumexp(z)``: a gather and a reduction, without
    building ``log_softmax(logits)``.

    Args:
        logits: ``[B, T, V]`` (or ``[N, V]``), any float dtype.
        labels: ``[B, T]`` (or ``[N]``) token ids in ``[0, V)``.

    Returns:
        ``[B, T]`` (or ``[N]``) float32 log-probabilities; differentiable
        with respect to ``logits``.
    """
    squeeze = logits.dim() == 2
    rows, row_labels = _rows(logits), labels.unsqueeze(0) if squeeze else labels
    if row_labels.shape != rows.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits shape {tuple(logits.shape)}")
    out = []
    for chunk, chunk_labels in _chunks(rows, row_labels):
        chunk = chunk.float()
        picked = chunk.gather(-1, chunk_labels.unsqueeze(-1)).squeeze(-1)
        out.append(picked - torch.logsumexp(chunk, dim=-1))
    result = torch.cat(out)
    return result.squeeze(0) if squeeze else result


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits)`` at every position.

    ``H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v``.

    Args:
        logits: ``[B, T, V]`` (or ``[N, V]``).

    Returns:
        ``[B, T]`` (or ``[N]``) float32 entropies in nats.
    """
    squeeze = logits.dim() == 2
    out = []
    for (chunk,) in _chunks(_rows(logits)):
        chunk = _finite_float(chunk)
        probs = torch.softmax(chunk, dim=-1)
        out.append(torch.logsumexp(chunk, dim=-1) - (probs * chunk).sum(-1))
    result = torch.cat(out)
    return result.squeeze(0) if squeeze else result


def token_kl(policy_logits: Tensor, ref_logits: Tensor) -> Tensor:
    """Full-vocabulary ``KL(ref || policy)`` at every position.

    ``KL_t = sum_v p_ref(v) * (log p_ref(v) - log p_policy(v))``, the
    token-level term of TDPO (Zeng et al., 2024, "Token-level Direct
    Preference Optimization"). Gradients flow into ``policy_logits`` only if
    ``ref_logits`` is detached (the reference is frozen anyway).

    Args:
        policy_logits, ref_logits: ``[B, T, V]`` (or ``[N, V]``), same shape.

    Returns:
        ``[B, T]`` (or ``[N]``) float32, >= 0.
    """
    if policy_logits.shape != ref_logits.shape:
        raise ValueError(
            f"policy_logits {tuple(policy_logits.shape)} and ref_logits {tuple(ref_logits.shape)} must have one shape"
        )
    squeeze = policy_logits.dim() == 2
    out = []
    for policy_chunk, ref_chunk in _chunks(_rows(policy_logits), _rows(ref_logits)):
        ref_logp = torch.log_softmax(_finite_float(ref_chunk), dim=-1)
        policy_logp = torch.log_softmax(_finite_float(policy_chunk), dim=-1)
        out.append((ref_logp.exp() * (ref_logp - policy_logp)).sum(-1))
    result = torch.cat(out)
    return result.squeeze(0) if squeeze else result


def sequence_kl(policy_logits: Tensor, ref_logits: Tensor, mask: Tensor) -> Tensor:
    """Sequential KL of TDPO: ``sum_t mask_t * KL(ref_t || policy_t)``.

    Args:
        policy_logits, ref_logits: ``[B, T, V]``, position ``t`` predicting
            token ``t + 1`` (already shifted, like ``logits[:, :-1]``).
        mask: ``[B, T]``, 1 on the response tokens being scored.

    Returns:
        ``[B]`` float32.
    """
    return (token_kl(policy_logits, ref_logits) * mask.float()).sum(-1)


def shift_for_next_token(input_ids: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Labels and mask for next-token prediction.

    ``logits[:, t]`` predicts ``input_ids[:, t + 1]``, which counts when
    ``loss_mask[:, t + 1]`` is set.

    Args:
        input_ids: ``[B, T]``.
        loss_mask: ``[B, T]``, 1 on the tokens to score (the response).

    Returns:
        ``(labels, mask)``, both ``[B, T - 1]``, aligned with ``logits[:, :-1]``.
    """
    if input_ids.shape != loss_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and loss_mask {tuple(loss_mask.shape)} must have one "
                         "shape")
    return input_ids[:, 1:], loss_mask[:, 1:]


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids that count only real tokens, so a left-padded row gets the
    same positions (0, 1, 2, ...) for its tokens as a right-padded one.

    Example: mask ``[0, 0, 1, 1, 1]`` gives ``[0, 0, 0, 1, 2]``.

    Args:
        attention_mask: ``[B, T]`` of 0/1.

    Returns:
        ``[B, T]`` long; padded positions hold 0 or the last real position.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_logprobs(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probability of every next token under ``model``.

    One forward pass with position ids from the attention mask (so left and
    right padding give the same values). ``temperature`` divides the logits,
    matching a rollout sampled at that temperature.

    Args:
        model: a causal LM (or a DeepSpeed engine wrapping one).
        input_ids, attention_mask: ``[B, T]``.

    Returns:
        ``[B, T - 1]`` float32 log-probs (entry ``t`` scores ``input_ids[:,
        t + 1]``), and with ``return_entropy`` also the ``[B, T - 1]``
        entropies of the same distributions.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    logits = output.logits[:, :-1]
    if temperature != 1.0:
        logits = logits / temperature
    logprobs = gather_logprobs(logits, input_ids[:, 1:])
    if return_entropy:
        return logprobs, entropy_from_logits(logits)
    return logprobs


def sequence_logprobs(token_logprobs: Tensor, mask: Tensor, *, average: bool = False) -> Tensor:
    """Summed (or, with ``average``, length-normalised) log-prob of each response.

    ``log pi(y|x) = sum_t mask_t * log pi(y_t | x, y_<t)``; the average is the
    form SimPO and IPO-style losses use.

    Args:
        token_logprobs: ``[B, T]``.
        mask: ``[B, T]``, 1 on response tokens.

    Returns:
        ``[B]`` float32; an empty response sums to 0 (its average is 0 too).
    """
    total = (token_logprobs.float() * mask.float()).sum(-1)
    if average:
        return total / sequence_lengths(mask).clamp(min=1).float()
    return total


def sequence_lengths(mask: Tensor) -> Tensor:
    """Number of response tokens in each row: ``[B, T]`` mask -> ``[B]`` long."""
    return mask.long().sum(-1)
