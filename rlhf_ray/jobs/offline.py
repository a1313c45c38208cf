"""The offline driver: SFT, KL-SFT, reward models, the DPO family, SPIN and sDPO.

Offline jobs run on the same Ray actor groups as online ones: the trained
model is a DeepSpeed group (policy, or the reward-model trainer), the frozen
reference a group of its own. One step:

    batch      = data.batch(sampler.next())
    batch     += reference.logps(batch)          # objectives with a reference
    metrics    = trainer.train_offline(batch, step)  # an OfflineStep: DeepSpeed step on every rank

SPIN and sDPO are schedules of stages over a preference objective: at each
stage boundary the reference becomes the latest policy; SPIN then lets that
reference generate the rejected responses to the SFT prompts.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_ray.algorithms.registry import get_offline_objective
from rlhf_ray.algorithms.steps import OfflineStep
from rlhf_ray.config.schema import ConfigError, JobConfig
from rlhf_ray.data.formats import PreferenceExample
from rlhf_ray.data.job_data import JobData, load_job_examples
from rlhf_ray.data.sampler import EpochSampler
from rlhf_ray.evaluation import during_training as evaluation
from rlhf_ray.jobs import stop_on_signals
from rlhf_ray.jobs.common import RecoveringJob, prepare_run_dir
from rlhf_ray.jobs.loop import run_steps
from rlhf_ray.jobs.validate import objective_params
from rlhf_ray.models.forward import needed_pair_tokens
from rlhf_ray.models.loading import load_tokenizer_for
from rlhf_ray.offline_formats import data_format
from rlhf_ray.runtime.checkpoint import load_checkpoint
from rlhf_ray.runtime.role_groups import RoleGroups, init_ray
from rlhf_ray.telemetry.timers import PhaseTimer
from rlhf_ray.workers.reward_trainer import zero_mean_preferred_rewards


@dataclass
class Stage:
    """A stretch of steps with one reference: plain runs have one, SPIN/sDPO several."""

    index: int
    first_step: int
    last_step: int
    rows: list[int]


def plan_stages(cfg: JobConfig, num_rows: int) -> list[Stage]:
    """Split the steps (and, for sDPO, the data) into stages."""
    count = max(cfg.algorithm.spin_iterations, cfg.algorithm.sdpo_stages, 1)
    total = cfg.run.total_steps
    stages = []
    for i in range(count):
        first = i * total // count + 1
        last = (i + 1) * total // count
        if cfg.algorithm.sdpo_stages > 1:
            rows = list(range(i * num_rows // count, (i + 1) * num_rows // count))
        else:
            rows = list(range(num_rows))
        stages.append(Stage(i, first, last, rows))
    return stages


def _cat_right_padded(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, right-padding dim 1 with zeros to the widest part (1-D parts as they are)."""
    if parts[0].dim() == 1:
        return torch.cat(parts)
    width = max(p.shape[1] for p in parts)
    return torch.cat([_fit_width(p, width) for p in parts])


def _fit_width(t: torch.Tensor, width: int) -> torch.Tensor:
    """`t` cut or zero-padded on the right of dim 1 to `width`."""
    if t.shape[1] >= width:
        return t[:, :width]
    pad = torch.zeros(t.shape[0], width - t.shape[1], *t.shape[2:], dtype=t.dtype)
    return torch.cat([t, pad], dim=1)


def _load_data(cfg: JobConfig, objective, params: dict, tokenizer,
               data_dir: Path) -> tuple[JobData, JobData | None, JobData | None]:
    """The training data, and the held-out pairs and prompts (where `data.eval` is set and the objective
    reads them)."""
    spin = cfg.algorithm.spin_iterations > 0
    fmt, kind = data_format(objective.data_format), objective.data_format
    disk_format = "sft" if spin else (cfg.data.format or fmt.disk_format)
    row_kind = None if spin else kind
    examples, skipped = load_job_examples(cfg.data.train, disk_format, cfg.data, tokenizer, data_dir, kind=row_kind)
    train = JobData(examples, kind, tokenizer, cfg.data, skipped, params)
    eval_pairs = eval_prompts = None
    if cfg.data.eval:
        eval_prompts = JobData(load_job_examples(cfg.data.eval, "prompt", cfg.data, tokenizer, data_dir)[0],
                               "prompt", tokenizer, cfg.data)
        if fmt.held_out and not spin:
            eval_pairs = JobData(load_job_examples(cfg.data.eval, disk_format, cfg.data, tokenizer, data_dir,
                                                   kind=row_kind)[0], kind, tokenizer, cfg.data, params=params)
    return train, eval_pairs, eval_prompts


def _check_scores(cfg: JobConfig, objective, params: dict, train: JobData) -> None:
    """ODPO's offsets come from per-pair scores: refuse data without them unless one constant offset
    was asked for."""
    if not objective.per_pair_offsets(params):
        return
    missing = [i for i, ex in enumerate(train.examples) if getattr(ex, "score_chosen", None) is None]
    if missing:
        raise ConfigError(f"algorithm.name: odpo sets each pair's offset from its scores, but {len(missing)} of "
                          f"{len(train)} pairs in data.train ({cfg.data.train}) have no "
                          f"score_chosen/score_rejected (first: row {missing[0]}); add those columns, or set "
                          "algorithm.params.offset=<number> to use one offset for every pair")


class OfflineJob(RecoveringJob):
    """One offline job from config to `summary.json`. The constructor holds what it is given;
    `from_config` makes the run folder and loads the data."""

    def __init__(self, cfg: JobConfig, *, run_dir: Path, tokenizer, train: JobData, eval_pairs: JobData | None = None,
                 eval_prompts: JobData | None = None):
        self.cfg = cfg
        self.run_dir = run_dir
        self.tokenizer = tokenizer
        self.train, self.eval_pairs, self.eval_prompts = train, eval_pairs, eval_prompts
        self.reference_cache: dict[str, torch.Tensor] | None = None
        # What the (validated) config says, looked up in the registries: no files, no models.
        self.objective = get_offline_objective(cfg.algorithm.name)
        self.params = objective_params(cfg)
        self.trains_policy = self.objective.trains == "policy"
        self.format = data_format(self.objective.data_format)

    @classmethod
    def from_config(cls, cfg: JobConfig) -> OfflineJob:
        """The job of a validated `cfg` (`jobs.validate`): its run folder made (the resolved config in it),
        the trained model's tokenizer and the data, with the checks only the data allows (ODPO's scores,
        `reward.rule` on the held-out prompts), before any model loads."""
        objective = get_offline_objective(cfg.algorithm.name)
        params = objective_params(cfg)
        run_dir = prepare_run_dir(cfg)
        model_cfg = cfg.policy.model if objective.trains == "policy" else cfg.reward.model
        tokenizer = load_tokenizer_for(model_cfg.tokenizer or model_cfg.name_or_path,
                                       trust_remote_code=model_cfg.trust_remote_code)
        train, eval_pairs, eval_prompts = _load_data(cfg, objective, params, tokenizer, run_dir / "data")
        _check_scores(cfg, objective, params, train)
        evaluation.check_rule_on_eval_data(cfg, eval_prompts, tokenizer)
        return cls(cfg, run_dir=run_dir, tokenizer=tokenizer, train=train, eval_pairs=eval_pairs,
                   eval_prompts=eval_prompts)

    # roles -----------------------------------------------------------------
    def _setup(self, roles: RoleGroups, resume_from: Path | None, stage: int) -> None:
        cfg = self.cfg
        trainer = roles[self.trainer_name]
        per_rank = cfg.run.batch_size // len(trainer)
        init = (cfg.policy if self.trains_policy else cfg.reward).model.name_or_path
        # Both roles load at once, each as soon as its own process is up (`RoleGroups(wait=False)`);
        # `wait_started` names a rank that failed to start before either setup is waited for.
        calls = [(trainer, trainer.map(lambda a: a.setup.remote(cfg, init_from=init, batch_per_rank=per_rank,
                                                               total_optimizer_steps=cfg.run.total_steps)))]
        if roles.owns("reference"):
            ref_init = cfg.reference.model.name_or_path or init
            if resume_from is not None and stage > 0:
                ref_init = str(resume_from / "reference_hf")
            reference = roles["reference"]
            calls.append((reference, reference.map(lambda a: a.setup.remote(cfg, init_from=ref_init))))
        roles.wait_started()
        for group, refs in calls:
            group.gather(refs)
        if roles.owns("reference"):
            if not (cfg.algorithm.spin_iterations or cfg.algorithm.sdpo_stages > 1):
                roles.offer("reference")  # a frozen reference other jobs may share

    @property
    def trainer_name(self) -> str:
        return "policy" if self.trains_policy else "reward"

    # the loop (jobs/loop.py runs it) ---------------------------------------
    skip_keys = ("train/skipped",)

    def _attempt(self, stop: threading.Event | None, resume_from: Path | None, failures: list[dict],
                 started_at: str) -> dict:
        cfg = self.cfg
        self.reference_cache = None
        self.stages = plan_stages(cfg, len(self.train))
        self.stage, self.data, self.sampler = None, self.train, None
        with RoleGroups(cfg, self._specs(), wait=False) as roles:
            self.resumed = {"step": 0, "stage": 0, "sampler": None}
            if resume_from is not None:
                self._setup(roles, resume_from, _peek_state(resume_from)["stage"])
                self.resumed = load_checkpoint(resume_from, {self.trainer_name: roles[self.trainer_name]})
            else:
                self._setup(roles, None, 0)
            return run_steps(self, roles, start=self.resumed["step"],
                             skipped_steps=self.resumed.get("skipped_steps", 0), failures=failures,
                             started_at=started_at, stop=stop)

    def _reference_roles(self, roles: RoleGroups) -> list[str]:
        """The groups that score the reference: its own, or the trainer (a LoRA policy's base)."""
        if "reference" in roles.groups:
            return ["reference"]
        return [self.trainer_name] if roles.reference() is not None and self.objective.needs_reference else []

    def busy(self, roles: RoleGroups) -> dict[str, list[str]]:
        reference, trainer = self._reference_roles(roles), self.trainer_name
        return {"reference": reference, "precompute_reference": reference, "update": [trainer],
                "eval": [trainer, *(r for r in reference if r != trainer)]}

    def before_step(self, roles: RoleGroups, step: int, timer: PhaseTimer) -> None:
        """At the first step of a stage: the reference moves to the latest policy (SPIN, sDPO; not where
        the run resumes inside the stage), the stage's data (SPIN generates its pairs), the reference's
        log-probs when precomputed, and the stage's sampler."""
        if self.stage is not None and step <= self.stage.last_step:
            return
        stage = next(s for s in self.stages if s.first_step <= step <= s.last_step)
        resumed_here = self.resumed["sampler"] is not None and self.resumed["stage"] == stage.index
        if stage.index > 0 and not resumed_here:
            self._advance_reference(roles)
        self.data = self._stage_data(roles, stage)
        if self.cfg.algorithm.precompute_reference and self.objective.needs_reference:
            with timer.phase("precompute_reference"):
                self._precompute_reference(roles, self.data)
        roles.compute_times()  # SPIN's generation is not the first step's compute
        self.sampler = EpochSampler(len(self.data), self.cfg.run.batch_size,
                                    seed=self.cfg.run.seed + 1000 * stage.index)
        if resumed_here:
            self.sampler.load_state_dict(self.resumed["sampler"])
        self.stage = stage

    def step(self, roles: RoleGroups, step: int, timer: PhaseTimer) -> dict:
        """The reference's log-probs of a batch (when the objective has one), then one update."""
        indices = next(self.sampler)
        batch = self.data.batch(indices)
        with timer.phase("reference"):
            batch.update(self._reference_logps(roles, batch, indices))
        with timer.phase("update"):
            metrics = self._train_step(roles, batch)
        self._last_batch = batch
        return metrics

    def rates(self, metrics: dict) -> dict:
        batch = self._last_batch
        return {"stage": self.stage.index, "perf/tokens_per_s": _tokens(batch) / metrics["time/step_s"],
                "perf/trained_tokens": _padded_tokens(batch), "perf/needed_tokens": _needed_tokens(batch)}

    def state_dict(self) -> dict:
        return {"stage": self.stage.index, "sampler": self.sampler.state_dict()}

    def trainables(self, roles: RoleGroups) -> dict:
        return {self.trainer_name: roles[self.trainer_name]}

    def exports(self, roles: RoleGroups) -> dict:
        export = {self.trainer_name: roles[self.trainer_name]}
        if self.stage.index > 0:
            export["reference"] = roles["reference"]
        return export

    def finish(self, roles: RoleGroups) -> dict:
        self._export_final(roles)
        return {"skipped_rows": self.train.skipped}

    def _stage_data(self, roles: RoleGroups, stage: Stage) -> JobData:
        if self.cfg.algorithm.spin_iterations:
            return self._spin_pairs(roles, stage)
        if len(stage.rows) == len(self.train):
            return self.train
        return JobData([self.train.examples[i] for i in stage.rows], self.train.kind, self.tokenizer, self.cfg.data,
                       params=self.params)

    def _spin_pairs(self, roles: RoleGroups, stage: Stage) -> JobData:
        """SPIN: chosen = the SFT completion, rejected = the current reference's own response."""
        sft = self.train.examples
        responses = []
        chunk = 64
        for start in range(0, len(sft), chunk):
            indices = list(range(start, min(start + chunk, len(sft))))
            prompts = self.train.prompts(indices)
            tokens = roles["reference"].call_rank0(lambda a: a.generate.remote(
                {k: prompts[k] for k in ("input_ids", "attention_mask")}, self.cfg.rollout.max_new_tokens,
                self.cfg.run.seed + 7919 * stage.index + start))
            responses.extend(self.tokenizer.decode(t, skip_special_tokens=True) for t in tokens)
        pairs = [PreferenceExample(prompt=ex.prompt, chosen=ex.completion, rejected=resp or " ")
                 for ex, resp in zip(sft, responses) if resp.strip() != str(ex.completion).strip()]
        return JobData(pairs, "preference", self.tokenizer, self.cfg.data)

    def _advance_reference(self, roles: RoleGroups) -> None:
        """The reference becomes the latest policy (SPIN iterate / sDPO stage)."""
        targets = list(roles["reference"].actors)
        roles["policy"].call(lambda a: a.send_weights.remote(targets, self.cfg.rollout.sync_bucket_bytes, "reference"))

    def _precompute_reference(self, roles: RoleGroups, data: JobData) -> None:
        """Score the whole training set with the reference once, then free the reference group."""
        size = self.cfg.run.batch_size
        parts = []
        for start in range(0, len(data), size):
            indices = list(range(start, min(start + size, len(data))))
            parts.append(self._reference_logps(roles, data.batch(indices), indices))
        # Each chunk is padded to its own longest row; per-token entries are right-padded to one width
        # here (padding is zero and off every mask) and cut to each batch's width when read.
        self.reference_cache = {k: _cat_right_padded([p[k] for p in parts]) for k in parts[0]}
        if "reference" in roles.groups:  # a LoRA policy's own base stays: it is the policy
            roles.release("reference")

    def _reference_logps(self, roles: RoleGroups, batch: dict, indices: list[int]) -> dict:
        if not self.objective.needs_reference:
            return {}
        if self.reference_cache is not None:
            rows = torch.tensor(indices)
            ids = batch["input_ids"] if "input_ids" in batch else batch["chosen_input_ids"]
            width = ids.shape[1] - 1  # per-token log-probs score tokens 1 .. T-1
            return {k: v[rows] if v.dim() == 1 else _fit_width(v[rows], width)
                    for k, v in self.reference_cache.items()}
        name = self.objective.name
        return roles.reference().scatter_padded(
            lambda a, shard: a.offline_reference_logps.remote(shard, name), batch).merged()

    def _train_step(self, roles: RoleGroups, batch: dict) -> dict:
        trainer = roles[self.trainer_name]
        step = OfflineStep(self.objective, self.params)
        step = self.format.driver_step(batch, step, self.cfg)
        per_rank = trainer.call_scattered(lambda a, shard: a.train_offline.remote(shard, step), batch)
        return {f"train/{k}" if "/" not in k else k: sum(m[k] for m in per_rank) / len(per_rank)
                for k in per_rank[0]}

    def evaluate(self, roles: RoleGroups, step: int) -> dict:
        """Held-out pairs' margins and accuracy; greedy answers to held-out prompts (and their rule reward)."""
        out = {}
        if self.eval_pairs is not None:
            out.update(evaluation.offline_pair_metrics(self.cfg, roles, self.eval_pairs, self.objective, self.params))
        if self.trains_policy and self.eval_prompts is not None:
            out.update(evaluation.alignment(roles["policy"], self.eval_prompts, self.tokenizer, self.cfg,
                                            self.run_dir, step))
        return out

    def _export_final(self, roles: RoleGroups) -> None:
        trainer = roles[self.trainer_name]
        if not self.trains_policy and self.cfg.algorithm.rm_zero_mean:
            zero_mean_preferred_rewards(trainer, self.train)
        trainer.call(lambda a, d=str(self.run_dir / "final"): a.export.remote(d))


def _tokens(batch: dict) -> float:
    return float(sum(v.sum() for k, v in batch.items() if k.endswith("attention_mask")))


def _needed_tokens(batch: dict) -> float:
    """Real tokens of the trained rows, a prompt a pair's two answers share counted once
    (`needed_pair_tokens`): the work the training FLOP rate is measured against."""
    if "chosen_loss_mask" in batch and "rejected_loss_mask" in batch:
        return float(needed_pair_tokens(batch))
    return float(sum(v.sum() for k, v in batch.items() if k.endswith("attention_mask") and not k.startswith("kl_")))


def _padded_tokens(batch: dict) -> float:
    """Token positions the trained model runs forward and backward over (padding included)."""
    return float(sum(v.numel() for k, v in batch.items() if k.endswith("input_ids") and not k.startswith("kl_")))


def _peek_state(path: Path) -> dict:
    from rlhf_ray.runtime.checkpoint import read_json

    return read_json(path / "trainer_state.json")


def run_offline(cfg: JobConfig, address: str | None = None, stop: threading.Event | None = None) -> dict:
    """Run an offline job on the local Ray cluster (or the one at `address`); returns the summary.
    `stop`: see `jobs.run_job`."""
    job = OfflineJob.from_config(cfg)
    init_ray(address)
    with stop_on_signals(stop) as stop:
        return job.run(stop)


__all__ = ["OfflineJob", "run_offline", "objective_params", "plan_stages"]
