"""Benchmark results as files: JSON (every figure), Markdown (tables with the
hardware and package versions in the header) and, for memory, a stacked bar
chart of each role's bytes (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

from rlhf_ray.telemetry.formatting import MiB, mib, number

ROLE_ORDER = ("policy", "critic", "reference", "reward", "rollout")
PHASE_ORDER = ("generate", "score", "reference", "advantages", "update_policy", "update_critic", "update", "sync")


def _phase_key(phase: str) -> tuple[int, str]:
    return (PHASE_ORDER.index(phase) if phase in PHASE_ORDER else len(PHASE_ORDER), phase)


# The benchmark tables print a figure a run lacks as "-".
_num = partial(number, missing="-")
_mib = partial(mib, missing="-")


def header(result: dict, title: str) -> list[str]:
    """A title, the machine (CPU model and cores, GPUs) and the package versions."""
    hw = result["hardware"]
    gpus = ", ".join(f"{g['name']} ({g['memory_bytes'] / 2**30:.0f} GiB)" for g in hw.get("gpus", [])) or "none"
    versions = ", ".join(f"{k} {v}" for k, v in hw.get("versions", {}).items() if v)
    cores = f"{hw.get('cpu_physical_cores') or '?'} physical / {hw.get('cpu_logical_cores')} logical cores, " \
            f"{hw.get('cpus_available')} available to this process"
    memory = f"{hw['memory_bytes'] / 2**30:.1f} GiB RAM" if hw.get("memory_bytes") else "RAM unknown"
    settings = ", ".join(f"{k}={v}" for k, v in result.get("settings", {}).items())
    return [f"# {title}", "", f"- CPU: {hw.get('cpu_model')} ({cores}); {memory}", f"- GPU: {gpus}",
            f"- Versions: {versions}", f"- Settings: {settings}", ""]


def limits_lines(limits: dict) -> list[str]:
    return [f"Physical limits measured in this run ({limits['device']}, {limits['threads']} threads): "
            f"GEMM {limits['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s ({limits['matmul_dtype']}, "
            f"n={limits['matmul_n']}), copy bandwidth {limits['memory_bandwidth_bytes_per_s'] / 1e9:.2f} GB/s "
            f"(read + write of {limits['copy_bytes'] // MiB} MiB).", ""]


def throughput_markdown(result: dict, title: str | None = None) -> str:
    """Per-phase medians, where the step time goes, rates, MFU and the decoding bound."""
    lines = header(result, title or f"Throughput: {result['label']}")
    lines += [f"{result['measured_steps']} measured steps after {result['warmup_steps']} warm-up steps; the "
              "median of each phase over them (medians of different phases need not add up to the median step).",
              "", "| phase | seconds | share of step |", "|---|---|---|"]
    step = result["step_median_s"]
    for phase, seconds in sorted(result["phases_median_s"].items(), key=lambda item: _phase_key(item[0])):
        lines.append(f"| {phase} | {_num(seconds)} | {100 * seconds / step:.1f}% |")
    lines += [f"| **step** | **{_num(step)}** | 100% |", ""]
    b = result["breakdown_median"]
    lines += ["Where the step goes (medians of per-step figures; compute = each kind's worker seconds, "
              "added up over roles that take turns on shared CPUs, the longest of roles running at once, "
              "inside its phase):", "", "| | seconds |", "|---|---|"]
    for key in ("compute/generate_s", "compute/forward_s", "compute/train_s", "compute/driver_s", "compute_s",
                "sync_s", "overhead_s"):
        if b.get(key) is not None:
            lines.append(f"| {key[:-2]} | {_num(b[key])} |")
    lines += [f"| **outside compute (sync + overhead), share of step** | **{100 * b['outside_compute_share']:.1f}%** |",
              "", "| rate | value |", "|---|---|",
              f"| samples / s (end to end) | {_num(result['samples_per_s'])} |",
              f"| training tokens / s (update phases) | {_num(result['train_tokens_per_s'])} |",
              f"| generation tokens / s (generate phase) | {_num(result['generate_tokens_per_s'])} |"]
    if "train" in result:
        t = result["train"]
        factor = t.get("flops_per_token", 6.0 * t["matmul_params"]) / t["matmul_params"]
        lines.append(f"| training model FLOP/s ({factor:g} N FLOPs a needed token, N = {t['matmul_params']:,}"
                     + (f"; {_num(t['needed_tokens_per_step'])} needed tokens a step: real tokens, a shared "
                        "prompt once" if t.get("needed_tokens_per_step") else "")
                     + f") | {t['model_flops_per_s'] / 1e9:.3f} G |")
        lines.append(f"| training MFU (vs the GEMM rate) | {100 * t['mfu']:.2f}% |")
    if "generate" in result:
        g = result["generate"]
        lines.append(f"| generation bound by bandwidth (tokens / s) | {_num(g['bandwidth_bound_tokens_per_s'])} |")
        lines.append(f"| generation vs the bandwidth bound | {100 * g['bandwidth_utilisation']:.2f}% |")
        if "compute_bound_tokens_per_s" in g:
            prefill = _num(g.get("prefill_tokens_per_step", 0))
            lines.append(f"| generation bound by compute (decoded tokens / s: 2 N FLOPs a decoded token, and "
                         f"{prefill} distinct prompt tokens a step prefilled at 2 N less the LM head) | "
                         f"{_num(g['compute_bound_tokens_per_s'])} |")
            lines.append(f"| generation vs the roofline (the higher bound) | {100 * g['roofline_utilisation']:.2f}% |")
    if result.get("sync", {}).get("share_of_memcpy") is not None:
        y = result["sync"]
        lines.append(f"| weight sync ({y['bytes'] / 1e6:,.1f} MB in {_num(y['seconds'])} s) | "
                     f"{y['bandwidth_bytes_per_s'] / 1e9:.3f} GB/s, {100 * y['share_of_memcpy']:.2f}% of memcpy "
                     f"({y['memcpy_bytes_per_s'] / 1e9:.2f} GB/s) |")
    if "forward" in result:
        f = result["forward"]
        lines.append(f"| scoring forwards' model FLOP/s ({', '.join(f['roles'])}; 2 N tokens / s) | "
                     f"{f['model_flops_per_s'] / 1e9:.3f} G, {100 * f['mfu']:.2f}% of the GEMM rate |")
    if result.get("bounds"):
        lines += ["", "Each phase against its own bound:", "", "| phase | figure | target | met |", "|---|---|---|---|"]
        for row in result["bounds"]:
            sign = ">=" if row["sense"] == "min" else "<="
            lines.append(f"| {row['what']} | {100 * row['value']:.1f}% | {sign} {100 * row['target']:.0f}% | "
                         f"{'yes' if row['met'] else 'no'} |")
    lines += [""] + limits_lines(result["limits"])
    load = result.get("load_average") or {}
    if load.get("before"):
        lines += [f"Load average (1, 5, 15 min) before the run {load['before']}, after {load['after']} on "
                  f"{result['hardware'].get('cpus_available')} CPUs: other work on the machine slows every figure.", ""]
    return "\n".join(lines)


def memory_markdown(result: dict, chart: str | None = None) -> str:
    """Each algorithm's roles (measured bytes, the planner's beside them), totals and savings."""
    lines = header(result, f"Memory by role: {', '.join(result['algorithms'])}")
    lines += ["Measured after the second update (gradients and optimizer state both seen). held = parameters + "
              "gradients + optimizer state of one rank; peak = GPU `max_memory_allocated`, on CPU the held "
              "bytes; peak RSS = the role process's peak resident memory (interpreter, torch, Ray included). "
              "MiB; planned = `rlhf-ray plan` for the same settings.", ""]
    head = "| algorithm | role | params | grads | optimizer | held | planned held | peak | peak RSS |"
    lines += [head, "|" + "---|" * 9]
    for name, run in result["runs"].items():
        for role, m in sorted(run["roles"].items(), key=lambda item: (item[0] not in ROLE_ORDER, ROLE_ORDER.index(
                item[0]) if item[0] in ROLE_ORDER else 0, item[0])):
            planned = run["planned"].get(role)
            planned_held = sum(planned.values()) if planned else None
            lines.append(f"| {name} | {role} | {_mib(m['params'])} | {_mib(m['grads'])} | {_mib(m['optimizer'])} | "
                         f"{_mib(m['held'])} | {_mib(planned_held)} | {_mib(m['peak'])} | {_mib(m['peak_rss'])} |")
        t = run["totals"]
        lines.append(f"| **{name}** | **total** | {_mib(t['params'])} | {_mib(t['grads'])} | {_mib(t['optimizer'])} | "
                     f"**{_mib(t['held'])}** | | **{_mib(t['peak'])}** | **{_mib(t['peak_rss'])}** |")
    lines += ["", "Activations of the trained roles: the peak of live tensor bytes beyond the held state during "
              "one training micro-step (forward, loss, backward; `telemetry.activations`), measured on the first "
              "micro-step, beside the planner's estimate for the same shape, micro-batch, dtype and checkpointing "
              "(MiB).", "", "| algorithm | role | micro-batch (rows x tokens) | activations | planned | "
              "planned / measured |", "|---|---|---|---|---|---|"]
    for name, run in result["runs"].items():
        for role, m in run["roles"].items():
            if "activations_bytes" not in m and "planned_activations_bytes" not in m:
                continue
            measured, planned = m.get("activations_bytes"), m.get("planned_activations_bytes")
            ratio = f"{planned / measured:.2f}" if measured and planned else "-"
            lines.append(f"| {name} | {role} | {int(m.get('activations_rows', 0))} x "
                         f"{int(m.get('activations_seq_len', 0))} | {_mib(measured)} | {_mib(planned)} | {ratio} |")
    lines += ["", f"Saving over {result['baseline']}:", "",
              "| algorithm | held | held + activations | peak | peak RSS |", "|---|---|---|---|---|"]
    for name, run in result["runs"].items():
        s = run["saving_percent"]
        lines.append(f"| {name} | {s.get('held', 0):.1f}% | {s.get('held_with_activations', 0):.1f}% | "
                     f"{s.get('peak', 0):.1f}% | {s.get('peak_rss', 0):.1f}% |")
    if chart:
        lines += ["", f"![memory by role]({chart})"]
    return "\n".join(lines) + "\n"


def step_time_markdown(result: dict) -> str:
    """Step time and samples/s of each algorithm at equal batch and at equal (planned) memory."""
    lines = header(result, f"Step time: {' vs '.join(result['algorithms'])}")
    names = result["algorithms"]
    for key, title in (("equal_batch", "At equal batch"), ("equal_memory", "At the largest batch each fits in "
                                                                          "the same memory")):
        part = result[key]
        batch = part["batch_size"]
        lines += [f"## {title}", ""]
        if key == "equal_memory":
            lines += [f"Budget: the planner's busiest device for {result['baseline']} at batch "
                      f"{result['equal_batch']['batch_size']}: {part['budget_bytes'] / MiB:.1f} MiB. Batches: " +
                      ", ".join(f"{n} {batch[n]}" for n in names) + ".", ""]
        lines += ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for phase, by_name in sorted(part["phases_median_s"].items(), key=lambda item: _phase_key(item[0])):
            lines.append(f"| {phase} (s) | " + " | ".join(_num(by_name.get(n)) for n in names) + " |")
        lines.append("| **step (s)** | " + " | ".join(_num(part["step_median_s"][n]) for n in names) + " |")
        lines.append("| samples / s | " + " | ".join(_num(part["samples_per_s"][n]) for n in names) + " |")
        lines.append(f"| speed-up over {result['baseline']} | " +
                     " | ".join(f"{part['speedup_over_baseline'][n]:.2f}x" for n in names) + " |")
        runs = result.get("runs", {}).get(key, {})
        loads = [((runs.get(n) or {}).get("load_average") or {}).get("before") for n in names]
        if any(loads):
            lines.append("| load average before the run (1 min) | " +
                         " | ".join(f"{load[0]:.1f}" if load else "-" for load in loads) + " |")
        lines.append("")
    lines += limits_lines(result["limits"])
    return "\n".join(lines)


def plot_memory(result: dict, path: str | os.PathLike) -> Path:
    """Stacked bars per algorithm, one segment per role: held bytes (left) and peak RSS (right), MiB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = result["algorithms"]
    present = {role for run in result["runs"].values() for role in run["roles"]}
    roles = [r for r in ROLE_ORDER if r in present] + sorted(present - set(ROLE_ORDER))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for ax, field, title in ((axes[0], "held", "params + grads + optimizer state"),
                             (axes[1], "peak_rss", "peak RSS of the role processes")):
        bottom = [0.0] * len(names)
        for role in roles:
            values = [result["runs"][n]["roles"].get(role, {}).get(field, 0.0) / MiB for n in names]
            ax.bar(names, values, bottom=bottom, label=role)
            bottom = [b + v for b, v in zip(bottom, values)]
        for x, total in enumerate(bottom):
            ax.text(x, total, f"{total:.1f}", ha="center", va="bottom")
        ax.set_title(title)
        ax.set_ylabel("MiB")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(roles), frameon=False)
    fig.suptitle(f"Memory by role ({result['settings'].get('model')}, batch {result['settings'].get('batch_size')})")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def engines_markdown(result: dict) -> str:
    """Generation rate, the decoding bound and weight-sync bandwidth per rollout engine."""
    lines = header(result, f"Rollout engines on the same {result['algorithm']} work")
    load = result["load_average"]
    lines += [f"{result['repeats']} repeats per engine, alternating ({' '.join(result['engines'])} ...), each "
              f"{result['measured_steps']} measured steps after {result['warmup_steps']} warm-up steps; medians over "
              f"the repeats. Load average (1, 5, 15 min) before {load['before']}, after {load['after']}.", ""]
    lines += limits_lines(result["limits"])
    lines += ["| engine | generation tokens/s | decoding bound tokens/s | share of the bound | generate s/step | "
              "sync bytes | sync s | sync bytes/s | share of memcpy |", "|---|---|---|---|---|---|---|---|---|"]
    for engine in result["engines"]:
        e = result["per_engine"][engine]
        share = "-" if e["bandwidth_utilisation"] is None else f"{100 * e['bandwidth_utilisation']:.2f}%"
        sync_share = "-" if e["sync_share_of_memcpy"] is None else f"{100 * e['sync_share_of_memcpy']:.2f}%"
        lines.append(f"| {engine} | {_num(e['generate_tokens_per_s'])} | {_num(e['bandwidth_bound_tokens_per_s'])} | "
                     f"{share} | {_num(e['generate_median_s'])} | {_num(e['sync_bytes'])} | {_num(e['sync_seconds'])} "
                     f"| {_num(e['sync_bytes_per_s'])} | {sync_share} |")
    lines += ["", f"memcpy copies {result['memcpy_bytes_per_s'] / 1e9:.2f} GB/s (half the read + write bandwidth "
              "above); sync bytes/s = bytes sent to the engine / the sync phase's wall time (Ray calls included)."]
    for key, value in result.get("generate_speedup", {}).items():
        lines.append(f"Generation speed-up {key.replace('_over_', ' over ')}: {value:.1f}x.")
    return "\n".join(lines) + "\n"


def write_result(result: dict, out_dir: str | os.PathLike, name: str) -> dict[str, Path]:
    """Write `<name>.json`, `<name>.md` (and for memory `<name>.png`) into `out_dir`; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md"}
    paths["json"].write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    if result["kind"] == "memory":
        paths["png"] = plot_memory(result, out / f"{name}.png")
        text = memory_markdown(result, chart=paths["png"].name)
    elif result["kind"] == "step_time":
        text = step_time_markdown(result)
    elif result["kind"] == "engines":
        text = engines_markdown(result)
    else:
        text = throughput_markdown(result)
    paths["md"].write_text(text)
    return paths


__all__ = ["engines_markdown", "memory_markdown", "plot_memory", "step_time_markdown", "throughput_markdown",
           "write_result"]
