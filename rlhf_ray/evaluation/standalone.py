"""Standalone evaluation of trained models, in one process and without Ray.

`rlhf-ray eval --model runs/dpo/final` answers the questions of the
DPO-vs-SFT study (REFERENCES.md) for any checkpoint: greedy responses to
held-out prompts, the share a judge accepts (alignment accuracy: for the
shipped task, the share that mention "Penn"), their mean length and, with a
reward model, their mean reward and the reward model's win rate of the model
over a baseline.

    prompts --> model ............ greedy responses --> judge, length
            --> baseline ......... greedy responses --> judge, length
    (prompt, response) --> reward model --> reward; per prompt:
        win 1, tie 0.5, loss 0 (model vs baseline) --> win rate

Two identical responses are a tie by definition (the reward model is a
function of the text), so a model against itself scores exactly 0.5.

Writes `metrics.json` (the returned dict) and `samples.jsonl` (one object per
prompt: prompt, response, its token count, the judge's verdict and, where
asked for, the reward, the baseline's response and the outcome) to `out_dir`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rlhf_ray.config.imports import import_callable
from rlhf_ray.data.collate import collate_prompts, collate_sequences
from rlhf_ray.data.formats import Text
from rlhf_ray.data.job_data import resolve_source
from rlhf_ray.data.loading import load_examples
from rlhf_ray.data.tasks import as_judge, judge_path
from rlhf_ray.data.tokenize import encode_prompt, encode_prompt_response, render_prompt
from rlhf_ray.files import write_jsonl_atomic, write_text_atomic
from rlhf_ray.models.forward import generate_tokens
from rlhf_ray.models.heads import load_scalar_head_model
from rlhf_ray.models.loading import default_device, load_causal_lm, load_tokenizer_for

DEFAULT_JUDGE = "auto"
DEFAULT_PROMPTS = "synthetic:prompts_eval"
METRICS_FILE = "metrics.json"
SAMPLES_FILE = "samples.jsonl"


def load_judge(judge: str, source: str = DEFAULT_PROMPTS):
    """`(judge, its import path)`: the judge `fn(prompt, response) -> bool` that `judge` names (a function of the
    response alone is called with the response; `"auto"`, the judge of the shipped task `source` names), or
    `(None, "")` where there is none."""
    path = judge_path(judge, source)
    return (as_judge(import_callable(path, "judge")), path) if path else (None, "")


def load_prompts(source: str, data_dir: Path, limit: int = 0) -> list[Text]:
    """Prompts of a data source (any file with a `prompt` or `messages` column, or
    `synthetic:<split>`, written to `data_dir`); the first `limit` of them (0: all)."""
    examples = load_examples(resolve_source(source, data_dir), "prompt").examples
    prompts = [example.prompt for example in examples]
    return prompts[:limit] if limit > 0 else prompts


@torch.no_grad()
def greedy_responses(model, tokenizer, prompts: Sequence[Text], *, max_new_tokens: int, max_prompt_length: int,
                     batch_size: int) -> tuple[list[str], list[int]]:
    """Greedy responses of a causal LM: (decoded texts, token counts with EOS).

    Prompts keep their last `max_prompt_length` tokens and are left-padded
    (`[B, P]`) in batches of `batch_size`; a response is cut after
    `max_new_tokens` tokens."""
    texts: list[str] = []
    lengths: list[int] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids = [encode_prompt(tokenizer, prompt, max_prompt_length) for prompt in chunk]
        batch = collate_prompts(ids, tokenizer.pad_token_id)
        tokens = generate_tokens(model, tokenizer, batch, max_new_tokens=max_new_tokens, seed=0, greedy=True)
        texts.extend(tokenizer.decode(row, skip_special_tokens=True) for row in tokens)
        lengths.extend(len(row) for row in tokens)
    return texts, lengths


@torch.no_grad()
def reward_scores(reward_model, tokenizer, prompts: Sequence[Text], responses: Sequence[str], *,
                  max_prompt_length: int, batch_size: int) -> list[float]:
    """Reward-model scores of (prompt, response) pairs, one float per pair.

    Each pair is encoded as in reward-model training (prompt, response, EOS;
    right-padded `[B, T]`) and scored at its last token; the response is never
    cut."""
    device = next(reward_model.parameters()).device
    longest = max((len(tokenizer.encode(r, add_special_tokens=False)) for r in responses), default=0)
    max_length = max_prompt_length + longest + 2
    scores: list[float] = []
    for start in range(0, len(prompts), batch_size):
        sequences = [encode_prompt_response(tokenizer, p, r, max_length=max_length,
                                            max_prompt_length=max_prompt_length)
                     for p, r in zip(prompts[start:start + batch_size], responses[start:start + batch_size])]
        batch = collate_sequences(sequences, tokenizer.pad_token_id)
        values = reward_model.score(input_ids=batch["input_ids"].to(device),
                                    attention_mask=batch["attention_mask"].to(device))
        scores.extend(float(v) for v in values.float().cpu())
    return scores


def pairwise_outcomes(model_texts: Sequence[str], model_rewards: Sequence[float],
                      baseline_texts: Sequence[str], baseline_rewards: Sequence[float]) -> list[float]:
    """Per prompt: 1 if the model's response out-scores the baseline's, 0 if it scores
    lower, 0.5 for equal rewards or identical responses."""
    outcomes = []
    for text, reward, base_text, base_reward in zip(model_texts, model_rewards, baseline_texts, baseline_rewards):
        if text == base_text or reward == base_reward:
            outcomes.append(0.5)
        else:
            outcomes.append(1.0 if reward > base_reward else 0.0)
    return outcomes


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def _generate_with(path: str, tokenizer, prompts: Sequence[Text], device: torch.device,
                   **kwargs) -> tuple[list[str], list[int]]:
    """Load the causal LM at `path`, respond greedily to every prompt, free it."""
    model = load_causal_lm(path, device=device, tokenizer=tokenizer)
    try:
        return greedy_responses(model, tokenizer, prompts, **kwargs)
    finally:
        del model


def _write_outputs(out: Path, metrics: dict, rows: list[dict]) -> None:
    write_jsonl_atomic(out / SAMPLES_FILE, rows, ensure_ascii=False)
    write_text_atomic(out / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")


def run_eval(model: str, *, baseline: str | None = None, reward_model: str | None = None,
             prompts: str | None = None, judge: str | None = DEFAULT_JUDGE, out_dir: str | os.PathLike = "runs/eval",
             max_new_tokens: int = 32, limit: int = 0, tokenizer: str | None = None, max_prompt_length: int = 64,
             batch_size: int = 16, device: str | None = None) -> dict[str, Any]:
    """Evaluate `model` (and `baseline`) on held-out prompts; see the module docstring.

    Args:
        model, baseline: causal LMs (checkpoint directory, preset or hub name).
        reward_model: a scalar-head reward model; adds mean rewards and, with
            `baseline`, the win rate.
        prompts: a data source with prompts; default the synthetic task's
            held-out `prompts_eval`, written under `out_dir/data`.
        judge: `module:function` of `fn(prompt, response) -> bool`; `auto`: the shipped task's judge when
            `prompts` is one of its splits; empty or None: no accuracy.
        tokenizer: one tokenizer for every model; default each model's own.
        limit: evaluate the first `limit` prompts only (0: all).
        device: `cpu`, `cuda`, ...; default CUDA when visible.

    Returns the metrics (also written to `out_dir/metrics.json`): `eval/...`
    for the model, `baseline/...` for the baseline, `eval/win_rate` and the
    counts `eval/wins`, `eval/ties`, `eval/losses`, plus the inputs by name.
    """
    if max_new_tokens < 1 or max_prompt_length < 1 or batch_size < 1 or limit < 0:
        raise ValueError(f"eval: need max_new_tokens, max_prompt_length and batch_size >= 1 and limit >= 0; got "
                         f"{max_new_tokens}, {max_prompt_length}, {batch_size} and {limit}")
    out = Path(out_dir)
    source = prompts or DEFAULT_PROMPTS
    judge_fn, judge = load_judge(judge, source) if judge else (None, "")
    prompt_list = load_prompts(source, out / "data", limit)
    run_on = torch.device(device) if device else default_device()
    gen = {"max_new_tokens": max_new_tokens, "max_prompt_length": max_prompt_length, "batch_size": batch_size}

    model_tokenizer = load_tokenizer_for(tokenizer or model, padding_side="left")
    texts, lengths = _generate_with(model, model_tokenizer, prompt_list, run_on, **gen)
    base_texts, base_lengths = [], []
    if baseline:
        base_tokenizer = load_tokenizer_for(tokenizer or baseline, padding_side="left")
        base_texts, base_lengths = _generate_with(baseline, base_tokenizer, prompt_list, run_on, **gen)

    rows = [{"prompt": render_prompt(model_tokenizer, p), "response": t, "response_tokens": n}
            for p, t, n in zip(prompt_list, texts, lengths)]
    metrics: dict[str, Any] = {"model": str(model), "prompts": source, "judge": judge or "",
                               "eval/num_prompts": len(prompt_list), "eval/response_length": _mean(lengths)}
    if baseline:
        metrics.update({"baseline": str(baseline), "baseline/response_length": _mean(base_lengths)})
        for row, text, n in zip(rows, base_texts, base_lengths):
            row.update({"baseline_response": text, "baseline_response_tokens": n})
    if judge_fn is not None:
        for prefix, key, outputs in (("eval", "judge", texts), ("baseline", "baseline_judge", base_texts)):
            verdicts = [bool(judge_fn(row["prompt"], text)) for row, text in zip(rows, outputs)]
            for row, verdict in zip(rows, verdicts):
                row[key] = verdict
            if outputs:
                metrics[f"{prefix}/alignment_accuracy"] = _mean(verdicts)
    if reward_model:
        rm_tokenizer = load_tokenizer_for(tokenizer or reward_model)
        rm = load_scalar_head_model(reward_model, device=run_on, tokenizer=rm_tokenizer)
        score = {"max_prompt_length": max_prompt_length, "batch_size": batch_size}
        rewards = reward_scores(rm, rm_tokenizer, prompt_list, texts, **score)
        metrics.update({"reward_model": str(reward_model), "eval/reward_mean": _mean(rewards)})
        for row, reward in zip(rows, rewards):
            row["reward"] = reward
        if baseline:
            base_rewards = reward_scores(rm, rm_tokenizer, prompt_list, base_texts, **score)
            outcomes = pairwise_outcomes(texts, rewards, base_texts, base_rewards)
            for row, reward, outcome in zip(rows, base_rewards, outcomes):
                row.update({"baseline_reward": reward, "outcome": outcome})
            metrics.update({"baseline/reward_mean": _mean(base_rewards), "eval/win_rate": _mean(outcomes),
                            "eval/wins": outcomes.count(1.0), "eval/ties": outcomes.count(0.5),
                            "eval/losses": outcomes.count(0.0)})
        del rm
    _write_outputs(out, metrics, rows)
    return metrics
