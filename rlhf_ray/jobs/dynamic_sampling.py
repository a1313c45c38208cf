"""Dynamic sampling (DAPO, Yu et al. 2025, arXiv:2503.14476, Sec. 3.2): a step trains on prompts whose samples disagree.

When every sample of a prompt gets the same reward (all right, or, early on a
hard task, all wrong), its group-relative advantages are zero on every token:
the group adds nothing to the gradient, and a batch of such groups is an empty
step (`policy/pg_loss` 0, `policy/grad_norm` 0). `fill_batch` keeps drawing
batches of prompts from the engines, drops those groups, and stops once
`batch_size` prompts with a reward spread are gathered or `max_draws` batches
have been drawn. A step still short then fills up with dropped groups, so every
step has the shape the update was set up for (`run.batch_size` x samples per
prompt rows), and says how many it refilled.

The driver hands `fill_batch` its `draw(index)`, one engine call and scoring
of `batch_size` fresh prompts; nothing here touches Ray.
"""

from __future__ import annotations

from typing import Callable

import torch

from rlhf_ray.algorithms.advantages import informative_groups

Rows = dict[str, torch.Tensor]
Draw = Callable[[int], "tuple[Rows, Rows]"]

__all__ = ["fill_batch", "select_groups", "join_rows"]


def fill_batch(draw: Draw, batch_size: int, group_size: int, max_draws: int,
               pad_id: int) -> tuple[Rows, Rows, dict[str, float]]:
    """Draw batches until `batch_size` prompts have samples with different rewards; returns
    `(rollout, scores, metrics)` of exactly `batch_size` prompts.

    Args:
        draw: `draw(index) -> (rollout, scores)` for `batch_size` new prompts, `index` counting the
            draws of this step from 0; `scores["sequence_rewards"]` is `[batch_size * group_size]`.
        batch_size: prompts the step trains on.
        group_size: samples per prompt (>= 2), each prompt's consecutive.
        max_draws: most calls of `draw` (the first included).
        pad_id: token id that left-pads prompts of different draws to one width.

    Returns:
        The kept groups in the order drawn, then dropped ones where fewer than `batch_size` had a
        reward spread; metrics `rollout/draws`, `rollout/prompts_drawn`, `rollout/groups_dropped` (of
        the groups drawn, those whose rewards were all equal), `rollout/groups_refilled` (dropped groups
        trained on after all, to fill the batch) and `rollout/drawn_reward_mean` (over every sample
        drawn: the kept batch's mean leans towards the prompts with a spread).
    """
    kept: list[tuple[Rows, Rows]] = []
    dropped: list[tuple[Rows, Rows]] = []
    n_kept = n_dropped = draws = 0
    reward_sum = reward_count = 0.0
    while draws < max_draws and n_kept < batch_size:
        rollout, scores = draw(draws)
        draws += 1
        rewards = scores["sequence_rewards"]
        reward_sum, reward_count = reward_sum + float(rewards.sum()), reward_count + rewards.numel()
        spread = informative_groups(rewards, group_size)
        kept.append((select_groups(rollout, spread, group_size), select_groups(scores, spread, group_size)))
        dropped.append((select_groups(rollout, ~spread, group_size), select_groups(scores, ~spread, group_size)))
        n_kept += int(spread.sum())
        n_dropped += int((~spread).sum())
    # Kept groups first, then dropped ones: the first batch_size groups of the draws' groups are the batch.
    parts = kept + dropped
    first = torch.arange(draws * batch_size) < batch_size
    rollout = select_groups(join_rows([r for r, _ in parts], pad_id), first, group_size)
    scores = select_groups(join_rows([s for _, s in parts], pad_id), first, group_size)
    metrics = {"rollout/draws": float(draws), "rollout/prompts_drawn": float(draws * batch_size),
               "rollout/groups_dropped": float(n_dropped),
               "rollout/groups_refilled": float(max(batch_size - n_kept, 0)),
               "rollout/drawn_reward_mean": reward_sum / max(reward_count, 1.0)}
    return rollout, scores, metrics


def select_groups(rows: Rows, groups: torch.Tensor, group_size: int) -> Rows:
    """The rows of the prompt groups where `groups` (`[G]` bool) is true.

    A tensor with `G * group_size` rows is indexed by sample; one with `G` rows (ReMax's `greedy_*`
    fields, one per prompt) by prompt. `group_size >= 2` keeps the two apart."""
    if group_size < 2:
        raise ValueError(f"select_groups needs group_size >= 2 to tell samples from prompts; got {group_size}")
    n_groups = groups.shape[0]
    samples = groups.repeat_interleave(group_size)
    out = {}
    for key, value in rows.items():
        if value.shape[0] == n_groups * group_size:
            out[key] = value[samples]
        elif value.shape[0] == n_groups:
            out[key] = value[groups]
        else:
            raise ValueError(f"{key} has {value.shape[0]} rows; expected {n_groups * group_size} (samples) or "
                             f"{n_groups} (prompts)")
    return out


def join_rows(parts: list[Rows], pad_id: int) -> Rows:
    """Rows of several draws as one batch. Prompts are left-padded to the longest prompt of their own
    draw, so `*input_ids` (with `pad_id`) and `*attention_mask` (with 0) are left-padded to the widest;
    every other field must have the same width in every part (responses are `rollout.max_new_tokens`
    long in every draw)."""
    parts = [p for p in parts if next(iter(p.values())).shape[0] > 0] or parts[:1]
    out = {}
    for key in parts[0]:
        values = [p[key] for p in parts]
        width = max(v.shape[-1] for v in values) if values[0].dim() > 1 else None
        if width is not None and any(v.shape[-1] != width for v in values):
            if not key.endswith(("input_ids", "attention_mask")):
                raise ValueError(f"{key}: widths {[v.shape[-1] for v in values]} differ between draws")
            fill = pad_id if key.endswith("input_ids") else 0
            values = [torch.nn.functional.pad(v, (width - v.shape[-1], 0), value=fill) for v in values]
        out[key] = torch.cat(values)
    return out

