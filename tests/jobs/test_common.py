"""Where a recovery resumes from: this run's latest checkpoint, else where the run started, never a checkpoint
another run left in the folder. The driver's loop is a fake here (`attempt` writes checkpoints the way
`save_checkpoint` does and then loses an actor), so the choice is seen without starting Ray."""

from __future__ import annotations

import json

import pytest

from rlhf_ray.config import load_config
from rlhf_ray.config.schema import ConfigError
from rlhf_ray.jobs.common import prepare_run_dir, with_recovery
from rlhf_ray.runtime.actor_group import ActorGroupError
from rlhf_ray.runtime.checkpoint import atomic_dir, checkpoint_dir, prune_checkpoints


def save(run_dir, step: int, keep_last: int = 5):
    """A checkpoint as `save_checkpoint` writes one (without the actors' state), then pruned as it prunes."""
    with atomic_dir(checkpoint_dir(run_dir, step)) as tmp:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
    prune_checkpoints(run_dir, keep_last)
    return checkpoint_dir(run_dir, step)


def death():
    return ActorGroupError("role 'policy' rank 0 of 1 failed", where="role 'policy' rank 0 of 1",
                           died="ActorDiedError: the actor died unexpectedly")


def run(cfg, run_dir, saves: list[list[int]], keep_last: int = 5):
    """`with_recovery` over attempts that each save the steps in `saves[i]` and then die, the last one
    finishing; returns the checkpoint each attempt was given (its step, or None)."""
    given = []

    def attempt(resume_from, failures):
        given.append(None if resume_from is None else json.loads((resume_from / "trainer_state.json").read_text())
                     ["step"])
        for step in saves[len(given) - 1]:
            save(run_dir, step, keep_last)
        if len(given) < len(saves):
            raise death()
        return {"failures": failures}

    summary = with_recovery(cfg, run_dir, attempt)
    return given, [f["resumed_from_step"] for f in summary["failures"]]


def config(run_dir, *overrides):
    return load_config(None, [f"run.output_dir={run_dir}", "run.max_failures=3", *overrides])


def test_a_death_before_the_first_save_resumes_from_the_given_checkpoint(tmp_path):
    earlier = tmp_path / "earlier"
    start = save(earlier, 3)
    run_dir = tmp_path / "run"
    given, resumed = run(config(run_dir, f"run.resume={start}"), run_dir, [[], [4]])
    assert given == [3, 3] and resumed == [3]  # not step 0 on the initial weights


def test_a_death_resumes_from_this_runs_checkpoint_not_a_higher_step_of_another_line(tmp_path):
    run_dir = tmp_path / "run"
    for step in (2, 4, 6, 8):
        save(run_dir, step)
    # Resumed from step_4 of a folder that also holds step_8 (the line it branches from): this run's step_5
    # is what a death goes back to, and pruning to two keeps it.
    given, resumed = run(config(run_dir, f"run.resume={checkpoint_dir(run_dir, 4)}", "run.keep_last=2"), run_dir,
                         [[5], [6]], keep_last=2)
    assert given == [4, 5] and resumed == [5]
    assert (checkpoint_dir(run_dir, 6)).is_dir()


def test_auto_resumes_a_death_before_any_save_from_where_it_started(tmp_path):
    run_dir = tmp_path / "run"
    save(run_dir, 2)  # an earlier invocation of the same run
    given, resumed = run(config(run_dir), run_dir, [[], [4], [6]])
    assert given == [2, 2, 4] and resumed == [2, 4]


def test_never_refuses_a_folder_holding_another_runs_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    save(run_dir, 900)
    cfg = config(run_dir, "run.resume=never")
    with pytest.raises(ConfigError, match=rf"run.resume: never, but {run_dir / 'checkpoints'} holds an earlier "
                                          r"run's checkpoints \(step_900\); give this run another run.output_dir"):
        prepare_run_dir(cfg)
    assert not (run_dir / "config.yaml").exists()  # refused before anything in the folder changed
    fresh = tmp_path / "fresh"
    assert prepare_run_dir(config(fresh, "run.resume=never")) == fresh
    given, resumed = run(config(fresh, "run.resume=never"), fresh, [[10], [20]])
    assert given == [None, 10] and resumed == [10]
