"""Small helpers for the end-to-end job tests (imported by the test modules)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from rlhf_ray.config import load_config

# Keys whose values depend on wall time, process memory, the machine's load (threads/: the cores a role
# ran on) or recoveries from dead actors, not on the computation.
VOLATILE = ("time/", "perf/", "memory/", "threads/", "sync/seconds", "sync/bandwidth", "run/restarts")


def tiny_config(preset: str, out: Path, *overrides: str, **kw):
    """A shipped preset made small: few steps, no progress bar, no held-out evaluation."""
    base = [f"run.output_dir={out}", "run.progress=false", "run.eval_every=0", "data.eval=", "run.save_every=0"]
    return load_config(preset, base + list(overrides))


def stopped_before(full: Path, step: int, to: Path) -> Path:
    """`full`'s run directory as it was before step `step` was checkpointed (a copy without that
    checkpoint and without final/): what a run stopped there leaves for its resume."""
    import shutil

    shutil.copytree(full, to)
    shutil.rmtree(to / "checkpoints" / f"step_{step}")
    shutil.rmtree(to / "final")
    return to


def metric_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(VOLATILE)} for row in rows]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


def assert_same_run(resumed: Path, full: Path, rel: float = 1e-4, abs_tol: float = 2e-4) -> None:
    """A resumed run ends like the uninterrupted one: every step once, the same metrics and the same final
    weights, to float rounding (weights to 1e-4). Two processes running the same step on a CPU agree to
    the last bits only: float32 GEMM results depend on where the operands sit in memory, the policy and
    the reference at step 1 differ by a few ulps per token (a KL of 1e-4 summed over a response instead
    of 0.0), and Adam's normalised step carries such differences of near-zero gradients into the next
    steps' metrics at about 1e-5 relative. Floats are therefore compared to `rel` or to `abs_tol`,
    whichever is looser; a real resume fault (a repeated or skipped step, a lost RNG state, another data
    position) samples other tokens or draws other prompts and moves them by far more, and a lost
    optimizer state shows in the final weights, compared separately. Differences are listed by step and
    key."""
    import math

    a, b = metric_rows(resumed), metric_rows(full)
    assert [r["step"] for r in a] == [r["step"] for r in b], ([r["step"] for r in a], [r["step"] for r in b])
    diffs = []
    for ra, rb in zip(a, b):
        for key in sorted(set(ra) | set(rb)):
            x, y = ra.get(key), rb.get(key)
            same = x == y or (isinstance(x, float) and isinstance(y, float)
                              and math.isclose(x, y, rel_tol=rel, abs_tol=abs_tol))
            if not same:
                diffs.append((ra["step"], key, x, y))
    assert not diffs, diffs[:10]
    wa, wb = final_weights(resumed), final_weights(full)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst <= 1e-4, worst  # a lost optimizer state moves weights by up to the learning rate (2e-4) a step


def actor_pids(class_name: str) -> list[int]:
    """Processes of the live Ray actors of `class_name` that this test process created: the cluster's own
    actor table (its GCS; `ray.util.state` needs the dashboard, which the tests' cluster does not start),
    filtered to this driver's job, each checked to be the process Ray titled `ray::<Class>` before it is
    named. No other process on the machine is ever a candidate."""
    import ray

    job = ray.get_runtime_context().get_job_id()
    pids = []
    for actor in ray._private.state.actors().values():
        if actor["ActorClassName"] != class_name or actor["State"] != "ALIVE" or actor["JobID"] != job:
            continue
        try:
            title = Path(f"/proc/{actor['Pid']}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title == f"ray::{class_name}" or title.startswith(f"ray::{class_name}."):
            pids.append(int(actor["Pid"]))
    return pids


def run_killing_once(cfg, class_name: str, after_steps: int) -> dict:
    """Run the job in a thread, `kill -9` every live actor of `class_name` once `after_steps` steps are
    written, wait for the job to end and return its summary (failing where there was nothing to kill)."""
    import os
    import signal
    import threading
    import time

    from rlhf_ray.jobs import run_job
    from rlhf_ray.telemetry.metrics import read_metrics

    metrics = Path(cfg.run.output_dir) / "metrics.jsonl"
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(summary=run_job(cfg)))
    job.start()
    deadline = time.monotonic() + 900  # a guard against a hung job, not a timing assertion
    while job.is_alive() and time.monotonic() < deadline:
        if metrics.exists() and len(read_metrics(metrics)) >= after_steps:
            break
        time.sleep(0.1)
    pids = actor_pids(class_name)
    assert job.is_alive() and pids, f"no live {class_name} actor to kill"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    job.join(timeout=900)
    assert "summary" in result, "the job did not finish after the kill"
    return result["summary"]
