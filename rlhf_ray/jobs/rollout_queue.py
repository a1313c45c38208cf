"""Rollouts generated ahead of the step that trains on them, at most `rollout.max_staleness` weight versions behind.

The online step takes its batch from this queue. With `max_staleness: 0` the step launches its own generation
and waits for it at once: the on-policy loop. With `k >= 1` the step also launches the generations of the next
`k` steps, with the weights the engines hold now, before it scores and trains on its own batch; the engines
generate while the policy trains. An engine actor runs one call at a time, so the weight sync at the end of the
step runs on the engines after the generations queued before it, and only the generations launched after it
sample with the new weights.

Versions: the weights after step `s` are version `s` (0: the initial ones). The engines hold version `s` once
step `s`'s sync has run. The step `m` trains from version `m - 1`; a batch sampled with version `v` is `m - 1 - v`
versions stale when step `m` trains on it. A generation for step `m` is launched at the start of step
`m - k` at the latest, when the engines hold version `m - k - 1`: its staleness is at most `k`.

A checkpoint holds the batches still in flight (their rows and versions, `state_dict`): a resumed run trains on
the same batches as an uninterrupted one. A run recovering from a dead engine resumes from its latest checkpoint
and regenerates what was in flight after it.

Nothing here touches Ray: the driver hands the queue `launch(step) -> Generation`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Rows = dict[str, torch.Tensor]

__all__ = ["Generation", "RolloutQueue", "rows_from_json", "rows_to_json"]


@dataclass
class Generation:
    """One step's generation: `result()` waits for its rows; `wait()` waits without fetching them."""

    result: Callable[[], Rows]
    wait: Callable[[], None] = lambda: None


def _done(rows: Rows) -> Generation:
    return Generation(result=lambda: rows)


class RolloutQueue:
    """The generations launched for the steps ahead (see the module docstring)."""

    def __init__(self, max_staleness: int, last_step: int, launch: Callable[[int], Generation]):
        self.max_staleness = max_staleness
        self.last_step = last_step
        self.launch = launch
        self.version = 0
        """The weight version the engines hold (that the next launched generation samples with)."""
        self.pending: dict[int, tuple[int, Generation]] = {}
        """Step -> (the version it samples with, its generation), launched in step order."""

    def take(self, step: int) -> tuple[Rows, int]:
        """Step `step`'s rollout and its staleness. Launches the generations of steps `step .. step +
        max_staleness` not yet launched (in step order: the sampler's order), then waits for `step`'s."""
        for m in range(step, min(step + self.max_staleness, self.last_step) + 1):
            if m not in self.pending:
                self.pending[m] = (self.version, self.launch(m))
        version, generation = self.pending.pop(step)
        if step - 1 - version > self.max_staleness:
            # Only a batch restored from a checkpoint of a run with a larger bound: generated anew, with fresh
            # prompts, by the weights the engines hold.
            version, generation = self.version, self.launch(step)
        return generation.result(), step - 1 - version

    def wait(self) -> None:
        """Wait until the engines have generated every launched batch (before a weight sync, whose time is
        then the sync's own)."""
        for _, generation in self.pending.values():
            generation.wait()

    def synced(self, step: int) -> None:
        """The engines now hold step `step`'s weights."""
        self.version = step

    def state_dict(self) -> dict:
        """The batches in flight, waited for: their steps, versions and rows (JSON)."""
        self.pending = {m: (v, _done(g.result())) for m, (v, g) in self.pending.items()}
        return {"version": self.version,
                "pending": [{"step": m, "version": v, "rows": rows_to_json(g.result())}
                            for m, (v, g) in sorted(self.pending.items())]}

    def load_state_dict(self, state: dict) -> None:
        self.version = state["version"]
        self.pending = {p["step"]: (p["version"], _done(rows_from_json(p["rows"]))) for p in state["pending"]}


def rows_to_json(rows: Rows) -> dict:
    """Tensors as JSON: dtype, shape and values (float32 values round-trip exactly through JSON's doubles)."""
    return {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape), "values": v.flatten().tolist()}
            for k, v in rows.items()}


def rows_from_json(data: dict) -> Rows:
    return {k: torch.tensor(v["values"], dtype=getattr(torch, v["dtype"])).reshape(v["shape"])
            for k, v in data.items()}
