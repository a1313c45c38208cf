"""What a job is, computed once from its config: `plan_job(cfg) -> JobPlan`.

Which kind of job (online RL or offline training), the declaration of its algorithm or objective, and its
role groups: which it creates, which it trains, which are frozen, which frozen ones it borrows from
another job of the same cluster (`<role>.share_with`) and which of its own it could lend. The drivers
(`jobs/`), the memory planner (`planner/`), the pipeline runner (`pipeline/runner.py`), validation and
`rlhf-ray bench` all read this one answer instead of working it out from the algorithm's name.

    plan = plan_job(load_config("tiny-ppo"))
    plan.kind     -> "online"
    plan.groups   -> ("policy", "rollout", "reward", "reference", "critic")
    plan.trained  -> ("policy", "critic")
    plan.frozen   -> ("reference", "reward")
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

from rlhf_ray.algorithms.offline import OfflineObjective
from rlhf_ray.algorithms.online import OnlineAlgorithm
from rlhf_ray.algorithms.registry import (
    OFFLINE_OBJECTIVES,
    ONLINE_ALGORITHMS,
    UnknownAlgorithmError,
    get_offline_objective,
    get_online_algorithm,
)
from rlhf_ray.config.schema import ConfigError, JobConfig

HEADS = {"policy": "lm", "reference": "lm", "critic": "scalar", "reward": "scalar"}
"""The output head of each model role: a causal LM, or a scalar per sequence (value, reward)."""


@dataclass(frozen=True)
class JobPlan:
    """One job's kind, declaration and role groups (see the module docstring)."""

    kind: str
    """"online" (a rollout engine samples, the policy learns from rewards) or "offline" (fixed data)."""
    declaration: OnlineAlgorithm | OfflineObjective
    """The registry entry of `algorithm.name`."""
    groups: tuple[str, ...]
    """Every role group the job has, in the order they are created: its own and borrowed ones."""
    trained: tuple[str, ...]
    """The groups whose weights the job trains: "policy", "critic", or "reward" (a reward-model trainer)."""
    frozen: tuple[str, ...]
    """The groups that hold a frozen model: "reference", and "reward" when a model (not a rule) scores."""
    borrowed: Mapping[str, str]
    """Frozen group -> the job it borrows that group from."""
    lendable: tuple[str, ...]
    """Frozen groups of its own another job may borrow: not borrowed, and not moved or freed in the run."""
    uses_reference: bool
    """Log-probs of a frozen reference enter the loss or reward (a group's, or a LoRA policy's base)."""
    lora_reference: bool
    """The reference is the LoRA policy's base with the adapter off: the policy answers, no group exists."""

    @property
    def online(self) -> bool:
        return self.kind == "online"

    def head(self, role: str) -> str:
        """"lm" or "scalar": what the role's model outputs."""
        return HEADS[role]


def declaration_of(name: str) -> OnlineAlgorithm | OfflineObjective:
    """The registry entry of an online algorithm or offline objective; an unknown name lists both families."""
    try:
        return get_online_algorithm(name)
    except UnknownAlgorithmError:
        pass
    try:
        return get_offline_objective(name)
    except UnknownAlgorithmError as err:
        known = ", ".join(list(ONLINE_ALGORITHMS) + list(OFFLINE_OBJECTIVES))
        raise ConfigError(f"algorithm.name: {err} Online and offline names: {known}") from None


def plan_job(cfg: JobConfig) -> JobPlan:
    """The plan of `cfg`; raises ConfigError for an unknown `algorithm.name`."""
    declaration = declaration_of(cfg.algorithm.name)
    a = cfg.algorithm
    if isinstance(declaration, OnlineAlgorithm):
        kind = "online"
        trained = ("policy", "critic") if declaration.needs_critic else ("policy",)
        uses_reference = declaration.needs_reference and a.kl_coef > 0
        lora_reference = uses_reference and cfg.policy_is_reference
        reference = uses_reference and not lora_reference
        groups = ("policy", "rollout", "reward") + (("reference",) if reference else ()) + trained[1:]
        frozen = (("reference",) if reference else ()) + (() if cfg.reward.rule else ("reward",))
        # A frozen group moved or freed during the run is the job's alone.
        stable = frozen
    else:
        kind = "offline"
        trained = ("policy",) if declaration.trains == "policy" else ("reward",)
        uses_reference = declaration.needs_reference
        lora_reference = uses_reference and trained == ("policy",) and cfg.policy_is_reference
        reference = uses_reference and not lora_reference
        groups = trained + (("reference",) if reference else ())
        frozen = ("reference",) if reference else ()
        # Precomputed reference log-probs free the group after the first pass; SPIN and sDPO move it
        # to the latest policy between stages.
        stable = () if a.precompute_reference or a.spin_iterations or a.sdpo_stages > 1 else frozen
    borrowed = {role: getattr(cfg, role).share_with for role in frozen if getattr(cfg, role).share_with}
    lendable = tuple(role for role in stable if role not in borrowed)
    return JobPlan(kind=kind, declaration=declaration, groups=groups, trained=trained, frozen=frozen,
                   borrowed=borrowed, lendable=lendable, uses_reference=uses_reference,
                   lora_reference=lora_reference)


def with_algorithm(cfg: JobConfig, name: str | None) -> JobConfig:
    """`cfg` with `algorithm.name` replaced by `name` (unchanged for None): the planner's and bench's
    comparisons of algorithms on one config."""
    if name is None:
        return cfg
    return dataclasses.replace(cfg, algorithm=dataclasses.replace(cfg.algorithm, name=name))
