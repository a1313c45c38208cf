"""Small helpers for the end-to-end job tests (imported by the test modules)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from rlhf_ray.config import load_config

# Keys whose values depend on wall time or process memory, not on the computation.
VOLATILE = ("time/", "perf/", "memory/", "sync/seconds", "sync/bandwidth")


def tiny_config(preset: str, out: Path, *overrides: str, **kw):
    """A shipped preset made small: few steps, no progress bar, no held-out evaluation."""
    base = [f"run.output_dir={out}", "run.progress=false", "run.eval_every=0", "data.eval=", "run.save_every=0"]
    return load_config(preset, base + list(overrides))


def metric_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(VOLATILE)} for row in rows]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))
