"""Every algorithm declared once, as data, so the drivers never branch on a name.

An `OnlineAlgorithm` says what the online loop must produce (critic values?
reference log-probs? a greedy rollout? how many samples per prompt?), where
the KL to the reference goes, which policy loss to use, and computes its
advantages through one keyword signature shared by all five algorithms.

An `OfflineObjective` says which data format it trains on, whether it needs
the reference model (or TDPO's sequential KL), which model it trains, and
computes its loss through `loss(inputs, params)`, where `inputs` is the batch
dataclass of its data format and `params` a plain dict of numbers.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

from torch import Tensor

from rlhf_ray.algorithms.advantages import (
    gae,
    grpo_advantages,
    reinforce_pp_advantages,
    remax_advantages,
    rloo_advantages,
    whiten,
)
from rlhf_ray.algorithms.objectives import (
    OFFLINE_ADAPTERS,
    KTOBatch,
    PreferenceBatch,
    RankedRewardBatch,
    RewardPairBatch,
    SFTBatch,
)

__all__ = [
    "OnlineAlgorithm",
    "OfflineObjective",
    "ONLINE_ALGORITHMS",
    "OFFLINE_OBJECTIVES",
    "UnknownAlgorithmError",
    "get_online_algorithm",
    "get_offline_objective",
    "PreferenceBatch",
    "SFTBatch",
    "KTOBatch",
    "RewardPairBatch",
    "RankedRewardBatch",
]

KL_PLACEMENTS = ("reward", "loss")
POLICY_LOSSES = ("ppo_clip", "reinforce")
DATA_FORMATS = ("sft", "preference", "kto", "ranked_or_preference")
TRAINS = ("policy", "reward_model")
ADVANTAGE_INPUTS = ("token_rewards", "sequence_rewards", "greedy_rewards", "values")

AdvantageFn = Callable[..., "tuple[Tensor, Tensor | None]"]


@dataclass(frozen=True)
class OnlineAlgorithm:
    """One online RL algorithm, as the driver needs to know it."""

    name: str
    description: str
    needs_critic: bool
    """A trainable value model (critic actor group) is built and updated."""
    needs_reference: bool
    """Reference log-probs are computed for the KL term."""
    needs_greedy: bool
    """The rollout also decodes one greedy response per prompt (ReMax's baseline)."""
    min_samples_per_prompt: int
    default_samples_per_prompt: int
    kl_placement: str
    """"reward": KL folded into the token rewards (`kl.token_level_rewards`);
    "loss": a k3 KL term added to the policy loss (`kl.kl_loss`), as in GRPO."""
    policy_loss: str
    """"ppo_clip" (`ppo_policy_loss`) or "reinforce" (`reinforce_policy_loss`)."""
    advantage_inputs: tuple[str, ...]
    """Which of token_rewards / sequence_rewards / greedy_rewards / values the
    advantage function reads; the others may be None."""
    advantage_fn: AdvantageFn = field(repr=False)

    def __post_init__(self) -> None:
        if self.kl_placement not in KL_PLACEMENTS:
            raise ValueError(f"{self.name}: kl_placement must be one of {KL_PLACEMENTS}; got {self.kl_placement!r}.")
        if self.policy_loss not in POLICY_LOSSES:
            raise ValueError(f"{self.name}: policy_loss must be one of {POLICY_LOSSES}; got {self.policy_loss!r}.")
        unknown = set(self.advantage_inputs) - set(ADVANTAGE_INPUTS)
        if unknown:
            raise ValueError(f"{self.name}: unknown advantage inputs {sorted(unknown)}; known {ADVANTAGE_INPUTS}.")
        if not 1 <= self.min_samples_per_prompt <= self.default_samples_per_prompt:
            raise ValueError(f"{self.name}: need 1 <= min_samples_per_prompt <= default_samples_per_prompt.")

    def compute_advantages(
        self,
        *,
        response_mask: Tensor,
        token_rewards: Tensor | None = None,
        sequence_rewards: Tensor | None = None,
        greedy_rewards: Tensor | None = None,
        values: Tensor | None = None,
        group_size: int = 1,
        gamma: float = 1.0,
        lam: float = 0.95,
        whiten_advantages: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Advantages `[B, T]` and, for critic-based algorithms, returns `[B, T]` (else None).

        Args:
            response_mask: `[B, T]`.
            token_rewards: `[B, T]` KL-shaped rewards (`kl.token_level_rewards`).
            sequence_rewards: `[B]` raw reward of each sampled response.
            greedy_rewards: `[B]` reward of the greedy response to each sample's prompt.
            values: `[B, T]` critic values at rollout time.
            group_size: samples per prompt, each prompt's samples consecutive.
            gamma, lam: discount and GAE lambda (algorithms without a critic ignore lam).
            whiten_advantages: normalise advantages over the batch (ignored by
                grpo and reinforce_pp, which normalise by construction).
        """
        given = {
            "token_rewards": token_rewards,
            "sequence_rewards": sequence_rewards,
            "greedy_rewards": greedy_rewards,
            "values": values,
        }
        missing = [name for name in self.advantage_inputs if given[name] is None]
        if missing:
            raise ValueError(
                f"Algorithm {self.name!r} computes advantages from {', '.join(self.advantage_inputs)}; "
                f"{', '.join(missing)} {'was' if len(missing) == 1 else 'were'} not given."
            )
        if group_size < self.min_samples_per_prompt:
            raise ValueError(
                f"Algorithm {self.name!r} needs at least {self.min_samples_per_prompt} samples per prompt; "
                f"got group_size={group_size}. Raise the rollout's samples per prompt."
            )
        return self.advantage_fn(
            response_mask=response_mask,
            group_size=group_size,
            gamma=gamma,
            lam=lam,
            whiten_advantages=whiten_advantages,
            **given,
        )


@dataclass(frozen=True)
class OfflineObjective:
    """One offline training objective, as the offline driver needs to know it."""

    name: str
    description: str
    data_format: str
    """"sft", "preference", "kto" or "ranked_or_preference" (reward models)."""
    needs_reference: bool
    """The frozen reference model scores every batch."""
    trains: str
    """"policy" (a causal LM) or "reward_model" (a scalar head)."""
    needs_sequence_kl: bool
    """TDPO: the batch carries `chosen_seq_kl` / `rejected_seq_kl`, which need
    full-vocabulary log-probs of policy and reference."""
    param_defaults: Mapping[str, float]
    """The keys of `params` this objective reads, with their defaults."""
    loss_fn: Callable[[Any, Mapping[str, float]], "tuple[Tensor, dict[str, Tensor]]"] = field(repr=False)

    def __post_init__(self) -> None:
        if self.data_format not in DATA_FORMATS:
            raise ValueError(f"{self.name}: data_format must be one of {DATA_FORMATS}; got {self.data_format!r}.")
        if self.trains not in TRAINS:
            raise ValueError(f"{self.name}: trains must be one of {TRAINS}; got {self.trains!r}.")
        object.__setattr__(self, "param_defaults", MappingProxyType(dict(self.param_defaults)))

    def resolve_params(self, params: Mapping[str, Any] | None = None) -> dict[str, float]:
        """This objective's own keys from `params`, defaults filled in; other keys are ignored."""
        params = params or {}
        return {
            key: params[key] if params.get(key) is not None else default
            for key, default in self.param_defaults.items()
        }

    def loss(self, inputs: Any, params: Mapping[str, Any] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """`(scalar loss, metrics)` for one batch of this objective's data format."""
        return self.loss_fn(inputs, self.resolve_params(params))


# --- online advantage adapters: one keyword signature, each reads its own inputs ---


def _sequence_return(token_rewards: Tensor, response_mask: Tensor) -> Tensor:
    """Undiscounted return of each response: the sum of its token rewards, `[B]`."""
    return (token_rewards * response_mask.to(token_rewards.dtype)).sum(dim=-1)


def _maybe_whiten(advantages: Tensor, response_mask: Tensor, whiten_advantages: bool) -> Tensor:
    return whiten(advantages, response_mask) if whiten_advantages else advantages


def _ppo(*, token_rewards, values, response_mask, gamma, lam, whiten_advantages, **_):
    advantages, returns = gae(token_rewards, values, response_mask, gamma, lam)
    return _maybe_whiten(advantages, response_mask, whiten_advantages), returns


def _remax(*, token_rewards, greedy_rewards, response_mask, whiten_advantages, **_):
    # The sample's KL-shaped return minus the greedy response's reward. The
    # greedy response is not KL-shaped (that would cost two more forward
    # passes); a baseline that does not depend on the sample keeps the
    # gradient unbiased either way.
    sampled = _sequence_return(token_rewards, response_mask)
    advantages = remax_advantages(sampled, greedy_rewards, response_mask)
    return _maybe_whiten(advantages, response_mask, whiten_advantages), None


def _grpo(*, sequence_rewards, response_mask, group_size, **_):
    # GRPO puts the KL in the loss, so its advantages use the raw rewards.
    return grpo_advantages(sequence_rewards, group_size, response_mask), None


def _rloo(*, token_rewards, response_mask, group_size, whiten_advantages, **_):
    # Ahmadian et al. apply the leave-one-out baseline to the KL-shaped return.
    sampled = _sequence_return(token_rewards, response_mask)
    advantages = rloo_advantages(sampled, group_size, response_mask)
    return _maybe_whiten(advantages, response_mask, whiten_advantages), None


def _reinforce_pp(*, token_rewards, response_mask, gamma, **_):
    return reinforce_pp_advantages(token_rewards, response_mask, gamma), None


_ONLINE = (
    OnlineAlgorithm(
        name="ppo",
        description="PPO with a learned critic and GAE (Schulman et al. 2017; Ouyang et al. 2022).",
        needs_critic=True, needs_reference=True, needs_greedy=False,
        min_samples_per_prompt=1, default_samples_per_prompt=1,
        kl_placement="reward", policy_loss="ppo_clip",
        advantage_inputs=("token_rewards", "values"), advantage_fn=_ppo,
    ),
    OnlineAlgorithm(
        name="remax",
        description="REINFORCE with the greedy response's reward as baseline; no critic (Li et al. 2023).",
        needs_critic=False, needs_reference=True, needs_greedy=True,
        min_samples_per_prompt=1, default_samples_per_prompt=1,
        kl_placement="reward", policy_loss="reinforce",
        advantage_inputs=("token_rewards", "greedy_rewards"), advantage_fn=_remax,
    ),
    OnlineAlgorithm(
        name="grpo",
        description="Group-relative advantages, KL in the loss; no critic (Shao et al. 2024).",
        needs_critic=False, needs_reference=True, needs_greedy=False,
        min_samples_per_prompt=2, default_samples_per_prompt=4,
        kl_placement="loss", policy_loss="ppo_clip",
        advantage_inputs=("sequence_rewards",), advantage_fn=_grpo,
    ),
    OnlineAlgorithm(
        name="rloo",
        description="REINFORCE with a leave-one-out baseline over k samples; no critic (Ahmadian et al. 2024).",
        needs_critic=False, needs_reference=True, needs_greedy=False,
        min_samples_per_prompt=2, default_samples_per_prompt=4,
        kl_placement="reward", policy_loss="ppo_clip",
        advantage_inputs=("token_rewards",), advantage_fn=_rloo,
    ),
    OnlineAlgorithm(
        name="reinforce_pp",
        description="REINFORCE++: batch-whitened returns of KL-shaped rewards, PPO clip; no critic (Hu 2025).",
        needs_critic=False, needs_reference=True, needs_greedy=False,
        min_samples_per_prompt=1, default_samples_per_prompt=1,
        kl_placement="reward", policy_loss="ppo_clip",
        advantage_inputs=("token_rewards",), advantage_fn=_reinforce_pp,
    ),
)

ONLINE_ALGORITHMS: Mapping[str, OnlineAlgorithm] = MappingProxyType({a.name: a for a in _ONLINE})


def _offline(name, description, data_format, needs_reference, trains="policy", needs_sequence_kl=False, **defaults):
    return OfflineObjective(
        name=name, description=description, data_format=data_format, needs_reference=needs_reference,
        trains=trains, needs_sequence_kl=needs_sequence_kl, param_defaults=defaults,
        loss_fn=OFFLINE_ADAPTERS[name],
    )


_OFFLINE = (
    _offline("sft", "Supervised fine-tuning: token-mean NLL.", "sft", False),
    _offline("kl_sft", "SFT plus a squared log-ratio penalty to the reference.", "sft", True, kl_coef=0.1),
    _offline("rm", "Reward model: Bradley-Terry pairs or InstructGPT K-way rankings, optionally with a margin.",
             "ranked_or_preference", False, trains="reward_model", margin=0.0),
    _offline("dpo", "Direct Preference Optimisation (Rafailov et al. 2023).", "preference", True,
             beta=0.1, label_smoothing=0.0),
    _offline("cdpo", "Conservative DPO: DPO with label smoothing (Mitchell 2023).", "preference", True,
             beta=0.1, label_smoothing=0.1),
    _offline("ipo", "Identity Preference Optimisation (Azar et al. 2023).", "preference", True, beta=0.1),
    _offline("dpop", "DPO-Positive: penalises the chosen log-prob falling (Pal et al. 2024).", "preference", True,
             beta=0.1, lam=50.0),
    _offline("rdpo", "Robust DPO for noisy labels (Chowdhury et al. 2024).", "preference", True,
             beta=0.1, epsilon=0.1),
    _offline("odpo", "DPO with an offset (Amini et al. 2024): per-pair offsets alpha * log(1 + score gap) from the "
             "data's score_chosen/score_rejected, or one constant offset when asked for.", "preference",
             True, beta=0.1, alpha=1.0, offset=1.0),
    _offline("slic", "SLiC-HF hinge with an NLL regulariser on the chosen responses (Zhao et al. 2023).",
             "preference", False, delta=1.0, lam=0.1),
    _offline("simpo", "SimPO: length-normalised, reference-free, target margin (Meng et al. 2024).", "preference",
             False, beta=2.0, gamma=1.0),
    _offline("tdpo1", "Token-level DPO, TDPO1 (Zeng et al. 2024).", "preference", True, needs_sequence_kl=True,
             beta=0.1),
    _offline("tdpo2", "Token-level DPO, TDPO2 (Zeng et al. 2024).", "preference", True, needs_sequence_kl=True,
             beta=0.1, alpha=0.5),
    _offline("kto", "Kahneman-Tversky Optimisation on unpaired data (Ethayarajh et al. 2024).", "kto", True,
             beta=0.1, lambda_d=1.0, lambda_u=1.0),
)

OFFLINE_OBJECTIVES: Mapping[str, OfflineObjective] = MappingProxyType({o.name: o for o in _OFFLINE})

_ALIASES = {"reinforce++": "reinforce_pp", "reinforcepp": "reinforce_pp", "robust_dpo": "rdpo"}


class UnknownAlgorithmError(KeyError, ValueError):
    """An algorithm or objective name that is not registered (both a KeyError and a ValueError)."""

    def __str__(self) -> str:
        return str(self.args[0])


def _lookup(kind: str, name: str, table: Mapping[str, Any]) -> Any:
    key = str(name).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key in table:
        return table[key]
    message = f"Unknown {kind} {name!r}. Known: {', '.join(table)}."
    nearest = difflib.get_close_matches(key, list(table), n=1)
    if nearest:
        message += f" Did you mean {nearest[0]!r}?"
    raise UnknownAlgorithmError(message)


def get_online_algorithm(name: str) -> OnlineAlgorithm:
    """The declaration of online algorithm `name` (ppo, remax, grpo, rloo, reinforce_pp)."""
    return _lookup("online algorithm", name, ONLINE_ALGORITHMS)


def get_offline_objective(name: str) -> OfflineObjective:
    """The declaration of offline objective `name` (sft, kl_sft, rm, dpo, cdpo, ipo, ...)."""
    return _lookup("offline objective", name, OFFLINE_OBJECTIVES)
