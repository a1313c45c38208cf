"""The offline objectives, each declared once: data format, reference, trained model, parameters, loss.

An `OfflineObjective` says which data format it trains on, whether it needs
the reference model (or TDPO's sequential KL), which model it trains, which
parameters it reads (`Param`: default, meaning, valid values; the config's
`algorithm.params` is checked against them), and computes its loss through
`loss(inputs, params)`, where `inputs` is the batch dataclass of its data
format (`batches.py`) and `params` a plain dict of numbers.

Adding a variant is its math (e.g. in `preference.py`), one loss function and
one `_offline(...)` entry in `_OFFLINE` below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

from torch import Tensor

from rlhf_ray.algorithms import preference as pref
from rlhf_ray.algorithms.batches import KTOBatch, PreferenceBatch, RankedRewardBatch, SFTBatch
from rlhf_ray.algorithms.reward_loss import ranked_reward_loss
from rlhf_ray.algorithms.sft_loss import kl_sft_loss, sft_loss

DATA_FORMATS = ("sft", "preference", "kto", "ranked", "multi_turn_preference")
TRAINS = ("policy", "reward_model")


# --- the pieces an offline objective is made of --------------------------------------------------

_RANGES: Mapping[str, Callable[[float], bool]] = {
    "any": lambda v: True,
    "> 0": lambda v: v > 0,
    ">= 0": lambda v: v >= 0,
    "[0, 0.5)": lambda v: 0 <= v < 0.5,
    "integer >= 0": lambda v: v >= 0 and float(v).is_integer(),
}


@dataclass(frozen=True)
class Param:
    """One parameter of an offline objective, as `algorithm.params.<key>` sets it."""

    default: float | None
    doc: str
    valid: str = "any"
    """The values it takes: "any", "> 0", ">= 0", "[0, 0.5)" or "integer >= 0"."""

    def __post_init__(self) -> None:
        if self.valid not in _RANGES:
            raise ValueError(f"Param.valid must be one of {list(_RANGES)}; got {self.valid!r}.")

    def problem(self, value: Any) -> str | None:
        """Why `value` is not a valid setting, or None."""
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expects a number, got {value!r}"
        if not _RANGES[self.valid](float(value)):
            return f"must be {self.valid}, got {value}"
        return None


class ParamError(ValueError):
    """A key in `params` the objective does not read, or a value out of its range; `key` names it."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class OfflineObjective:
    """One offline training objective, as the offline driver needs to know it."""

    name: str
    description: str
    data_format: str
    """"sft", "preference", "kto", "ranked" (reward models: rankings, or pairs as rankings of two) or
    "multi_turn_preference"; the
    format object of that name (`rlhf_ray.offline_formats`) builds, scores and takes the loss of its batches."""
    needs_reference: bool
    """The frozen reference model scores every batch."""
    trains: str
    """"policy" (a causal LM) or "reward_model" (a scalar head)."""
    needs_sequence_kl: bool
    """TDPO: the batch carries `chosen_seq_kl` / `rejected_seq_kl`, which need
    full-vocabulary log-probs of policy and reference."""
    params: Mapping[str, Param]
    """The keys of `params` this objective reads, with their defaults, meaning and range."""
    loss_fn: Callable[[Any, Mapping[str, float]], "tuple[Tensor, dict[str, Tensor]]"] = field(repr=False)

    def __post_init__(self) -> None:
        if self.data_format not in DATA_FORMATS:
            raise ValueError(f"{self.name}: data_format must be one of {DATA_FORMATS}; got {self.data_format!r}.")
        if self.trains not in TRAINS:
            raise ValueError(f"{self.name}: trains must be one of {TRAINS}; got {self.trains!r}.")
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    def __reduce_ex__(self, protocol):
        """A registered objective pickles as its name, read back from the receiving process's registry (its
        `params` mapping proxy does not pickle, and its loss function is code that process has), so a step
        sent to a worker (`steps.OfflineStep`) holds the very declaration there. Others pickle field by
        field."""
        if OFFLINE_OBJECTIVES.get(self.name) is self:
            return registered_objective, (self.name,)
        return super().__reduce_ex__(protocol)

    @property
    def param_defaults(self) -> dict[str, float | None]:
        return {key: p.default for key, p in self.params.items()}

    def describe_params(self) -> str:
        """One line per parameter: `key (default D, valid V): doc`."""
        return "\n".join(f"{key} (default {p.default}, {p.valid}): {p.doc}" for key, p in self.params.items()) \
            or "(none)"

    def resolve_params(self, params: Mapping[str, Any] | None = None) -> dict[str, float | None]:
        """Every parameter of this objective from `params`, defaults filled in for the keys not given (or None).

        Raises `ParamError` for a key the objective does not read or a value out of its range, naming
        the key and listing what is allowed."""
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise ParamError(unknown[0], f"{self.name} has no parameter {unknown[0]!r}; its parameters: "
                                         f"{', '.join(self.params) or 'none'}.")
        resolved: dict[str, float | None] = {}
        for key, spec in self.params.items():
            value = params.get(key)
            problem = spec.problem(value)
            if problem:
                raise ParamError(key, f"{self.name} parameter {key!r} {problem} ({spec.doc}).")
            resolved[key] = spec.default if value is None else float(value)
        return resolved

    def per_pair_offsets(self, params: Mapping[str, Any]) -> bool:
        """ODPO without a constant `offset`: each pair's offset comes from its `score_chosen`/`score_rejected`."""
        return "offset" in self.params and params.get("offset") is None

    def loss(self, inputs: Any, params: Mapping[str, Any] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """`(scalar loss, metrics)` for one batch of this objective's data format, `params` checked and
        completed by `resolve_params` first. The trainers take a `steps.OfflineStep`, checked once when
        built, and call its `loss`."""
        return self.loss_fn(inputs, self.resolve_params(params))


# --- offline loss functions: (batch of the objective's format, params) -> (loss, metrics) ---


def _expect(name: str, inputs: Any, cls: type, *required: str) -> None:
    if not isinstance(inputs, cls):
        raise TypeError(f"Offline objective {name!r} takes a {cls.__name__}; got {type(inputs).__name__}.")
    missing = [f for f in required if getattr(inputs, f) is None]
    if missing:
        raise ValueError(
            f"Offline objective {name!r} needs {cls.__name__}.{', '.join(missing)}, which "
            f"{'was' if len(missing) == 1 else 'were'} None. The offline job must compute "
            f"{'it' if len(missing) == 1 else 'them'} (see the objective's needs_reference / needs_sequence_kl)."
        )


_REF = ("ref_chosen_logps", "ref_rejected_logps")


def _four(b: PreferenceBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return b.policy_chosen_logps, b.policy_rejected_logps, b.ref_chosen_logps, b.ref_rejected_logps


def _sft(b: SFTBatch, p: Mapping[str, float]):
    _expect("sft", b, SFTBatch)
    return sft_loss(b.logprobs, b.loss_mask)


def _kl_sft(b: SFTBatch, p: Mapping[str, float]):
    _expect("kl_sft", b, SFTBatch, "ref_logprobs")
    return kl_sft_loss(b.logprobs, b.ref_logprobs, b.loss_mask, p["kl_coef"])


def _rm(b: RankedRewardBatch, p: Mapping[str, float]):
    # A preference pair arrives as a ranking of K = 2 responses (`JobData`), so one loss serves both.
    _expect("rm", b, RankedRewardBatch)
    return ranked_reward_loss(b.rewards, b.ranking, margin=p["margin"])


def _dpo_like(name: str):
    def adapter(b: PreferenceBatch, p: Mapping[str, float]):
        _expect(name, b, PreferenceBatch, *_REF)
        return pref.dpo_loss(*_four(b), beta=p["beta"], label_smoothing=p["label_smoothing"])

    return adapter


def _ipo(b: PreferenceBatch, p: Mapping[str, float]):
    _expect("ipo", b, PreferenceBatch, *_REF)
    return pref.ipo_loss(*_four(b), beta=p["beta"])


def _dpop(b: PreferenceBatch, p: Mapping[str, float]):
    _expect("dpop", b, PreferenceBatch, *_REF)
    return pref.dpop_loss(*_four(b), beta=p["beta"], lam=p["lam"])


def _rdpo(b: PreferenceBatch, p: Mapping[str, float]):
    _expect("rdpo", b, PreferenceBatch, *_REF)
    return pref.robust_dpo_loss(*_four(b), beta=p["beta"], epsilon=p["epsilon"])


def _apo_zero(b: PreferenceBatch, p: Mapping[str, float]):
    _expect("apo_zero", b, PreferenceBatch, *_REF)
    return pref.apo_zero_loss(*_four(b), beta=p["beta"])


def _odpo(b: PreferenceBatch, p: Mapping[str, float]):
    _expect("odpo", b, PreferenceBatch, *_REF)
    offset = b.offsets if b.offsets is not None else p["offset"]
    if offset is None:
        raise ValueError("Offline objective 'odpo' needs PreferenceBatch.offsets (per-pair offsets from the pairs' "
                         "scores) or params['offset'] (one constant offset); both were None.")
    return pref.odpo_loss(*_four(b), beta=p["beta"], offset=offset)


def _slic(b: PreferenceBatch, p: Mapping[str, float]):
    _expect("slic", b, PreferenceBatch)
    # Without separate reference samples, regularise towards the chosen responses.
    targets = b.policy_ref_sample_logps if b.policy_ref_sample_logps is not None else b.policy_chosen_logps
    return pref.slic_loss(
        b.policy_chosen_logps, b.policy_rejected_logps, delta=p["delta"], lam=p["lam"], policy_ref_sample_logps=targets
    )


def _simpo(b: PreferenceBatch, p: Mapping[str, float]):
    _expect("simpo", b, PreferenceBatch, "chosen_lengths", "rejected_lengths")
    return pref.simpo_loss(
        b.policy_chosen_logps, b.policy_rejected_logps, b.chosen_lengths, b.rejected_lengths,
        beta=p["beta"], gamma=p["gamma"],
    )


def _tdpo(name: str, variant: int):
    def adapter(b: PreferenceBatch, p: Mapping[str, float]):
        _expect(name, b, PreferenceBatch, *_REF, "chosen_seq_kl", "rejected_seq_kl")
        weight = {"alpha": p["alpha"]} if variant == 2 else {}  # TDPO1's KL gap has no weight, so no alpha Param
        return pref.tdpo_loss(*_four(b), b.chosen_seq_kl, b.rejected_seq_kl, beta=p["beta"], variant=variant, **weight)

    return adapter


def _segment_dpo(b: PreferenceBatch, p: Mapping[str, float]):
    """Segment-Level DPO (Kong et al. 2025): DPO's loss, with each side's log-prob summed over the assistant
    tokens of its segment only (the `multi_turn_preference` format masks the rest). Not sDPO, the stepwise
    DPO schedule of `algorithm.sdpo_stages` (Kim et al. 2024), which splits the data into stages."""
    _expect("segment_dpo", b, PreferenceBatch, *_REF)
    return pref.dpo_loss(*_four(b), beta=p["beta"])


def _kto(b: KTOBatch, p: Mapping[str, float]):
    _expect("kto", b, KTOBatch)
    z0 = b.kl_reference_point
    if z0 is None:
        if b.policy_logps_mismatched is None or b.ref_logps_mismatched is None:
            raise ValueError(
                "Offline objective 'kto' needs KTOBatch.kl_reference_point, or both policy_logps_mismatched and "
                "ref_logps_mismatched to estimate it; all were None."
            )
        z0 = pref.kto_reference_point(b.policy_logps_mismatched, b.ref_logps_mismatched)
    return pref.kto_loss(
        b.policy_logps, b.ref_logps, b.desirable, z0, beta=p["beta"], lambda_d=p["lambda_d"], lambda_u=p["lambda_u"]
    )


_BETA = Param(0.1, "inverse temperature of the implicit reward beta * log(pi / pi_ref)", "> 0")


def _offline(name, description, data_format, needs_reference, loss_fn, trains="policy", needs_sequence_kl=False,
             **params: Param):
    return OfflineObjective(
        name=name, description=description, data_format=data_format, needs_reference=needs_reference,
        trains=trains, needs_sequence_kl=needs_sequence_kl, params=params, loss_fn=loss_fn,
    )


_OFFLINE = (
    _offline("sft", "Supervised fine-tuning: token-mean NLL.", "sft", False, _sft),
    _offline("kl_sft", "SFT plus a squared log-ratio penalty to the reference.", "sft", True, _kl_sft,
             kl_coef=Param(0.1, "weight of the squared log-ratio penalty", ">= 0")),
    _offline("rm", "Reward model: Bradley-Terry pairs or InstructGPT K-way rankings, optionally with a margin.",
             "ranked", False, _rm, trains="reward_model",
             margin=Param(0.0, "the better response must win by at least this much (0: none)", ">= 0")),
    _offline("dpo", "Direct Preference Optimisation (Rafailov et al. 2023).", "preference", True, _dpo_like("dpo"),
             beta=_BETA, label_smoothing=Param(0.0, "assumed share of flipped labels (cDPO)", "[0, 0.5)")),
    _offline("cdpo", "Conservative DPO: DPO with label smoothing (Mitchell 2023).", "preference", True,
             _dpo_like("cdpo"), beta=_BETA,
             label_smoothing=Param(0.1, "assumed share of flipped labels", "[0, 0.5)")),
    _offline("ipo", "Identity Preference Optimisation (Azar et al. 2023).", "preference", True, _ipo,
             beta=Param(0.1, "regularisation strength tau: the target log-ratio gap is 1 / (2 beta)", "> 0")),
    _offline("dpop", "DPO-Positive: penalises the chosen log-prob falling (Pal et al. 2024).", "preference", True,
             _dpop, beta=_BETA, lam=Param(50.0, "weight of the penalty on the chosen log-ratio falling", ">= 0")),
    _offline("rdpo", "Robust DPO for noisy labels (Chowdhury et al. 2024).", "preference", True, _rdpo,
             beta=_BETA, epsilon=Param(0.1, "label-flip rate the loss is debiased for", "[0, 0.5)")),
    _offline("apo_zero", "Anchored Preference Optimisation, APO-zero: raise the chosen and lower the rejected "
             "likelihood, each against the reference (D'Oosterlinck et al. 2024).", "preference", True, _apo_zero,
             beta=_BETA),
    _offline("odpo", "DPO with an offset (Amini et al. 2024): per-pair offsets alpha * log(1 + score gap) from the "
             "data's score_chosen/score_rejected, or one constant offset when asked for.", "preference",
             True, _odpo, beta=_BETA,
             alpha=Param(1.0, "scale of the per-pair offset alpha * log(1 + score gap)", ">= 0"),
             offset=Param(None, "one constant offset for every pair; empty: per-pair offsets from the data's "
                                "score_chosen/score_rejected columns (required then)")),
    _offline("slic", "SLiC-HF hinge with an NLL regulariser on the chosen responses (Zhao et al. 2023).",
             "preference", False, _slic, delta=Param(1.0, "hinge margin on the log-prob gap", ">= 0"),
             lam=Param(0.1, "weight of the NLL regulariser", ">= 0")),
    _offline("simpo", "SimPO: length-normalised, reference-free, target margin (Meng et al. 2024).", "preference",
             False, _simpo, beta=Param(2.0, "scale of the length-normalised reward", "> 0"),
             gamma=Param(1.0, "target reward margin", ">= 0")),
    _offline("tdpo1", "Token-level DPO, TDPO1 (Zeng et al. 2024).", "preference", True, _tdpo("tdpo1", 1),
             needs_sequence_kl=True, beta=_BETA),
    _offline("tdpo2", "Token-level DPO, TDPO2 (Zeng et al. 2024).", "preference", True, _tdpo("tdpo2", 2),
             needs_sequence_kl=True, beta=_BETA,
             alpha=Param(0.5, "weight of the sequential-KL gap (the chosen side's KL is detached)", ">= 0")),
    _offline("segment_dpo", "Segment-Level DPO on multi-turn conversations (Kong et al. 2025): DPO over the "
             "assistant turns of the segment from the first turn where chosen and rejected differ; not sDPO "
             "(algorithm.sdpo_stages, stepwise DPO).", "multi_turn_preference", True, _segment_dpo, beta=_BETA,
             segment_turns=Param(0.0, "turns in the segment, from the first differing one (0: to the end)",
                                 "integer >= 0")),
    _offline("kto", "Kahneman-Tversky Optimisation on unpaired data (Ethayarajh et al. 2024).", "kto", True, _kto,
             beta=_BETA, lambda_d=Param(1.0, "weight of desirable examples", ">= 0"),
             lambda_u=Param(1.0, "weight of undesirable examples", ">= 0")),
)

OFFLINE_OBJECTIVES: Mapping[str, OfflineObjective] = MappingProxyType({o.name: o for o in _OFFLINE})


def registered_objective(name: str) -> OfflineObjective:
    """The registered objective `name` as it is spelled in `OFFLINE_OBJECTIVES` (how a declaration unpickles)."""
    return OFFLINE_OBJECTIVES[name]
