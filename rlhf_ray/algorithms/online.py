"""The online algorithms, each declared once: what the loop must produce, where the KL goes, the policy loss.

An `OnlineAlgorithm` says what the online loop must produce (critic values?
reference log-probs? a greedy rollout? how many samples per prompt?), where
the KL to the reference goes (`KLPlacement`: shaped into the rewards, or a
term of the loss), which policy loss it trains with (`PolicyLoss`), and
computes its advantages through one keyword signature shared by all of them,
and which `algorithm.*` values it starts from where a config leaves them out
(`defaults`: DAPO's clip range and absent KL, Dr. GRPO's loss aggregation).
Adding an algorithm is its advantage math (`advantages.py`), one adapter and
one `OnlineAlgorithm(...)` entry in `_ONLINE` below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping

from torch import Tensor

from rlhf_ray.algorithms.advantages import (
    discounted_returns,
    gae,
    grpo_advantages,
    reinforce_pp_advantages,
    remax_advantages,
    rloo_advantages,
    whiten,
)
from rlhf_ray.algorithms.kl import KL_KINDS, kl_loss
from rlhf_ray.algorithms.policy_loss import gspo_policy_loss, ppo_policy_loss, reinforce_policy_loss

if TYPE_CHECKING:
    from rlhf_ray.algorithms.steps import PolicyStep

ADVANTAGE_INPUTS = ("token_rewards", "sequence_rewards", "greedy_rewards", "values")

AdvantageFn = Callable[..., "tuple[Tensor, Tensor | None]"]
LossResult = "tuple[Tensor, dict[str, Tensor]]"


# --- the pieces an online algorithm is made of ---------------------------------------------------


@dataclass(frozen=True)
class PolicyLoss:
    """A policy-gradient loss: `fn(logprobs, old_logprobs, advantages, weights, step) -> (loss, metrics)`, where
    `step` is the minibatch's `steps.PolicyStep` (its clip range).

    Each token's loss must be positively homogeneous in its advantage, `L_t(w * A) = w * L_t(A)` for
    `w >= 0`: the rollout importance weights enter through the advantages (`rollout_is.weighted_advantages`),
    which `tests/algorithms/test_rollout_is.py` checks for every registered loss."""

    name: str
    fn: Callable[..., LossResult] = field(repr=False)
    uses_ratio: bool
    """The loss weighs each token by pi / pi_old, so a rollout batch may be reused over several epochs and
    minibatches; without the ratio (REINFORCE) a second pass would train on an older policy's samples."""
    policy_old_logprobs: bool = False
    """The loss needs the policy's own old log-probs, never the rollout engine's: its clip range is narrower
    than the gap between the two can be (bf16 on GPUs). The online driver now gives every loss the
    policy's own (the engine's enter only the rollout importance weights), so this records the
    requirement rather than switching anything."""
    unused: tuple[str, ...] = ()
    """`algorithm.*` settings this loss has no use for: a value set away from its default is refused."""

    def __call__(self, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, weights: Tensor,
                 step: PolicyStep) -> tuple[Tensor, dict[str, Tensor]]:
        return self.fn(logprobs, old_logprobs, advantages, weights, step)


PPO_CLIP = PolicyLoss("ppo_clip", uses_ratio=True, fn=lambda logprobs, old, adv, weights, s: ppo_policy_loss(
    logprobs, old, adv, weights, clip_eps=s.clip_eps, dual_clip=s.dual_clip, clip_eps_high=s.clip_eps_high))
GSPO_CLIP = PolicyLoss("gspo_clip", uses_ratio=True, policy_old_logprobs=True, unused=("dual_clip",),
                       fn=lambda logprobs, old, adv, weights, s: gspo_policy_loss(
                           logprobs, old, adv, weights, clip_eps_low=s.clip_eps,
                           clip_eps_high=s.clip_eps if s.clip_eps_high is None else s.clip_eps_high))
REINFORCE = PolicyLoss("reinforce", uses_ratio=False, fn=lambda logprobs, old, adv, weights, s: reinforce_policy_loss(
    logprobs, adv, weights))


@dataclass(frozen=True)
class KLPlacement:
    """Where the KL to the reference enters: shaped into the token rewards, or a term of the policy loss."""

    name: str
    in_reward: bool

    def estimator(self, configured: str) -> str:
        """The KL estimator (`kl.KL_KINDS`) for `algorithm.kl_estimator`: `auto` is k1 in the rewards
        (Ziegler et al.) and k3 in the loss (GRPO). k1 is refused in the loss: the gradient of
        mean(log pi - log pi_ref) is mean grad log pi, zero in expectation on the policy's own samples."""
        kind = configured if configured != "auto" else ("k1" if self.in_reward else "k3")
        if kind not in KL_KINDS:
            raise ValueError(f"KL estimator {configured!r}: expected auto or one of {', '.join(KL_KINDS)}")
        if kind == "k1" and not self.in_reward:
            raise ValueError("k1 as a loss term has no KL gradient: its expected gradient, E[grad log pi], is "
                             "zero on the policy's own samples; use k3 (auto) or k2")
        return kind

    def reward_coef(self, kl_coef: float) -> float:
        """The coefficient `kl.token_level_rewards` shapes the rewards with (0 when the KL sits in the loss)."""
        return kl_coef if self.in_reward else 0.0

    def loss_term(self, logprobs: Tensor, ref_logprobs: Tensor | None, weights: Tensor,
                  kl_coef: float, kind: str = "auto") -> tuple[Tensor, dict[str, Tensor]] | None:
        """`(kl_coef * mean KL, metrics)` to add to the policy loss, with the estimator `kind` (see
        `estimator`), or None when the KL is in the rewards."""
        if self.in_reward or kl_coef <= 0:
            return None
        return kl_loss(logprobs, ref_logprobs, weights, kl_coef, kind=self.estimator(kind))


KL_IN_REWARD = KLPlacement("reward", in_reward=True)
KL_IN_LOSS = KLPlacement("loss", in_reward=False)


@dataclass(frozen=True)
class OnlineAlgorithm:
    """One online RL algorithm, as the driver and the policy worker need to know it."""

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
    kl: KLPlacement
    """`KL_IN_REWARD` (`kl.token_level_rewards`) or `KL_IN_LOSS` (`kl.kl_loss`, as in GRPO); each with its
    own default estimator (`KLPlacement.estimator`)."""
    policy_loss: PolicyLoss
    """`PPO_CLIP` (`ppo_policy_loss`) or `REINFORCE` (`reinforce_policy_loss`)."""
    advantage_inputs: tuple[str, ...]
    """Which of token_rewards / sequence_rewards / greedy_rewards / values the
    advantage function reads; the others may be None."""
    advantage_fn: AdvantageFn = field(repr=False)
    discounts: tuple[str, ...] = ()
    """Which of `algorithm.gamma` (the discount) and `algorithm.lam` (GAE's lambda) the advantage function
    reads; a value set for one it does not read is refused (ReMax's and the group methods' returns are
    undiscounted sums, as in their papers and verl)."""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    """`algorithm.*` values this algorithm starts from where a config leaves them out (the paper's
    settings); the config loader fills them in, so `rlhf-ray config show` prints them."""

    def __reduce_ex__(self, protocol):
        """A registered algorithm pickles as its name, read back from the receiving process's registry: its
        functions (the policy losses are lambdas) are code that process has already, and a step sent to a
        worker (`steps.PolicyStep`) holds the very declaration there. Others pickle field by field."""
        if ONLINE_ALGORITHMS.get(self.name) is self:
            return registered_algorithm, (self.name,)
        return super().__reduce_ex__(protocol)

    def __post_init__(self) -> None:
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
                the group-relative algorithms and reinforce_pp, which set their
                own scale).
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
    # Each token's KL-shaped reward-to-go (the sum of the token rewards from
    # it on, as verl computes ReMax's return: a token is not charged the KL of
    # the tokens before it) minus the greedy response's reward. The greedy
    # response is not KL-shaped (that would cost two more forward passes); a
    # baseline that does not depend on the sample keeps the gradient unbiased
    # either way.
    sampled = discounted_returns(token_rewards, response_mask, gamma=1.0)
    advantages = remax_advantages(sampled, greedy_rewards, response_mask)
    return _maybe_whiten(advantages, response_mask, whiten_advantages), None


def _grpo(*, sequence_rewards, response_mask, group_size, **_):
    # GRPO puts the KL in the loss, so its advantages use the raw rewards.
    return grpo_advantages(sequence_rewards, group_size, response_mask), None


def _dr_grpo(*, sequence_rewards, response_mask, group_size, **_):
    # Dividing by the group's std weighs prompts that are nearly always right or wrong up (a question-level
    # difficulty bias, Liu et al. 2025); Dr. GRPO keeps the mean baseline alone.
    return grpo_advantages(sequence_rewards, group_size, response_mask, scale_by_std=False), None


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
        min_samples_per_prompt=1, default_samples_per_prompt=1, kl=KL_IN_REWARD, policy_loss=PPO_CLIP,
        advantage_inputs=("token_rewards", "values"), advantage_fn=_ppo, discounts=("gamma", "lam"),
    ),
    OnlineAlgorithm(
        name="remax",
        description="REINFORCE of the KL-shaped reward-to-go with the greedy response's reward as baseline; no "
                    "critic (Li et al. 2023).",
        needs_critic=False, needs_reference=True, needs_greedy=True,
        min_samples_per_prompt=1, default_samples_per_prompt=1, kl=KL_IN_REWARD, policy_loss=REINFORCE,
        advantage_inputs=("token_rewards", "greedy_rewards"), advantage_fn=_remax,
    ),
    OnlineAlgorithm(
        name="grpo",
        description="Group-relative advantages, KL in the loss; no critic (Shao et al. 2024).",
        needs_critic=False, needs_reference=True, needs_greedy=False,
        min_samples_per_prompt=2, default_samples_per_prompt=4, kl=KL_IN_LOSS, policy_loss=PPO_CLIP,
        advantage_inputs=("sequence_rewards",), advantage_fn=_grpo,
    ),
    OnlineAlgorithm(
        name="dr_grpo",
        description="GRPO without its biases: advantage r - group mean (no std division), token losses summed "
                    "over a constant length, rollout.max_new_tokens (Liu et al. 2025).",
        needs_critic=False, needs_reference=True, needs_greedy=False,
        min_samples_per_prompt=2, default_samples_per_prompt=4, kl=KL_IN_LOSS, policy_loss=PPO_CLIP,
        advantage_inputs=("sequence_rewards",), advantage_fn=_dr_grpo,
        defaults={"loss_aggregation": "seq-mean-token-sum-norm"},
    ),
    OnlineAlgorithm(
        name="dapo",
        description="GRPO with a decoupled clip range (0.2 / 0.28), a token-level loss, dynamic sampling "
                    "(groups whose rewards are all equal are dropped, more prompts drawn), no KL; overlong "
                    "shaping with algorithm.overlong_buffer (Yu et al. 2025).",
        needs_critic=False, needs_reference=True, needs_greedy=False,
        min_samples_per_prompt=2, default_samples_per_prompt=4, kl=KL_IN_LOSS, policy_loss=PPO_CLIP,
        advantage_inputs=("sequence_rewards",), advantage_fn=_grpo,
        defaults={"clip_eps_low": 0.2, "clip_eps_high": 0.28, "kl_coef": 0.0, "loss_aggregation": "token-mean",
                  "dynamic_sampling": True},
    ),
    OnlineAlgorithm(
        name="gspo",
        description="Group-relative advantages under a sequence-level importance ratio, clipped per response "
                    "(3e-4 / 4e-4) (Zheng et al. 2025).",
        needs_critic=False, needs_reference=True, needs_greedy=False,
        min_samples_per_prompt=2, default_samples_per_prompt=4, kl=KL_IN_LOSS, policy_loss=GSPO_CLIP,
        advantage_inputs=("sequence_rewards",), advantage_fn=_grpo,
        defaults={"clip_eps_low": 3e-4, "clip_eps_high": 4e-4, "loss_aggregation": "seq-mean-token-mean"},
    ),
    OnlineAlgorithm(
        name="rloo",
        description="REINFORCE with a leave-one-out baseline over k samples; no critic (Ahmadian et al. 2024).",
        needs_critic=False, needs_reference=True, needs_greedy=False,
        min_samples_per_prompt=2, default_samples_per_prompt=4, kl=KL_IN_REWARD, policy_loss=PPO_CLIP,
        advantage_inputs=("token_rewards",), advantage_fn=_rloo,
    ),
    OnlineAlgorithm(
        name="reinforce_pp",
        description="REINFORCE++: batch-whitened returns of KL-shaped rewards, PPO clip; no critic (Hu 2025).",
        needs_critic=False, needs_reference=True, needs_greedy=False,
        min_samples_per_prompt=1, default_samples_per_prompt=1, kl=KL_IN_REWARD, policy_loss=PPO_CLIP,
        advantage_inputs=("token_rewards",), advantage_fn=_reinforce_pp, discounts=("gamma",),
    ),
)

ONLINE_ALGORITHMS: Mapping[str, OnlineAlgorithm] = MappingProxyType({a.name: a for a in _ONLINE})


def registered_algorithm(name: str) -> OnlineAlgorithm:
    """The registered algorithm `name` as it is spelled in `ONLINE_ALGORITHMS` (how a declaration unpickles)."""
    return ONLINE_ALGORITHMS[name]
