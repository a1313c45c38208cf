"""Asynchronous rollouts (`rollout.max_staleness`): the queue's launch rule and staleness, its checkpoint, the
config's refusals, the importance weight of a stale batch, and tiny GRPO runs: 0 is the synchronous loop, 1
trains on batches at most one version stale, and a resumed asynchronous run ends like an uninterrupted one."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.jobs.rollout_queue import Generation, RolloutQueue, rows_from_json, rows_to_json

from job_helpers import assert_same_run, metric_rows, run_killing_once, stopped_before, tiny_config


class _Engines:
    """Launches that record which step launched with which weight version, and when."""

    def __init__(self):
        self.launched: list[tuple[int, int]] = []
        self.queue: RolloutQueue | None = None

    def launch(self, step: int) -> Generation:
        self.launched.append((step, self.queue.version))
        return Generation(result=lambda: {"input_ids": torch.full((2, 3), step)})


def _queue(k: int, last: int) -> tuple[RolloutQueue, _Engines]:
    engines = _Engines()
    engines.queue = RolloutQueue(k, last, engines.launch)
    return engines.queue, engines


def _run(queue: RolloutQueue, steps: range) -> list[int]:
    staleness = []
    for step in steps:
        rows, stale = queue.take(step)
        assert int(rows["input_ids"][0, 0]) == step
        staleness.append(stale)
        queue.synced(step)  # the step's update and sync
    return staleness


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_each_batch_is_sampled_at_most_k_versions_behind_the_weights_that_train_on_it(k):
    queue, engines = _queue(k, last=6)
    staleness = _run(queue, range(1, 7))
    # Step m trains from version m - 1; the first k + 1 batches are all sampled with the initial weights.
    assert staleness == [min(m - 1, k) for m in range(1, 7)]
    assert [s for s, _ in engines.launched] == list(range(1, 7))  # launched in step order: the sampler's order
    assert not queue.pending  # nothing launched past the last step


def test_k_0_launches_each_steps_own_generation_when_it_takes_it():
    queue, engines = _queue(0, last=3)
    for step in (1, 2, 3):
        queue.take(step)
        assert engines.launched[-1] == (step, step - 1) and not queue.pending  # the weights of the step before
        queue.synced(step)


def test_the_batches_in_flight_go_into_the_checkpoint_and_come_back_as_they_were_sampled():
    queue, engines = _queue(2, last=8)
    _run(queue, range(1, 4))  # after step 3: step 4 in flight (launched at step 2) and step 5 (at step 3)
    state = json.loads(json.dumps(queue.state_dict()))  # as stored in trainer_state.json
    assert [(p["step"], p["version"]) for p in state["pending"]] == [(4, 1), (5, 2)] and state["version"] == 3
    resumed, fresh = _queue(2, last=8)
    resumed.load_state_dict(state)
    rows, stale = resumed.take(4)
    assert int(rows["input_ids"][0, 0]) == 4 and stale == 2  # the stored batch, not a new one
    assert fresh.launched == [(6, 3)]  # only the step that was not in flight is launched


def test_a_restored_batch_staler_than_the_bound_is_generated_anew():
    queue, _ = _queue(2, last=8)
    _run(queue, range(1, 4))
    state = queue.state_dict()
    tighter, engines = _queue(0, last=8)  # resumed with max_staleness 0
    tighter.load_state_dict(state)
    rows, stale = tighter.take(4)  # stored with version 1: 2 stale
    assert stale == 0 and engines.launched == [(4, 3)]


def test_rows_round_trip_through_json_exactly():
    rows = {"ids": torch.tensor([[1, 2], [3, 4]]), "done": torch.tensor([True, False]),
            "lp": torch.tensor([[-0.1234567, -float("inf")], [0.0, -3.3]], dtype=torch.float32)}
    back = rows_from_json(json.loads(json.dumps(rows_to_json(rows))))
    for key, value in rows.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


@pytest.mark.parametrize("overrides, message", [
    (["rollout.max_staleness=-1"], r"max_staleness: got -1; expected a whole number >= 0"),
    (["rollout.max_staleness=1.5"], r"max_staleness"),
    (["rollout.max_staleness=1", "rollout.num_gpus_per_engine=1", "rollout.sleep_between_steps=true"],
     r"max_staleness: 1 generates while the policy trains, but rollout.sleep_between_steps"),
])
def test_bad_staleness_settings_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny-grpo", overrides)


def test_the_importance_weight_of_a_stale_batch_is_the_policy_now_over_the_engine_then(tmp_path):
    """A batch sampled two versions back: the policy scores it with the weights the step starts from (its
    old log-probs); the engine's log-probs are those of the weights that sampled. The rollout correction's
    weight is their ratio, which covers the policy's lag as well as the engine's own numerics."""
    from rlhf_ray.jobs.online import OnlineJob

    cfg = tiny_config("tiny-grpo", tmp_path / "stale", "rollout.engine=hf", "rollout.max_staleness=2",
                      "run.batch_size=1", "algorithm.samples_per_prompt=2",
                      "algorithm.max_logprob_diff=10")
    job = OnlineJob.from_config(cfg)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    engine_then = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]]) * mask
    policy_now = (engine_then + torch.tensor([[0.3, -0.2, 0.0], [0.1, 0.0, 0.0]])) * mask
    rollout = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5, dtype=torch.long),
               "response_mask": mask, "finished": torch.ones(2, dtype=torch.bool), "engine_logprobs": engine_then}
    scores = {"sequence_rewards": torch.tensor([1.0, 0.0]), "logprobs": policy_now, "ref_logprobs": policy_now}
    batch, _ = job.compute_advantages(rollout, scores)
    assert torch.equal(batch["old_logprobs"], policy_now) and torch.equal(batch["engine_logprobs"], engine_then)
    metrics = job.check_mismatch(rollout, scores)
    # tis, cap 2: weights e^0.3, e^-0.2, e^0.1, none truncated
    assert metrics["rollout/is_weight_mean"] == pytest.approx((math.exp(0.3) + math.exp(-0.2) + math.exp(0.1)) / 3)
    assert metrics["rollout/is_clipped_frac"] == 0


# Tiny GRPO runs -------------------------------------------------------------------------------------------

GRPO = ["run.total_steps=4", "run.batch_size=2", "rollout.max_new_tokens=8", "run.keep_last=5"]


def _staleness(run_dir) -> list[float]:
    return [row["rollout/staleness"] for row in metric_rows(run_dir)]


@pytest.fixture(scope="module")
def async_run(ray_cluster, tmp_path_factory):
    """An uninterrupted tiny GRPO run with max_staleness 1, checkpointed at steps 2 and 4."""
    from rlhf_ray.jobs import run_job

    out = tmp_path_factory.mktemp("async") / "full"
    run_job(tiny_config("tiny-grpo", out, *GRPO, "run.save_every=2", "rollout.max_staleness=1"))
    return out


def test_max_staleness_1_trains_on_batches_one_version_behind(async_run):
    assert _staleness(async_run) == [0.0, 1.0, 1.0, 1.0]
    state = json.loads((async_run / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    assert [(p["step"], p["version"]) for p in state["rollouts"]["pending"]] == [(3, 1)]  # in flight at step 2
    state = json.loads((async_run / "checkpoints" / "step_4" / "trainer_state.json").read_text())
    assert state["rollouts"]["pending"] == []  # nothing launched past the last step


def _intervals(run_dir, role: str, phase: str) -> dict[int, tuple[float, float]]:
    from rlhf_ray.telemetry.timeline import read_timeline

    """Each step's first start and last end of `phase` on `role`."""
    spans: dict[int, tuple[float, float]] = {}
    for r in read_timeline(run_dir):
        if r["role"] == role and r["phase"] == phase:
            start, end = spans.get(r["step"], (r["start"], r["end"]))
            spans[r["step"]] = (min(start, r["start"]), max(end, r["end"]))
    return spans


def test_the_timeline_shows_the_engines_generating_ahead_while_the_policy_trains(async_run):
    generate, update = _intervals(async_run, "rollout", "generate"), _intervals(async_run, "policy", "update")
    assert sorted(generate) == [1, 2, 3, 4] and all(start <= end for start, end in generate.values())
    for step in (1, 2, 3):  # the next step's generation starts before this step's update and runs beside it
        assert generate[step + 1][0] < update[step][0]
        assert generate[step + 1][0] >= generate[step][1]  # one engine: after the generation launched before it


def test_a_resumed_asynchronous_run_ends_like_the_uninterrupted_one(async_run, tmp_path):
    from rlhf_ray.jobs import run_job

    resumed = stopped_before(async_run, 4, tmp_path / "resumed")
    run_job(tiny_config("tiny-grpo", resumed, *GRPO, "run.save_every=2", "rollout.max_staleness=1"))
    assert_same_run(resumed, async_run)


def test_max_staleness_0_is_the_synchronous_loop(ray_cluster, tmp_path):
    """The queue with k = 0 against the step's generation called in line, as the loop did before the queue."""
    from rlhf_ray.jobs.online import OnlineJob

    class InLine(OnlineJob):
        def step(self, roles, step, timer):
            self.rollouts.take = lambda m: (self.generate(roles, self.prompts.batch(next(self.sampler)),
                                                          seed=self.draw_seed(m, 0)), 0)
            return super().step(roles, step, timer)

    args = [*GRPO[:3], "run.total_steps=2"]
    InLine.from_config(tiny_config("tiny-grpo", tmp_path / "inline", *args)).run()
    OnlineJob.from_config(tiny_config("tiny-grpo", tmp_path / "queue", *args, "rollout.max_staleness=0")).run()
    assert_same_run(tmp_path / "queue", tmp_path / "inline")
    assert _staleness(tmp_path / "queue") == [0.0, 0.0]
    generate, sync = _intervals(tmp_path / "queue", "rollout", "generate"), _intervals(tmp_path / "queue", "rollout",
                                                                                         "sync")
    assert generate[2][0] >= sync[1][1]  # on-policy: the next generation waits for the weights of this step


def test_an_engine_killed_with_batches_in_flight_is_survived_like_an_uninterrupted_run(async_run, tmp_path):
    """kill -9 of the engine once step 2 is written: the generation it runs (or has queued) is lost, and the run
    resumes from its latest checkpoint (whose batch in flight is stored) and generates the rest anew."""
    from rlhf_ray.telemetry.metrics import read_metrics

    out = tmp_path / "killed"
    cfg = tiny_config("tiny-grpo", out, *GRPO, "run.save_every=2", "rollout.max_staleness=1")
    summary = run_killing_once(cfg, "VLLMRolloutWorker", after_steps=2)
    failures = summary["failures"]
    assert len(failures) == 1 and failures[0]["role"].startswith("role 'rollout'"), failures
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert_same_run(out, async_run)
