"""rlhf-ray: distributed RLHF on Ray.

Sub-packages follow the layers of docs/ARCHITECTURE.md: `algorithms` (pure tensor math),
`config`, `data`, `models`, `runtime` (Ray plumbing), `workers` (one actor
role per file), `jobs` (the drivers), `telemetry`, `planner` and `cli`.
"""

__version__ = "0.1.0"
