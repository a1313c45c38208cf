"""Plan a job config: the planner's settings read from a `JobConfig`, exactly
as the drivers and `runtime/deepspeed_config.py` would run it.

What is read, per role (policy, critic, reference, reward, rollout; a role is
named as its config section and its `memory/<role>/...` metrics):

- which roles exist: the algorithm's registry entry (critic? reference with
  kl_coef > 0? greedy baseline? samples per prompt?), a reward model unless
  `reward.rule` is set; offline objectives train the policy (or the reward
  model for `rm`) beside an optional frozen reference;
- the model shape (`load_shape` of `model.name_or_path`, or `model` for every
  role when given: a shipped preset such as llama-7b, or a config.json);
- dtype: `auto` is fp32 on CPU and bf16 on GPU (`models.loading.resolve_dtype`);
  bf16 at ZeRO 1-3 accumulates gradients in fp32, as `build_deepspeed_config` sets;
- optimizer: torch AdamW on CPU (one 4-byte `step` tensor per parameter
  tensor), DeepSpeed's fused/CPU Adam on GPU; one param group (`TrainEngine`
  passes every trainable parameter in one list);
- ZeRO stage, offload, and the bucket sizes of `zero_buckets` (the same rule
  DeepSpeed is configured with); stage 3 overlaps communication (DeepSpeed's
  default), stages 1/2 do not;
- batch shape: a trained role's micro-batch is `min(micro_batch_size, rows
  per rank per optimizer step)` as in `TrainEngine`; preference pairs run
  chosen and rejected rows in one pass (twice the rows); a sequence is
  `max_prompt_length + rollout.max_new_tokens` online, `max_length` offline;
- devices: a role has `num_ranks * num_gpus_per_rank` GPUs, or on CPU one
  process per rank (its "device"); ranks sharing a GPU add up on it; roles in
  one `placement.colocate` group share the group's devices. `gpus=N` instead
  puts every role on the same N GPUs, one rank (or engine) per GPU.
"""

from __future__ import annotations

import dataclasses
import math

from rlhf_ray.config.schema import DEFAULT_LORA_TARGETS, ConfigError, JobConfig
from rlhf_ray.job_plan import plan_job, with_algorithm
from rlhf_ray.planner.layout import ROLES, LayoutPlan, plan_group
from rlhf_ray.planner.memory import (
    GiB,
    InferenceSettings,
    RolePlan,
    RolloutSettings,
    TrainSettings,
    plan_frozen_role,
    plan_rollout,
    plan_trained_role,
    trained_state_bytes,
)
from rlhf_ray.planner.shapes import ModelShape, load_shape, param_tensors
from rlhf_ray.planner.zero import ZeroConfig, frozen_state_bytes
from rlhf_ray.sizing import zero_buckets

_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def planner_dtype(dtype: str, on_gpu: bool) -> str:
    """A config dtype as the planner names it; `auto` is bf16 on GPU and fp32 on CPU."""
    if dtype == "auto":
        return "bf16" if on_gpu else "fp32"
    return _DTYPES[dtype]


def role_shape(key: str, name_or_path: str, model: str | None) -> ModelShape:
    """The shape of the model at `name_or_path` (`model` replaces it when given)."""
    from rlhf_ray.models.sources import local_model_path  # a .gguf file or shipped model: its converted folder

    try:
        return load_shape(local_model_path(model or name_or_path))
    except FileNotFoundError:
        if model:
            raise
        raise ConfigError(f"{key}: {name_or_path!r} is neither a shipped preset nor a local folder or config.json, "
                          "so its shape is unknown here (nothing is downloaded); give --model with a preset "
                          "such as llama-7b or the path of its config.json") from None


@dataclasses.dataclass(frozen=True)
class _Roles:
    """What the algorithm asks for, read from the registry."""

    trained: tuple[tuple[str, str], ...]   # (role, head) of trained models
    frozen: tuple[tuple[str, str], ...]    # (role, head) of frozen models
    rollout_sequences: int                 # sequences generated per step (0: offline)
    rows_per_optimizer_step: int           # rows of a trained role's optimizer step
    pairs: bool                            # chosen and rejected rows in one forward


def _roles(cfg: JobConfig) -> _Roles:
    plan, a, batch = plan_job(cfg), cfg.algorithm, cfg.run.batch_size
    trained = tuple((role, plan.head(role)) for role in plan.trained)
    frozen = tuple((role, plan.head(role)) for role in plan.frozen)
    if plan.online:
        online = plan.declaration
        n = a.samples_per_prompt or online.default_samples_per_prompt
        sequences = batch * n + (batch if online.needs_greedy else 0)
        return _Roles(trained, frozen, sequences, batch * n // a.num_minibatches, False)
    return _Roles(trained, frozen, 0, batch, _pairs(plan.declaration))


def on_gpu(cfg: JobConfig, gpus: int | None = None) -> bool:
    """Whether the job runs on GPUs: `gpus` given, or any role asks for GPUs."""
    roles = (cfg.policy, cfg.critic, cfg.reference, cfg.reward)
    return gpus is not None or any(r.num_gpus_per_rank > 0 for r in roles) or cfg.rollout.num_gpus_per_engine > 0


def _devices(ranks: int, gpus_per_rank: float) -> tuple[int, int]:
    """(devices, ranks per device): GPUs the ranks span, or one CPU process per rank."""
    if gpus_per_rank <= 0:
        return ranks, 1
    devices = max(1, math.ceil(ranks * gpus_per_rank - 1e-9))
    return devices, math.ceil(ranks / devices)


def _zero(stage: int, shape: ModelShape, head: str, offload_optimizer: bool, offload_params: bool) -> ZeroConfig:
    tensors = param_tensors(shape, head)
    buckets = zero_buckets(stage, sum(t.numel for t in tensors), max(t.numel for t in tensors))
    extra = {}
    if stage == 3:
        extra = {"param_persistence_threshold": buckets["stage3_param_persistence_threshold"],
                 "prefetch_bucket_size": buckets["stage3_prefetch_bucket_size"]}
    return ZeroConfig(stage=stage, offload_optimizer=offload_optimizer, offload_params=offload_params,
                      reduce_bucket_size=buckets["reduce_bucket_size"], overlap_comm=stage == 3, **extra)


def _scaled(plan: RolePlan, ranks_per_device: int) -> RolePlan:
    """Several ranks of one role on each device: their bytes add up there."""
    if ranks_per_device == 1:
        return plan
    k = ranks_per_device
    return dataclasses.replace(
        plan, gpu={c: k * b for c, b in plan.gpu.items()}, resident=k * plan.resident,
        phases={p: k * b for p, b in plan.phases.items()}, host={c: k * b for c, b in plan.host.items()},
        notes=plan.notes + (f"{k} ranks share each device",))


@dataclasses.dataclass(frozen=True)
class PlannedRole:
    """One role of a config as the planner sees it."""

    role: str
    head: str
    shape: ModelShape
    settings: TrainSettings | InferenceSettings | RolloutSettings
    ranks: int
    """Data-parallel ranks (ZeRO's dp size); rollout engines for the rollout role."""
    devices: int
    """GPUs the role spans (CPU: processes)."""
    ranks_per_device: int


def planned_roles(cfg: JobConfig, *, model: str | None = None, gpus: int | None = None) -> tuple[PlannedRole, ...]:
    """Every role `cfg` creates, with the settings it runs with (see the module docstring)."""
    roles = _roles(cfg)
    sections = {role: getattr(cfg, role) for role, _ in roles.trained + roles.frozen}
    online = roles.rollout_sequences > 0
    gpu = on_gpu(cfg, gpus)
    policy_path = cfg.policy.model.name_or_path
    paths = {"policy": ("policy.model.name_or_path", policy_path),
             "reference": ("reference.model.name_or_path", cfg.reference.model.name_or_path or policy_path),
             "reward": ("reward.model.name_or_path", cfg.reward.model.name_or_path),
             # InstructGPT starts the critic from the reward model, else from the policy with a new head.
             "critic": ("critic.init_from", cfg.reward.model.name_or_path if cfg.critic.init_from == "reward"
                        else policy_path)}
    shapes = {role: role_shape(*paths[role], model) for role in ["policy", *sections]}
    seq_len = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens if online else cfg.data.max_length
    rows = 2 if roles.pairs else 1
    specs = []
    for role, head in roles.trained + roles.frozen:
        section, shape = sections[role], shapes[role]
        ranks = gpus if gpus is not None else section.num_ranks
        devices, per_device = (gpus, 1) if gpus is not None else _devices(section.num_ranks,
                                                                          section.num_gpus_per_rank)
        dtype = planner_dtype(section.model.dtype, gpu)
        if (role, head) in roles.trained:
            micro = min(section.micro_batch_size, max(1, roles.rows_per_optimizer_step // ranks))
            settings = TrainSettings(
                dtype=dtype, zero=_zero(section.zero_stage, shape, head, section.offload_optimizer,
                                        section.offload_params),
                micro_batch_size=rows * micro, seq_len=seq_len,
                # The online policy's LM head scores its response positions only (`models.forward`).
                logits_len=cfg.rollout.max_new_tokens + 1 if online and head == "lm" else None,
                gradient_checkpointing=section.model.gradient_checkpointing,
                optimizer="adamw_fused" if gpu else "adamw_torch",
                grad_accum_dtype="fp32" if dtype == "bf16" and section.zero_stage > 0 else None,
                **_lora(section.lora, shape, role))
        else:
            stage = 3 if section.zero_stage == 3 else 0
            settings = InferenceSettings(
                dtype=dtype, zero=_zero(stage, shape, head, False, section.offload_params),
                micro_batch_size=rows * section.micro_batch_size, seq_len=seq_len)
        specs.append(PlannedRole(role, head, shape, settings, ranks, devices, per_device))
    if online:
        r = cfg.rollout
        tp = r.tensor_parallel_size if r.engine == "vllm" else 1
        devices = gpus if gpus is not None else (r.num_engines * tp if gpu else r.num_engines)
        settings = RolloutSettings(
            engine=r.engine, dtype=planner_dtype(cfg.policy.model.dtype, gpu), tensor_parallel_size=tp,
            gpu_memory_utilization=r.gpu_memory_utilization, num_sequences=roles.rollout_sequences,
            prompt_len=cfg.data.max_prompt_length, response_len=r.max_new_tokens)
        specs.append(PlannedRole("rollout", "lm", shapes["policy"], settings, devices // tp, devices, 1))
    return tuple(specs)


def _lora(lora, shape: ModelShape, role: str) -> dict:
    """TrainSettings' LoRA fields for a role's `lora` section (the architecture's default targets when
    none are named)."""
    if not lora.enabled:
        return {}
    targets = tuple(lora.target_modules) or DEFAULT_LORA_TARGETS.get(shape.model_type)
    if not targets:
        raise ConfigError(f"{role}.lora.target_modules: no default LoRA targets for model type "
                          f"{shape.model_type!r}; name the modules")
    return {"lora_rank": lora.rank, "lora_targets": targets}


def plan_from_config(cfg: JobConfig, *, algorithm: str | None = None, model: str | None = None,
                     gpus: int | None = None, gpu_mem_gib: float = 80.0) -> LayoutPlan:
    """Plan `cfg` (with `algorithm.name` replaced by `algorithm` when given: `--compare`).

    `model`: a preset or config.json used for every role's shape. `gpus`: put
    every role on the same `gpus` GPUs (the hybrid layout) instead of the
    config's placement. `gpu_mem_gib`: memory of one device.
    """
    cfg = with_algorithm(cfg, algorithm)
    plans: dict[str, RolePlan] = {}
    devices: dict[str, int] = {}
    gpu_mem = int(gpu_mem_gib * GiB)
    for spec in planned_roles(cfg, model=model, gpus=gpus):
        if isinstance(spec.settings, RolloutSettings):
            plan = plan_rollout(spec.shape, spec.settings, spec.devices, gpu_mem)
        elif isinstance(spec.settings, TrainSettings):
            plan = plan_trained_role(spec.role, spec.shape, spec.head, spec.settings, spec.ranks)
        else:
            plan = plan_frozen_role(spec.role, spec.shape, spec.head, spec.settings, spec.ranks)
        plans[spec.role] = _scaled(plan, spec.ranks_per_device)
        devices[spec.role] = spec.devices
    return _layout(cfg, plans, devices, gpus, gpu_mem_gib, on_gpu(cfg, gpus))


def held_bytes(cfg: JobConfig, *, algorithm: str | None = None, rank: int = 0) -> dict[str, dict[str, int]]:
    """What each role's `rank` holds after its second step, in the classes `measure_memory` reports
    (`memory/<role>/{params,grads,optimizer}_bytes`, keyed by role): params; grads;
    optimizer = fp32 master weights + optimizer states, device and host bytes alike.

    This is `StateBytes.held_by_category` of the settings `plan_from_config` uses, for one rank
    (ZeRO-1/2 ranks keep different gradients: those of every tensor overlapping their partition).
    The ZeRO-1/2 reduce bucket, set up for a backward pass and freed after it, is not held.
    """
    out = {}
    for spec in planned_roles(with_algorithm(cfg, algorithm)):
        numels = [t.numel for t in param_tensors(spec.shape, spec.head)]
        s = spec.settings
        if isinstance(s, TrainSettings):
            state = trained_state_bytes(spec.shape, spec.head, s, spec.ranks, rank=rank)
        elif isinstance(s, InferenceSettings):
            state = frozen_state_bytes(numels, s.dtype, s.zero, spec.ranks)
        else:  # a rollout engine holds a whole copy of the weights
            state = frozen_state_bytes(numels, s.dtype, ZeroConfig(), 1)
        out[spec.role] = state.held_by_category()
    return out


def _layout(cfg: JobConfig, plans: dict[str, RolePlan], devices: dict[str, int], gpus: int | None,
            gpu_mem_gib: float, gpu: bool) -> LayoutPlan:
    if gpus is not None:
        groups = [tuple(plans)]
    else:
        groups = [tuple(r for r in group if r in plans) for group in cfg.placement.colocate]
        groups = [g for g in groups if g]
        placed = {role for g in groups for role in g}
        groups += [(role,) for role in plans if role not in placed]
    gpu_mem = int(gpu_mem_gib * GiB)
    group_plans = tuple(plan_group([plans[r] for r in g], max(devices[r] for r in g), gpu_mem) for g in groups)
    if gpus is not None:
        notes = [f"every role on the same {gpus} GPU(s), one rank or engine per GPU"]
    else:
        notes = ["placement from the config (placement.colocate, num_ranks, num_gpus_per_rank)"]
        if not gpu:
            notes.append("a CPU config: each 'GPU' is one role process (rank) and its memory")
    return LayoutPlan(algorithm=cfg.algorithm.name, gpu_mem_bytes=gpu_mem,
                      roles=tuple(plans[r] for r in ROLES if r in plans), groups=group_plans, notes=tuple(notes))


__all__ = ["PlannedRole", "held_bytes", "on_gpu", "plan_from_config", "planned_roles", "planner_dtype",
           "role_shape"]


def _pairs(objective) -> bool:
    """Whether each example of the objective's data format is a chosen and a rejected sequence."""
    from rlhf_ray.offline_formats import data_format

    return data_format(objective.data_format).pairs
