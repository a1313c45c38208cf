"""Checks across config sections that must pass before any model loads.

Each check names the key to change and what to set it to. Field-level checks
live in the config dataclasses; resource checks (does the layout fit the
cluster?) run in `runtime/placement.py` just after these.
"""

from __future__ import annotations

from rlhf_ray.algorithms.registry import (
    ParamError,
    get_offline_objective,
    get_online_algorithm,
)
from rlhf_ray.config.schema import ConfigError, JobConfig, RoleConfig
from rlhf_ray.job_plan import plan_job
from rlhf_ray.offline_formats import data_format
from rlhf_ray.runtime.deepspeed_config import DeepSpeedConfigError, check_lr_schedule


def _divisible(batch: int, ranks: int, micro: int, what: str) -> None:
    if batch % ranks:
        raise ConfigError(f"{what}: a global batch of {batch} does not split over {ranks} ranks; "
                          f"make it a multiple of {ranks}")
    per_rank = batch // ranks
    if per_rank % min(micro, per_rank):
        raise ConfigError(f"{what}: each rank gets {per_rank} sequences, not a multiple of micro_batch_size {micro}")


def _check_schedule(role: RoleConfig, name: str, optimizer_steps: int) -> None:
    o = role.optim
    try:
        check_lr_schedule(o.scheduler, o.lr, o.warmup_steps, optimizer_steps)
    except DeepSpeedConfigError as err:
        raise ConfigError(f"{name}.optim: {err} (this job makes {optimizer_steps} optimizer steps)") from None


# Which `algorithm.*` fields each kind of job reads. A field set away from its default that the chosen
# algorithm does not read is an error naming the ones it does (it would otherwise be silently ignored).
ONLINE_FIELDS = ("samples_per_prompt", "kl_coef", "kl_estimator", "adaptive_kl", "kl_target", "kl_horizon",
                 "clip_eps", "dual_clip", "value_clip_eps", "gamma", "lam", "ppo_epochs", "num_minibatches",
                 "whiten_advantages", "normalize_rewards", "no_eos_penalty", "ptx_coef", "loss_aggregation",
                 "clip_eps_low", "clip_eps_high", "overlong_buffer", "overlong_penalty", "dynamic_sampling",
                 "dynamic_sampling_max_draws")
MISMATCH_FIELDS = ("rollout_is", "rollout_is_cap", "max_logprob_diff")  # every online algorithm's policy loss
OFFLINE_COMMON_FIELDS = ("params", "precompute_reference", "spin_iterations", "sdpo_stages")
OFFLINE_FIELDS_BY_OBJECTIVE = {"rm": ("rm_zero_mean",), "sft": ("loss_aggregation",),
                               "kl_sft": ("loss_aggregation",)}


def fields_read(cfg: JobConfig) -> set[str]:
    """The `algorithm.*` fields the job's algorithm or objective reads."""
    name, a = cfg.algorithm.name, cfg.algorithm
    if plan_job(cfg).online:
        algorithm = get_online_algorithm(name)
        unread = set(algorithm.policy_loss.unused) | ({"gamma", "lam"} - set(algorithm.discounts))
        if a.clip_eps_low and a.clip_eps_high:
            unread.add("clip_eps")  # both sides of the clip range are set (dapo and gspo start so)
        if not a.dynamic_sampling:
            unread.add("dynamic_sampling_max_draws")
        if not a.overlong_buffer:
            unread.add("overlong_penalty")
        return {"name", *ONLINE_FIELDS, *MISMATCH_FIELDS} - unread
    return {"name", *OFFLINE_COMMON_FIELDS, *OFFLINE_FIELDS_BY_OBJECTIVE.get(get_offline_objective(name).name, ())}


def check_fields_read(cfg: JobConfig) -> None:
    """Refuse `algorithm.*` values the chosen algorithm would ignore."""
    from dataclasses import fields

    from rlhf_ray.config.schema import AlgorithmConfig

    defaults = AlgorithmConfig()
    read = fields_read(cfg)
    ignored = sorted(f.name for f in fields(AlgorithmConfig)
                     if f.name not in read and getattr(cfg.algorithm, f.name) != getattr(defaults, f.name))
    if ignored:
        uses = ", ".join(f"algorithm.{k}" for k in sorted(read - {"name"})) or "none"
        hint = (" (algorithm.params holds an offline objective's parameters; online algorithms take theirs as "
                "algorithm.* keys)") if "params" in ignored else ""
        raise ConfigError(f"algorithm.{ignored[0]}: {cfg.algorithm.name} does not read "
                          f"{', '.join('algorithm.' + k for k in ignored)}; remove it{hint}. "
                          f"{cfg.algorithm.name} reads: {uses}")


def objective_params(cfg: JobConfig) -> dict[str, float | None]:
    """The offline objective's parameters: `algorithm.params` checked against the registry entry,
    defaults filled in. An unknown key or a value out of range is a ConfigError naming the key."""
    objective = get_offline_objective(cfg.algorithm.name)
    try:
        return objective.resolve_params(cfg.algorithm.params)
    except ParamError as err:
        if err.key in objective.params:
            raise ConfigError(f"algorithm.params.{err.key}: {err}") from None
        described = "; ".join(objective.describe_params().splitlines())
        raise ConfigError(f"algorithm.params: {err} Parameters of {objective.name}: {described}") from None


def samples_per_prompt(cfg: JobConfig) -> int:
    algorithm = get_online_algorithm(cfg.algorithm.name)
    return cfg.algorithm.samples_per_prompt or algorithm.default_samples_per_prompt


def validate_offline(cfg: JobConfig, produced: tuple[str, ...] = ()) -> None:
    objective = get_offline_objective(cfg.algorithm.name)
    check_fields_read(cfg)
    check_lora(cfg, "offline", produced)
    objective_params(cfg)
    if objective.needs_reference and not cfg.reference.enabled:
        raise ConfigError(f"algorithm.name: {objective.name} needs a reference model, but reference.enabled is "
                          "false; set reference.enabled=true (or pick a reference-free objective: sft, slic, simpo)")
    if cfg.algorithm.spin_iterations and cfg.algorithm.sdpo_stages > 1:
        raise ConfigError("algorithm.spin_iterations and algorithm.sdpo_stages are both set; pick one schedule")
    if (cfg.algorithm.spin_iterations or cfg.algorithm.sdpo_stages > 1) and \
            not data_format(objective.data_format).schedules:
        raise ConfigError(f"SPIN and sDPO are schedules over a preference objective (dpo, ipo, ...); "
                          f"{objective.name} trains on {objective.data_format} data")
    if (cfg.algorithm.spin_iterations or cfg.algorithm.sdpo_stages > 1) and not objective.needs_reference:
        raise ConfigError(f"SPIN and sDPO move the reference between stages; {objective.name} has no reference")
    if cfg.algorithm.precompute_reference and objective.needs_reference:
        if objective.needs_sequence_kl or not data_format(objective.data_format).reference_cacheable:
            raise ConfigError(f"algorithm.precompute_reference: {objective.name} needs the reference on every batch "
                              "(full token distributions for TDPO, in-batch mismatched pairs for KTO); set it false")
        if cfg.algorithm.spin_iterations or cfg.algorithm.sdpo_stages > 1:
            raise ConfigError("algorithm.precompute_reference: SPIN and sDPO change the reference between stages; "
                              "set it false")
    name = "reward" if objective.trains == "reward_model" else "policy"
    role = getattr(cfg, name)
    _check_schedule(role, name, cfg.run.total_steps)
    rows = cfg.run.batch_size
    _divisible(rows, role.num_ranks, role.micro_batch_size, "run.batch_size")
    spin = cfg.algorithm.spin_iterations
    if spin and cfg.run.total_steps < spin:
        raise ConfigError(f"run.total_steps {cfg.run.total_steps} is fewer than algorithm.spin_iterations {spin}")


def validate_online(cfg: JobConfig, produced: tuple[str, ...] = ()) -> None:
    algorithm = get_online_algorithm(cfg.algorithm.name)
    check_fields_read(cfg)
    check_lora(cfg, "online", produced)
    n = samples_per_prompt(cfg)
    if n < algorithm.min_samples_per_prompt:
        raise ConfigError(f"algorithm.samples_per_prompt: {algorithm.name} compares samples within a group and "
                          f"needs at least {algorithm.min_samples_per_prompt} per prompt; got {n}")
    if cfg.algorithm.dynamic_sampling and n < 2:
        raise ConfigError(f"algorithm.dynamic_sampling compares the rewards of a prompt's samples and needs "
                          f"samples_per_prompt >= 2; got {n}: raise algorithm.samples_per_prompt or set "
                          "algorithm.dynamic_sampling=false")
    if cfg.algorithm.overlong_buffer > cfg.rollout.max_new_tokens:
        raise ConfigError(f"algorithm.overlong_buffer: {cfg.algorithm.overlong_buffer} tokens is longer than the "
                          f"longest response, rollout.max_new_tokens={cfg.rollout.max_new_tokens}; make it at most "
                          "that (the paper: a fifth of it)")
    if algorithm.needs_reference and not cfg.reference.enabled and cfg.algorithm.kl_coef > 0:
        raise ConfigError(f"reference.enabled: {algorithm.name} with kl_coef > 0 needs the reference model; "
                          "set reference.enabled=true or algorithm.kl_coef=0")
    a = cfg.algorithm
    try:
        algorithm.kl.estimator(a.kl_estimator)
    except ValueError as err:
        raise ConfigError(f"algorithm.kl_estimator: {algorithm.name} puts the KL in its loss, and {err}") from None
    if not algorithm.policy_loss.uses_ratio and (a.ppo_epochs > 1 or a.num_minibatches > 1):
        raise ConfigError(f"algorithm.ppo_epochs/num_minibatches: {algorithm.name}'s REINFORCE loss has no importance "
                          f"ratio, so a second pass (ppo_epochs={a.ppo_epochs}) or minibatch "
                          f"(num_minibatches={a.num_minibatches}) would train on samples of an older policy; set both "
                          "to 1, or use a clipped-ratio algorithm (ppo, grpo)")
    if not cfg.reward.rule and not cfg.reward.model.name_or_path:
        raise ConfigError("reward: give reward.rule (module:function) or reward.model.name_or_path (a reward model)")
    if not cfg.reward.rule:
        check_reward_tokenizer(cfg, produced)
    if cfg.rollout.engine == "vllm":
        check_vllm_available(cfg, produced)
    optimizer_steps = cfg.run.total_steps * cfg.algorithm.ppo_epochs * cfg.algorithm.num_minibatches
    _check_schedule(cfg.policy, "policy", optimizer_steps)
    if algorithm.needs_critic:
        _check_schedule(cfg.critic, "critic", optimizer_steps)
    rows = cfg.run.batch_size * n
    minibatch = rows // cfg.algorithm.num_minibatches
    if rows % cfg.algorithm.num_minibatches:
        raise ConfigError(f"algorithm.num_minibatches: {rows} rollouts per step (run.batch_size x samples) do not "
                          f"split into {cfg.algorithm.num_minibatches} minibatches")
    _divisible(minibatch, cfg.policy.num_ranks, cfg.policy.micro_batch_size, "policy minibatch")
    if algorithm.needs_critic:
        _divisible(minibatch, cfg.critic.num_ranks, cfg.critic.micro_batch_size, "critic minibatch")
    check_rollout_placement(cfg)
    if algorithm.needs_critic and cfg.critic.init_from == "reward" and cfg.reward.rule:
        raise ConfigError("critic.init_from: reward needs a reward model, but reward.rule is set; "
                          "set critic.init_from=policy")


def check_rollout_placement(cfg: JobConfig) -> None:
    """The engines' tensor-parallel degree fits the GPUs of their bundles, as the job's placement plans them."""
    from rlhf_ray.jobs.common import role_specs
    from rlhf_ray.runtime.role_groups import plan_for
    from rlhf_ray.workers.rollout.vllm.checks import check_tensor_parallel

    check_tensor_parallel(cfg.rollout, plan_for(cfg, role_specs(cfg)).slots["rollout"][0].num_gpus)


def check_reward_tokenizer(cfg: JobConfig, produced: tuple[str, ...] = ()) -> None:
    """A reward model scores the policy's token ids as they are (nothing is decoded and encoded again), so
    its own tokenizer, where it has one, must be the policy's: the same vocabulary and padding. Refused
    otherwise, naming both (a model a job before it in a pipeline will write is not checked)."""
    import os

    from rlhf_ray.models.loading import load_tokenizer_for
    from rlhf_ray.models.sources import local_model_path
    from rlhf_ray.models.tokenizer import TOKENIZER_FILES

    policy_source = cfg.policy.model.tokenizer or cfg.policy.model.name_or_path
    reward_source = cfg.reward.model.tokenizer or cfg.reward.model.name_or_path
    if reward_source == policy_source or any(_made_by_earlier_job(p, produced) for p in (policy_source, reward_source)):
        return
    folder = local_model_path(reward_source)  # a .gguf file or shipped model: its converted folder
    if not cfg.reward.model.tokenizer and not (os.path.isdir(folder) and any(
            os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES)):
        return  # a preset or a folder without a tokenizer: the reward role uses the policy's
    trust = cfg.policy.model.trust_remote_code
    policy_tok, reward_tok = load_tokenizer_for(policy_source, trust_remote_code=trust), \
        load_tokenizer_for(reward_source, trust_remote_code=cfg.reward.model.trust_remote_code)
    if policy_tok.get_vocab() != reward_tok.get_vocab() or policy_tok.pad_token_id != reward_tok.pad_token_id:
        raise ConfigError(f"reward.model: the reward model's tokenizer ({reward_source}, {len(reward_tok)} tokens) is "
                          f"not the policy's ({policy_source}, {len(policy_tok)} tokens); the reward role scores "
                          "the policy's token ids as they are, so it would score other text. Use a reward model "
                          "trained with the policy's tokenizer, or a reward.rule")


def check_vllm_available(cfg: JobConfig, produced: tuple[str, ...] = ()) -> None:
    """`rollout.engine: vllm`: the build for the engines' device is installed, sampling is one the
    log-prob check honours, and prompt plus response fit the model's positions (unless the model is
    one a job before it in a pipeline will write, under one of the `produced` folders)."""
    from rlhf_ray.models.loading import max_positions, read_model_config
    from rlhf_ray.workers.rollout.vllm.checks import check_sampling, check_vllm_runtime

    r = cfg.rollout
    check_vllm_runtime(r)
    check_sampling(r)
    if _made_by_earlier_job(cfg.policy.model.name_or_path, produced):
        return
    config = read_model_config(cfg.policy.model.name_or_path, trust_remote_code=cfg.policy.model.trust_remote_code)
    limit = max_positions(config) if config is not None else None
    wanted = cfg.data.max_prompt_length + r.max_new_tokens
    if limit is not None and wanted > limit:
        raise ConfigError(f"rollout.max_new_tokens: vLLM's max_model_len = data.max_prompt_length "
                          f"({cfg.data.max_prompt_length}) + rollout.max_new_tokens ({r.max_new_tokens}) = {wanted} "
                          f"exceeds the {limit} positions of {cfg.policy.model.name_or_path}; shorten one of them")


def _made_by_earlier_job(path: str, produced: tuple[str, ...]) -> bool:
    return any(str(path).startswith(folder.rstrip("/") + "/") for folder in produced)


def lora_roles(cfg: JobConfig, kind: str) -> dict[str, str]:
    """{trained role with LoRA: the model it starts from} for this job (`kind`: online or offline)."""
    trained: dict[str, str] = {}
    if kind == "online":
        trained["policy"] = cfg.policy.model.name_or_path
        if get_online_algorithm(cfg.algorithm.name).needs_critic:
            trained["critic"] = (cfg.reward.model.name_or_path if cfg.critic.init_from == "reward"
                                 else cfg.policy.model.name_or_path)
    elif get_offline_objective(cfg.algorithm.name).trains == "policy":
        trained["policy"] = cfg.policy.model.name_or_path
    else:
        trained["reward"] = cfg.reward.model.name_or_path
    return {role: model for role, model in trained.items() if getattr(cfg, role).lora.enabled}


def check_lora(cfg: JobConfig, kind: str, produced: tuple[str, ...] = ()) -> None:
    """LoRA settings that cannot work fail here, before any model loads, naming the key."""
    import importlib.util

    import torch

    if cfg.reference.lora.enabled:
        raise ConfigError("reference.lora: the reference is frozen and trains nothing; remove it (a LoRA policy's "
                          "reference is its own base with the adapter off)")
    if kind == "online" and cfg.reward.lora.enabled:
        raise ConfigError("reward.lora: the reward model is frozen in online jobs (LoRA trains a reward model with "
                          "algorithm rm); remove reward.lora")
    roles = lora_roles(cfg, kind)
    for role, model in roles.items():
        settings = getattr(cfg, role)
        if settings.lora.quantize:
            problem = None
            if not torch.cuda.is_available():
                problem = "CUDA, absent on this machine"
            elif importlib.util.find_spec("bitsandbytes") is None:
                problem = "the bitsandbytes package, not installed here"
            if problem:
                raise ConfigError(f"{role}.lora.quantize: a 4-bit base (QLoRA) needs {problem}; set "
                                  f"{role}.lora.quantize= (empty) to train LoRA on the base in its own dtype")
            raise ConfigError(f"{role}.lora.quantize: a 4-bit base under DeepSpeed ZeRO is not supported by this "
                              f"release; set {role}.lora.quantize= (empty) and train LoRA on a bf16 base")
        if model and not _made_by_earlier_job(model, produced):
            from rlhf_ray.models.loading import read_model_config
            from rlhf_ray.models.lora import check_target_modules

            config = read_model_config(model, trust_remote_code=settings.model.trust_remote_code)
            if config is not None:
                check_target_modules(config, settings.lora, f"{role}.lora.target_modules",
                                     settings.model.trust_remote_code)
    if cfg.policy_is_reference and cfg.reference.share_with:
        raise ConfigError(f"reference.share_with: a LoRA policy's reference is its own base with the adapter off, "
                          f"not job {cfg.reference.share_with!r}'s reference group; remove reference.share_with, "
                          "or set reference.model.name_or_path to give this job a reference group of its own")
    lora = cfg.policy.lora
    if kind == "online" and "policy" in roles and cfg.rollout.engine == "vllm" and \
            cfg.rollout.num_gpus_per_engine > 0 and cfg.rollout.weight_transfer == "nccl":
        raise ConfigError("rollout.weight_transfer: nccl broadcasts the policy's parameters as they are, and a LoRA "
                          "policy's are adapters on a frozen base; set rollout.weight_transfer=ipc (the merged "
                          "weights in buckets, or the adapter alone with policy.lora.sync=adapter)")
    if kind == "online" and "policy" in roles and lora.sync == "adapter":
        if cfg.rollout.engine != "vllm":
            raise ConfigError("policy.lora.sync: adapter serves the adapter with vLLM's LoRA support; "
                              f"rollout.engine is {cfg.rollout.engine}: set policy.lora.sync=merged")
        model = cfg.policy.model.name_or_path
        if not _made_by_earlier_job(model, produced):
            from rlhf_ray.models.loading import read_model_config
            from rlhf_ray.workers.rollout.vllm.checks import vllm_supports_lora

            config = read_model_config(model, trust_remote_code=cfg.policy.model.trust_remote_code)
            if config is not None and not vllm_supports_lora(config):
                raise ConfigError(f"policy.lora.sync: adapter needs vLLM LoRA kernels for "
                                  f"{', '.join(config.architectures or [config.model_type])}, which vLLM lacks; set "
                                  "policy.lora.sync=merged (the merged weights, as without LoRA)")


def validate(cfg: JobConfig, produced: tuple[str, ...] = ()) -> str:
    """Run every cross-section check; returns the job kind. `produced`: folders that jobs before this one
    (in a pipeline) will write, whose models cannot be read yet; they are checked when the job starts."""
    kind = plan_job(cfg).kind
    if kind == "online":
        validate_online(cfg, produced)
    else:
        validate_offline(cfg, produced)
    return kind
