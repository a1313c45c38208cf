"""One DeepSpeed engine on one data-parallel rank, as the trainable roles use it.

`TrainEngine` wraps `deepspeed.initialize` with the config our role settings
build, splits a rank's batch into micro-batches for gradient accumulation,
runs a loss function over them, saves and loads full checkpoints, streams its
weights in buckets (gathering ZeRO-3 partitions), and reports the memory it
holds. The roles in `workers/` are thin shells around it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

import torch

from rlhf_ray.config.schema import RoleConfig
from rlhf_ray.data.collate import trim_right_padding
from rlhf_ray.runtime.cores import CoreFollower
from rlhf_ray.runtime.deepspeed_config import build_deepspeed_config
from rlhf_ray.runtime.distributed import current_device
from rlhf_ray.telemetry.activations import ActivationReport, ActivationTracker, batch_shape
from rlhf_ray.telemetry.memory import MemoryReport, held_storage_keys, measure_memory
from rlhf_ray.telemetry.timers import ComputeClock

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]]


def import_deepspeed(device: torch.device | None = None):
    """DeepSpeed, imported on first use. It picks its accelerator once, when imported, from what the
    process sees; naming it from the rank's `device` (default `current_device()`: what Ray assigned)
    keeps a CPU rank on a GPU node off GPU 0, and keeps DeepSpeed's accelerator probe (a warning on
    stdout) out of commands that never train. A `DS_ACCELERATOR` set by the user wins."""
    if "deepspeed" not in sys.modules:
        device = current_device() if device is None else torch.device(device)
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    import deepspeed

    return deepspeed


def split_micro_batches(batch: dict, micro_batch_size: int, allow_remainder: bool = False) -> list[dict]:
    """Split a dict of equally long tensors/lists along dim 0 into micro-batches
    (the last one shorter only with `allow_remainder`, as inference allows)."""
    sizes = {len(v) for v in batch.values() if isinstance(v, (torch.Tensor, list))}
    if len(sizes) != 1:
        raise ValueError(f"batch fields have different lengths {sorted(sizes)}; cannot split into micro-batches")
    (size,) = sizes
    if size % micro_batch_size and not allow_remainder:
        raise ValueError(f"a rank's batch of {size} does not divide into micro-batches of {micro_batch_size}; "
                         "make run.batch_size / num_ranks a multiple of micro_batch_size")
    out = []
    for start in range(0, size, micro_batch_size):
        out.append({k: (v[start:start + micro_batch_size] if isinstance(v, (torch.Tensor, list)) else v)
                    for k, v in batch.items()})
    return out


def mean_metrics(per_micro: list[dict]) -> dict[str, float]:
    """Average metric dicts of several micro-batches (keys present in any)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for metrics in per_micro:
        for key, value in metrics.items():
            value = float(value.detach().float().mean()) if isinstance(value, torch.Tensor) else float(value)
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + 1
    return {k: sums[k] / counts[k] for k in sums}


@torch.no_grad()
def run_micro_batches(module, batch: dict, fn: Callable[[torch.nn.Module, dict], dict], micro_batch_size: int,
                      device) -> dict[str, torch.Tensor]:
    """`fn(module, micro_batch) -> dict[str, Tensor[b, ...]]` over micro-batches without gradients,
    results concatenated along dim 0 on the CPU."""
    outs = []
    for mb in split_micro_batches(batch, micro_batch_size, allow_remainder=True):
        mb = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in mb.items()}
        outs.append({k: v.detach().cpu() for k, v in fn(module, mb).items()})
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}


def save_pretrained(module, state: dict, tokenizer, directory: str, write: bool) -> None:
    """`save_pretrained` of a (gathered) state dict and the tokenizer; only the writing rank writes."""
    if write:
        module.save_pretrained(directory, state_dict=state)
        tokenizer.save_pretrained(directory)


NORM_ROW = 1 << 14


@torch.no_grad()
def squared_l2(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor`'s squares, a float64 scalar, in one read and no copy of a float32 tensor.

    torch's float32 norm of a whole gradient on the CPU drifts with its size (1.6e-3 relative for the 28M
    entries of a 49k x 576 embedding), and a float64 copy costs 20x the time (0.7-0.8 s a step for 135M
    parameters). Norms of rows of `NORM_ROW` entries stay within 1e-7, so the tensor is taken as such rows
    (plus the remainder), each row's norm in float32, and the rows' squares are summed in float64."""
    flat = tensor.detach().reshape(-1)
    whole = flat.numel() // NORM_ROW * NORM_ROW
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    if whole:
        rows = torch.linalg.vector_norm(flat[:whole].view(-1, NORM_ROW), dim=1, dtype=torch.float32)
        total = total + rows.double().square().sum()
    if whole < flat.numel():
        total = total + torch.linalg.vector_norm(flat[whole:], dtype=torch.float32).double().square()
    return total


class TrainEngine:
    """A DeepSpeed ZeRO engine for one trainable model on this rank.

    `batch_per_rank` is the number of sequences this rank sees per optimizer
    step; it must be a multiple of `role.micro_batch_size`, and the quotient is
    DeepSpeed's gradient-accumulation count. `clock` counts the seconds spent in
    `train_batch` ("train") and `forward_eval` ("forward"). With
    `measure_activations` the first training micro-step runs under an
    `ActivationTracker`, and `memory()` reports its activation peak.
    `device` is the rank's (default `current_device()`); DeepSpeed moves the
    module there. `threads` is `placement.threads`: with "follow", each
    measured call runs with the torch threads the cores left free allow
    (`runtime/cores.py`).
    """

    def __init__(self, model: torch.nn.Module, role: RoleConfig, *, world_size: int, batch_per_rank: int,
                 total_optimizer_steps: int, dtype: str, measure_activations: bool = True,
                 device: torch.device | None = None, threads: str = "follow"):
        self.micro_batch_size = min(role.micro_batch_size, batch_per_rank)
        if batch_per_rank % self.micro_batch_size:
            raise ValueError(f"each rank gets {batch_per_rank} sequences per optimizer step, which is not a multiple "
                             f"of micro_batch_size {role.micro_batch_size}")
        self.grad_accum_steps = batch_per_rank // self.micro_batch_size
        self.world_size = world_size
        self.zero_stage = role.zero_stage
        device = current_device() if device is None else torch.device(device)
        deepspeed = import_deepspeed(device)
        optim = role.optim
        self.ds_config = build_deepspeed_config(
            zero_stage=role.zero_stage, micro_batch_size_per_rank=self.micro_batch_size,
            grad_accum_steps=self.grad_accum_steps, world_size=world_size, dtype=dtype, grad_clip=optim.grad_clip,
            offload_optimizer=role.offload_optimizer, offload_params=role.offload_params, lr=optim.lr,
            weight_decay=optim.weight_decay, betas=optim.betas, eps=optim.eps, warmup_steps=optim.warmup_steps,
            total_steps=max(total_optimizer_steps, 1), scheduler=optim.scheduler, train=True,
            on_cuda=device.type == "cuda", model_numel=sum(p.numel() for p in model.parameters()),
            largest_param_numel=max(p.numel() for p in model.parameters()))
        from rlhf_ray.models.lora import is_peft_model

        self.lora = is_peft_model(model)
        params = [p for p in model.parameters() if p.requires_grad]
        # At ZeRO-0 in float32 DeepSpeed would clip with a gradient-norm pass of its own, and scale every
        # gradient even when the factor is 1; the engine takes the norm once (`_unpartitioned_grad_norm`, for
        # the finite check and the metric) and clips with it. Other stages and dtypes clip in DeepSpeed's
        # optimizers, which report their norm.
        self.grad_clip = float(optim.grad_clip)
        self.clips_itself = self.zero_stage == 0 and dtype == "float32"
        ds_config = {**self.ds_config, "gradient_clipping": 0.0} if self.clips_itself else self.ds_config
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=params, config=ds_config)
        if world_size == 1 and self.zero_stage == 0:
            # One rank has nothing to all-reduce, but DeepSpeed's ZeRO-0 backward still flattens every
            # gradient into one buffer and back (about a seventh of a tiny model's optimizer step).
            self.engine.enable_backward_allreduce = False
        # Peak held memory: gradients exist between the last backward and the
        # optimizer step, optimizer state only after the first step, so the
        # snapshot before the second step holds both (the layout is fixed after).
        self._snapshots_left = 2
        self._peak: MemoryReport | None = None
        # Activations are measured on the first training micro-step (the tracker costs a Python call
        # per op): forward, loss and backward, beyond the held state (`telemetry.activations`).
        self._activations_left = 1 if measure_activations else 0
        self._activations: ActivationReport | None = None
        self.follower = CoreFollower(mode=threads)
        self.clock = ComputeClock(around=self.follower.follow)

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def global_loss(self, loss: torch.Tensor, local_weight: torch.Tensor | float, total_weight: float) -> torch.Tensor:
        """A micro-batch's share of a loss aggregated over the whole minibatch.

        `loss` is this micro-batch's weighted mean (weights summing to
        `local_weight`: its tokens, or its sequences); `total_weight` is the
        same sum over the minibatch on every rank. DeepSpeed divides each
        micro-batch's loss by the accumulation steps and averages gradients over
        ranks, so scaling by `local / total * accumulation * ranks` makes the
        update the gradient of the minibatch's own mean, whatever the
        micro-batch size and rank count."""
        return loss * (float(local_weight) / max(float(total_weight), 1e-12)) * self.grad_accum_steps * self.world_size

    def train_batch(self, batch: dict, loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step over this rank's batch, accumulated over micro-batches.

        `loss_fn(module, micro_batch)` returns `(scalar_loss, metrics)`; the loss
        is the mean over the micro-batch, DeepSpeed divides it by the number of
        micro-batches and averages gradients over ranks.
        """
        with self.clock.measure("train"):
            return self._train_batch(batch, loss_fn)

    def _train_batch(self, batch: dict, loss_fn: LossFn) -> dict[str, float]:
        self.engine.train()
        micro = split_micro_batches(batch, self.micro_batch_size)
        if len(micro) != self.grad_accum_steps:
            raise ValueError(f"expected {self.grad_accum_steps} micro-batches per step, got {len(micro)}")
        per_micro = []
        finite = True
        skipped_before = self.engine.skipped_steps
        for index, mb in enumerate(micro):
            mb = trim_right_padding(mb)  # each micro-batch as long as its own longest row
            mb = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in mb.items()}
            if self._activations_left:
                loss, metrics = self._measured_micro_step(mb, loss_fn)
            else:
                loss, metrics = loss_fn(self.engine, mb)
                self.engine.backward(loss)
            finite = finite and bool(torch.isfinite(loss.detach()).all())
            last = index == len(micro) - 1
            if last and self._snapshots_left:
                self._snapshots_left -= 1
                self._record_peak()
            if last and self.zero_stage == 0:
                own_norm = self._unpartitioned_grad_norm()
                # ZeRO 1-3 optimizers skip a step whose gradient norm is not finite; at ZeRO-0 the step is
                # the plain optimizer's, so a non-finite loss or norm (on any rank) is skipped here.
                if not self._all_ranks(finite and math.isfinite(own_norm)):
                    with self._step_skipped():
                        self.engine.step()
                    per_micro.append({"loss": loss.detach(), **metrics})
                    continue
                if self.clips_itself:
                    self._clip_gradients(own_norm)
            self.engine.step()
            per_micro.append({"loss": loss.detach(), **metrics})
        out = mean_metrics(per_micro)
        out["skipped"] = float(self.engine.skipped_steps > skipped_before)
        # The global norm over every rank's gradients, before clipping (the same number whatever the ZeRO
        # stage and rank count), and whether clipping fired on this optimizer step. ZeRO 1-3 optimizers
        # report it; at ZeRO-0 DeepSpeed clips without keeping the norm, so it is taken from the
        # all-reduced gradients just before the step.
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None and self.zero_stage == 0:
            grad_norm = own_norm
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
            out["grad_clipped"] = float(self.grad_clip > 0 and float(grad_norm) > self.grad_clip)
        out["lr"] = float(self.engine.get_lr()[0])
        return out

    def _measured_micro_step(self, mb: dict, loss_fn: LossFn) -> tuple[torch.Tensor, dict]:
        """Forward, loss and backward of one micro-batch under an `ActivationTracker`; the gradients
        and buffers they leave held (the state `measure_memory` counts) are not activations."""
        self._activations_left -= 1
        with ActivationTracker() as tracker:
            loss, metrics = loss_fn(self.engine, mb)
            tracker.mark_backward()
            tracker.end_with_autograd(loss)
            self.engine.backward(loss)
        rows, seq_len = batch_shape(mb)
        report = tracker.report(held_storage_keys(self.engine, self.optimizer), rows=rows, seq_len=seq_len)
        self._activations = report.max(self._activations)
        return loss, metrics

    def _all_ranks(self, ok: bool) -> bool:
        """`ok` on every rank of the group (one all-reduce; this rank's value alone without a group)."""
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return ok
        flag = torch.tensor([0.0 if ok else 1.0], device=self.device)  # NCCL reduces device tensors only
        dist.all_reduce(flag)
        return float(flag) == 0.0

    @contextmanager
    def _step_skipped(self):
        """DeepSpeed's boundary `step()` with neither the optimizer nor the LR schedule moving: the
        gradients are dropped, the parameters and optimizer state stay as they were, and the engine
        counts the step as skipped (as its ZeRO optimizers do on a non-finite gradient norm)."""
        optimizer, scheduler = self.engine.optimizer, self.engine.lr_scheduler
        saved = optimizer.step, getattr(scheduler, "step", None)
        optimizer.step = lambda *args, **kwargs: None
        if scheduler is not None:
            scheduler.step = lambda *args, **kwargs: None
        try:
            yield
        finally:
            optimizer.step = saved[0]
            if scheduler is not None:
                scheduler.step = saved[1]
        self.engine.skipped_steps += 1

    @torch.no_grad()
    def _unpartitioned_grad_norm(self) -> float:
        """L2 norm of the module's gradients (ZeRO-0: after the boundary's all-reduce, the global ones), to
        float32 rounding (`squared_l2`)."""
        squares = [squared_l2(p.grad) for p in self.module.parameters() if p.grad is not None]
        return float(torch.stack(squares).sum().sqrt()) if squares else 0.0

    @torch.no_grad()
    def _clip_gradients(self, norm: float) -> None:
        """Scale the gradients to norm `grad_clip` when `norm` is above it, with DeepSpeed's factor
        (clip / (norm + 1e-6), never above 1); a factor of 1 leaves them untouched."""
        if self.grad_clip <= 0:
            return
        factor = self.grad_clip / (norm + 1e-6)
        if factor < 1.0:
            torch._foreach_mul_([p.grad for p in self.module.parameters() if p.grad is not None], factor)

    @torch.no_grad()
    def forward_eval(self, batch: dict, fn: Callable[[torch.nn.Module, dict], dict]) -> dict:
        """Run `fn(module, micro_batch) -> dict[str, Tensor[b, ...]]` over micro-batches without
        gradients and concatenate the results along dim 0 (ZeRO-3 gathers on the fly)."""
        self.engine.eval()
        with self.clock.measure("forward"):
            return run_micro_batches(self.engine, batch, fn, self.micro_batch_size, self.device)

    # checkpoints -----------------------------------------------------------
    def save_checkpoint(self, directory: str, client_state: dict | None = None) -> None:
        """Every rank writes its shard of model, optimizer and scheduler under `directory`."""
        self.engine.save_checkpoint(directory, tag="engine", client_state=client_state or {})

    def load_checkpoint(self, directory: str) -> dict:
        _, client_state = self.engine.load_checkpoint(directory, tag="engine", load_optimizer_states=True,
                                                      load_lr_scheduler_states=True)
        if client_state is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}/engine")
        return client_state

    # weights ---------------------------------------------------------------
    def gathered(self, params: list[torch.nn.Parameter]):
        """Context in which ZeRO-3 partitioned `params` hold their full values on every rank."""
        if self.zero_stage == 3:
            return import_deepspeed().zero.GatheredParameters(params, modifier_rank=None)
        return nullcontext()

    def _gathered_named(self, copy: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """`(name, full cpu copy)` of every parameter, one at a time (ZeRO-3 gathers each on every rank);
        with `copy=False`, a parameter already whole on the CPU comes as itself (the caller reads it before
        the next optimizer step and never writes to it)."""
        for name, param in self.module.named_parameters():
            with self.gathered([param]):
                whole_on_cpu = not copy and param.device.type == "cpu" and self.zero_stage != 3
                tensor = param.detach() if whole_on_cpu else param.detach().to("cpu", copy=True)
            yield name, tensor

    def join_weight_gathers(self) -> None:
        """Take part in the ZeRO-3 gathers of a weight stream (`iter_weight_buckets` on the sending rank)
        without copying anything: the ranks that do not send. Nothing to do below stage 3."""
        if self.zero_stage != 3:
            return
        for param in self.module.parameters():  # the order `_gathered_named` gathers in
            with self.gathered([param]):
                pass

    def named_weights(self, copy: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """The weights the model computes with, under the base model's names: with LoRA the base plus
        the adapter, merged one module at a time (`models.lora.MergedWeights`, always from copies);
        `copy` as in `_gathered_named` otherwise."""
        if self.lora:
            from rlhf_ray.models.lora import MergedWeights

            yield from MergedWeights(self.module).stream(self._gathered_named())
        else:
            yield from self._gathered_named(copy)

    def iter_weight_buckets(self, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Yield the model's full weights (`named_weights`) as buckets of `(name, cpu_tensor)` of about
        `bucket_bytes`.

        Only the sending rank iterates; the others call `join_weight_gathers`
        (ZeRO-3 gathers are collective). No more than one bucket of full weights
        (plus the module being merged or the parameter being gathered) is held at a time.

        The sender copies each bucket into the object store before the optimizer moves again, so a plain
        model's parameters on the CPU go as they are, not copied first (538 MB of SmolLM2 cost 0.04-0.2 s
        a sync to copy)."""
        bucket: list[tuple[str, torch.Tensor]] = []
        size = 0
        for name, tensor in self.named_weights(copy=False):
            bucket.append((name, tensor))
            size += tensor.numel() * tensor.element_size()
            if size >= bucket_bytes:
                yield bucket
                bucket, size = [], 0
        if bucket:
            yield bucket

    def adapter(self) -> tuple[dict[str, torch.Tensor], dict]:
        """A LoRA model's adapter tensors and `adapter_config.json` contents (every rank gathers)."""
        from rlhf_ray.models.lora import adapter_state

        return adapter_state(self.module, self._gathered_named())

    def export(self, directory: str, tokenizer, rank: int, merge: bool = True) -> None:
        """`save_pretrained` of the full weights (every rank gathers for ZeRO-3; rank 0 writes). A LoRA
        model writes its merged weights there and its adapter to `adapter/` under it, or with
        `merge=False` only its adapter (peft's format) to `directory`."""
        if not self.lora:
            save_pretrained(self.module, self.full_state_dict(), tokenizer, directory, rank == 0)
            return
        state = dict(self._gathered_named())
        if rank != 0:
            return
        from rlhf_ray.models.lora import MergedWeights

        adapter_dir = os.path.join(directory, "adapter") if merge else directory
        self.module.save_pretrained(adapter_dir, state_dict=state)
        tokenizer.save_pretrained(adapter_dir)
        if merge:
            merged = dict(MergedWeights(self.module).stream(state.items()))
            save_pretrained(self.module.get_base_model(), merged, tokenizer, directory, True)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full CPU state dict (ZeRO-3 gathered, LoRA merged) under the base model's names."""
        return dict(self.named_weights())

    def _record_peak(self) -> None:
        now = measure_memory(self.engine, self.optimizer)
        self._peak = now if self._peak is None else self._peak.max(now)

    def memory(self) -> MemoryReport:
        """What this rank holds now, field-wise maxed with the snapshots taken inside the first steps,
        with the activations measured on the first micro-step (None before it)."""
        now = measure_memory(self.engine, self.optimizer)
        report = now if self._peak is None else self._peak.max(now)
        return dataclasses.replace(report, activations=self._activations)


class InferenceEngine:
    """A frozen model on this rank: plain module, or ZeRO-3 partitioned when `zero_stage == 3`.

    Used by the reference and reward roles. `load_weights` takes buckets of
    `(name, tensor)` (the same stream the policy sends to rollout engines), so
    SPIN/sDPO can move the reference to the latest policy. `clock` counts the
    seconds spent in `forward_eval`. The module runs on the rank's `device`
    (default `current_device()`): ZeRO-3 places it there itself, a plain
    module is moved there (the loaders leave it on the CPU). `threads` as
    for `TrainEngine`."""

    def __init__(self, model: torch.nn.Module, *, zero_stage: int, micro_batch_size: int, world_size: int,
                 dtype: str, device: torch.device | None = None, threads: str = "follow"):
        model.requires_grad_(False)
        model.eval()
        self.zero_stage = zero_stage
        self.micro_batch_size = micro_batch_size
        self.follower = CoreFollower(mode=threads)
        self.clock = ComputeClock(around=self.follower.follow)
        device = current_device() if device is None else torch.device(device)
        if zero_stage == 3:
            deepspeed = import_deepspeed(device)
            config = build_deepspeed_config(
                zero_stage=3, micro_batch_size_per_rank=micro_batch_size, grad_accum_steps=1, world_size=world_size,
                dtype=dtype, grad_clip=0.0, offload_optimizer=False, offload_params=False, lr=0.0, weight_decay=0.0,
                betas=(0.9, 0.999), eps=1e-8, warmup_steps=0, total_steps=1, scheduler="constant", train=False,
                on_cuda=device.type == "cuda", model_numel=sum(p.numel() for p in model.parameters()),
                largest_param_numel=max(p.numel() for p in model.parameters()))
            self.engine, *_ = deepspeed.initialize(model=model, config=config)
            self.module = self.engine.module
            self.device = self.engine.device
        else:
            self.engine = None
            self.module = model.to(device)
            self.device = device

    @torch.no_grad()
    def forward_eval(self, batch: dict, fn: Callable[[torch.nn.Module, dict], dict]) -> dict:
        """Run `fn(module, micro_batch)` over micro-batches and concatenate along dim 0."""
        with self.clock.measure("forward"):
            return run_micro_batches(self.module, batch, fn, self.micro_batch_size, self.device)

    def gathered(self, params: list[torch.nn.Parameter]):
        """Context in which ZeRO-3 partitioned `params` hold their full values."""
        if self.zero_stage == 3:
            return import_deepspeed().zero.GatheredParameters(params, modifier_rank=None)
        return nullcontext()

    def export(self, directory: str, tokenizer, rank: int, merge: bool = True) -> None:
        """`save_pretrained` of the full weights (every rank gathers for ZeRO-3; rank 0 writes; a frozen
        model has no adapter, so `merge` changes nothing)."""
        save_pretrained(self.module, self.full_state_dict(), tokenizer, directory, rank == 0)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full CPU copy of the weights (ZeRO-3 gathered), for `save_pretrained`."""
        state = {}
        for name, param in self.module.named_parameters():
            with self.gathered([param]):
                state[name] = param.detach().to("cpu", copy=True)
        return state

    @torch.no_grad()
    def load_weights(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        """Copy named full tensors into the model's parameters (ZeRO-3: re-partitioned on exit)."""
        params = dict(self.module.named_parameters())
        missing = [name for name, _ in bucket if name not in params]
        if missing:
            raise KeyError(f"weights for unknown parameters {missing[:3]}: the sender's model differs from this one")
        targets = [params[name] for name, _ in bucket]
        ctx = (import_deepspeed().zero.GatheredParameters(targets, modifier_rank=0) if self.zero_stage == 3
               else nullcontext())
        with ctx:
            for (name, tensor), param in zip(bucket, targets):
                param.data.copy_(tensor.to(param.device, param.dtype))

    def memory(self) -> MemoryReport:
        return measure_memory(self.engine if self.engine is not None else self.module, None)
