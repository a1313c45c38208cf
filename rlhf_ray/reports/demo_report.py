"""The demo's `report.md`: alignment accuracy, reward curves, the four-model
layout and its memory, and where the time went. Built only from the run
directories' `metrics.jsonl`, so it can be rebuilt from any finished runs."""

from __future__ import annotations

from pathlib import Path

from rlhf_ray.files import write_text_atomic
from rlhf_ray.telemetry.formatting import fixed, mib, percent
from rlhf_ray.telemetry.hardware import hardware_info
from rlhf_ray.telemetry.metrics import read_metrics

ROLES = ("policy", "critic", "reference", "reward", "rollout")


def _last(rows: list[dict], key: str):
    for row in reversed(rows):
        if key in row:
            return row[key]
    return None


def _first(rows: list[dict], key: str):
    for row in rows:
        if key in row:
            return row[key]
    return None


def memory_by_role(rows: list[dict]) -> dict[str, dict[str, int]]:
    """`{role: {params, grads, optimizer, held, peak_rss}}` from the step that reported memory."""
    out: dict[str, dict[str, int]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("memory/"):
                _, role, what = key.split("/")
                out.setdefault(role, {})[what.removesuffix("_bytes")] = value
    return out


def plot_curves(runs: dict[str, list[dict]], path: Path) -> Path:
    """Reward curves: online mean reward per step, DPO implicit rewards, SFT loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name in ("ppo", "remax"):
        rows = runs.get(name, [])
        axes[0].plot([r["step"] for r in rows], [r.get("rollout/reward_mean") for r in rows], label=name.upper())
    axes[0].set(title="Online: mean reward of sampled responses", xlabel="step", ylabel="reward model score")
    dpo = runs.get("dpo", [])
    for key, label in (("rewards/chosen", "chosen"), ("rewards/rejected", "rejected")):
        axes[1].plot([r["step"] for r in dpo], [r.get(key) for r in dpo], label=label)
    axes[1].axhline(0.0, color="grey", linewidth=0.5)
    axes[1].set(title="DPO: implicit rewards (beta x log-ratio)", xlabel="step")
    for name in ("sft", "rm"):
        rows = runs.get(name, [])
        axes[2].plot([r["step"] for r in rows], [r.get("train/loss") for r in rows], label=name.upper())
    axes[2].set(title="Offline: training loss", xlabel="step")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _alignment_section(runs: dict[str, list[dict]], seconds: dict[str, float]) -> list[str]:
    lines = ["## Alignment accuracy on held-out prompts", "",
             "Share of greedy responses to the held-out prompts that the task's judge accepts (the synthetic "
             "task: they mention the target word, the study's alignment accuracy; arithmetic: the answer is "
             "right); 'first' is the evaluation after step 1, 'final' after the last step.", "",
             "| stage | first | final | held-out reward (final) | KL to reference | wall time |",
             "|---|---|---|---|---|---|"]
    for name, rows in runs.items():
        if name == "rm":
            continue
        lines.append(f"| {name.upper()} | {percent(_first(rows, 'eval/alignment_accuracy'))} | "
                     f"{percent(_last(rows, 'eval/alignment_accuracy'))} | {fixed(_last(rows, 'eval/reward_mean'))} | "
                     f"{fixed(_last(rows, 'eval/kl_to_ref'))} | {seconds.get(name, 0):.0f} s |")
    rm = runs.get("rm")
    if rm:
        lines += ["", f"Reward model: held-out pairwise accuracy {percent(_last(rm, 'eval/rm_accuracy'))} "
                      f"(chosen scored above rejected) after {rm[-1]['step']} steps."]
    return lines


def _frontier_section(out: Path, picture: Path) -> list[str]:
    """Reward against KL along each run, and each method's reward at one matched KL."""
    import json

    data = json.loads((out / "frontier.json").read_text())
    points, matched = data["points"], data.get("matched_kl")
    lines = ["## Reward against KL: what each method buys per nat", "",
             "A judge's accuracy says whether a method gets there (on the tiny task every method reaches 100%, "
             "which ranks nothing); RLHF methods are compared by the reward they reach for how far they move "
             "from the reference. Each point is a checkpoint along a run, "
             "scored on the same 64 held-out prompts with one sampled response each: the reward model's "
             "score, the KL to the SFT model, and the responses' NLL under the SFT model (coherence).", "",
             f"![frontier]({picture.name})", "",
             f"| method | final KL (nats) | final reward | SFT NLL per token | reward at KL {matched} |",
             "|---|---|---|---|---|"]
    at = data.get("reward_at_matched_kl") or {}
    for method in dict.fromkeys(p["method"] for p in points):
        last = max((p for p in points if p["method"] == method), key=lambda p: p["step"])
        value = at.get(method)
        lines.append(f"| {method.upper()} | {last['kl']:.1f} | {last['reward']:.2f} | {last['sft_nll']:.2f} | "
                     f"{'–' if value is None else f'{value:.2f}'} |")
    return lines + [""]


def _layout_section(runs: dict[str, list[dict]]) -> list[str]:
    lines = ["## The four-model layout and what it costs", "",
             "PPO keeps four models (policy, critic, frozen reference, frozen reward model) plus the rollout "
             "engine's copy of the policy; ReMax drops the critic: its weights, gradients, optimizer state and "
             "activations. Bytes each role holds on one rank (MiB), measured after the first updates:", "",
             "| role | PPO params | PPO grads | PPO optimizer | PPO held | ReMax held |", "|---|---|---|---|---|---|"]
    ppo, remax = memory_by_role(runs.get("ppo", [])), memory_by_role(runs.get("remax", []))
    totals = {"ppo": 0, "remax": 0}
    for role in ROLES:
        p, r = ppo.get(role, {}), remax.get(role, {})
        if not p and not r:
            continue
        totals["ppo"] += p.get("held", 0)
        totals["remax"] += r.get("held", 0)
        # No bytes of a kind (a frozen role's gradients) print as missing.
        cells = [mib(p.get(kind) or None) for kind in ("params", "grads", "optimizer", "held")]
        cells.append(mib(r.get("held") or None) if r else "not created")
        lines.append(f"| {role} | " + " | ".join(cells) + " |")
    lines.append(f"| **total** | | | | **{mib(totals['ppo'] or None)}** | **{mib(totals['remax'] or None)}** |")
    if totals["ppo"]:
        saving = 1 - totals["remax"] / totals["ppo"]
        lines += ["", f"ReMax holds {100 * saving:.1f}% less than PPO here (the ReMax paper reports about 46% less "
                      "GPU memory on a 7B model, where activations and optimizer state dominate; here the "
                      "models are small, fp32 and the sequences short, so the split is by parameter, gradient and "
                      "optimizer bytes)."]
        peak = {name: max((m.get("peak_rss", 0) for m in memory_by_role(runs.get(name, [])).values()), default=0)
                for name in ("ppo", "remax")}
        lines.append(f"Largest process RSS of any role: PPO {mib(peak['ppo'] or None)} MiB, "
                     f"ReMax {mib(peak['remax'] or None)} MiB "
                     "(the role's bytes above, its copies while loading, and the Python, torch and DeepSpeed "
                     "runtime of its process).")
    return lines


def _time_section(runs: dict[str, list[dict]]) -> list[str]:
    phases = sorted({k for rows in runs.values() for row in rows for k in row
                     if k.startswith("time/") and k != "time/step_s"
                     and not k.startswith(("time/compute/", "time/compute_of_kind/"))})
    lines = ["## Where the time goes", "", "Median seconds per step, by phase:", "",
             "| stage | step | " + " | ".join(p[5:-2] for p in phases) + " |",
             "|---|---|" + "---|" * len(phases)]
    for name, rows in runs.items():
        def median(key):
            values = sorted(r[key] for r in rows if key in r)
            return values[len(values) // 2] if values else None
        cells = [fixed(median(p)) for p in phases]
        lines.append(f"| {name.upper()} | {fixed(median('time/step_s'))} | " + " | ".join(cells) + " |")
    return lines


def write_report(out: Path, stages: list[tuple[str, Path, float]], pictures: dict[str, Path] | None = None,
                 wall_s: float | None = None,
                 describe: str = "synthetic 'mention Penn' task -> SFT (30% of demonstrations mention the target)"
                 ) -> Path:
    """Write `out/report.md` (and `out/rewards.png`) from the stages' run directories; `pictures` are the
    pipeline report's `layout`, `timeline` and `cost` files, shown when given."""
    runs = {name: read_metrics(run_dir) for name, run_dir, _ in stages}
    seconds = {name: s for name, _, s in stages}
    plot = plot_curves(runs, out / "rewards.png")
    hw = hardware_info()
    wall = sum(seconds.values()) if wall_s is None else wall_s
    lines = ["# rlhf-ray demo report", "",
             f"Machine: {hw.get('cpu_model', 'CPU')}, {hw.get('cpu_logical_cores', '?')} cores; no GPU used. "
             f"Total wall time {wall / 60:.1f} min for {len(stages)} jobs.", "",
             f"Pipeline: {describe} -> reward model on preference pairs -> DPO, PPO and ReMax from the SFT "
             "model, the three at the same time on one Ray cluster.", ""]
    lines += _alignment_section(runs, seconds) + [""]
    lines += ["## Reward curves", "", f"![reward curves]({plot.name})", ""]
    if pictures:
        lines += ["## The cluster: who ran where, and when", "",
                  "Each job is a placement group of role groups; the frozen reference and reward groups are "
                  "set up once and borrowed by the jobs alongside.", "", f"![layout]({pictures['layout'].name})", "",
                  "Busy intervals of every role over wall time: the three last jobs overlap, and the gaps are "
                  "reserved time a role waits.", "", f"![timeline]({pictures['timeline'].name})", ""]
        if "frontier" in pictures:
            lines += _frontier_section(out, pictures["frontier"])
        cost = Path(pictures["cost"]).read_text().splitlines()[2:]
        lines += ["## What each role cost", "",
                  "Reserved core-seconds (CPUs x the job's wall time), the share of that time the role was busy, "
                  "the bytes each rank holds and the peak RSS of its process.", ""] + cost + [""]
    lines += _layout_section(runs) + [""]
    lines += _time_section(runs) + [""]
    lines += ["Run directories: " + ", ".join(f"`{name}/`" for name, _, _ in stages) +
              " (each with config.yaml, metrics.jsonl, samples/, final/)."]
    return write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
