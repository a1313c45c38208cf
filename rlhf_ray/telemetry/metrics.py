"""Per-step metrics: `metrics.jsonl` in the run directory, TensorBoard and W&B when installed.

One JSON object per line, one line per step, `"step"` first:

    {"step": 3, "loss": 0.61, "time/step_s": 1.92, "memory/policy/peak_bytes": 1843200}

Tensors and numpy scalars are stored as Python numbers (integer dtypes as
int, the rest as float), so byte counts stay exact. `summary.json` is written
atomically at the end of a run from the whole file (resumed rows included).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import os
import statistics
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import torch

from rlhf_ray.files import write_json_atomic, write_jsonl_atomic

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def to_scalar(key: str, value: Any) -> int | float | bool | str | None:
    """A metric value as a JSON-ready Python scalar (one-element tensors and numpy scalars unwrapped)."""
    if hasattr(value, "dtype") and hasattr(value, "item"):  # torch tensor, numpy array or scalar
        size = value.numel() if isinstance(value, torch.Tensor) else getattr(value, "size", 1)
        if size != 1:
            raise ValueError(f"metric {key!r} is an array of shape {tuple(value.shape)}; a metric is one number: "
                             f"reduce it (e.g. .mean()) before logging")
        value = value.item()
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"metric {key!r} has a value of type {type(value).__name__}; expected a number, a one-element "
                    f"tensor or numpy scalar, a bool, a string or None")


def _config_dict(config: Any) -> dict:
    if config is None:
        return {}
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"config must be a dataclass or a mapping, got {type(config).__name__}")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Rows of a `metrics.jsonl` (or of the one in run directory `path`).

    A last line cut short by a crash is skipped with a warning; a bad line
    elsewhere is an error naming the file and line.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no metrics file at {path}: is this the run directory of a started run?")
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                logger.warning("%s: line %d is incomplete (the run stopped mid-write); skipped", path, number)
                break
            raise ValueError(f"{path}: line {number} is not valid JSON ({err})") from err
        if not isinstance(row, dict) or "step" not in row:
            raise ValueError(f"{path}: line {number} is not a metrics row (a JSON object with a 'step' key)")
        rows.append(row)
    return rows


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def summarise(rows: Iterable[Mapping[str, Any]]) -> dict:
    """Summary of a run's metric rows.

    Returns `num_steps`, `last_step`, `last` (each key's last non-null value),
    `mean` of the `time/*` and `perf/*` keys, `median` of `time/*`, and `max`
    of `memory/*` (over finite numbers only).
    """
    rows = list(rows)
    last: dict[str, Any] = {}
    series: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if key == "step" or value is None:
                continue
            last[key] = value
            if _is_number(value):
                series.setdefault(key, []).append(value)
    return {
        "num_steps": len(rows),
        "last_step": rows[-1]["step"] if rows else None,
        "last": last,
        "mean": {k: statistics.fmean(v) for k, v in series.items() if k.startswith(("time/", "perf/"))},
        "median": {k: statistics.median(v) for k, v in series.items() if k.startswith("time/")},
        "max": {k: max(v) for k, v in series.items() if k.startswith("memory/")},
    }


def utc_now() -> str:
    """The current time in ISO 8601, UTC, to the millisecond (`summary.json`'s `started_at` / `finished_at`)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def write_summary(run_dir: str | os.PathLike, source: Any = None, extra: Mapping[str, Any] | None = None) -> dict:
    """Summarise the run and write `run_dir/summary.json` atomically; returns the summary.

    `source` is a `MetricsWriter` or a list of rows; by default the run's
    `metrics.jsonl` is read. `extra` entries (e.g. the algorithm name, final
    eval accuracy) are added at the top level.
    """
    if source is None or isinstance(source, MetricsWriter):
        path = source.path if isinstance(source, MetricsWriter) else Path(run_dir) / METRICS_FILE
        rows = read_metrics(path) if path.exists() else []
    else:
        rows = list(source)
    summary = summarise(rows)
    summary.update({k: to_scalar(k, v) if not isinstance(v, (dict, list, tuple)) else v
                    for k, v in (extra or {}).items()})
    write_json_atomic(Path(run_dir) / SUMMARY_FILE, summary)
    return summary


# sinks -----------------------------------------------------------------------

def _numeric(row: Mapping[str, Any]) -> dict[str, int | float]:
    """The finite numbers of a row, `step` left out: what TensorBoard and W&B plot."""
    return {k: v for k, v in row.items() if k != "step" and _is_number(v)}


class Sink(Protocol):
    """A destination of metric rows, one class per name in `SINKS`.

    `open(run_dir, config, resume_step)` starts it for a run directory, or
    logs one warning and returns None where it cannot run (its package is not
    installed, W&B cannot log in, ...): the run goes on with the others.
    `last_step` is the last step it already holds after a resume (only
    `metrics.jsonl` can say), else None."""

    last_step: int | None = None

    @classmethod
    def open(cls, run_dir: Path, config: Any, resume_step: int | None) -> Sink | None:
        """The sink for `run_dir`, continuing after `resume_step` when that is not None; None if unavailable."""

    def write(self, step: int, row: dict[str, Any]) -> None:
        """Record the row of `step` (`"step"` first, every value a JSON scalar)."""

    def close(self) -> None:
        """Flush and release; called once."""


class JsonlSink(Sink):
    """`metrics.jsonl` in the run directory, one line per step, flushed as written.

    A fresh run starts the file empty; a resumed one keeps the rows up to the
    resume step and drops the rest, so the resumed file equals an
    uninterrupted run's."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        self.last_step = self._prepare_file(resume_step)
        self._file = open(self.path, "a")

    @classmethod
    def open(cls, run_dir: Path, config: Any, resume_step: int | None) -> JsonlSink:
        return cls(run_dir / METRICS_FILE, resume_step)

    def _prepare_file(self, resume_step: int | None) -> int | None:
        if resume_step is None:
            if self.path.exists() and self.path.stat().st_size:
                logger.warning("%s holds metrics of an earlier run; starting it afresh (to continue that run, "
                               "pass resume_step)", self.path)
            self.path.write_text("")
            return None
        if not self.path.exists():
            return None
        kept = [row for row in read_metrics(self.path) if row["step"] <= resume_step]
        write_jsonl_atomic(self.path, kept)
        return kept[-1]["step"] if kept else None

    def write(self, step: int, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardSink(Sink):
    """TensorBoard event files under `<run_dir>/tensorboard`; a resume purges the events after its step."""

    def __init__(self, writer):
        self._writer = writer

    @classmethod
    def open(cls, run_dir: Path, config: Any, resume_step: int | None) -> TensorBoardSink | None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.warning("metric sink 'tensorboard' asked for but the tensorboard package is not installed "
                           "(pip install tensorboard); metrics go to %s only", run_dir / METRICS_FILE)
            return None
        purge_step = resume_step + 1 if resume_step is not None else None
        writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge_step)
        if config is not None and purge_step is None:
            writer.add_text("config", "```\n" + json.dumps(_config_dict(config), indent=2, default=str) + "\n```")
        return cls(writer)

    def write(self, step: int, row: dict[str, Any]) -> None:
        for key, value in _numeric(row).items():
            self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbSink(Sink):
    """A W&B run named after the run directory; its id is kept in `<run_dir>/wandb_run_id`, so a resume
    continues the same W&B run."""

    def __init__(self, run):
        self._run = run

    @classmethod
    def open(cls, run_dir: Path, config: Any, resume_step: int | None) -> WandbSink | None:
        try:
            import wandb
        except ImportError:
            logger.warning("metric sink 'wandb' asked for but the wandb package is not installed (pip install wandb); "
                           "metrics go to %s only", run_dir / METRICS_FILE)
            return None
        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
        try:
            run = wandb.init(project=os.environ.get("WANDB_PROJECT", "rlhf-ray"), name=run_dir.name, id=run_id,
                             resume="allow", dir=str(run_dir), config=_config_dict(config))
        except Exception as err:  # not logged in, no network, bad settings: the run goes on without W&B
            logger.warning("metric sink 'wandb' could not start (%s); metrics go to %s only",
                           err, run_dir / METRICS_FILE)
            return None
        id_file.write_text(run_id + "\n")
        return cls(run)

    def write(self, step: int, row: dict[str, Any]) -> None:
        self._run.log(_numeric(row), step=step)

    def close(self) -> None:
        self._run.finish()


# run.sinks -> its class; the names are `config.schema.METRIC_SINKS`, in the order sinks are opened and written.
SINKS: dict[str, type[Sink]] = {"jsonl": JsonlSink, "tensorboard": TensorBoardSink, "wandb": WandbSink}


class MetricsWriter:
    """Writes one metrics row per step to the run directory and to the asked-for sinks.

    Args:
        run_dir: the run directory (created if missing).
        sinks: names in `SINKS` ("jsonl", "tensorboard", "wandb"). TensorBoard
            and W&B are used when their packages import; a missing one logs
            one warning.
        config: the resolved job config (dataclass or mapping), recorded by W&B
            and TensorBoard.
        resume_step: continuing a run stopped after this step: rows with a
            larger step are dropped from `metrics.jsonl` (and TensorBoard), so
            the resumed file equals an uninterrupted run's. `None` starts a
            fresh file.
    """

    def __init__(self, run_dir: str | os.PathLike, sinks: Iterable[str] = tuple(SINKS), config: Any = None,
                 resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        sinks = tuple(sinks)
        unknown = [s for s in sinks if s not in SINKS]
        if unknown:
            raise ValueError(f"unknown metric sink(s) {unknown}; expected some of {list(SINKS)}")
        opened = (cls.open(self.run_dir, config, resume_step) for name, cls in SINKS.items() if name in sinks)
        self._sinks: list[Sink] = [sink for sink in opened if sink is not None]
        self.last_step: int | None = next((s.last_step for s in self._sinks if s.last_step is not None), None)
        self._closed = False

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Record the metrics of `step` (steps strictly increase); returns the row written."""
        if self._closed:
            raise RuntimeError(f"MetricsWriter for {self.run_dir} is closed")
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(f"metrics for step {step} come after step {self.last_step} in {self.path}: "
                             f"steps must increase (resuming? pass resume_step to MetricsWriter)")
        if "step" in metrics:
            raise ValueError("metrics must not contain a 'step' key: pass the step as the first argument")
        row: dict[str, Any] = {"step": int(step)}
        for key, value in metrics.items():
            if not isinstance(key, str):
                raise TypeError(f"metric names are strings, got {key!r}")
            row[key] = to_scalar(key, value)
        for sink in self._sinks:
            sink.write(step, row)
        self.last_step = step
        return row

    def close(self) -> None:
        """Flush and close every sink (safe to call twice)."""
        if self._closed:
            return
        self._closed = True
        for sink in self._sinks:
            sink.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
