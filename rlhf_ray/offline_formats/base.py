"""What one data format of an offline job is made of, in one object.

A data format knows, for its rows: which on-disk layout the loader reads
(`disk_format`) and what else a row must satisfy (`check_row`), how a list of
rows becomes the batch tensors (`batch`, on the driver), what the reference
adds to a batch (`reference_logps`, on a rank holding the reference weights),
and how the trained model's loss is taken (`loss_fn`, on a trainer rank, from
the step's `OfflineStep` with the values `rank_step` works out on that rank and
`driver_step` on the driver). The drivers and workers call these and branch on
no name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rlhf_ray.algorithms.steps import OfflineStep

LossFn = Callable[[Any, dict], "tuple[Any, dict]"]


class OfflineDataFormat:
    """One data format; subclasses override what their rows need."""

    name: str = ""
    disk_format: str = ""
    """The loader's format (`data/formats.py`) read when `data.format` is not set."""
    pairs: bool = False
    """Batches hold chosen/rejected pairs (`chosen_*`/`rejected_*` tensors): held-out pair metrics apply, and
    every example is two sequences through the model."""
    held_out: bool = False
    """Held-out rows of this format are scored too (pair metrics for pairs, ranking accuracy for rankings)."""
    schedules: bool = False
    """SPIN and sDPO can run over it: one prompt and two responses, which SPIN also builds from SFT rows."""
    reference_cacheable: bool = True
    """The reference's log-probs of a row depend on that row alone, so they can be precomputed once."""

    def check_row(self, example: Any) -> None:
        """Raise `data.formats.RowProblem` (naming the key and what to do) for a row this format cannot train on;
        the loader adds the file and row."""
        return None

    def batch(self, data: Any, rows: list) -> dict:
        """The tensors of `rows` (examples of `data`, a `JobData`: its tokenizer, config, params, encode cache)."""
        raise NotImplementedError(f"data format {self.name!r} builds no batches")

    def reference_logps(self, scoring: Any, batch: dict, objective: Any) -> dict:
        """What the reference adds to `batch` for `objective`, computed through `scoring` (`ReferenceScoring`)."""
        raise NotImplementedError(f"data format {self.name!r} has no reference scoring")

    def loss_fn(self, step: OfflineStep, engine: Any = None, shared_prefix: bool = False) -> LossFn:
        """`fn(module, micro_batch) -> (loss, metrics)` of `step`'s objective on this format's batches; with
        `engine` (training) the loss may be this micro-batch's share of the step's (`engine.global_loss`).
        With `shared_prefix` (the role's setting) rows that share a prompt may share its forward
        (`models/forward.py`); formats without such rows ignore it."""
        raise NotImplementedError(f"data format {self.name!r} has no loss")

    def rank_step(self, worker: Any, batch: dict, step: OfflineStep) -> OfflineStep:
        """`step` with what a trainer rank works out once per step from the whole batch (default: nothing)."""
        return step

    def driver_step(self, batch: dict, step: OfflineStep, cfg: Any) -> OfflineStep:
        """`step` with what the driver works out once per step from the whole batch (default: nothing)."""
        return step
