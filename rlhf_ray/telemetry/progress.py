"""The driver's progress bar: step count, rate and a few key metrics (tqdm).

Shown only on an interactive terminal: when the stream is not a TTY, when the
`CI` or `RLHF_RAY_NO_PROGRESS` environment variable is set, or when the job
asks for none, no bar is drawn. Off a terminal (a log file, `submit --wait`,
CI) a plain line every `log_every` steps takes its place on the same stream:
the step, a few metrics, the rate and the time left, prefixed with the job's
label, so a pipeline's jobs each print their own lines. `run.progress: false`
turns both off.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

# Shown in this order when present in a step's metrics, at most `max_keys` of them.
DEFAULT_KEYS = (
    "loss", "train/loss", "policy/pg_loss", "critic/value_loss", "policy/grad_norm", "critic/grad_norm",
    "train/grad_norm", "rewards/mean", "rewards/accuracies", "rewards/margins", "eval/alignment_accuracy",
    "time/step_s",
)


def _is_interactive(stream: TextIO) -> bool:
    if os.environ.get("CI") or os.environ.get("RLHF_RAY_NO_PROGRESS"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def format_metrics(metrics: Mapping[str, Any], keys: Sequence[str] = DEFAULT_KEYS, max_keys: int = 5) -> str:
    """`"loss=0.612 rewards/accuracies=0.75"`: the first `max_keys` of `keys` present with a number."""
    parts = []
    for key in keys:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"{key}={value:.4g}" if math.isfinite(value) else f"{key}={value}")
        if len(parts) == max_keys:
            break
    return " ".join(parts)


class Progress:
    """Progress of a run of `total` steps, resumed runs starting at `initial`.

    Args:
        total: the last step of the run.
        initial: steps already done (a resumed run).
        enabled: False turns every progress output off.
        desc: label before the bar (e.g. the algorithm name).
        keys: metric keys to show, in order; `max_keys` of them at most.
        stream: where the bar goes (stderr by default).
        log_every: off a terminal, log a line every this many steps
            (default: about 20 lines per run).
    """

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "",
                 keys: Sequence[str] = DEFAULT_KEYS, max_keys: int = 5, stream: TextIO | None = None,
                 log_every: int | None = None):
        self.total = int(total)
        self.desc = desc
        self.keys = tuple(keys)
        self.max_keys = max_keys
        self.enabled = bool(enabled)
        self.log_every = log_every if log_every is not None else max(1, self.total // 20)
        stream = stream if stream is not None else sys.stderr
        self._stream = stream
        self._initial = int(initial)
        self._started = time.perf_counter()
        self._bar = None
        if self.enabled and _is_interactive(stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=int(initial), desc=desc or None, file=stream,
                             dynamic_ncols=True, unit="step", leave=True)

    @property
    def shows_bar(self) -> bool:
        return self._bar is not None

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Move to `step` (the step just finished) and show its key metrics."""
        text = format_metrics(metrics or {}, self.keys, self.max_keys)
        if self._bar is not None:
            self._bar.update(int(step) - self._bar.n)
            self._bar.set_postfix_str(text, refresh=True)
        elif self.enabled and (step % self.log_every == 0 or step == self.total):
            print(self.line(step, text), file=self._stream, flush=True)

    def line(self, step: int, text: str = "") -> str:
        """`"[ppo] step 12/40 loss=0.61 | 0.52 step/s, 54 s left"`: one plain progress line."""
        done = int(step) - self._initial
        elapsed = time.perf_counter() - self._started
        rate = done / elapsed if done > 0 and elapsed > 0 else 0.0
        left = f", {(self.total - step) / rate:.0f} s left" if rate > 0 and step < self.total else ""
        label = f"[{self.desc}] " if self.desc else ""
        return f"{label}step {step}/{self.total}" + (f" {text}" if text else "") + f" | {rate:.3g} step/s{left}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
