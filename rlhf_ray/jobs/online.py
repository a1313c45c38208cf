"""The online driver: PPO, ReMax, GRPO, Dr. GRPO, DAPO, GSPO, RLOO and REINFORCE++ on one loop.

Each algorithm comes from the registry as data (does it need a critic, a
greedy rollout, how many samples per prompt, where does the KL go, which
policy loss); the loop below never branches on its name:

    rollout  = rollouts.take(step)                     # engines, n samples (+ greedy) of sampler.next();
                                                       # rollout.max_staleness k: the next k steps' launched too
    scores   = score(rollout)                          # policy, reference, reward, critic: at once or in turns
                                                       # (dynamic sampling: more prompts while groups agree)
    skip     = check_mismatch(rollout, scores)         # max_logprob_diff: too far from the engine to train on
    batch    = compute_advantages(rollout, scores)     # KL-shaped rewards, advantages, returns
    metrics  = update(batch)                           # epochs x minibatches, policy and critic
    sync_weights()                                     # policy -> engines, in buckets (after the launched
                                                       # generations: later ones sample with the new weights)

`rollouts` is a `RolloutQueue` (jobs/rollout_queue.py): with `rollout.max_staleness: 0` a step generates its own
batch and waits for it; with k >= 1 the engines generate the next k steps' batches while this one is scored and
trained on, and each batch is at most k weight versions stale (`rollout/staleness`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from functools import cached_property
from pathlib import Path

import ray
import torch

from rlhf_ray.algorithms.advantages import aggregation_denominator
from rlhf_ray.algorithms.registry import get_online_algorithm
from rlhf_ray.algorithms.rollout_is import SUM_PREFIX, mismatch_metrics, mismatch_sums, rollout_is_weights
from rlhf_ray.algorithms.steps import CriticStep, PolicyStep
from rlhf_ray.config.schema import JobConfig
from rlhf_ray.data.job_data import JobData, load_job_examples
from rlhf_ray.data.sampler import EpochSampler
from rlhf_ray.evaluation import during_training as evaluation
from rlhf_ray.job_plan import plan_job
from rlhf_ray.jobs import online_advantages, stop_on_signals
from rlhf_ray.jobs.common import RecoveringJob, prepare_run_dir
from rlhf_ray.jobs.dynamic_sampling import fill_batch
from rlhf_ray.jobs.loop import run_steps
from rlhf_ray.jobs.online_advantages import (
    ROLLOUT_KEYS,
    RunningStd,
    compute_advantages,
    fresh_controllers,
)
from rlhf_ray.jobs.rollout_queue import Generation, RolloutQueue
from rlhf_ray.jobs.validate import samples_per_prompt
from rlhf_ray.models.forward import needed_prompt_tokens, needed_rollout_tokens
from rlhf_ray.models.loading import load_tokenizer_for
from rlhf_ray.runtime.actor_group import concat_shards
from rlhf_ray.runtime.checkpoint import load_checkpoint
from rlhf_ray.runtime.role_groups import RoleGroups, init_ray
from rlhf_ray.telemetry.hardware import measure_memory_bandwidth
from rlhf_ray.telemetry.timers import PhaseTimer
from rlhf_ray.workers.rollout.vllm.transfer import weight_transfer_backend


class OnlineJob(RecoveringJob):
    """One online RL job from config to `summary.json`. The constructor holds what it is given;
    `from_config` makes the run folder and loads what the job runs on."""

    def __init__(self, cfg: JobConfig, *, run_dir: Path, tokenizer, prompts: JobData,
                 eval_prompts: JobData | None = None, ptx: JobData | None = None, memcpy_rate: float):
        self.cfg = cfg
        self.run_dir = run_dir
        self.tokenizer = tokenizer
        self.prompts, self.eval_prompts, self.ptx = prompts, eval_prompts, ptx
        # Bytes/s a plain copy moves on this machine (half the read + write bandwidth), beside each sync.
        self.memcpy_rate = memcpy_rate
        self.kl, self.reward_std = fresh_controllers(cfg)

    @classmethod
    def from_config(cls, cfg: JobConfig) -> OnlineJob:
        """The job of a validated `cfg` (`jobs.validate`): its run folder made (the resolved config in it),
        the policy's tokenizer, the prompts (held-out and ptx ones where set), and the memcpy rate, measured
        here, before Ray starts its processes beside it."""
        run_dir = prepare_run_dir(cfg)
        model = cfg.policy.model
        tokenizer = load_tokenizer_for(model.tokenizer or model.name_or_path, trust_remote_code=model.trust_remote_code)
        data_dir = run_dir / "data"

        def load(source: str, kind: str) -> JobData:
            return JobData(load_job_examples(source, kind, cfg.data, tokenizer, data_dir)[0], kind, tokenizer, cfg.data)

        prompts = load(cfg.data.train, "prompt")
        eval_prompts = load(cfg.data.eval, "prompt") if cfg.data.eval else None
        ptx = load(cfg.data.ptx, "sft") if cfg.data.ptx and cfg.algorithm.ptx_coef > 0 else None
        memcpy_rate = measure_memory_bandwidth(nbytes=64 * 2**20, iters=3) / 2
        return cls(cfg, run_dir=run_dir, tokenizer=tokenizer, prompts=prompts, eval_prompts=eval_prompts, ptx=ptx,
                   memcpy_rate=memcpy_rate)

    # what the config says, worked out on first use ------------------------
    @cached_property
    def algorithm(self):
        return get_online_algorithm(self.cfg.algorithm.name)

    @cached_property
    def n(self) -> int:
        return samples_per_prompt(self.cfg)

    @cached_property
    def uses_reference(self) -> bool:
        return plan_job(self.cfg).uses_reference

    @cached_property
    def kl_estimator(self) -> str:
        return online_advantages.kl_estimator(self.cfg)

    @cached_property
    def scores_old_logprobs(self) -> bool:
        return online_advantages.scores_old_logprobs(self.cfg)

    @cached_property
    def groups_in_order(self) -> bool:
        """With shared prefixes the update's minibatches list a prompt's samples side by side (rollouts are
        prompt-major), so its micro-batches hold whole groups where their size allows; the minibatch's rows
        are the same, and its loss is a sum over them (the order changes nothing but float rounding)."""
        return self.n > 1 and self.cfg.policy.shared_prefix

    def _fresh_controllers(self) -> None:
        """The controllers as a run starts (`fresh_controllers`)."""
        self.kl, self.reward_std = fresh_controllers(self.cfg)

    # roles -----------------------------------------------------------------
    def _setup(self, roles: RoleGroups) -> None:
        cfg = self.cfg
        init = cfg.policy.model.name_or_path
        rows = cfg.run.batch_size * self.n
        minibatch = rows // cfg.algorithm.num_minibatches
        steps = cfg.run.total_steps * cfg.algorithm.ppo_epochs * cfg.algorithm.num_minibatches
        # Every role loads at once; then each group is waited for in turn. Engines that share GPUs with
        # other roles start first, alone: vLLM sizes its pool from the memory free while it profiles
        # (and refuses to start, or fails its check, when another process allocates or frees meanwhile);
        # with sleep_between_steps they then release it for the trainers to load.
        def launch(name, fn):
            return roles[name], roles[name].map(fn)

        # The role groups' constructors may still run (`RoleGroups(wait=False)`): each setup queues behind its
        # own, and `wait_started` names a rank that failed to start before any setup is waited for.
        engines = launch("rollout", lambda a: a.setup.remote(cfg, init_from=init))
        if roles.shares_gpus("rollout"):
            roles.wait_started()
            roles["rollout"].gather(engines[1])
            roles["rollout"].call(lambda a: a.sleep.remote())
            calls = []
        else:
            calls = [engines]
        calls.append(launch("policy", lambda a: a.setup.remote(cfg, init_from=init,
                                                               batch_per_rank=minibatch // len(roles["policy"]),
                                                               total_optimizer_steps=steps)))
        if roles.owns("reward"):
            calls.append(launch("reward", lambda a: a.setup.remote(cfg, tokenizer_from=init)))
        if roles.owns("reference"):
            ref_init = cfg.reference.model.name_or_path or init
            calls.append(launch("reference", lambda a: a.setup.remote(cfg, init_from=ref_init)))
        if "critic" in roles.groups:
            critic_init = cfg.reward.model.name_or_path if cfg.critic.init_from == "reward" else init
            calls.append(launch("critic", lambda a: a.setup.remote(
                cfg, init_from=critic_init, tokenizer_from=init, batch_per_rank=minibatch // len(roles["critic"]),
                total_optimizer_steps=steps)))
        roles.wait_started()
        for group, refs in calls:
            group.gather(refs)
        if roles.owns("reference"):
            roles.offer("reference")  # a frozen reference other jobs may share
        if roles.owns("reward") and not cfg.reward.rule:
            roles.offer("reward")  # and the reward model
        if cfg.rollout.engine == "vllm" and weight_transfer_backend(cfg) == "nccl":
            engines, tp = roles["rollout"].actors, cfg.rollout.tensor_parallel_size
            bucket = cfg.rollout.sync_bucket_bytes
            roles["policy"].call(lambda a: a.connect_vllm_engines.remote(engines, tp, bucket))

    # the loop (jobs/loop.py runs it) ---------------------------------------
    skip_keys = ("policy/skipped", "critic/skipped", "rollout/skipped")

    def _attempt(self, stop: threading.Event | None, resume_from: Path | None, failures: list[dict],
                 started_at: str) -> dict:
        cfg = self.cfg
        self._fresh_controllers()
        with RoleGroups(cfg, self._specs(), wait=False) as roles:
            self._setup(roles)
            self.sampler = EpochSampler(len(self.prompts), cfg.run.batch_size, seed=cfg.run.seed)
            self.rollouts = RolloutQueue(cfg.rollout.max_staleness, cfg.run.total_steps,
                                         lambda step: self.launch_step(roles, step))
            self._engines_free_at = 0.0  # when the last generation put on the timeline ended
            start, skipped = 0, 0
            if resume_from is not None:
                state = load_checkpoint(resume_from, self.trainables(roles))
                start, skipped = state["step"], state.get("skipped_steps", 0)
                self.sampler.load_state_dict(state["sampler"])
                self.kl.load_state_dict(state["kl"])
                self.reward_std = RunningStd(state["reward_std"])
                if "rollouts" in state:  # the batches in flight at the checkpoint, as they were sampled
                    self.rollouts.load_state_dict(state["rollouts"])
                self.sync_weights(roles)
                self.rollouts.synced(start)
            return run_steps(self, roles, start=start, skipped_steps=skipped, failures=failures,
                             started_at=started_at, stop=stop)

    def busy(self, roles: RoleGroups) -> dict[str, list[str]]:
        def present(*names: str) -> list[str]:
            return [r for r in names if r in roles.groups]

        # The engines' generations are recorded as they run (`launch_generate`), also while the policy trains
        # (`rollout.max_staleness` >= 1); the driver's waits for them ("generate", "rollout_wait") occupy no role.
        return {"generate": [], "score": present("policy", "reward", "reference", "critic"),
                "rollout_wait": [], "sync": ["policy", "rollout"],
                "eval": present("rollout", "policy", "reward", "reference")}

    def before_step(self, roles: RoleGroups, step: int, timer: PhaseTimer) -> None:
        pass

    def step(self, roles: RoleGroups, step: int, timer: PhaseTimer) -> dict:
        """Generate, score, advantages, update, sync (the module docstring's loop)."""
        with timer.phase("generate"):
            first, staleness = self.rollouts.take(step)
        rollout, scores, drawn = self.collect(roles, self.sampler, step, timer, first=first)
        metrics = self.check_mismatch(rollout, scores)  # rollout/skipped: too far from the engine to train on
        metrics.update(drawn)
        metrics["rollout/staleness"] = float(staleness)
        if not metrics.get("rollout/skipped"):
            kl_coef = self.kl.value  # one coefficient per step: the rewards' and the loss's
            with timer.phase("advantages"):
                batch, advantage_metrics = self.compute_advantages(rollout, scores, kl_coef)
            metrics.update(advantage_metrics)
            metrics.update(self.update(roles, batch, step, timer, kl_coef))
            self.kl.update(metrics["rollout/kl"], self.cfg.run.batch_size * self.n)  # the next step's
        if self.rollouts.pending:  # launched ahead (max_staleness >= 1): the engines finish them before the sync
            with timer.phase("rollout_wait"):
                self.rollouts.wait()
        with timer.phase("sync"):
            metrics.update(self.sync_weights(roles))
        self.rollouts.synced(step)
        self._last = (rollout, scores)
        return metrics

    def rates(self, metrics: dict) -> dict:
        rollout, scores = self._last
        return self.rollout_metrics(rollout, scores, metrics)

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "kl": self.kl.state_dict(),
                "reward_std": self.reward_std.state_dict(), "rollouts": self.rollouts.state_dict()}

    def trainables(self, roles: RoleGroups) -> dict:
        return {name: roles[name] for name in ("policy", "critic") if name in roles.groups}

    def exports(self, roles: RoleGroups) -> dict:
        return {"policy": roles["policy"]}

    def finish(self, roles: RoleGroups) -> dict:
        roles["policy"].call(lambda a, d=str(self.run_dir / "final"): a.export.remote(d))
        return {}

    # stages ----------------------------------------------------------------
    def launch_step(self, roles: RoleGroups, step: int) -> Generation:
        """Step `step`'s batch of prompts (the sampler's next), its generation launched (`RolloutQueue`)."""
        prompts = self.prompts.batch(next(self.sampler))
        return self.launch_generate(roles, prompts, seed=self.draw_seed(step, 0), step=step)

    def draw_seed(self, step: int, index: int) -> int:
        """The engines' sampling seed for draw `index` of step `step`."""
        return self.cfg.run.seed * 100003 + step + index * 1000003

    def collect(self, roles: RoleGroups, sampler: EpochSampler, step: int,
                timer: PhaseTimer, first: dict | None = None) -> tuple[dict, dict, dict]:
        """The step's rollout and scores: `run.batch_size` prompts, generated and scored. With
        `algorithm.dynamic_sampling`, prompts whose samples all got the same reward are dropped and more are
        drawn (`dynamic_sampling.fill_batch`); the metrics say how many. Each draw is scored whole, by every
        role the step needs: the rewards decide which groups stay, and one scoring call per draw keeps the
        roles' turns as in a plain step (the reference's and policy's work on dropped groups is the cost).
        `first`: the first draw's rollout, generated already (`RolloutQueue.take`); later draws generate here,
        with the weights the engines hold."""
        def draw(index: int) -> tuple[dict, dict]:
            if index == 0 and first is not None:
                rollout = first
            else:
                prompts = self.prompts.batch(next(sampler))
                with timer.phase("generate"):
                    rollout = self.generate(roles, prompts, seed=self.draw_seed(step, index), step=step)
            return rollout, self.score(roles, rollout, timer)

        a = self.cfg.algorithm
        if not a.dynamic_sampling:
            return (*draw(0), {})
        return fill_batch(draw, self.cfg.run.batch_size, self.n, a.dynamic_sampling_max_draws,
                          self.tokenizer.pad_token_id)

    def generate(self, roles: RoleGroups, prompts: dict, seed: int, greedy: bool | None = None,
                 n: int | None = None, step: int | None = None) -> dict:
        """Split the prompts across engine replicas; every sample of a prompt stays on one engine (`step`: as
        `launch_generate`'s)."""
        return self.launch_generate(roles, prompts, seed, greedy, n, step).result()

    def launch_generate(self, roles: RoleGroups, prompts: dict, seed: int, greedy: bool | None = None,
                        n: int | None = None, step: int | None = None) -> Generation:
        """`generate` launched on the engines without waiting: its `result()` waits for the rows. With `step`,
        the engines' time on it goes on the timeline as that step's "generate" (`_engine_span`)."""
        greedy = self.algorithm.needs_greedy if greedy is None else greedy
        n = self.n if n is None else n
        # Any prompt count over any number of engines: the last prompt is repeated up to a multiple,
        # and the rows generated for the repeats are dropped.
        pending = roles["rollout"].scatter_padded(lambda a, shard: a.generate.remote(shard, n, greedy, seed),
                                                  {k: prompts[k] for k in ("input_ids", "attention_mask")})
        span = self._engine_span(pending.refs, step) if step is not None else (lambda: None)

        def wait() -> None:
            ray.wait(pending.refs, num_returns=len(pending.refs))
            span()

        def result() -> dict:
            rows = concat_shards(pending.results())
            span()
            if self.cfg.rollout.sleep_between_steps:  # the roles sharing the engines' GPUs train in vLLM's memory
                roles["rollout"].call(lambda a: a.sleep.remote())
            return {k: v[:pending.size] if k.startswith("greedy_") else v[:pending.size * n] for k, v in rows.items()}

        return Generation(result=result, wait=wait)

    def _engine_span(self, refs: list, step: int):
        """Put the engines' work on `refs` on the timeline once it is waited for: from its launch, or from the end
        of the generation launched before it (an engine runs its calls in order; the driver waits for every
        launched generation before a sync, so nothing else is queued ahead), to the moment its last result
        arrived (a callback, so a generation waited for long after it ended keeps its own end)."""
        launched, ends, recorded = time.time(), [], []
        for ref in refs:
            ref.future().add_done_callback(lambda _: ends.append(time.time()))

        def record() -> None:  # called once the refs are ready
            if recorded:
                return
            recorded.append(True)
            start = max(launched, self._engines_free_at)
            self._engines_free_at = max(ends) if len(ends) == len(refs) else time.time()  # a callback still on its way
            self.timeline.record("generate", ["rollout"], start, self._engines_free_at, step)
        return record

    def score(self, roles: RoleGroups, rollout: dict, timer: PhaseTimer) -> dict:
        """Old log-probs (policy), reference log-probs, rewards and values, all launched at once."""
        rows = {k: rollout[k] for k in ROLLOUT_KEYS}
        if self.algorithm.needs_greedy:
            greedy = {k: rollout[f"greedy_{k}"] for k in ROLLOUT_KEYS}
            reward_rows = {k: torch.cat([rows[k], greedy[k]]) for k in ROLLOUT_KEYS}
        else:
            reward_rows = rows
        launch = {"reward": lambda: roles["reward"].scatter_padded(lambda a, s: a.score.remote(s), reward_rows)}
        if self.scores_old_logprobs:
            launch["policy"] = lambda: roles["policy"].scatter_padded(lambda a, s: a.rollout_logprobs.remote(s), rows)
        if self.uses_reference:
            launch["reference"] = lambda: roles.reference().scatter_padded(
                lambda a, s: a.ref_rollout_logprobs.remote(s), rows)
        if "critic" in roles.groups:
            launch["critic"] = lambda: roles["critic"].scatter_padded(lambda a, s: a.values.remote(s), rows)
        out = {}
        with timer.phase("score"):
            for merged in roles.in_turns(launch, lambda name, calls: calls.merged()).values():
                out.update(merged)
        if not self.scores_old_logprobs:  # the policy's own come from its training forward; the KL shaping
            out["logprobs"] = rollout["engine_logprobs"]  # of the rewards reads the engine's meanwhile
        rewards = out.pop("sequence_rewards")
        size = rows["input_ids"].shape[0]
        out["sequence_rewards"] = rewards[:size]
        if self.algorithm.needs_greedy:
            out["greedy_rewards"] = rewards[size:].repeat_interleave(self.n)
        return out

    def compute_advantages(self, rollout: dict, scores: dict, kl_coef: float | None = None) -> tuple[dict, dict]:
        """`online_advantages.compute_advantages` with this step's coefficient (the controller's current
        value by default; the controller is not moved here); keeps the running reward std it returns."""
        kl_coef = self.kl.value if kl_coef is None else kl_coef
        batch, metrics, self.reward_std = compute_advantages(rollout, scores, self.cfg, kl_coef, self.reward_std)
        return batch, metrics

    def update(self, roles: RoleGroups, batch: dict, step: int, timer: PhaseTimer, kl_coef: float) -> dict:
        """PPO epochs over shuffled minibatches; policy and critic update concurrently (in turns where they
        share CPU-only bundles, `RoleGroups.turns`). `kl_coef`: this step's, as the rewards were shaped with."""
        a = self.cfg.algorithm
        rows = batch["input_ids"].shape[0]
        size = rows // a.num_minibatches
        clip_low, clip_high = a.clip_range  # the ratio's clip range [1 - low, 1 + high]
        # Checked here, once; each minibatch's step adds its denominators.
        policy_step = PolicyStep(self.algorithm, clip_eps=clip_low, clip_eps_high=clip_high,
                                 dual_clip=a.dual_clip or None, kl_coef=kl_coef, kl_estimator=self.kl_estimator,
                                 temperature=self.cfg.rollout.temperature, ptx_coef=a.ptx_coef,
                                 rollout_is=a.rollout_is, rollout_is_cap=a.rollout_is_cap,
                                 loss_aggregation=a.loss_aggregation)
        generator = torch.Generator().manual_seed(self.cfg.run.seed * 7919 + step)
        per_step = []
        for _ in range(a.ppo_epochs):
            order = torch.randperm(rows, generator=generator)
            for start in range(0, rows, size):
                idx = order[start:start + size]
                if self.groups_in_order:
                    idx = idx.sort().values
                mb = {k: v[idx] for k, v in batch.items()}
                # The minibatch's aggregation denominator (tokens, sequences, or rows x max_new_tokens) over all
                # its rows: each micro-batch on each rank scales its share by it (`TrainEngine.global_loss`).
                denominator = aggregation_denominator(mb["response_mask"], a.loss_aggregation,
                                                      self.cfg.rollout.max_new_tokens)
                ptx_denominator = None
                if self.ptx is not None:
                    ptx_rows = torch.randint(len(self.ptx), (size,), generator=generator).tolist()
                    mb.update({f"ptx_{k}": v for k, v in self.ptx.batch(ptx_rows).items()})
                    ptx_denominator = aggregation_denominator(
                        mb["ptx_loss_mask"][:, 1:], a.loss_aggregation, self.cfg.data.max_length)
                mb_step = replace(policy_step, loss_denominator=denominator, ptx_denominator=ptx_denominator)
                launch = {"policy": lambda p=mb_step, mb=mb: roles["policy"].scatter(
                    lambda w, s: w.train_online.remote(s, p), mb)}
                if "critic" in roles.groups:
                    critic_step = CriticStep(a.value_clip_eps, a.loss_aggregation, denominator)
                    launch["critic"] = lambda c=critic_step, mb=mb: roles["critic"].scatter(
                        lambda w, s: w.train_values.remote(s, c), mb)
                launched = time.time()

                def finish(role, pending):
                    with timer.phase(f"update_{role}"):
                        results = roles[role].gather(pending)
                    self.timeline.record("update", [role], launched, time.time(), step)
                    return results

                merged = {}
                for role, results in roles.in_turns(launch, finish).items():
                    # Each role's own keys (loss, grad_norm, lr, ...) under its own prefix.
                    merged.update({k if "/" in k else f"{role}/{k}": sum(r[k] for r in results) / len(results)
                                   for k in results[0]})
                per_step.append(merged)
        keys = per_step[0].keys()
        out = {k: sum(m[k] for m in per_step) / len(per_step) for k in keys}
        # The policy's mismatch sums (every rank, micro-batch and minibatch scaled alike) as ratios.
        sums = {k[len(SUM_PREFIX):]: out.pop(k) for k in list(out) if k.startswith(SUM_PREFIX)}
        if sums:
            out.update(mismatch_metrics(sums))
        return out

    def check_mismatch(self, rollout: dict, scores: dict) -> dict:
        """With `algorithm.max_logprob_diff`: the whole batch's mismatch between the policy's scored
        log-probs and the engine's, and `rollout/skipped` 1 when its mean exceeds the limit (the step is
        then not trained on, and counted as a skipped one); {} without it."""
        a = self.cfg.algorithm
        if not a.max_logprob_diff:
            return {}
        old, engine, mask = scores["logprobs"], rollout["engine_logprobs"], rollout["response_mask"]
        weights, capped = rollout_is_weights(old, engine, mask, a.rollout_is, a.rollout_is_cap)
        metrics = mismatch_metrics(mismatch_sums(old, engine, weights, capped, mask))
        metrics["rollout/skipped"] = float(metrics["rollout/logprob_diff"] > a.max_logprob_diff)
        return metrics

    def sync_weights(self, roles: RoleGroups) -> dict:
        """Policy -> every engine, in buckets; returns seconds, bytes and bandwidth."""
        start = time.perf_counter()
        engines = list(roles["rollout"].actors)
        bucket = self.cfg.rollout.sync_bucket_bytes
        results = roles["policy"].call(lambda a: a.send_weights.remote(engines, bucket))
        seconds = time.perf_counter() - start
        sent = max(r["sync/bytes"] for r in results)
        rate = sent / max(seconds, 1e-9)
        return {"sync/bytes": sent, "sync/seconds": seconds, "sync/bandwidth_bytes_per_s": rate,
                "sync/bandwidth_memcpy_bytes_per_s": self.memcpy_rate,
                "sync/bandwidth_share_of_memcpy": rate / self.memcpy_rate}

    def rollout_metrics(self, rollout: dict, scores: dict, metrics: dict) -> dict:
        mask = rollout["response_mask"].float()
        out = {"rollout/reward_mean": float(scores["sequence_rewards"].mean()),
               "rollout/response_length": float(mask.sum(-1).mean()),
               "rollout/finished_frac": float(rollout["finished"].float().mean())}
        if "greedy_rewards" in scores:
            out["rollout/greedy_reward_mean"] = float(scores["greedy_rewards"].mean())
        tokens = float(rollout["attention_mask"].sum())
        # Work counts for the benchmarks: response tokens decoded (greedy ones too), decoding steps
        # (the longest response of each generate call), and tokens through the policy's training passes.
        generated = float(mask.sum())
        decode_steps = float(mask.sum(-1).max())
        if "greedy_response_mask" in rollout:
            greedy = rollout["greedy_response_mask"]
            generated += float(greedy.sum())
            decode_steps += float(greedy.sum(-1).max())
        out["perf/generated_tokens"] = generated
        out["perf/decode_steps"] = decode_steps
        # Prefill: each distinct prompt once (its samples and greedy answer share it through the prefix cache).
        out["perf/prefill_tokens"] = float(needed_prompt_tokens(
            rollout["input_ids"], rollout["attention_mask"], rollout["response_mask"].shape[1]))
        out["perf/trained_tokens"] = float(self.cfg.algorithm.ppo_epochs * rollout["input_ids"].numel())
        out["perf/needed_tokens"] = float(self.cfg.algorithm.ppo_epochs * needed_rollout_tokens(
            rollout["input_ids"], rollout["attention_mask"], rollout["response_mask"].shape[1]))
        out["perf/tokens_per_s"] = tokens / max(metrics.get("time/step_s", 0.0), 1e-9)
        out["perf/samples_per_s"] = rollout["input_ids"].shape[0] / max(metrics.get("time/step_s", 0.0), 1e-9)
        return out

    def evaluate(self, roles: RoleGroups, step: int) -> dict:
        """Held-out prompts: mean reward, alignment accuracy, response length, KL to the reference."""
        if self.eval_prompts is None:
            return {}
        prompts = self.eval_prompts.batch(evaluation.eval_indices(self.cfg, self.eval_prompts))
        return evaluation.online_eval(
            self.cfg, roles, prompts, step, tokenizer=self.tokenizer, run_dir=self.run_dir,
            generate=lambda rows, seed: self.generate(roles, rows, seed=seed, greedy=True, n=1))


def run_online(cfg: JobConfig, address: str | None = None, stop: threading.Event | None = None) -> dict:
    """Run an online job on the local Ray cluster (or the one at `address`); returns the summary.
    `stop`: see `jobs.run_job`."""
    job = OnlineJob.from_config(cfg)
    init_ray(address)
    with stop_on_signals(stop) as stop:
        return job.run(stop)


__all__ = ["OnlineJob", "run_online", "RunningStd"]
