"""Benchmarks and the reports written from them.

- `bench`: `rlhf-ray bench` (throughput, memory, the PPO-vs-ReMax
  comparison, the engine comparison), each run through the real drivers.
- `bench_markdown`: the markdown tables of those results.
- `demo_report`: the demo's `report.md`, built from the runs' metrics.

Numbers are formatted by `telemetry/formatting.py`, shared by all of them.
"""
