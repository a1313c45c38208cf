"""Benchmarks of real jobs: throughput per phase, memory per role, PPO against ReMax.

Every benchmark runs ordinary jobs (`run_job`) with evaluation and intermediate
checkpoints off, reads their `metrics.jsonl`, and returns a JSON-ready dict;
`bench_report.py` renders it as Markdown and charts.

Where the step time goes. The driver times each phase (`time/<phase>_s`); every
worker times its own compute (`time/compute/<role>/<kind>_s`, kinds generate,
forward, train; `telemetry.timers.ComputeClock`). Phases map to kinds:

    generate -> generate        score, reference -> forward
    update_policy, update_critic, update -> train
    advantages -> computed on the driver        sync -> weight transfer

For each kind, compute = the roles' worker seconds of that kind as they ran
(`time/compute_of_kind/<kind>_s`: added up over roles that take turns on
shared CPUs, the longest of roles that run at the same time; ranks run in
parallel), never more than the phase's wall time. Per step: outside compute =
step - compute, of which weight sync is the transfer of the policy's weights,
and the rest ("overhead") is what Ray scheduling, serialising batches, waiting
and the driver's bookkeeping cost.

Physical limits, measured in the same run (`telemetry.hardware`): the GEMM rate
and the copy bandwidth. Training MFU = 6 * N * needed tokens / update time /
GEMM rate (Kaplan et al. 2020; PaLM appendix B), N the matmul parameters of
every trained model (`planner.shapes.matmul_param_count`), 4 * N under LoRA
(no weight gradients), the needed tokens being the batch's real tokens with a
prompt its samples or a pair's answers share counted once
(`perf/needed_tokens`), so that a shared-prefix forward gets no credit for work
it skips; the scoring forwards' rate (2 * N) counts the same tokens. Decoding reads every
weight once per step of a batch, so generation cannot beat
decode_steps * weight_bytes / bandwidth seconds (decode_steps: the longest
response of each generate call, summed over calls); each decoded token also
costs 2 * N FLOPs of the policy and each distinct prompt token (prefilled once:
its samples share it through the prefix cache) 2 * N less the LM head's
weights (prefill scores only a prompt's last position), so it cannot beat
those FLOPs (`perf/prefill_tokens`, `perf/generated_tokens`) at the GEMM rate
either. The higher of the two is the roofline bound: at batch 64 on
a CPU the compute bound is the higher (decoding does 2 * 64 / 4 = 32 FLOPs
per fp32 weight byte, more than a CPU's GEMM rate over its bandwidth).
"""

from __future__ import annotations

import dataclasses
import os
import re
import statistics
from pathlib import Path

import torch

from rlhf_ray.config.schema import ConfigError, JobConfig
from rlhf_ray.telemetry.hardware import hardware_info, measure_matmul_flops, measure_memory_bandwidth
from rlhf_ray.telemetry.metrics import read_metrics

PHASE_KIND = {"generate": "generate", "score": "forward", "reference": "forward", "update_policy": "train",
              "update_critic": "train", "update": "train", "advantages": "driver", "sync": "sync"}
"""What each driver phase does: a worker compute kind, driver-side compute, or the weight transfer."""
WORKER_KINDS = ("generate", "forward", "train")
_PHASE_KEY = re.compile(r"^time/([^/]+)_s$")
_COMPUTE_KEY = re.compile(r"^time/compute/([^/]+)/([^/]+)_s$")


# configs ----------------------------------------------------------------------

def replace_path(cfg: JobConfig, **sections: dict) -> JobConfig:
    """`cfg` with fields of its sections replaced: `replace_path(cfg, run={"total_steps": 3})`."""
    changes = {name: dataclasses.replace(getattr(cfg, name), **fields) for name, fields in sections.items()}
    return dataclasses.replace(cfg, **changes)


def bench_config(cfg: JobConfig, total_steps: int, run_dir: Path) -> JobConfig:
    """The job as benchmarked: `total_steps` steps into `run_dir`, from scratch, no evaluation,
    no intermediate checkpoints, no progress bar, metrics to jsonl only."""
    return replace_path(cfg, run={"total_steps": total_steps, "output_dir": str(run_dir), "resume": "never",
                                  "eval_every": 0, "save_every": 0, "progress": False, "sinks": ("jsonl",)},
                        data={"eval": ""})


def with_algorithm(cfg: JobConfig, name: str) -> JobConfig:
    """`cfg` running online algorithm `name`, with one pass over one minibatch for a REINFORCE-style loss
    (which has no importance ratio to reuse samples with); the critic follows from the algorithm."""
    from rlhf_ray.algorithms.registry import get_online_algorithm

    algorithm = get_online_algorithm(name)
    changes = {"name": name}
    if not algorithm.policy_loss.uses_ratio:
        changes.update(ppo_epochs=1, num_minibatches=1)
    return replace_path(cfg, algorithm=changes)


def samples_per_step(cfg: JobConfig) -> int:
    """Sampled sequences (online) or training examples (offline) of one step."""
    from rlhf_ray.job_plan import plan_job
    from rlhf_ray.jobs.validate import samples_per_prompt

    if plan_job(cfg).online:
        return cfg.run.batch_size * samples_per_prompt(cfg)
    return cfg.run.batch_size


# physical limits --------------------------------------------------------------

def measure_limits(*, threads: int | None = None, device: str | None = None, dtype: torch.dtype | None = None,
                   matmul_n: int = 2048, copy_bytes: int = 256 * 2**20) -> dict:
    """The GEMM rate (FLOP/s) and copy bandwidth (bytes/s) of this machine, with `threads` torch
    threads (default: all CPUs) on `device` (default: CUDA when visible), GEMMs in `dtype`
    (default: bf16 on CUDA, fp32 on CPU)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    threads = threads or os.cpu_count() or 1
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        flops = measure_matmul_flops(n=matmul_n, dtype=dtype, device=device)
        bandwidth = measure_memory_bandwidth(nbytes=copy_bytes, device=device)
    finally:
        torch.set_num_threads(before)
    return {"device": device, "threads": threads, "matmul_dtype": str(dtype).replace("torch.", ""),
            "matmul_n": matmul_n, "matmul_flops_per_s": flops, "copy_bytes": copy_bytes,
            "memory_bandwidth_bytes_per_s": bandwidth}


def limits_threads(cfg: JobConfig) -> int:
    """CPU threads the trained policy computes with: its ranks times their CPUs, at most the machine's."""
    return max(1, min(os.cpu_count() or 1, int(cfg.policy.num_ranks * cfg.policy.num_cpus_per_rank)))


# one step's breakdown -----------------------------------------------------------

def step_breakdown(row: dict) -> dict[str, float]:
    """Where one step's wall time went, from its metrics row (see the module docstring).

    Returns `step_s`, `compute_s`, `sync_s`, `overhead_s` (step - compute - sync),
    `outside_compute_share` ((step - compute) / step), and per kind
    `wall/<kind>_s` and `compute/<kind>_s`.
    """
    if "time/step_s" not in row:
        raise ValueError(f"metrics row of step {row.get('step')} has no time/step_s: not a training step row")
    wall: dict[str, float] = {}
    for key, seconds in row.items():
        match = _PHASE_KEY.match(key)
        if match and match.group(1) != "step":
            kind = PHASE_KIND.get(match.group(1), "other")
            wall[kind] = wall.get(kind, 0.0) + float(seconds)
    worker: dict[str, float] = {}
    for key, seconds in row.items():
        match = _COMPUTE_KEY.match(key)
        if match:
            kind = match.group(2)
            worker[kind] = max(worker.get(kind, 0.0), float(seconds))
    # Roles that took turns (`RoleGroups.turns`) add up; rows written before that was logged keep the
    # slowest role alone.
    worker.update({kind: float(row[f"time/compute_of_kind/{kind}_s"]) for kind in WORKER_KINDS
                   if f"time/compute_of_kind/{kind}_s" in row})
    compute = {kind: min(worker.get(kind, 0.0), wall.get(kind, 0.0)) for kind in WORKER_KINDS}
    compute["driver"] = wall.get("driver", 0.0)
    step = float(row["time/step_s"])
    total = sum(compute.values())
    out = {"step_s": step, "compute_s": total, "sync_s": wall.get("sync", 0.0),
           "overhead_s": step - total - wall.get("sync", 0.0),
           "outside_compute_share": (step - total) / step if step > 0 else 0.0}
    out.update({f"wall/{kind}_s": seconds for kind, seconds in wall.items()})
    out.update({f"compute/{kind}_s": seconds for kind, seconds in compute.items()})
    return out


def _median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.median(values) if values else None


def _total(rows: list[dict], key: str) -> float:
    return float(sum(r.get(key, 0.0) or 0.0 for r in rows))


def _planned_specs(cfg: JobConfig) -> list | None:
    """The planner's role specs of the job (shape, head, settings), or None when a shape is unknown."""
    from rlhf_ray.planner.from_config import planned_roles

    try:
        return planned_roles(cfg)
    except (ConfigError, FileNotFoundError, ValueError):
        return None


def _matmul_params_by_role(cfg: JobConfig) -> list[tuple[str, bool, int]] | None:
    """(role, trained, matmul parameters) of each model role the planner sees (rollout engines left out);
    None when a shape is unknown."""
    from rlhf_ray.planner.memory import RolloutSettings, TrainSettings
    from rlhf_ray.planner.shapes import matmul_param_count

    specs = _planned_specs(cfg)
    if specs is None:
        return None
    return [(s.role, isinstance(s.settings, TrainSettings), matmul_param_count(s.shape, s.head))
            for s in specs if not isinstance(s.settings, RolloutSettings)]


def lm_head_params(cfg: JobConfig) -> int | None:
    """Parameters of the policy's LM head (vocabulary x hidden width, tied or not); None when unknown."""
    shape = next((s.shape for s in _planned_specs(cfg) or [] if s.role == "policy"), None)
    return None if shape is None else shape.vocab_size * shape.hidden_size


def trained_matmul_params(cfg: JobConfig, role: str | None = None) -> int | None:
    """N of the 6N rule: matmul parameters of every model the job trains (or of the trained `role`
    only); None when a shape is unknown."""
    roles = _matmul_params_by_role(cfg)
    return None if roles is None else sum(n for name, trained, n in roles if trained and role in (None, name))


def train_flops_per_token(cfg: JobConfig) -> float | None:
    """FLOPs a token costs the trained models' forward and backward: 6 N for a fully trained model (the
    forward 2 N, the backward's input and weight gradients 2 N each), 4 N under LoRA (the frozen weights
    get no gradient; the adapters' own share is left out). None when a shape is unknown."""
    roles = _matmul_params_by_role(cfg)
    if roles is None:
        return None
    return float(sum((4 if getattr(cfg, name).lora.enabled else 6) * n for name, trained, n in roles if trained))


def role_matmul_params(cfg: JobConfig) -> dict[str, int]:
    """Matmul parameters of each role's model (rollout engines left out); empty when a shape is unknown."""
    return {name: n for name, _, n in _matmul_params_by_role(cfg) or []}


PHASE_TARGETS = (
    ("training", "training MFU (6 N FLOPs a needed token, 4 N under LoRA, against the GEMM rate)", 0.60, "min"),
    ("forward", "scoring forwards (2 N FLOPs a needed token against the GEMM rate)", 0.60, "min"),
    ("generate", "generation against its roofline", 0.30, "min"),
    ("sync", "weight sync against memcpy bandwidth", 0.25, "min"),
    ("overhead", "Ray and driver overhead, share of the step", 0.05, "max"),
)
"""Each phase against its own bound: (key, what, target, whether the figure must reach it or stay under it)."""


def phase_bounds(out: dict) -> list[dict]:
    """Each phase's figure against `PHASE_TARGETS` (phases the run has)."""
    figures = {"training": out.get("train", {}).get("mfu"), "forward": out.get("forward", {}).get("mfu"),
               "generate": out.get("generate", {}).get("roofline_utilisation"),
               "sync": out.get("sync", {}).get("share_of_memcpy"),
               "overhead": out["breakdown_median"].get("overhead_s", 0.0) / out["step_median_s"]}
    rows = []
    for key, what, target, sense in PHASE_TARGETS:
        if figures.get(key) is not None:
            value = figures[key]
            rows.append({"phase": key, "what": what, "value": value, "target": target, "sense": sense,
                         "met": value >= target if sense == "min" else value <= target})
    return rows


def analyse_throughput(cfg: JobConfig, rows: list[dict], limits: dict, weight_bytes: float | None) -> dict:
    """Medians, rates and utilisation of the measured steps `rows` (see the module docstring)."""
    if not rows:
        raise ValueError("no measured steps: run more steps than warm-up steps")
    breakdowns = [step_breakdown(r) for r in rows]
    phases = sorted({m.group(1) for r in rows for k in r if (m := _PHASE_KEY.match(k)) and m.group(1) != "step"})
    step_total = _total(rows, "time/step_s")
    train_wall = sum(b.get("wall/train_s", 0.0) for b in breakdowns)
    generate_wall = _total(rows, "time/generate_s")
    trained_tokens = _total(rows, "perf/trained_tokens")
    generated = _total(rows, "perf/generated_tokens")
    step_tokens = [r["perf/tokens_per_s"] * r["time/step_s"] for r in rows
                   if r.get("perf/tokens_per_s") and r.get("time/step_s")]
    out = {
        "measured_steps": len(rows),
        "phases_median_s": {p: _median(rows, f"time/{p}_s") for p in phases},
        "step_median_s": _median(rows, "time/step_s"),
        "step_seconds": [r["time/step_s"] for r in rows],
        "breakdown_median": {k: _median(breakdowns, k) for k in sorted(breakdowns[0])},
        "compute_median_s": {k: _median(rows, k) for k in sorted({k for r in rows for k in r
                                                                  if k.startswith("time/compute/")})},
        "samples_per_step": samples_per_step(cfg),
        "samples_per_s": samples_per_step(cfg) * len(rows) / step_total,
        "train_tokens_per_s": trained_tokens / train_wall if train_wall > 0 else None,
        "generate_tokens_per_s": generated / generate_wall if generate_wall > 0 else None,
        # The real (unpadded) prompt + response tokens of a step's batch, and the tokens it decoded.
        "tokens_per_step": statistics.median(step_tokens) if step_tokens else None,
        "generated_tokens_per_step": generated / len(rows),
    }
    # Per model, for the planner's cost (`rlhf-ray plan --throughput`): the trained models (policy,
    # critic) share the update's wall time, and every scoring role reads each sampled row once.
    roles_of = {kind: {m.group(1) for r in rows for k in r if (m := _COMPUTE_KEY.match(k)) and m.group(2) == kind}
                for kind in ("train", "forward")}
    epochs = cfg.algorithm.ppo_epochs if "generate" in out["phases_median_s"] else 1
    forward_wall = sum(b.get("wall/forward_s", 0.0) for b in breakdowns)
    if train_wall > 0 and roles_of["train"]:
        out["model_train_tokens_per_s"] = trained_tokens * len(roles_of["train"]) / train_wall
    if forward_wall > 0 and roles_of["forward"]:
        out["model_forward_tokens_per_s"] = trained_tokens / epochs * len(roles_of["forward"]) / forward_wall
    # FLOP rates count the tokens the work needs (each shared prompt once, no padding), where the run
    # logged them, so that a forward that skips repeated prompts is not credited with FLOPs it never did.
    needed = _total(rows, "perf/needed_tokens") or trained_tokens
    n = trained_matmul_params(cfg)
    per_token = train_flops_per_token(cfg)
    if n and per_token and train_wall > 0:
        achieved = per_token * needed / train_wall
        out["train"] = {"matmul_params": n, "flops_per_token": per_token, "needed_tokens_per_step": needed / len(rows),
                        "model_flops_per_s": achieved, "mfu": achieved / limits["matmul_flops_per_s"]}
    forward_compute = sum(b.get("compute/forward_s", 0.0) for b in breakdowns)
    params = role_matmul_params(cfg)
    scored = [role for role in roles_of["forward"] if role in params]
    if forward_compute > 0 and scored:
        # Each model role's forward reads every scored token once a step (epochs repeat only the update).
        flops = sum(2.0 * params[role] for role in scored) * needed / epochs
        out["forward"] = {"roles": scored, "model_flops_per_s": flops / forward_compute,
                          "mfu": flops / forward_compute / limits["matmul_flops_per_s"]}
    if any("sync/bytes" in r for r in rows):
        out["sync"] = {"bytes": _median(rows, "sync/bytes"), "seconds": _median(rows, "sync/seconds"),
                       "bandwidth_bytes_per_s": _median(rows, "sync/bandwidth_bytes_per_s"),
                       "memcpy_bytes_per_s": _median(rows, "sync/bandwidth_memcpy_bytes_per_s"),
                       "share_of_memcpy": _median(rows, "sync/bandwidth_share_of_memcpy")}
    decode_steps = _total(rows, "perf/decode_steps")
    if weight_bytes and decode_steps and generate_wall > 0:
        bound_s = decode_steps * weight_bytes / limits["memory_bandwidth_bytes_per_s"]
        out["generate"] = {"weight_bytes": weight_bytes, "decode_steps_per_step": decode_steps / len(rows),
                           "bandwidth_bound_s_per_step": bound_s / len(rows),
                           "bandwidth_bound_tokens_per_s": generated / bound_s,
                           "bandwidth_utilisation": bound_s / generate_wall}
        policy_n = trained_matmul_params(cfg, "policy")
        if policy_n:
            # Each decoded token costs 2 N FLOPs, each distinct prompt token 2 N less the LM head (prefill
            # scores only a prompt's last position); whichever bound is higher is the one the engine can
            # approach.
            prefill = _total(rows, "perf/prefill_tokens")
            body_n = policy_n - (lm_head_params(cfg) or 0)
            compute_s = 2.0 * (policy_n * generated + body_n * prefill) / limits["matmul_flops_per_s"]
            roofline_s = max(bound_s, compute_s)
            out["generate"].update(prefill_tokens_per_step=prefill / len(rows),
                                   compute_bound_s_per_step=compute_s / len(rows),
                                   compute_bound_tokens_per_s=generated / compute_s,
                                   roofline_bound_tokens_per_s=generated / roofline_s,
                                   roofline_utilisation=roofline_s / generate_wall)
    out["bounds"] = phase_bounds(out)
    return out


# the runs -----------------------------------------------------------------------

def check_steps(warmup: int, steps: int) -> None:
    if warmup < 0 or steps < 1:
        raise ValueError(f"need --warmup >= 0 and --steps >= 1, got warmup={warmup}, steps={steps}")


def run_measured(cfg: JobConfig, run_dir: Path, *, warmup: int, steps: int,
                 address: str | None = None) -> tuple[list[dict], dict]:
    """Run `warmup + steps` steps of `cfg` into `run_dir`, from scratch (what an earlier bench left there is
    removed first); returns the measured rows and the summary."""
    import shutil

    from rlhf_ray.jobs import run_job

    check_steps(warmup, steps)
    shutil.rmtree(run_dir, ignore_errors=True)
    summary = run_job(bench_config(cfg, warmup + steps, run_dir), address)
    rows = [r for r in read_metrics(run_dir) if r["step"] > warmup]
    return rows, summary


def run_throughput(cfg: JobConfig, out_dir: str | os.PathLike, *, warmup: int = 2, steps: int = 5,
                   address: str | None = None, limits: dict | None = None, label: str | None = None) -> dict:
    """`warmup` unmeasured then `steps` measured steps of `cfg` (online or offline); the run goes to
    `out_dir/runs/<label>`. `limits` (from `measure_limits`) are measured first when not given."""
    from rlhf_ray.jobs.validate import validate

    check_steps(warmup, steps)
    label = label or cfg.algorithm.name
    validate(bench_config(cfg, warmup + steps, Path(out_dir) / "runs" / label))  # fails before any measuring
    limits = limits or measure_limits(threads=limits_threads(cfg))
    load_before = load_average()
    rows, summary = run_measured(cfg, Path(out_dir) / "runs" / label, warmup=warmup, steps=steps, address=address)
    weight_bytes = summary.get("max", {}).get("memory/rollout/params_bytes")
    return {"kind": "throughput", "label": label, "algorithm": cfg.algorithm.name, "settings": settings_of(cfg),
            "warmup_steps": warmup, "hardware": hardware_info(), "limits": limits,
            "load_average": {"before": load_before, "after": load_average()},
            **analyse_throughput(cfg, rows, limits, weight_bytes)}


def load_average() -> list[float] | None:
    """The machine's 1, 5 and 15 minute load averages (other work on the CPUs skews timings)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def settings_of(cfg: JobConfig) -> dict:
    """The sizes a benchmark's figures depend on."""
    return {"model": cfg.policy.model.name_or_path, "batch_size": cfg.run.batch_size,
            "samples_per_step": samples_per_step(cfg), "max_prompt_length": cfg.data.max_prompt_length,
            "max_new_tokens": cfg.rollout.max_new_tokens, "max_length": cfg.data.max_length,
            "ppo_epochs": cfg.algorithm.ppo_epochs, "num_minibatches": cfg.algorithm.num_minibatches,
            "policy_ranks": cfg.policy.num_ranks, "policy_zero_stage": cfg.policy.zero_stage,
            "policy_micro_batch_size": cfg.policy.micro_batch_size,
            "reward": cfg.reward.rule or cfg.reward.model.name_or_path}


MEMORY_FIELDS = ("params", "grads", "optimizer", "held", "peak", "peak_rss")
ACTIVATION_FIELDS = ("activations_bytes", "activations_forward_bytes", "activations_rows", "activations_seq_len")
"""What a trained role reports of its first micro-step (`telemetry.activations`), keys as in its metrics."""


def role_memory(summary: dict) -> dict[str, dict[str, float]]:
    """`{role: {params, grads, optimizer, held, peak, peak_rss}}` bytes from a summary's `max` memory keys,
    and for trained roles the `ACTIVATION_FIELDS` as they are named in the metrics."""
    out: dict[str, dict[str, float]] = {}
    for key, value in (summary.get("max") or {}).items():
        parts = key.split("/")
        if len(parts) != 3 or parts[0] != "memory":
            continue
        if parts[2] in ACTIVATION_FIELDS:
            out.setdefault(parts[1], dict.fromkeys(MEMORY_FIELDS, 0.0))[parts[2]] = value
        elif parts[2].endswith("_bytes") and parts[2][:-len("_bytes")] in MEMORY_FIELDS:
            out.setdefault(parts[1], dict.fromkeys(MEMORY_FIELDS, 0.0))[parts[2][:-len("_bytes")]] = value
    return out


def planned_activations(cfg: JobConfig, roles: dict[str, dict[str, float]]) -> dict[str, int]:
    """The planner's training activation peak (`planner.memory.train_activation_bytes`) of each trained
    role, for the shape, dtype and checkpointing `cfg` runs it with, at the micro-batch the role measured
    (rows and longest sequence; the config's micro-batch and sequence length where it measured none)."""
    from rlhf_ray.planner.from_config import planned_roles
    from rlhf_ray.planner.memory import TrainSettings, train_activation_bytes

    out = {}
    for spec in planned_roles(cfg):
        s = spec.settings
        if not isinstance(s, TrainSettings):
            continue
        measured = roles.get(spec.role, {})
        rows = int(measured.get("activations_rows") or s.micro_batch_size)
        seq_len = int(measured.get("activations_seq_len") or s.seq_len)
        out[spec.role] = train_activation_bytes(spec.shape, rows, seq_len, s.dtype, spec.head,
                                                gradient_checkpointing=s.gradient_checkpointing,
                                                flash_attention=s.flash_attention, dropout=s.dropout,
                                                logits_len=s.logits_len)
    return out


def run_memory(cfg: JobConfig, algorithms: list[str], out_dir: str | os.PathLike, *,
               address: str | None = None) -> dict:
    """Two steps of each online algorithm on `cfg`'s sizes and batch (memory is reported after the
    second update, when gradients and optimizer state have both existed); every role's measured
    bytes, the planner's prediction of params/grads/optimizer for the same settings, each trained
    role's measured activation peak of one micro-step (`activations_bytes`) beside the planner's
    (`planned_activations_bytes`), totals, and each algorithm's saving over the first without
    activations (`held`) and with them (`held_with_activations` = held + every trained role's
    activations)."""
    from rlhf_ray.planner.from_config import held_bytes

    if len(algorithms) < 1:
        raise ValueError("bench memory needs at least one algorithm, e.g. --algos ppo,remax")
    variants = {name: with_algorithm(cfg, name) for name in algorithms}  # unknown names fail before any run
    runs = {}
    for name, variant in variants.items():
        _, summary = run_measured(variant, Path(out_dir) / "runs" / f"memory-{name}", warmup=0, steps=2,
                                  address=address)
        roles = role_memory(summary)
        planned_act = planned_activations(variant, roles)
        for role, planned in planned_act.items():
            roles.setdefault(role, dict.fromkeys(MEMORY_FIELDS, 0.0))["planned_activations_bytes"] = planned
        totals = {field: sum(r[field] for r in roles.values()) for field in MEMORY_FIELDS}
        totals["activations"] = sum(r.get("activations_bytes", 0.0) for r in roles.values())
        totals["held_with_activations"] = totals["held"] + totals["activations"]
        totals["planned_activations"] = sum(planned_act.values())
        runs[name] = {"roles": roles, "totals": totals, "planned": held_bytes(variant)}
    base = runs[algorithms[0]]["totals"]
    for name, run in runs.items():
        run["saving_percent"] = {field: 100.0 * (base[field] - run["totals"][field]) / base[field]
                                 for field in ("held", "held_with_activations", "peak", "peak_rss") if base[field]}
    return {"kind": "memory", "baseline": algorithms[0], "algorithms": list(algorithms), "settings": settings_of(cfg),
            "hardware": hardware_info(), "runs": runs}


# PPO against ReMax on step time ------------------------------------------------------

def planned_peak_bytes(cfg: JobConfig) -> int:
    """The planner's busiest device for `cfg` (weights, optimizer state, activations, logits, KV cache)."""
    from rlhf_ray.planner.from_config import plan_from_config

    return plan_from_config(cfg).peak_gpu_bytes


def largest_batch(cfg: JobConfig, budget_bytes: int, *, max_factor: int = 16) -> int:
    """The largest `run.batch_size` up to `max_factor` times `cfg`'s whose planned busiest device fits
    in `budget_bytes` and which the job accepts (batches split over minibatches, ranks and engines);
    `cfg`'s own batch when no larger one does."""
    from rlhf_ray.jobs.validate import validate_online

    base = cfg.run.batch_size
    best = base
    for batch in range(base + 1, base * max_factor + 1):
        candidate = replace_path(cfg, run={"batch_size": batch})
        try:
            validate_online(candidate)
        except ConfigError:
            continue
        if planned_peak_bytes(candidate) > budget_bytes:
            break
        best = batch
    return best


def _phase_table(results: dict[str, dict]) -> dict[str, dict[str, float | None]]:
    phases = sorted({p for r in results.values() for p in r["phases_median_s"]})
    return {p: {name: r["phases_median_s"].get(p) for name, r in results.items()} for p in phases}


def run_step_time_comparison(cfg: JobConfig, algorithms: list[str], out_dir: str | os.PathLike, *,
                             warmup: int = 2, steps: int = 5, address: str | None = None,
                             limits: dict | None = None) -> dict:
    """Step time of each algorithm two ways: at `cfg`'s batch, and at the largest batch each fits in
    the memory the first (the baseline) plans for `cfg`'s batch; per-phase medians side by side.

    Memory here is the planner's (CPU runs measure no activations); times are measured."""
    if len(algorithms) < 2:
        raise ValueError("a step-time comparison needs two algorithms or more, e.g. ppo,remax")
    check_steps(warmup, steps)
    variants = {name: with_algorithm(cfg, name) for name in algorithms}
    limits = limits or measure_limits(threads=limits_threads(cfg))
    equal = {name: run_throughput(v, out_dir, warmup=warmup, steps=steps, address=address, limits=limits,
                                  label=f"{name}-equal-batch") for name, v in variants.items()}
    budget = planned_peak_bytes(variants[algorithms[0]])
    batches = {name: largest_batch(v, budget) for name, v in variants.items()}
    at_budget = {}
    for name, v in variants.items():
        if batches[name] == cfg.run.batch_size:
            at_budget[name] = equal[name]
        else:
            at_budget[name] = run_throughput(replace_path(v, run={"batch_size": batches[name]}), out_dir,
                                             warmup=warmup, steps=steps, address=address, limits=limits,
                                             label=f"{name}-batch-{batches[name]}")
    base = algorithms[0]

    def summary(results: dict[str, dict]) -> dict:
        return {"step_median_s": {n: r["step_median_s"] for n, r in results.items()},
                "samples_per_s": {n: r["samples_per_s"] for n, r in results.items()},
                "speedup_over_baseline": {n: r["samples_per_s"] / results[base]["samples_per_s"]
                                          for n, r in results.items()},
                "phases_median_s": _phase_table(results)}

    return {"kind": "step_time", "baseline": base, "algorithms": list(algorithms), "settings": settings_of(cfg),
            "hardware": hardware_info(), "limits": limits,
            "equal_batch": {"batch_size": cfg.run.batch_size, **summary(equal)},
            "equal_memory": {"budget_bytes": budget, "batch_size": batches, **summary(at_budget)},
            "runs": {"equal_batch": equal, "equal_memory": at_budget}}


__all__ = ["PHASE_KIND", "analyse_throughput", "bench_config", "largest_batch", "measure_limits", "planned_peak_bytes",
           "role_memory", "run_measured", "run_memory", "run_step_time_comparison", "run_throughput",
           "samples_per_step", "step_breakdown", "with_algorithm"]


# rollout engines side by side ------------------------------------------------------

def run_engine_comparison(cfg: JobConfig, engines: list[str], out_dir: str | os.PathLike, *, repeats: int = 2,
                          warmup: int = 2, steps: int = 5, limits: dict | None = None) -> dict:
    """The same online work on each rollout engine, `repeats` times, the engines alternating
    (A B A B ...) so that load drifting over the run hits both alike.

    Per engine (medians over the repeats): generation tokens/s of the generate phase, the decoding
    bound (every weight read once per decode step at the measured copy bandwidth) and the share of
    it reached, and weight-sync bytes/s against the rate a plain memcpy copies bytes (half the
    read + write bandwidth)."""
    from rlhf_ray.jobs.validate import validate

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    configs = {e: replace_path(cfg, rollout={"engine": e}) for e in engines}
    for engine, c in configs.items():
        validate(bench_config(c, warmup + steps, Path(out_dir) / "runs" / engine))
    limits = limits or measure_limits(threads=limits_threads(cfg))
    copy_rate = limits["memory_bandwidth_bytes_per_s"] / 2
    load_before = load_average()
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    for repeat in range(repeats):
        for engine in engines:
            run_dir = Path(out_dir) / "runs" / f"{engine}-{repeat}"
            rows, summary = run_measured(configs[engine], run_dir, warmup=warmup, steps=steps)
            weight_bytes = summary.get("max", {}).get("memory/rollout/params_bytes")
            analysis = analyse_throughput(configs[engine], rows, limits, weight_bytes)
            runs[engine].append({"generate_tokens_per_s": analysis["generate_tokens_per_s"],
                                 "bandwidth_utilisation": analysis.get("generate", {}).get("bandwidth_utilisation"),
                                 "bandwidth_bound_tokens_per_s":
                                     analysis.get("generate", {}).get("bandwidth_bound_tokens_per_s"),
                                 "sync_bytes": _median(rows, "sync/bytes"),
                                 "sync_seconds": _median(rows, "sync/seconds"),
                                 "sync_bytes_per_s": _median([r for r in rows if r.get("sync/bytes")],
                                                             "sync/bandwidth_bytes_per_s"),
                                 "step_median_s": analysis["step_median_s"],
                                 "generate_median_s": analysis["phases_median_s"].get("generate")})
    per_engine = {}
    for engine, results in runs.items():
        per_engine[engine] = {k: _median(results, k) for k in results[0]}
        sync = per_engine[engine]["sync_bytes_per_s"]
        per_engine[engine]["sync_share_of_memcpy"] = sync / copy_rate if sync else None
    out = {"kind": "engines", "algorithm": cfg.algorithm.name, "settings": settings_of(cfg), "engines": engines,
           "repeats": repeats, "warmup_steps": warmup, "measured_steps": steps, "hardware": hardware_info(),
           "limits": limits, "memcpy_bytes_per_s": copy_rate,
           "load_average": {"before": load_before, "after": load_average()}, "runs": runs, "per_engine": per_engine}
    if len(engines) == 2 and all(per_engine[e]["generate_tokens_per_s"] for e in engines):
        a, b = engines
        out["generate_speedup"] = {f"{b}_over_{a}": per_engine[b]["generate_tokens_per_s"]
                                   / per_engine[a]["generate_tokens_per_s"]}
    return out
