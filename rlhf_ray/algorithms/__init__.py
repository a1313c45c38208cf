"""Pure tensor math of every algorithm rlhf-ray trains: advantages, KL,
reward shaping, policy and value losses, the DPO family, reward-model and
SFT losses, and the registry that declares each algorithm once, as data.

Imports torch only: no model, no config object, no Ray.
"""

from rlhf_ray.algorithms.advantages import (
    discounted_returns,
    gae,
    grpo_advantages,
    informative_groups,
    masked_mean,
    masked_var,
    reinforce_pp_advantages,
    remax_advantages,
    rloo_advantages,
    whiten,
)
from rlhf_ray.algorithms.batches import (
    KTOBatch,
    PreferenceBatch,
    RankedRewardBatch,
    SFTBatch,
)
from rlhf_ray.algorithms.kl import (
    KL_KINDS,
    AdaptiveKLController,
    FixedKLController,
    kl_loss,
    kl_penalty,
    token_level_rewards,
)
from rlhf_ray.algorithms.policy_loss import gspo_policy_loss, ppo_policy_loss, reinforce_policy_loss, value_loss
from rlhf_ray.algorithms.preference import (
    apo_zero_loss,
    dpo_loss,
    dpop_loss,
    ipo_loss,
    kto_loss,
    kto_reference_point,
    odpo_loss,
    robust_dpo_loss,
    simpo_loss,
    slic_loss,
    tdpo_loss,
    tdpo_sequential_kl,
)
from rlhf_ray.algorithms.registry import (
    OFFLINE_OBJECTIVES,
    ONLINE_ALGORITHMS,
    OfflineObjective,
    OnlineAlgorithm,
    UnknownAlgorithmError,
    get_offline_objective,
    get_online_algorithm,
)
from rlhf_ray.algorithms.reward_loss import pairwise_reward_loss, ranked_reward_loss
from rlhf_ray.algorithms.reward_shaping import overlong_penalty
from rlhf_ray.algorithms.rollout_is import mismatch_metrics, mismatch_sums, rollout_is_weights, weighted_advantages
from rlhf_ray.algorithms.sft_loss import kl_sft_loss, sft_loss

__all__ = [
    # advantages
    "masked_mean", "masked_var", "whiten", "discounted_returns", "gae", "remax_advantages",
    "grpo_advantages", "informative_groups", "rloo_advantages", "reinforce_pp_advantages",
    # reward shaping
    "overlong_penalty",
    # kl
    "KL_KINDS", "kl_penalty", "kl_loss", "token_level_rewards", "FixedKLController", "AdaptiveKLController",
    # policy and value losses
    "ppo_policy_loss", "gspo_policy_loss", "value_loss", "reinforce_policy_loss",
    # preference
    "dpo_loss", "ipo_loss", "dpop_loss", "robust_dpo_loss", "apo_zero_loss", "odpo_loss", "slic_loss", "simpo_loss",
    "tdpo_loss", "tdpo_sequential_kl", "kto_loss", "kto_reference_point",
    # reward model and SFT
    "pairwise_reward_loss", "ranked_reward_loss", "sft_loss", "kl_sft_loss",
    # the rollout engine's gap to the trainer
    "rollout_is_weights", "weighted_advantages", "mismatch_sums", "mismatch_metrics",
    # registry
    "OnlineAlgorithm", "OfflineObjective", "ONLINE_ALGORITHMS", "OFFLINE_OBJECTIVES", "UnknownAlgorithmError",
    "get_online_algorithm", "get_offline_objective",
    "PreferenceBatch", "SFTBatch", "KTOBatch", "RankedRewardBatch",
]
