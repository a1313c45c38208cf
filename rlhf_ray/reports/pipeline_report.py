"""What a pipeline's jobs cost and how they shared the cluster: `layout.png`, `timeline.png`, the cost table.

Everything is read from the jobs' run directories: `summary.json` (each
role's ranks, CPUs and GPUs, the node of each rank, which groups were
borrowed from which job, `started_at`/`finished_at`), `metrics.jsonl` (held
memory and peak RSS per role) and `timeline.jsonl` (busy intervals per
role), so the pictures can be redrawn from any finished runs.

- `layout.png`: one box per job (its placement group), one row per role
  group with ranks, CPUs/GPUs per rank and held memory; a group borrowed
  from another job is drawn once, in its owner's box, with a line to each job
  that uses it; actors are coloured by the node they run on.
- `timeline.png`: a Gantt chart, one row per (job, role), each busy interval
  coloured by phase, over wall time from the first job's start.
- `cost_rows` / `cost_markdown`: per job and role, CPU-core-seconds and
  GPU-seconds reserved (reservation x the job's wall time), the busy share of
  that time, held memory and peak RSS.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from rlhf_ray.telemetry.formatting import mib
from rlhf_ray.telemetry.metrics import read_metrics
from rlhf_ray.telemetry.timeline import busy_seconds, read_timeline

ROLE_ORDER = ("policy", "rollout", "critic", "reference", "reward")
PHASE_COLOURS = {"generate": "#4c72b0", "score": "#dd8452", "update": "#55a868", "sync": "#c44e52",
                 "eval": "#8172b3", "reference": "#937860", "advantages": "#da8bc3",
                 "precompute_reference": "#8c8c8c"}
NODE_COLOURS = ("#e8f0fb", "#fdf0e6", "#e9f5ec", "#f7e8f2", "#eeeeee")


def _seconds(iso: str | None) -> float | None:
    return datetime.fromisoformat(iso).timestamp() if iso else None


def job_records(run_dirs: dict[str, Path]) -> dict[str, dict]:
    """Per job: its summary, first memory figures per role, timeline rows and wall time."""
    out = {}
    for job, run_dir in run_dirs.items():
        path = Path(run_dir) / "summary.json"
        if not path.exists():
            continue
        summary = json.loads(path.read_text())
        memory: dict[str, dict[str, float]] = {}
        metrics_path = Path(run_dir) / "metrics.jsonl"
        for row in read_metrics(metrics_path) if metrics_path.exists() else []:
            for key, value in row.items():
                if key.startswith("memory/") and key.count("/") == 2:
                    _, role, what = key.split("/")
                    memory.setdefault(role, {}).setdefault(what, value)
        start, end = _seconds(summary.get("started_at")), _seconds(summary.get("finished_at"))
        out[job] = {"summary": summary, "memory": memory, "timeline": read_timeline(run_dir),
                    "start": start, "end": end, "wall_s": (end - start) if start and end else None}
    return out


def _role_order(roles) -> list[str]:
    return sorted(roles, key=lambda r: ROLE_ORDER.index(r) if r in ROLE_ORDER else len(ROLE_ORDER))


def cost_rows(records: dict[str, dict]) -> list[dict]:
    """One row per job and role it created: reserved core-seconds and GPU-seconds, busy share, memory."""
    rows = []
    for job, rec in records.items():
        layout = rec["summary"].get("layout") or {}
        busy = busy_seconds(rec["timeline"])
        wall = rec["wall_s"] or 0.0
        for role in _role_order(layout):
            spec = layout[role]
            if spec.get("owner"):
                continue  # borrowed: its cost is the owner's
            cpus = spec["ranks"] * spec["cpus_per_rank"]
            gpus = spec["ranks"] * spec["gpus_per_rank"]
            users = [job] + [j for j, r in records.items()
                             if (r["summary"].get("layout") or {}).get(role, {}).get("owner") == job]
            role_busy = max((busy.get((u, role), 0.0) for u in users), default=0.0)
            mem = rec["memory"].get(role, {})
            rows.append({"job": job, "role": role, "ranks": spec["ranks"], "cpus": cpus, "gpus": gpus,
                         "cpu_core_s": cpus * wall, "gpu_s": gpus * wall,
                         "busy_share": role_busy / wall if wall else None, "used_by": users,
                         "held_bytes": mem.get("held_bytes"), "peak_rss_bytes": mem.get("peak_rss_bytes")})
    return rows


def cost_markdown(rows: list[dict], price_per_gpu_hour: float = 2.0) -> list[str]:
    """The cost table; with GPUs reserved, a column of dollars at the planner's hourly GPU price."""
    gpus = any(r["gpus"] for r in rows)
    dollars = f" $ at {price_per_gpu_hour:.2f}/GPU-h |" if gpus else ""
    lines = ["| job | role | ranks | CPUs | GPUs | CPU-core-s reserved | GPU-s reserved |" + dollars +
             " busy share | used by | held MiB | peak RSS MiB |",
             "|---|---|--:|--:|--:|--:|--:|" + ("--:|" if gpus else "") + "--:|---|--:|--:|"]
    for r in rows:
        busy = "–" if r["busy_share"] is None else f"{100 * r['busy_share']:.0f}%"
        cost = f" {r['gpu_s'] / 3600 * price_per_gpu_hour:.2f} |" if gpus else ""
        lines.append(f"| {r['job']} | {r['role']} | {r['ranks']} | {r['cpus']:.3g} | {r['gpus']:.3g} | "
                     f"{r['cpu_core_s']:.0f} | {r['gpu_s']:.0f} |{cost} {busy} | {', '.join(r['used_by'])} | "
                     f"{mib(r['held_bytes'])} | {mib(r['peak_rss_bytes'])} |")
    totals = {k: sum(r[k] for r in rows) for k in ("cpu_core_s", "gpu_s")}
    total_cost = f" **{totals['gpu_s'] / 3600 * price_per_gpu_hour:.2f}** |" if gpus else ""
    lines.append(f"| **all** | | | | | **{totals['cpu_core_s']:.0f}** | **{totals['gpu_s']:.0f}** |{total_cost}"
                 " | | | |")
    return lines


def _node_names(records: dict[str, dict]) -> dict[str, str]:
    """Node id -> a short label ("node 1 (10.0.0.5)"), in order of first appearance."""
    names: dict[str, str] = {}
    for rec in records.values():
        ips = rec["summary"].get("nodes") or {}
        for spec in (rec["summary"].get("layout") or {}).values():
            for node in spec.get("nodes") or []:
                if node and node not in names:
                    names[node] = f"node {len(names) + 1} ({ips.get(node, '?')}, id {node[:6]})"
    return names


def draw_layout(records: dict[str, dict], path: Path) -> Path:
    """`layout.png`: the nodes, the jobs' placement groups, their role groups, and the shared ones."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    jobs = list(records)
    nodes = _node_names(records)
    node_colour = {node: NODE_COLOURS[i % len(NODE_COLOURS)] for i, node in enumerate(nodes)}
    col_w, row_h = 3.7, 0.95
    rows = max((len(records[j]["summary"].get("layout") or {}) for j in jobs), default=1)
    width = col_w * max(len(jobs), 2) + 0.6
    top = rows * row_h + 1.9
    fig, ax = plt.subplots(figsize=(width * 1.05, (top + 2.0) * 0.85))
    ax.set_xlim(0, width)
    ax.set_ylim(-1.9, top + 0.5)
    ax.axis("off")
    # The node(s): one frame around every job; with several nodes each role box takes its node's colour.
    label = "   ".join(nodes.values()) if nodes else "one node"
    ax.add_patch(FancyBboxPatch((0.08, -0.05), width - 0.16, top + 0.3, boxstyle="round,pad=0.02", fc="none",
                                ec="#999999", lw=1.0, ls=":"))
    ax.text(0.2, top + 0.05, f"Ray cluster: {label}", fontsize=9, color="#555555")
    anchors: dict[tuple[str, str], tuple[float, float]] = {}
    links: list[tuple[str, str, str]] = []  # (borrower, role, owner)
    for i, job in enumerate(jobs):
        summary = records[job]["summary"]
        layout = summary.get("layout") or {}
        x0 = 0.3 + i * col_w
        own = [r for r in _role_order(layout) if not layout[r].get("owner")]
        cpus = sum(layout[r]["ranks"] * layout[r]["cpus_per_rank"] for r in own)
        gpus = sum(layout[r]["ranks"] * layout[r]["gpus_per_rank"] for r in own)
        roles = _role_order(layout)
        box_h = len(roles) * row_h + 0.95
        y_top = top - 0.25
        ax.add_patch(FancyBboxPatch((x0, y_top - box_h), col_w - 0.35, box_h, boxstyle="round,pad=0.02",
                                    fc="white", ec="#333333", lw=1.4))
        reserve = f"{cpus:.3g} CPU" + (f", {gpus:.3g} GPU" if gpus else "")
        ax.text(x0 + 0.1, y_top - 0.32, f"{job}  ({summary.get('algorithm', '')})", fontsize=11, weight="bold")
        ax.text(x0 + 0.1, y_top - 0.62, f"placement group: {reserve}", fontsize=8.5, color="#444444")
        for j, role in enumerate(roles):
            spec = layout[role]
            y = y_top - 1.6 - j * row_h
            owner = spec.get("owner")
            node = (spec.get("nodes") or [""])[0]
            face = "white" if owner else node_colour.get(node, "#f2f2f2")
            ax.add_patch(FancyBboxPatch((x0 + 0.1, y), col_w - 0.55, row_h - 0.18, boxstyle="round,pad=0.02",
                                        fc=face, ec="#b03060" if owner else "#777777", lw=1.0,
                                        ls="--" if owner else "-"))
            anchors[(job, role)] = (x0 + 0.1 + (col_w - 0.55) / 2, y + (row_h - 0.18) / 2)
            if owner:
                ax.text(x0 + 0.2, y + 0.45, f"{role}", fontsize=10, weight="bold", color="#b03060")
                ax.text(x0 + 0.2, y + 0.15, f"borrowed from {owner}: no actors of its own", fontsize=8,
                        color="#b03060")
                links.append((job, role, owner))
                continue
            held = records[job]["memory"].get(role, {}).get("held_bytes")
            per_rank = f"{spec['cpus_per_rank']:.3g} CPU" + (f" {spec['gpus_per_rank']:.3g} GPU"
                                                              if spec["gpus_per_rank"] else "")
            what = f"held {mib(held)} MiB" if held else "a rule: no weights"
            ax.text(x0 + 0.2, y + 0.45, f"{role}  x{spec['ranks']}", fontsize=10, weight="bold")
            ax.text(x0 + 0.2, y + 0.15, f"{per_rank} per rank · {what}", fontsize=8)
            if len(nodes) > 1:  # one chip per rank, in its node's colour
                for r, rank_node in enumerate(spec.get("nodes") or []):
                    cx = x0 + 1.55 + r * 0.42
                    ax.add_patch(FancyBboxPatch((cx, y + 0.38), 0.36, 0.2, boxstyle="round,pad=0.01",
                                                fc=node_colour.get(rank_node, "#f2f2f2"), ec="#555555", lw=0.6))
                    short = nodes.get(rank_node, "?").split(" (")[0].replace("node ", "n")
                    ax.text(cx + 0.18, y + 0.48, f"r{r}:{short}", fontsize=6.5, ha="center", va="center")
            users = [j2 for j2 in jobs if (records[j2]["summary"].get("layout") or {}).get(role, {})
                     .get("owner") == job]
            if users:
                ax.text(x0 + col_w - 0.55, y + 0.45, f"shared with {', '.join(users)}", fontsize=7.5,
                        ha="right", color="#b03060", style="italic")
        units = []
        for r in own:
            unit = tuple(sorted([r, *layout[r].get("colocated_with", [])], key=_role_order(layout).index))
            if len(unit) > 1 and unit not in units:
                units.append(unit)
        if units:
            text = "colocated (one bundle per rank): " + "; ".join(" + ".join(u) for u in units)
            ax.text(x0 + 0.1, y_top - box_h - 0.3, textwrap.fill(text, 52), fontsize=7.5, color="#555555", va="top")
    for job, role, owner in links:
        if (owner, role) in anchors:
            (x1, y1), (x2, y2) = anchors[(owner, role)], anchors[(job, role)]
            ax.annotate("", xy=(x2 - 1.0, y2), xytext=(x1 + 1.0, y1), arrowprops=dict(
                arrowstyle="->", color="#b03060", lw=1.3, ls="--", connectionstyle="arc3,rad=-0.15"))
    notes = ("Each solid box is one job's Ray placement group; each row a role group (xN = data-parallel ranks) "
             "with what each rank reserves and the bytes it holds (weights, gradients, optimizer state). A dashed "
             "row is a frozen group the job borrows: it is set up once, in the owner's box, and the arrow points "
             "to each job that uses it.")
    ax.text(0.15, -0.35, textwrap.fill(notes, int(width * 17)), fontsize=8.5, va="top")
    fig.suptitle("Cluster layout: every job's actors by role", fontsize=13, weight="bold")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_timeline(records: dict[str, dict], path: Path) -> Path:
    """`timeline.png`: every role's busy intervals per job, over wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    starts = [rec["start"] for rec in records.values() if rec["start"]]
    t0 = min(starts) if starts else 0.0
    rows: list[tuple[str, str]] = []
    for job, rec in records.items():
        roles = {row["role"] for row in rec["timeline"]}
        rows += [(job, role) for role in _role_order(roles)]
    fig, ax = plt.subplots(figsize=(12, 0.38 * len(rows) + 1.8))
    used = set()
    for y, (job, role) in enumerate(rows):
        for row in records[job]["timeline"]:
            if row["role"] != role:
                continue
            phase = row["phase"]
            used.add(phase)
            ax.broken_barh([(row["start"] - t0, max(row["end"] - row["start"], 1e-3))], (y - 0.38, 0.76),
                           facecolors=PHASE_COLOURS.get(phase, "#bbbbbb"))
    for job, rec in records.items():
        if rec["start"] and rec["end"]:
            ys = [y for y, (j, _) in enumerate(rows) if j == job]
            if ys:
                ax.plot([rec["start"] - t0, rec["end"] - t0], [min(ys) - 0.5] * 2, color="#333333", lw=0.8)
    def label(job: str, role: str) -> str:
        owner = ((records[job]["summary"].get("layout") or {}).get(role) or {}).get("owner")
        return f"{job} · {role}" + (f" ({owner}'s)" if owner else "")

    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([label(job, role) for job, role in rows], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("wall time since the first job started (s)")
    ax.set_title("When each role was busy: jobs overlap on one cluster; gaps are idle reserved time")
    ax.grid(axis="x", alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Patch(color=PHASE_COLOURS.get(p, "#bbbbbb"), label=p) for p in sorted(used)]
    handles.append(Line2D([], [], color="#333333", lw=0.8, label="the job's run (started_at to finished_at)"))
    ax.legend(handles=handles,
              loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.6 / max(len(rows), 1)), ncol=min(len(handles), 9),
              fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_pipeline_report(out: Path, run_dirs: dict[str, Path]) -> dict[str, Path]:
    """`layout.png`, `timeline.png` and `cost.md` in `out`, from the jobs' run directories."""
    records = job_records(run_dirs)
    paths = {"layout": draw_layout(records, out / "layout.png"),
             "timeline": draw_timeline(records, out / "timeline.png")}
    (out / "cost.md").write_text("\n".join(["# What each role cost", ""] + cost_markdown(cost_rows(records))) + "\n")
    paths["cost"] = out / "cost.md"
    return paths
