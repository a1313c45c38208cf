"""What every driver shares: the run directory and its resolved config.

A run directory (docs/ARCHITECTURE.md) holds `config.yaml` (resolved), `metrics.jsonl`,
`checkpoints/step_<N>/` and `summary.json`; the Ray side of a job (its role
groups, their checkpoints) lives in `runtime/`.
"""

from __future__ import annotations

import os
from pathlib import Path

from rlhf_ray.config.loader import dump_yaml
from rlhf_ray.config.schema import JobConfig


def prepare_run_dir(cfg: JobConfig) -> Path:
    """Create the run directory and write the resolved config."""
    run_dir = Path(cfg.run.output_dir).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "config.yaml.tmp"
    tmp.write_text(dump_yaml(cfg))
    os.replace(tmp, run_dir / "config.yaml")
    return run_dir
