"""Every algorithm and objective by name: the lookup the drivers, workers and CLI use.

The declarations live in `online.py` (`OnlineAlgorithm`: PPO, ReMax, GRPO,
Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++) and `offline.py` (`OfflineObjective`: SFT, reward models,
the DPO family, KTO); this module joins the two tables, resolves aliases and
says which names exist when one does not.
"""

from __future__ import annotations

import difflib
from typing import Any, Mapping

from rlhf_ray.algorithms.batches import KTOBatch, PreferenceBatch, RankedRewardBatch, SFTBatch
from rlhf_ray.algorithms.offline import OFFLINE_OBJECTIVES, OfflineObjective, Param, ParamError
from rlhf_ray.algorithms.online import ONLINE_ALGORITHMS, OnlineAlgorithm

__all__ = [
    "OnlineAlgorithm", "OfflineObjective", "Param", "ParamError", "ONLINE_ALGORITHMS", "OFFLINE_OBJECTIVES",
    "UnknownAlgorithmError", "get_online_algorithm", "get_offline_objective", "online_defaults",
    "PreferenceBatch", "SFTBatch", "KTOBatch", "RankedRewardBatch",
]

_ALIASES = {"reinforce++": "reinforce_pp", "reinforcepp": "reinforce_pp", "robust_dpo": "rdpo",
            "drgrpo": "dr_grpo", "dr.grpo": "dr_grpo"}


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
    """The declaration of online algorithm `name` (ppo, remax, grpo, dr_grpo, dapo, gspo, rloo, reinforce_pp)."""
    return _lookup("online algorithm", name, ONLINE_ALGORITHMS)


def online_defaults(name: str) -> Mapping[str, Any]:
    """The `algorithm.*` values online algorithm `name` starts from where a config leaves them out
    (`OnlineAlgorithm.defaults`); empty for an offline objective or an unknown name, which validation
    reports."""
    try:
        return get_online_algorithm(name).defaults
    except UnknownAlgorithmError:
        return {}


def get_offline_objective(name: str) -> OfflineObjective:
    """The declaration of offline objective `name` (sft, kl_sft, rm, dpo, cdpo, ipo, ...)."""
    return _lookup("offline objective", name, OFFLINE_OBJECTIVES)
