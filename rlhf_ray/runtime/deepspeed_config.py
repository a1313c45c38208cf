"""Standard DeepSpeed config dicts built from a role's settings.

`build_deepspeed_config` turns the few numbers a role declares (ZeRO stage,
batch sizes, dtype, AdamW, learning-rate schedule) into the dict that
`deepspeed.initialize(config=...)` takes, and checks them first so a bad
combination fails with a message naming the setting instead of a traceback
from inside DeepSpeed.

What runs where:
- Optimizer. On CPU the config asks for torch's AdamW (`"torch_adam": true`),
  because DeepSpeed's fused and cpu_adam C++ ops need a compiler tool chain that
  a CPU box may lack; with optimizer offload this also needs
  `"zero_force_ds_cpu_optimizer": false`. On CUDA it asks for DeepSpeed's own
  AdamW (FusedAdam, or DeepSpeedCPUAdam when the optimizer is offloaded), which
  DeepSpeed builds on first use.
- Offload to CPU works on both; pinned host memory only with CUDA.
- float16 needs CUDA (or a CPU with oneDNN fp16 kernels); bfloat16 and
  float32 run everywhere.
- bf16 training accumulates gradients in fp32 (`data_types.grad_accum_dtype`)
  for ZeRO stages 1-3; DeepSpeed refuses that mix at stage 0, where gradients
  accumulate in bf16.

Learning-rate schedule. DeepSpeed's own schedulers are used (their state is
saved and restored with DeepSpeed checkpoints), with linear warm-up:
`constant` -> WarmupLR (or no scheduler at all without warm-up), `linear` ->
WarmupDecayLR, `cosine` -> WarmupCosineLR. DeepSpeed starts them one step
behind: optimizer step k (0-based) runs at the schedule's value for k - 1, and
step 0 at lr 0. `scheduled_lr` gives the exact value; with peak `lr`, warm-up
W, total T and i = k - 1:

    k == 0:   0
    i <  W:   lr * i / W                                       (warm-up)
    i >= W:   constant: lr
              linear:   lr * max(0, (T - i) / (T - W))
              cosine:   lr * (1 + cos(pi * min(1, (i - W + 1) / (T - W)))) / 2

DeepSpeed's warm-up lasts at least 2 steps, so `warmup_steps` must be 0 (only
with `constant`) or at least 2; the decaying schedules need T > W.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rlhf_ray.sizing import zero_buckets

DTYPES = ("float32", "bfloat16", "float16")
SCHEDULERS = ("constant", "linear", "cosine")
_DEEPSPEED_SCHEDULER = {"constant": "WarmupLR", "linear": "WarmupDecayLR", "cosine": "WarmupCosineLR"}
# DeepSpeed prints a progress line every `steps_per_print` steps; our own
# metrics cover that, so it is pushed out of reach.
_QUIET_STEPS = 2**31 - 1


class DeepSpeedConfigError(ValueError):
    """A setting DeepSpeed cannot run with; the message names it and the fix."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise DeepSpeedConfigError(message)


def check_lr_schedule(scheduler: str, lr: float, warmup_steps: int, total_steps: int) -> None:
    """Raise `DeepSpeedConfigError` for a schedule DeepSpeed cannot run; cheap, so a
    driver can call it while validating a job, before any model loads."""
    _require(scheduler in SCHEDULERS, f"scheduler {scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    _require(lr > 0, f"lr must be > 0 for a trainable role, got {lr}")
    _require(warmup_steps >= 0, f"warmup_steps must be >= 0, got {warmup_steps}")
    _require(warmup_steps != 1, "warmup_steps=1: DeepSpeed's schedulers warm up over at least 2 optimizer steps; "
                                "use warmup_steps 0 (no warm-up) or >= 2")
    _require(warmup_steps > 0 or scheduler == "constant",
             f"scheduler {scheduler!r} with warmup_steps=0: DeepSpeed's {_DEEPSPEED_SCHEDULER[scheduler]} "
             "always warms up; set warmup_steps >= 2 or use scheduler 'constant'")
    _require(total_steps >= 1, f"total_steps must be >= 1, got {total_steps}")
    _require(scheduler == "constant" or total_steps > warmup_steps,
             f"scheduler {scheduler!r} decays after warm-up, but total_steps={total_steps} is not above "
             f"warmup_steps={warmup_steps}: lower warmup_steps, train longer or use scheduler 'constant'")


def scheduled_lr(step: int, *, lr: float, scheduler: str, warmup_steps: int, total_steps: int) -> float:
    """The learning rate DeepSpeed applies at optimizer step `step` (0-based) for the
    schedule `build_deepspeed_config` writes; the formula is in the module docstring."""
    check_lr_schedule(scheduler, lr, warmup_steps, total_steps)
    if scheduler == "constant" and warmup_steps == 0:
        return lr
    if step == 0:
        return 0.0
    i, w, t = step - 1, warmup_steps, total_steps
    if i < w:
        return lr * i / w
    if scheduler == "constant":
        return lr
    if scheduler == "linear":
        return lr * max(0.0, (t - i) / (t - w))
    progress = min(1.0, (i - w + 1) / (t - w))
    return lr * (1 + math.cos(math.pi * progress)) / 2


def _scheduler_section(scheduler: str, lr: float, warmup_steps: int, total_steps: int) -> dict | None:
    if scheduler == "constant" and warmup_steps == 0:
        return None
    if scheduler == "cosine":
        params = {"total_num_steps": total_steps, "warmup_num_steps": warmup_steps, "warmup_min_ratio": 0.0,
                  "cos_min_ratio": 0.0, "warmup_type": "linear"}
    else:
        params = {"warmup_min_lr": 0.0, "warmup_max_lr": lr, "warmup_num_steps": warmup_steps, "warmup_type": "linear"}
        if scheduler == "linear":
            params["total_num_steps"] = total_steps
    return {"type": _DEEPSPEED_SCHEDULER[scheduler], "params": params}


def _cpu_has_fp16() -> bool:
    """What DeepSpeed's CPU accelerator answers for `is_fp16_supported` (oneDNN fp16 kernels)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def _dtype_sections(dtype: str, zero_stage: int, train: bool) -> dict:
    if dtype == "bfloat16":
        sections: dict[str, Any] = {"bf16": {"enabled": True}}
        if train and zero_stage > 0:
            sections["data_types"] = {"grad_accum_dtype": "fp32"}
        return sections
    if dtype == "float16":
        # loss_scale 0 = dynamic loss scaling, starting at 2**16.
        return {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}}
    return {}


def build_deepspeed_config(
    *,
    zero_stage: int,
    micro_batch_size_per_rank: int,
    world_size: int,
    grad_accum_steps: int = 1,
    dtype: str = "float32",
    grad_clip: float = 1.0,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    lr: float = 1e-5,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    warmup_steps: int = 0,
    total_steps: int = 1,
    scheduler: str = "constant",
    train: bool = True,
    on_cuda: bool | None = None,
    torch_adam: bool | None = None,
    model_numel: int | None = None,
    largest_param_numel: int | None = None,
) -> dict:
    """A DeepSpeed config dict for one role.

    Batch: `train_batch_size = micro_batch_size_per_rank * grad_accum_steps *
    world_size` sequences per optimizer step. `grad_clip` clips the global
    gradient norm (0 turns clipping off). Optimizer: AdamW with `lr`,
    `weight_decay`, `betas`, `eps`; schedule `scheduler` over `total_steps`
    optimizer steps after `warmup_steps` of linear warm-up (see the module
    docstring for the exact values).

    `train=False` is for frozen roles (reference, reward): no optimizer,
    scheduler or clipping; `zero_stage` 3 partitions the weights across ranks
    (gathered on the fly during forward passes), 0 keeps a full copy on each;
    the optimizer and schedule arguments are ignored.

    `on_cuda` (default: whether CUDA is visible here) and `torch_adam`
    (default: on CPU only) choose what can run, as the module docstring says;
    build the config inside the actor that runs it.

    `model_numel` (the model's parameter count) and `largest_param_numel`
    size ZeRO to the model (`zero_buckets`): DeepSpeed's default reduce bucket
    of 5e8 elements is allocated up front and held (2 GB in fp32), and its
    ZeRO-3 persistence threshold of 1e5 elements would leave every weight of a
    small model unpartitioned. `None` keeps DeepSpeed's defaults.
    """
    _require(zero_stage in (0, 1, 2, 3), f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    _require(dtype in DTYPES, f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    _require(micro_batch_size_per_rank >= 1, f"micro_batch_size_per_rank must be >= 1, got {micro_batch_size_per_rank}")
    _require(grad_accum_steps >= 1, f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
    _require(world_size >= 1, f"world_size must be >= 1, got {world_size}")
    _require(not offload_params or zero_stage == 3,
             f"offload_params needs ZeRO stage 3 (only stage 3 partitions parameters), got zero_stage={zero_stage}: "
             "set zero_stage 3 or turn offload_params off")
    on_cuda = torch.cuda.is_available() if on_cuda is None else on_cuda
    _require(dtype != "float16" or on_cuda or _cpu_has_fp16(),
             "dtype float16 needs CUDA here: DeepSpeed's CPU accelerator runs fp16 only on CPUs with AMX-FP16, "
             "which this one lacks; use bfloat16 or float32 on CPU")

    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size_per_rank,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size_per_rank * grad_accum_steps * world_size,
        "steps_per_print": _QUIET_STEPS,
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": zero_stage},
        **_dtype_sections(dtype, zero_stage, train),
    }
    zero = config["zero_optimization"]
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_cuda}
    if zero_stage == 3:
        # Lets `save_16bit_model` / export gather the full weights from the partitions.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if model_numel is not None and zero_stage >= 1:
        zero.update(zero_buckets(zero_stage, model_numel, largest_param_numel or model_numel))

    if not train:
        _require(zero_stage in (0, 3),
                 f"zero_stage {zero_stage} partitions optimizer state and gradients, which a frozen role does not "
                 "have: use 0 (full copy per rank) or 3 (weights partitioned across ranks)")
        _require(not offload_optimizer, "offload_optimizer is set for a frozen role, which has no optimizer: "
                                        "turn it off, or use offload_params with zero_stage 3")
        return config

    check_lr_schedule(scheduler, lr, warmup_steps, total_steps)
    _require(grad_clip >= 0, f"grad_clip must be >= 0 (0 turns clipping off), got {grad_clip}")
    _require(weight_decay >= 0, f"weight_decay must be >= 0, got {weight_decay}")
    _require(eps > 0, f"eps must be > 0, got {eps}")
    _require(len(betas) == 2 and all(0 <= b < 1 for b in betas), f"betas must be two numbers in [0, 1), got {betas}")
    _require(not offload_optimizer or zero_stage >= 1,
             "offload_optimizer needs ZeRO stage 1, 2 or 3 (stage 0 keeps no partitioned optimizer state to "
             "offload): raise zero_stage or turn offload_optimizer off")
    torch_adam = (not on_cuda) if torch_adam is None else torch_adam

    config["gradient_clipping"] = float(grad_clip)
    config["optimizer"] = {
        "type": "AdamW",
        "params": {"lr": lr, "betas": [float(b) for b in betas], "eps": eps, "weight_decay": weight_decay,
                   "torch_adam": torch_adam},
    }
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_cuda}
        if torch_adam:
            config["zero_force_ds_cpu_optimizer"] = False
    schedule = _scheduler_section(scheduler, lr, warmup_steps, total_steps)
    if schedule is not None:
        config["scheduler"] = schedule
    return config
