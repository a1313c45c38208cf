"""Dynamic sampling (DAPO) without Ray: which groups a step keeps, how draws of different prompt widths
join, what it logs, and how the online driver feeds it; and the overlong penalty in the driver's rewards."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.jobs.dynamic_sampling import fill_batch, join_rows, select_groups

from job_helpers import tiny_config

PAD = 0
R = 2  # response tokens


def fake_draw(rewards_per_draw, prompt_widths, group_size=2, calls=None):
    """`draw(index)` whose draw k has prompts of width prompt_widths[k] and rewards rewards_per_draw[k];
    each row's ids are [pad..., 100 * k + row] (prompt) + [7, 7] (response), so a row names its draw."""
    def draw(index):
        if calls is not None:
            calls.append(index)
        rewards = torch.tensor(rewards_per_draw[index])
        rows, width = rewards.shape[0], prompt_widths[index]
        prompt = torch.full((rows, width), PAD)
        prompt[:, -1] = 100 * index + torch.arange(rows)
        input_ids = torch.cat([prompt, torch.full((rows, R), 7)], dim=1)
        attention_mask = (torch.arange(width + R) >= width - 1).long().expand(rows, -1)
        groups = rows // group_size
        rollout = {"input_ids": input_ids, "attention_mask": attention_mask,
                   "response_mask": torch.ones(rows, R), "finished": torch.ones(rows, dtype=torch.bool),
                   "greedy_input_ids": input_ids[::group_size] + 1000}  # one row per prompt (ReMax's fields)
        scores = {"sequence_rewards": rewards, "logprobs": torch.zeros(rows, R)}
        assert groups * group_size == rows
        return rollout, scores
    return draw


def test_groups_whose_rewards_agree_are_dropped_and_more_prompts_drawn():
    # batch of 2 prompts, 2 samples each. Draw 0: [1, 1] agrees (dropped), [0, 1] kept; draw 1 (wider prompts):
    # [0, 0] dropped, [1, 0] kept -> 2 kept groups after 2 draws, no third draw.
    calls = []
    draw = fake_draw([[1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0], [9.0, 8.0, 7.0, 6.0]], [3, 5, 4], calls=calls)
    rollout, scores, metrics = fill_batch(draw, batch_size=2, group_size=2, max_draws=3, pad_id=PAD)
    assert calls == [0, 1]
    # the kept rows in the order drawn: draw 0's rows 2, 3 and draw 1's rows 2, 3
    assert rollout["input_ids"][:, -R - 1].tolist() == [2, 3, 102, 103]
    assert scores["sequence_rewards"].tolist() == [0.0, 1.0, 1.0, 0.0]
    # draw 0's prompts (width 3) are left-padded to draw 1's width 5, responses stay the last R columns
    assert rollout["input_ids"].shape == (4, 5 + R) and rollout["input_ids"][0, :2].tolist() == [PAD, PAD]
    assert rollout["attention_mask"][0].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert rollout["greedy_input_ids"][:, -R - 1].tolist() == [1002, 1102]  # per prompt: its own group's
    assert metrics == {"rollout/draws": 2.0, "rollout/prompts_drawn": 4.0, "rollout/groups_dropped": 2.0,
                       "rollout/groups_refilled": 0.0, "rollout/drawn_reward_mean": 0.5}  # 4 of 8 rewards are 1


def test_a_step_still_short_after_the_last_draw_fills_up_with_dropped_groups():
    # Every group agrees (all wrong, as a real model's first steps on a hard task): two draws, then the
    # batch is the first two dropped groups, and the metrics say so.
    draw = fake_draw([[0.0] * 4, [0.0] * 4], [3, 3])
    rollout, _, metrics = fill_batch(draw, batch_size=2, group_size=2, max_draws=2, pad_id=PAD)
    assert rollout["input_ids"][:, -R - 1].tolist() == [0, 1, 2, 3]
    assert metrics["rollout/draws"] == 2 and metrics["rollout/groups_dropped"] == 4
    assert metrics["rollout/groups_refilled"] == 2
    # one kept group and a refill: the kept one comes first
    draw = fake_draw([[0.0, 1.0, 0.0, 0.0]], [3])
    rollout, _, metrics = fill_batch(draw, batch_size=2, group_size=2, max_draws=1, pad_id=PAD)
    assert rollout["input_ids"][:, -R - 1].tolist() == [0, 1, 2, 3] and metrics["rollout/groups_refilled"] == 1
    draw = fake_draw([[1.0, 1.0, 0.0, 1.0]], [3])
    rollout, _, _ = fill_batch(draw, batch_size=2, group_size=2, max_draws=1, pad_id=PAD)
    assert rollout["input_ids"][:, -R - 1].tolist() == [2, 3, 0, 1]


def test_select_and_join_refuse_what_they_cannot_line_up():
    with pytest.raises(ValueError, match="group_size >= 2"):
        select_groups({"x": torch.zeros(2)}, torch.tensor([True, False]), 1)
    with pytest.raises(ValueError, match="x has 3 rows; expected 4 .* or 2"):
        select_groups({"x": torch.zeros(3)}, torch.tensor([True, False]), 2)
    with pytest.raises(ValueError, match=r"response_mask: widths \[2, 3\] differ between draws"):
        join_rows([{"response_mask": torch.ones(1, 2)}, {"response_mask": torch.ones(1, 3)}], PAD)


def _rows_for(prompts, n, lengths):
    """What an engine would return for `prompts`: n samples each, responses of `lengths` tokens (of 32)."""
    ids = prompts["input_ids"].repeat_interleave(n, 0)
    mask = (torch.arange(32) < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": torch.cat([ids, 5 * mask], 1),
            "attention_mask": torch.cat([prompts["attention_mask"].repeat_interleave(n, 0), mask], 1),
            "response_mask": mask, "finished": torch.ones(len(lengths), dtype=torch.bool),
            "engine_logprobs": torch.zeros(len(lengths), 32)}


def test_the_driver_draws_fresh_prompts_with_fresh_seeds_until_the_batch_is_full(tmp_path):
    from rlhf_ray.jobs.online import OnlineJob
    from rlhf_ray.telemetry.timers import PhaseTimer

    cfg = tiny_config("tiny-dapo", tmp_path / "dapo", "run.batch_size=2", "algorithm.samples_per_prompt=2",
                      "algorithm.dynamic_sampling_max_draws=3")
    job = OnlineJob.from_config(cfg)
    # groups of 2: draw 0 keeps none, draw 1 its second, draw 2 its first (4 of the 6 groups dropped)
    rewards = iter([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.5, 0.5]])
    seeds, prompts_seen = [], []

    def generate(roles, prompts, seed, step=None):
        seeds.append(seed)
        prompts_seen.append(prompts)
        return _rows_for(prompts, 2, [3, 4, 5, 6])

    job.generate = generate
    job.score = lambda roles, rollout, timer: {"sequence_rewards": torch.tensor(next(rewards)),
                                               "logprobs": torch.zeros(4, 32)}
    sampler = iter([[0, 1], [2, 3], [4, 5], [6, 7]])
    rollout, scores, metrics = job.collect(None, sampler, step=3, timer=PhaseTimer())
    base = job.cfg.run.seed * 100003 + 3
    assert seeds == [base, base + 1000003, base + 2 * 1000003]  # each draw samples anew
    assert next(sampler) == [6, 7]  # three batches of prompts drawn from the data
    assert metrics["rollout/draws"] == 3 and metrics["rollout/groups_dropped"] == 4
    assert metrics["rollout/groups_refilled"] == 0
    # the batch: draw 1's second prompt, then draw 2's first, each with its two samples
    # (every draw's prompts left-padded to the widest draw's; the responses are the last 32 columns)
    expected = [prompts_seen[1]["input_ids"][1], prompts_seen[2]["input_ids"][0]]
    width = rollout["input_ids"].shape[1] - 32
    assert width == max(p["input_ids"].shape[1] for p in prompts_seen)
    for row, prompt in zip(rollout["input_ids"][::2], expected):
        assert row[width - len(prompt):width].tolist() == prompt.tolist()
    assert scores["sequence_rewards"].tolist() == [0.0, 1.0, 1.0, 0.0]


def test_overlong_penalty_enters_the_rewards_before_the_advantages(tmp_path):
    from rlhf_ray.jobs.online import OnlineJob

    cfg = tiny_config("tiny-dapo", tmp_path / "dapo", "run.batch_size=2", "algorithm.samples_per_prompt=2",
                      "algorithm.overlong_buffer=6")
    job = OnlineJob.from_config(cfg)
    assert job.cfg.rollout.max_new_tokens == 32
    rollout = _rows_for({"input_ids": torch.ones(2, 3, dtype=torch.long),
                         "attention_mask": torch.ones(2, 3, dtype=torch.long)}, 2, [32, 29, 10, 26])
    scores = {"sequence_rewards": torch.tensor([1.0, 1.0, 0.0, 0.0]), "logprobs": torch.zeros(4, 32)}
    batch, metrics = job.compute_advantages(rollout, scores)
    # penalties: 32 tokens -> -1, 29 -> -(29 - 26) / 6 = -0.5, 10 and 26 -> 0; shaped rewards [0, 0.5 | 0, 0]
    # group 1: mean 0.25, std 0.353553 -> -+0.707107; group 2 agrees -> 0
    assert metrics["rollout/overlong_penalty_mean"] == pytest.approx(-0.375)
    torch.testing.assert_close(batch["advantages"][:, 0], torch.tensor([-0.707107, 0.707107, 0.0, 0.0]),
                               atol=1e-5, rtol=0)
