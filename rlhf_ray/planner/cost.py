"""Time and cost of an online RLHF run, from measured throughput or from
FLOPs at an assumed model-FLOPs utilisation (MFU).

FLOPs per token follow Kaplan et al. 2020 and PaLM (Chowdhery et al. 2022,
appendix B): a forward pass costs 2N + 4*L*h_q*c, training 3x that
(6N + 12*L*h_q*c), with N the matmul parameters (`matmul_param_count`), L
layers, h_q the query width and c the context a token attends over (the whole
sequence for training and scoring, the tokens so far when decoding). MFU
counts these model FLOPs only, so recomputation under gradient checkpointing
and decoding's memory-bound steps show up as a lower MFU, not as more FLOPs.
Phases are summed as if they ran one after another, as they do when the
roles share GPUs; a layout that overlaps them runs faster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from rlhf_ray.planner.shapes import ModelShape, matmul_param_count

Kind = Literal["generate", "forward", "train"]

GPU_PEAK_FLOPS = {"a100": 312e12, "a800": 312e12, "h100": 989e12, "h200": 989e12}
"""Dense bf16 tensor-core peak per GPU (NVIDIA data sheets; SXM parts)."""


@dataclass(frozen=True)
class PhaseWork:
    """Tokens one role processes in one phase of a step, over the whole cluster."""

    phase: str
    """"generate", "score" or "train"."""
    role: str
    kind: Kind
    """generate: decoded tokens; forward: tokens through a forward pass; train: forward + backward."""
    tokens: int
    flops_per_token: float


def _flops_per_token(shape: ModelShape, head: str, context: float, kind: Kind) -> float:
    forward = 2 * matmul_param_count(shape, head) + 4 * shape.num_layers * shape.q_dim * context
    return 3 * forward if kind == "train" else forward


def online_step_work(
    *,
    policy: ModelShape,
    critic: ModelShape | None,
    reference: ModelShape | None,
    reward: ModelShape | None,
    prompts: int,
    samples_per_prompt: int,
    greedy_per_prompt: int,
    prompt_len: int,
    response_len: int,
    policy_epochs: int = 1,
) -> list[PhaseWork]:
    """The work of one online step: generate samples_per_prompt sampled (and
    greedy_per_prompt greedy, ReMax's baseline) responses per prompt; score
    them (policy log-probs, reference log-probs and critic values for the
    sampled ones, rewards for all); train the policy, and the critic when there
    is one, for `policy_epochs` passes over the sampled sequences.
    A role given as None does not exist (no critic, no reference, a rule reward).
    """
    sampled = prompts * samples_per_prompt
    generated = prompts * (samples_per_prompt + greedy_per_prompt)
    seq = prompt_len + response_len
    work = [
        PhaseWork("generate", "rollout", "forward", generated * prompt_len,
                  _flops_per_token(policy, "lm", prompt_len, "forward")),
        PhaseWork(
            "generate", "rollout", "generate", generated * response_len,
            _flops_per_token(policy, "lm", prompt_len + response_len / 2, "generate"),
        ),
        PhaseWork("score", "policy", "forward", sampled * seq, _flops_per_token(policy, "lm", seq, "forward")),
    ]
    if reference is not None:
        work.append(PhaseWork("score", "reference", "forward", sampled * seq,
                              _flops_per_token(reference, "lm", seq, "forward")))
    if reward is not None:
        work.append(PhaseWork("score", "reward", "forward", generated * seq,
                              _flops_per_token(reward, "scalar", seq, "forward")))
    if critic is not None:
        work.append(PhaseWork("score", "critic", "forward", sampled * seq,
                              _flops_per_token(critic, "scalar", seq, "forward")))
    work.append(PhaseWork("train", "policy", "train", policy_epochs * sampled * seq,
                          _flops_per_token(policy, "lm", seq, "train")))
    if critic is not None:
        work.append(PhaseWork("train", "critic", "train", policy_epochs * sampled * seq,
                              _flops_per_token(critic, "scalar", seq, "train")))
    return work


@dataclass(frozen=True)
class Hardware:
    """GPUs and the share of their peak the work is assumed to reach."""

    num_gpus: int
    peak_flops: float
    """Per GPU, dense, in the training dtype (see GPU_PEAK_FLOPS)."""
    train_mfu: float = 0.3
    forward_mfu: float = 0.3
    generate_mfu: float = 0.05
    """Decoding reads every weight per step of a batch: far below peak FLOPs."""

    def __post_init__(self) -> None:
        for name in ("train_mfu", "forward_mfu", "generate_mfu"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}.")
        if self.num_gpus < 1 or self.peak_flops <= 0:
            raise ValueError(f"need num_gpus >= 1 and peak_flops > 0, got {self.num_gpus} and {self.peak_flops}.")


@dataclass(frozen=True)
class Throughput:
    """Measured tokens per second over the whole cluster, by kind of work;
    a kind left None falls back to FLOPs at the Hardware's MFU."""

    generate_tokens_per_s: float | None = None
    forward_tokens_per_s: float | None = None
    train_tokens_per_s: float | None = None


@dataclass(frozen=True)
class StepTime:
    seconds: dict[str, float]
    """By "<phase>/<role>/<kind>"."""

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())

    def phase_s(self, phase: str) -> float:
        return sum(s for key, s in self.seconds.items() if key.split("/")[0] == phase)


def step_time(work: list[PhaseWork], *, hardware: Hardware | None = None,
              throughput: Throughput | None = None) -> StepTime:
    """Seconds per phase: tokens / measured rate, else FLOPs / (GPUs * peak * MFU)."""
    throughput = throughput or Throughput()
    seconds: dict[str, float] = {}
    for item in work:
        rate = getattr(throughput, f"{item.kind}_tokens_per_s")
        if rate is not None:
            if rate <= 0:
                raise ValueError(f"{item.kind}_tokens_per_s must be positive, got {rate}.")
            t = item.tokens / rate
        elif hardware is not None:
            mfu = getattr(hardware, f"{item.kind}_mfu")
            t = item.tokens * item.flops_per_token / (hardware.num_gpus * hardware.peak_flops * mfu)
        else:
            raise ValueError(f"no {item.kind} throughput given and no Hardware to estimate it from FLOPs; give either.")
        key = f"{item.phase}/{item.role}/{item.kind}"
        seconds[key] = seconds.get(key, 0.0) + t
    return StepTime(seconds)


@dataclass(frozen=True)
class RunCost:
    steps: int
    seconds: float
    gpu_hours: float
    dollars: float

    @property
    def hours(self) -> float:
        return self.seconds / 3600.0


def run_cost(
    step_seconds: float, *, prompts_per_step: int, num_prompts: int, num_gpus: int, price_per_gpu_hour: float
) -> RunCost:
    """A run over `num_prompts` prompts: ceil(num_prompts / prompts_per_step)
    steps; GPU-hours = hours * GPUs; dollars = GPU-hours * hourly price."""
    if prompts_per_step < 1 or num_prompts < 1 or num_gpus < 1:
        raise ValueError(
            f"prompts_per_step, num_prompts and num_gpus must be at least 1, "
            f"got {prompts_per_step}, {num_prompts}, {num_gpus}."
        )
    if price_per_gpu_hour < 0:
        raise ValueError(f"price_per_gpu_hour must not be negative, got {price_per_gpu_hour}.")
    steps = math.ceil(num_prompts / prompts_per_step)
    seconds = steps * step_seconds
    gpu_hours = seconds / 3600.0 * num_gpus
    return RunCost(steps=steps, seconds=seconds, gpu_hours=gpu_hours, dollars=gpu_hours * price_per_gpu_hour)
