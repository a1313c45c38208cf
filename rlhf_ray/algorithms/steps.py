"""What one training call carries from a driver to its trainer ranks: the declaration and every value its
loss reads, as typed fields.

`PolicyStep` is one minibatch of the online policy update (`PolicyWorker.train_online`), `CriticStep` one of
the value update (`CriticWorker.train_values`), `OfflineStep` one step of an offline objective
(`train_offline` of the policy and the reward-model trainer, and the policy's held-out `eval_preference`).
A step is checked when it is built, on the driver: a value out of range fails there with a `ParamError`
naming the key, never inside a micro-batch of a remote rank, and the losses read the fields as they are.

A step carries the registry's declaration itself (`OnlineAlgorithm`, `OfflineObjective`), not its name. The
declarations hold functions (the policy losses are lambdas), so each pickles as its registry name and is
read back from the receiving process's own registry (`OnlineAlgorithm.__reduce_ex__`): no code crosses the
Ray boundary, and the worker holds the very object the driver named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, NoReturn

from torch import Tensor

from rlhf_ray.algorithms.advantages import LOSS_AGGREGATIONS
from rlhf_ray.algorithms.offline import OfflineObjective, ParamError
from rlhf_ray.algorithms.online import OnlineAlgorithm
from rlhf_ray.algorithms.rollout_is import ROLLOUT_IS_MODES

__all__ = ["PolicyStep", "CriticStep", "OfflineStep", "ParamError"]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Checks:
    """The checks a step's `__post_init__` runs, each naming the step and the key it refuses."""

    def __init__(self, step: str):
        self.step = step

    def fail(self, key: str, problem: str) -> NoReturn:
        raise ParamError(key, f"{self.step}: {key} {problem}")

    def number(self, key: str, value: Any, ok=lambda v: True, valid: str = "", optional: bool = False) -> None:
        if value is None and optional:
            return
        if not _number(value):
            self.fail(key, f"expects a number{' or None' if optional else ''}, got {value!r}")
        if not ok(value):
            self.fail(key, f"must be {valid}, got {value}")

    def choice(self, key: str, value: Any, choices: tuple[str, ...]) -> None:
        if value not in choices:
            self.fail(key, f"must be one of {', '.join(choices)}, got {value!r}")


def _positive(v):
    return v > 0


def _non_negative(v):
    return v >= 0


@dataclass(frozen=True)
class PolicyStep:
    """One optimizer step of an online algorithm's policy loss on a minibatch (`workers.policy.online_loss`)."""

    algorithm: OnlineAlgorithm
    """Its policy loss and KL placement are the step's loss."""
    clip_eps: float
    """The ratio's lower clip, `1 - clip_eps` (GSPO: of its sequence ratio)."""
    kl_coef: float
    """This step's KL coefficient, the one the rewards were shaped with; in the loss where the algorithm puts
    the KL there (0: no term)."""
    temperature: float
    """The sampling temperature the log-probs are taken at (`rollout.temperature`), as the engines sampled."""
    clip_eps_high: float | None = None
    """The ratio's upper clip, `1 + clip_eps_high`; None: `clip_eps`."""
    dual_clip: float | None = None
    """PPO's dual-clip bound `c > 1` for negative advantages; None: off."""
    kl_estimator: str = "auto"
    """k1, k2, k3 or auto; stored resolved (`KLPlacement.estimator`: k1 in the rewards, k3 in the loss)."""
    loss_aggregation: str = "token-mean"
    """One of `advantages.LOSS_AGGREGATIONS`: the token weights of the policy and the PPO-ptx losses."""
    loss_denominator: float | None = None
    """The minibatch's aggregation weight over all its rows (`aggregation_denominator`): each micro-batch on
    each rank scales its share of the loss by it (`TrainEngine.global_loss`). Training needs it; a loss
    taken outside the engine (tests, evaluation) does not."""
    rollout_is: str = "none"
    """The importance correction of the engine-trainer mismatch (`rollout_is.ROLLOUT_IS_MODES`)."""
    rollout_is_cap: float = 2.0
    """Its truncation (tis) or bound `[1/cap, cap]` (mis); > 1."""
    ptx_coef: float = 0.0
    """Weight of the SFT loss on the minibatch's `ptx_*` rows (PPO-ptx); 0: none."""
    ptx_denominator: float | None = None
    """The `ptx_*` rows' aggregation weight over the minibatch, as `loss_denominator` is the responses'."""

    def __post_init__(self) -> None:
        if not isinstance(self.algorithm, OnlineAlgorithm):
            raise TypeError(f"PolicyStep.algorithm takes the registry's OnlineAlgorithm "
                            f"(get_online_algorithm(name)); got {type(self.algorithm).__name__}")
        check = _Checks(f"policy step of {self.algorithm.name}")
        check.number("clip_eps", self.clip_eps, _positive, "> 0")
        check.number("clip_eps_high", self.clip_eps_high, _non_negative, ">= 0", optional=True)
        check.number("dual_clip", self.dual_clip, lambda v: v > 1, "> 1 (or None: off)", optional=True)
        check.number("kl_coef", self.kl_coef, _non_negative, ">= 0")
        check.number("temperature", self.temperature, _positive, "> 0")
        check.choice("loss_aggregation", self.loss_aggregation, LOSS_AGGREGATIONS)
        check.number("loss_denominator", self.loss_denominator, _non_negative, ">= 0", optional=True)
        check.choice("rollout_is", self.rollout_is, ROLLOUT_IS_MODES)
        check.number("rollout_is_cap", self.rollout_is_cap, lambda v: v > 1, "> 1")
        check.number("ptx_coef", self.ptx_coef, _non_negative, ">= 0")
        check.number("ptx_denominator", self.ptx_denominator, _non_negative, ">= 0", optional=True)
        try:
            kind = self.algorithm.kl.estimator(self.kl_estimator)
        except ValueError as err:
            check.fail("kl_estimator", f"is refused: {err}")
        object.__setattr__(self, "kl_estimator", kind)


@dataclass(frozen=True)
class CriticStep:
    """One optimizer step of the clipped value loss on a minibatch (`CriticWorker.train_values`)."""

    clip_eps: float | None
    """The clip of the values' change around the rollout's (`algorithm.value_clip_eps`); None: no clip."""
    loss_aggregation: str = "token-mean"
    """The token weights of the value loss, as the policy's."""
    loss_denominator: float | None = None
    """The minibatch's aggregation weight over all its rows, as `PolicyStep.loss_denominator`; None: each
    micro-batch's own mean."""

    def __post_init__(self) -> None:
        check = _Checks("critic step")
        check.number("clip_eps", self.clip_eps, _non_negative, ">= 0", optional=True)
        check.choice("loss_aggregation", self.loss_aggregation, LOSS_AGGREGATIONS)
        check.number("loss_denominator", self.loss_denominator, _non_negative, ">= 0", optional=True)


@dataclass(frozen=True)
class OfflineStep:
    """One step of an offline objective: its declaration, its parameters, and what the driver and the trainer
    rank work out for the step (the data format's `driver_step` and `rank_step`)."""

    objective: OfflineObjective
    """Its data format takes the loss (`offline_formats`), its `loss_fn` the numbers."""
    params: Mapping[str, float | None] = field(default_factory=dict)
    """The objective's own parameters (`algorithm.params`): checked against its `Param`s when the step is
    built, defaults filled in, read-only."""
    loss_aggregation: str = "token-mean"
    """The token weights of a token loss (SFT, KL-SFT)."""
    loss_denominator: float | None = None
    """The step's aggregation weight over the whole batch (SFT formats, on the driver); None: each
    micro-batch's own mean."""
    kl_reference_point: float | None = None
    """KTO's z0, worked out once per step on the trainer rank; None: each micro-batch's own (held-out)."""

    def __post_init__(self) -> None:
        if not isinstance(self.objective, OfflineObjective):
            raise TypeError(f"OfflineStep.objective takes the registry's OfflineObjective "
                            f"(get_offline_objective(name)); got {type(self.objective).__name__}")
        object.__setattr__(self, "params", MappingProxyType(self.objective.resolve_params(self.params)))
        check = _Checks(f"offline step of {self.objective.name}")
        check.choice("loss_aggregation", self.loss_aggregation, LOSS_AGGREGATIONS)
        check.number("loss_denominator", self.loss_denominator, _non_negative, ">= 0", optional=True)
        check.number("kl_reference_point", self.kl_reference_point, optional=True)

    def loss(self, inputs: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """`(scalar loss, metrics)` of the objective on a batch of its data format, with the step's parameters
        as they were checked (`OfflineObjective.loss` checks them on every call)."""
        return self.objective.loss_fn(inputs, self.params)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "params": dict(self.params)}  # a mapping proxy does not pickle

    def __setstate__(self, state: dict) -> None:
        for key, value in state.items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "params", MappingProxyType(state["params"]))
