"""Evaluation: held-out reward and pass rate, alignment accuracy with a judge,
held-out preference metrics, reward-model accuracy, and sample outputs beside
the metrics.

Held-out rewards come from the job's own reward: its reward model or rule for
an online job, its `reward.rule` (when set) for an offline one. A rule's pass
rate is the share of responses whose reward reaches the rule's `max_reward`
attribute (1.0 when it has none): for the arithmetic task's `answer_reward`,
the share answered right.

The judge is the config's `judge`: `auto` (the default) is the judge of the
shipped task the data comes from (the synthetic task's: the response mentions
Penn, the DPO-vs-SFT study's alignment accuracy; the arithmetic task's: the
answer is right) and none for other data; or an import path of
`fn(prompt, response) -> bool`. Samples carry a verdict only where a judge gave
one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from rlhf_ray.algorithms.steps import OfflineStep
from rlhf_ray.config.imports import import_callable
from rlhf_ray.config.schema import JobConfig
from rlhf_ray.data.tasks import as_judge, judge_path
from rlhf_ray.files import write_jsonl_atomic
from rlhf_ray.workers.reward_trainer import pairwise_accuracy


def eval_indices(cfg: JobConfig, data) -> list[int]:
    """The held-out examples an evaluation reads: the first `run.eval_size` of `data` (0: all of them)."""
    size = cfg.run.eval_size
    return list(range(min(size, len(data)) if size else len(data)))


def generate_all(group, prompts: dict, *, max_new_tokens: int, seed: int, greedy: bool) -> list[list[int]]:
    """Responses of every rank's share of the prompts (all ranks take part: ZeRO-3 gathers)."""
    pending = group.scatter_padded(lambda a, shard: a.generate.remote(shard, max_new_tokens, seed, greedy),
                                   {k: prompts[k] for k in ("input_ids", "attention_mask")})
    return [row for shard in pending.results() for row in shard][:pending.size]


def judge_from(cfg: JobConfig) -> Callable[[str, str], bool] | None:
    path = judge_path(cfg.judge, cfg.data.eval or cfg.data.train)
    return as_judge(import_callable(path, "judge")) if path else None


def rule_max_reward(rule: Callable) -> float:
    """The reward a rule gives a response that passes (its `max_reward` attribute; 1.0 when it has none)."""
    return float(getattr(rule, "max_reward", 1.0))


def pass_rate(rewards, max_reward: float) -> float:
    """Share of rewards at the rule's maximum (a small tolerance for float sums)."""
    values = [float(r) for r in rewards]
    return sum(v >= max_reward - 1e-6 for v in values) / max(len(values), 1)


def _judged(judge, prompts: list[str], texts: list[str]) -> list[bool] | None:
    return [bool(judge(p, t)) for p, t in zip(prompts, texts)] if judge else None


def _sample_rows(prompts: list[str], texts: list[str], **columns) -> list[dict]:
    """One row per response; a column given as None (a judge that was not set) is left out."""
    given = {k: v for k, v in columns.items() if v is not None}
    return [{"prompt": p, "response": t, **{k: v[i] for k, v in given.items()}}
            for i, (p, t) in enumerate(zip(prompts, texts))]


def write_samples(run_dir: Path, step: int, rows: list[dict]) -> Path:
    """Sample outputs of an evaluation, one JSON object per line, under `samples/`."""
    return write_jsonl_atomic(run_dir / "samples" / f"step_{step}.jsonl", rows)


def alignment(policy_group, eval_prompts, tokenizer, cfg: JobConfig, run_dir: Path, step: int) -> dict:
    """Greedy responses to held-out prompts: alignment accuracy (judge), the rule's reward and pass rate
    (`reward.rule`, when the job sets one), mean length, samples on disk."""
    indices = eval_indices(cfg, eval_prompts)
    n = len(indices)
    prompts = eval_prompts.prompts(indices)
    tokens = generate_all(policy_group, prompts, max_new_tokens=cfg.rollout.max_new_tokens, seed=cfg.run.seed,
                          greedy=True)
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    prompt_texts = prompts["prompt_text"]
    verdicts = _judged(judge_from(cfg), prompt_texts, texts)
    out = {"eval/response_length": sum(len(t) for t in tokens) / max(n, 1)}
    rewards = None
    if cfg.reward.rule:
        rule = import_callable(cfg.reward.rule, "reward.rule")
        rewards = [float(r) for r in rule(_as_the_reward_role_sees(tokenizer, prompt_texts), texts)]
        out["eval/greedy_reward_mean"] = sum(rewards) / max(n, 1)
        out["eval/greedy_pass_rate"] = pass_rate(rewards, rule_max_reward(rule))
    if verdicts is not None:
        out["eval/alignment_accuracy"] = sum(verdicts) / max(n, 1)
    write_samples(run_dir, step, _sample_rows(prompt_texts, texts, judge=verdicts, reward=rewards))
    return out


def _as_the_reward_role_sees(tokenizer, prompt_texts: list[str]) -> list[str]:
    """Rendered prompts as the reward role decodes rollout rows: their tokens without special tokens."""
    return [tokenizer.decode(tokenizer(p, add_special_tokens=False)["input_ids"], skip_special_tokens=True)
            for p in prompt_texts]


def check_rule_on_eval_data(cfg: JobConfig, eval_prompts, tokenizer) -> None:
    """An offline job scores its held-out answers with `reward.rule` only when it evaluates, after training
    has started: try the rule on the first held-out prompt now, so a rule that refuses the data (another
    task's prompts) fails before any model loads."""
    if not cfg.reward.rule or eval_prompts is None or not len(eval_prompts):
        return
    from rlhf_ray.config.schema import ConfigError

    rule = import_callable(cfg.reward.rule, "reward.rule")
    prompt = _as_the_reward_role_sees(tokenizer, eval_prompts.prompts([0])["prompt_text"])
    try:
        rule(prompt, [""])
    except Exception as err:  # the user's function: any exception is a refusal of the data
        raise ConfigError(f"reward.rule: {cfg.reward.rule} raised on the first prompt of data.eval "
                          f"({cfg.data.eval}): {type(err).__name__}: {err}; give a rule for this data, or "
                          "reward.rule= to evaluate without one") from err


def offline_pair_metrics(cfg: JobConfig, roles, pairs, objective, params: dict) -> dict:
    """Held-out loss and reward metrics (preference objectives) or pairwise accuracy (reward models) on
    `pairs`, the first `run.eval_size` of them; `objective` is the job's (`get_offline_objective`), `params`
    its resolved parameters."""
    batch = pairs.batch(eval_indices(cfg, pairs))
    if objective.trains != "policy":
        scores = roles["reward"].scatter_padded(lambda a, shard: a.scores.remote(shard), batch).merged()["scores"]
        return {"eval/rm_accuracy": float(pairwise_accuracy(scores, batch["ranking"])),
                "eval/rm_score_mean": float(scores.mean())}
    name = objective.name
    if objective.needs_reference:
        batch.update(roles.reference().scatter_padded(
            lambda a, shard: a.offline_reference_logps.remote(shard, name), batch).merged())
    step = OfflineStep(objective, params)
    per_rank = roles["policy"].scatter_padded(
        lambda a, shard: a.eval_preference.remote(shard, step), batch).results()
    return {f"eval/{k}": sum(m[k] for m in per_rank) / len(per_rank) for k in per_rank[0]}


def online_eval(cfg: JobConfig, roles, prompts: dict, step: int, *, generate: Callable[[dict, int], dict],
                tokenizer, run_dir: Path) -> dict:
    """Held-out prompts through the engines (one sample and one greedy response each): mean reward,
    alignment accuracy of the greedy responses, response length, and KL of the samples to the reference.
    `generate(prompts, seed)`: the job's rollout of one sample and one greedy response per prompt; `roles`
    score it (reward, policy, reference); the samples are written under `run_dir`."""
    rollout = generate(prompts, cfg.run.seed + 104729)
    keys = ("input_ids", "attention_mask", "response_mask")
    sampled = {k: rollout[k] for k in keys}
    greedy = {k: rollout[f"greedy_{k}"] for k in keys}
    both = {k: torch.cat([sampled[k], greedy[k]]) for k in keys}
    launch = {"reward": lambda: roles["reward"].scatter_padded(lambda a, s: a.score.remote(s), both),
              "policy": lambda: roles["policy"].scatter_padded(lambda a, s: a.rollout_logprobs.remote(s), sampled)}
    reference = roles.reference()
    if reference is not None:
        launch["reference"] = lambda: reference.scatter_padded(lambda a, s: a.ref_rollout_logprobs.remote(s), sampled)
    results = roles.in_turns(launch, lambda name, calls: calls.merged())
    rewards = results["reward"]["sequence_rewards"]
    size = sampled["input_ids"].shape[0]
    out = {"eval/reward_mean": float(rewards[:size].mean()), "eval/greedy_reward_mean": float(rewards[size:].mean()),
           "eval/response_length": float(greedy["response_mask"].sum(-1).float().mean())}
    mask = sampled["response_mask"].float()
    if "reference" in results:
        diff = (results["policy"]["logprobs"] - results["reference"]["ref_logprobs"]) * mask
        out["eval/kl_to_ref"] = float(diff.sum(-1).mean())
    if cfg.reward.rule:
        max_reward = rule_max_reward(import_callable(cfg.reward.rule, "reward.rule"))
        out["eval/pass_rate"] = pass_rate(rewards[:size], max_reward)
        out["eval/greedy_pass_rate"] = pass_rate(rewards[size:], max_reward)
    texts = [tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True)
             for row, m in zip(greedy["input_ids"][:, -mask.shape[1]:], greedy["response_mask"])]
    verdicts = _judged(judge_from(cfg), prompts["prompt_text"], texts)
    if verdicts is not None:
        out["eval/alignment_accuracy"] = sum(verdicts) / max(len(texts), 1)
    write_samples(run_dir, step, _sample_rows(prompts["prompt_text"], texts, judge=verdicts,
                                                  reward=rewards[size:].tolist()))
    return out
