"""The reward-KL frontier: how much reward each method buys for how far it moves from the reference.

On the shipped task every method ends at 100% alignment, which ranks
nothing. Methods are compared here the way RLHF papers compare them: along
each run (its saved checkpoints), held-out prompts get one sampled response
each (temperature 1, the same seeds for every model), and for those samples

- `reward`: the mean reward-model score,
- `kl`: the mean summed log-ratio log pi(y|x) - log pi_ref(y|x) of the
  sampled tokens (an unbiased estimate of KL(pi || pi_ref), in nats),
- `sft_nll`: the mean per-token negative log-likelihood of the response
  under the SFT model (a coherence measure: a policy that finds high reward
  with text the SFT model finds unlikely scores high here),

and `reward_at_kl` reads each method's reward at one matched KL by linear
interpolation along its run. Single process, no Ray; `frontier.png` plots
reward against KL with one line per method.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from rlhf_ray.data.collate import collate_prompts
from rlhf_ray.data.formats import Text
from rlhf_ray.data.tokenize import encode_prompt
from rlhf_ray.evaluation.standalone import load_prompts, reward_scores
from rlhf_ray.models.forward import generate_tokens, response_logprobs
from rlhf_ray.models.heads import load_scalar_head_model
from rlhf_ray.models.loading import load_causal_lm, load_tokenizer_for
from rlhf_ray.workers.rollout.base import assemble_rows


def run_checkpoints(run_dir: Path, role: str = "policy") -> list[tuple[int, Path]]:
    """(step, exported model) of each checkpoint a run kept, then its final model, in step order."""
    points = []
    for ckpt in sorted((Path(run_dir) / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1])):
        if (ckpt / f"{role}_hf" / "config.json").exists():
            points.append((int(ckpt.name.split("_")[1]), ckpt / f"{role}_hf"))
    final = Path(run_dir) / "final"
    if (final / "config.json").exists():
        summary = Path(run_dir) / "summary.json"
        last = json.loads(summary.read_text()).get("last_step") if summary.exists() else None
        step = int(last) if isinstance(last, (int, float)) else (points[-1][0] + 1 if points else 1)
        if not points or points[-1][0] != step:
            points.append((step, final))
    return points


@torch.no_grad()
def sample_and_score(model_path: Path, reference, sft, reward_model, tokenizer, prompts: Sequence[Text], *,
                     max_new_tokens: int, max_prompt_length: int, batch_size: int = 32, seed: int = 0) -> dict:
    """Mean reward, KL to the reference and NLL under the SFT model of one sampled response per prompt."""
    model = load_causal_lm(str(model_path), tokenizer=tokenizer)
    model.eval()
    rewards: list[float] = []
    kls: list[float] = []
    nll_sum = tokens = 0.0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        batch = collate_prompts([encode_prompt(tokenizer, p, max_prompt_length) for p in chunk], tokenizer.pad_token_id)
        responses = generate_tokens(model, tokenizer, batch, max_new_tokens=max_new_tokens, seed=seed + start,
                                    greedy=False)
        rows = assemble_rows(batch["input_ids"], batch["attention_mask"], responses, max_new_tokens,
                             tokenizer.pad_token_id, tokenizer.eos_token_id, repeat=1)
        mask = rows["response_mask"].float()
        logp = {name: response_logprobs(m, rows["input_ids"], rows["attention_mask"], max_new_tokens)["logprobs"]
                for name, m in (("policy", model), ("reference", reference), ("sft", sft))}
        kls.extend(((logp["policy"] - logp["reference"]) * mask).sum(-1).tolist())
        nll_sum += float(-(logp["sft"] * mask).sum())
        tokens += float(mask.sum())
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        rewards.extend(reward_scores(reward_model, tokenizer, chunk, texts, max_prompt_length=max_prompt_length,
                                     batch_size=batch_size))
    return {"reward": sum(rewards) / len(rewards), "kl": sum(kls) / len(kls), "sft_nll": nll_sum / max(tokens, 1.0)}


def frontier(runs: dict[str, Path], *, sft: Path, reward_model: Path, prompts_source: str, data_dir: Path,
             limit: int = 64, max_new_tokens: int = 32, max_prompt_length: int = 48) -> list[dict]:
    """One point per (method, checkpoint); the SFT start is method `sft` at KL 0."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer_for(str(sft))
    reference = load_causal_lm(str(sft), tokenizer=tokenizer).eval()
    rm = load_scalar_head_model(str(reward_model), tokenizer=tokenizer).eval()
    prompts = load_prompts(prompts_source, data_dir, limit)
    common = dict(max_new_tokens=max_new_tokens, max_prompt_length=max_prompt_length)
    points = [{"method": "sft", "step": 0, **sample_and_score(sft, reference, reference, rm, tokenizer, prompts,
                                                               **common)}]
    for method, run_dir in runs.items():
        for step, path in run_checkpoints(run_dir):
            points.append({"method": method, "step": step,
                           **sample_and_score(path, reference, reference, rm, tokenizer, prompts, **common)})
    return points


def reward_at_kl(points: list[dict], kl: float) -> dict[str, float | None]:
    """Each method's reward at KL `kl`, interpolated linearly between its two checkpoints around it (with the
    SFT start at KL 0 first); None when the method never reached that KL."""
    start = next((p for p in points if p["method"] == "sft"), None)
    out: dict[str, float | None] = {}
    for method in dict.fromkeys(p["method"] for p in points if p["method"] != "sft"):
        path = ([start] if start else []) + sorted((p for p in points if p["method"] == method),
                                                    key=lambda p: p["step"])
        out[method] = None
        for a, b in zip(path, path[1:]):
            lo, hi = sorted((a["kl"], b["kl"]))
            if lo <= kl <= hi and hi > lo:
                t = (kl - a["kl"]) / (b["kl"] - a["kl"])
                out[method] = a["reward"] + t * (b["reward"] - a["reward"])
                break
    return out


def draw_frontier(points: list[dict], path: Path, matched_kl: float | None = None) -> Path:
    """`frontier.png`: held-out reward against KL to the reference, one line per method along its run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    start = next((p for p in points if p["method"] == "sft"), None)
    for method in dict.fromkeys(p["method"] for p in points if p["method"] != "sft"):
        run = sorted((p for p in points if p["method"] == method), key=lambda p: p["step"])
        line = ([start] if start else []) + run
        axes[0].plot([p["kl"] for p in line], [p["reward"] for p in line], marker="o", label=method.upper())
        axes[1].plot([p["kl"] for p in line], [p["sft_nll"] for p in line], marker="o", label=method.upper())
    if start:
        for ax, key in ((axes[0], "reward"), (axes[1], "sft_nll")):
            ax.scatter([start["kl"]], [start[key]], s=120, marker="*", color="black", zorder=5, label="SFT start")
    if matched_kl is not None:
        axes[0].axvline(matched_kl, color="#999999", ls=":", lw=1)
        axes[0].text(matched_kl, axes[0].get_ylim()[0], f"  matched KL {matched_kl:g}", fontsize=8, color="#666666",
                     va="bottom")
    axes[0].set(title="Reward bought per nat of KL (up and left is better)", xlabel="KL to the SFT reference (nats)",
                ylabel="held-out reward (reward model)")
    axes[1].set(title="Coherence: NLL of the samples under the SFT model", xlabel="KL to the SFT reference (nats)",
                ylabel="mean NLL per response token (lower: more SFT-like)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Each point is one checkpoint along a run, scored on the same held-out prompts with one sampled "
                 "response each", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
