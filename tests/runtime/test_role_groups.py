"""RoleGroups.in_turns: roles sharing CPU-only bundles take turns, other roles run at the same time; a
borrowed group stays with its borrower across a recovery.

The toy workers record when their call ran; a call that must overlap another waits for that other
call to start (a file it writes), so the test needs no timing margin: run in turns, it would wait in
vain and fail."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from rlhf_ray.config import load_config
from rlhf_ray.jobs.common import RecoveringJob
from rlhf_ray.runtime.actor_group import ActorGroupError
from rlhf_ray.runtime.distributed import DistributedWorker
from rlhf_ray.runtime.role_groups import SHARED, RoleGroups, RoleSpec, SharedGroups


class ClockWorker(DistributedWorker):
    """Records the wall-clock interval of its call; can wait for another call to have started."""

    def work(self, folder: str, name: str, wait_for: str = "") -> tuple[float, float]:
        start = time.time()
        (Path(folder) / f"{name}.started").touch()
        if wait_for:
            deadline = time.time() + 60
            while not (Path(folder) / f"{wait_for}.started").exists():
                if time.time() > deadline:
                    raise TimeoutError(f"{name} waited 60 s for {wait_for} to start: they did not run at once")
                time.sleep(0.01)
        time.sleep(0.2)
        return start, time.time()

    def set_compute(self, seconds: dict[str, float]) -> None:
        self.seconds = seconds

    def compute_time(self) -> dict[str, float]:
        return getattr(self, "seconds", {})


@pytest.fixture(scope="module")
def ship_test_classes():
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _groups(colocate: str, names: tuple[str, ...]):
    cfg = load_config("tiny-dpo", [f"placement.colocate={colocate}", "policy.num_cpus_per_rank=1",
                                   "reference.num_cpus_per_rank=1"])
    # An earlier test's groups give their CPUs back with a delay: RoleGroups waits for them.
    return RoleGroups(cfg, [RoleSpec(name, ClockWorker, 1, 1.0) for name in names])


def test_colocated_cpu_roles_take_turns_and_the_others_run_at_once(ray_cluster, ship_test_classes, tmp_path):
    with _groups("[[policy, reference]]", ("policy", "reference", "reward")) as roles:
        assert roles.turns(["policy", "reference", "reward"]) == [["policy", "reference"], ["reward"]]
        launch = {
            "policy": lambda: roles["policy"].map(lambda a: a.work.remote(str(tmp_path), "policy", "reward")),
            "reference": lambda: roles["reference"].map(lambda a: a.work.remote(str(tmp_path), "reference")),
            "reward": lambda: roles["reward"].map(lambda a: a.work.remote(str(tmp_path), "reward", "policy")),
        }
        spans = roles.in_turns(launch, lambda name, refs: roles[name].gather(refs)[0])
    assert list(spans) == ["policy", "reference", "reward"]
    # The reference began only after the policy, which shares its bundle, had finished ...
    assert spans["reference"][0] >= spans["policy"][1]
    # ... while the reward (its own bundle) ran beside the policy: each waited for the other to start.


def test_compute_of_roles_that_take_turns_adds_up(ray_cluster, ship_test_classes):
    with _groups("[[policy, reference]]", ("policy", "reference", "reward")) as roles:
        # The policy's calls ran with as few as 1 torch thread (the cores it found free), the others report none.
        for name, seconds in {"policy": {"forward": 0.3, "train": 2.0, "threads": 1}, "reference": {"forward": 0.5},
                              "reward": {"forward": 0.7}}.items():
            roles[name].call(lambda a, s=seconds: a.set_compute.remote(s))
        out = roles.compute_times()
    assert out["time/compute/reference/forward_s"] == 0.5 and out["time/compute/policy_s"] == 2.3
    assert out["threads/policy"] == 1.0 and "threads/reference" not in out
    assert not any("threads" in key for key in out if key.startswith("time/"))
    # policy then reference (0.3 + 0.5 in turns), beside the reward (0.7): 0.8.
    assert out["time/compute_of_kind/forward_s"] == pytest.approx(0.8)
    assert out["time/compute_of_kind/train_s"] == 2.0


def test_roles_in_bundles_of_their_own_run_at_once(ray_cluster, ship_test_classes, tmp_path):
    with _groups("[]", ("policy", "reference")) as roles:
        assert roles.turns(["policy", "reference"]) == [["policy"], ["reference"]]
        launch = {"policy": lambda: roles["policy"].map(lambda a: a.work.remote(str(tmp_path), "p", "r")),
                  "reference": lambda: roles["reference"].map(lambda a: a.work.remote(str(tmp_path), "r", "p"))}
        roles.in_turns(launch, lambda name, refs: roles[name].gather(refs))


class BorrowingJob(RecoveringJob):
    """A job borrowing its reference whose first attempt loses an actor after using it; the retry waits a
    moment for the owner to finish, as a slow recovery would, then uses the reference again."""

    def __init__(self, cfg, run_dir, owner_done: threading.Event):
        self.cfg, self.run_dir, self.owner_done = cfg, run_dir, owner_done
        self.attempts = 0

    def _specs(self):
        return [RoleSpec("policy", ClockWorker, 1, 1.0), RoleSpec("reference", ClockWorker, 1, 1.0)]

    def _attempt(self, stop, resume_from, failures, started_at):
        self.attempts += 1
        if self.attempts > 1:
            self.owner_done.wait(timeout=3)  # an owner free to finish does so in this time
        with RoleGroups(self.cfg, self._specs()) as roles:
            assert roles.borrowed_from() == {"reference": "lender"}
            roles["reference"].call(lambda a: a.set_compute.remote({"forward": 1.0}))
            if self.attempts == 1:
                raise ActorGroupError("role 'policy' rank 0 of 1 failed", where="role 'policy' rank 0 of 1",
                                      died="ActorDiedError: killed")
        return {"failures": failures}


def test_a_borrower_recovers_with_the_group_its_owner_would_have_torn_down(ray_cluster, ship_test_classes,
                                                                           tmp_path):
    owner_cfg = load_config("tiny-dpo", ["name=lender", "policy.num_cpus_per_rank=1",
                                         "reference.num_cpus_per_rank=1"])
    borrower_cfg = load_config("tiny-dpo", ["name=borrower", "reference.share_with=lender", "placement.colocate=[]",
                                            f"run.output_dir={tmp_path}", "policy.num_cpus_per_rank=1",
                                            "run.max_failures=1"])
    offered, owner_done = threading.Event(), threading.Event()
    SHARED.forget("lender")

    def owner():  # offers its reference, then finishes: it tears the group down once no borrower holds it
        try:
            with RoleGroups(owner_cfg, [RoleSpec("reference", ClockWorker, 1, 1.0)]) as roles:
                roles.offer("reference")
                offered.set()
        finally:
            SHARED.abandon("lender")
            owner_done.set()

    job = BorrowingJob(borrower_cfg, tmp_path, owner_done)
    with SHARED.holding("borrower", ["lender/reference"]):  # as a pipeline reserves before its jobs start
        lender = threading.Thread(target=owner)
        lender.start()
        assert offered.wait(timeout=300)
        summary = job.run()
    lender.join(timeout=60)
    assert job.attempts == 2 and len(summary["failures"]) == 1 and summary["failures"][0]["resumed_from_step"] == 0
    assert owner_done.is_set()  # and the owner finished once the borrower's run had ended


def test_an_owner_recovering_takes_its_group_back_from_borrowers_that_let_go_and_offers_a_new_one():
    shared = SharedGroups()
    shared.publish("lender/reference", "group 1")
    withdrawn = threading.Event()
    with shared.holding("borrower", ["lender/reference"]):
        assert shared.wait("lender/reference", timeout_s=1, borrower="borrower") == "group 1"
        # The shared reference died: the owner tears down to recover, waiting only for the borrower's role
        # groups (whose calls failed on it too) to let go, not for the borrower's run to end.
        owner = threading.Thread(target=lambda: (shared.withdraw("lender/reference", final=False), withdrawn.set()))
        owner.start()
        assert not withdrawn.wait(timeout=0.3)
        shared.let_go("lender/reference", "borrower")
        assert withdrawn.wait(timeout=5)
        owner.join()
        shared.publish("lender/reference", "group 2")  # the owner's new group, to the same reservations
        assert shared.wait("lender/reference", timeout_s=1, borrower="borrower") == "group 2"
        done = threading.Event()
        final = threading.Thread(target=lambda: (shared.withdraw("lender/reference"), done.set()))
        final.start()
        shared.let_go("lender/reference", "borrower")
        assert not done.wait(timeout=0.3)  # the owner's end waits for the borrower's whole run
    assert done.wait(timeout=5)
    final.join()


def test_shares_gpus_is_true_only_for_a_gpu_role_beside_another_gpu_role():
    from types import SimpleNamespace

    from rlhf_ray.runtime.placement import RoleResources, plan_placement

    specs = {"policy": RoleSpec("policy", object, 1, 1, 1), "rollout": RoleSpec("rollout", object, 1, 1, 1),
             "reward": RoleSpec("reward", object, 1, 1, 0), "critic": RoleSpec("critic", object, 1, 1, 1)}

    def groups(colocate):
        resources = [RoleResources(s.name, s.num_ranks, s.num_cpus_per_rank, s.num_gpus_per_rank)
                     for s in specs.values()]
        roles = RoleGroups.__new__(RoleGroups)
        roles.specs = specs
        roles.placement = SimpleNamespace(plan=plan_placement(resources, colocate=colocate))
        return roles

    assert groups([["policy", "rollout"]]).shares_gpus("rollout")
    assert not groups([["rollout", "reward"]]).shares_gpus("rollout")  # the reward rule holds no GPU
    assert not groups([]).shares_gpus("rollout")
    assert groups([["critic", "rollout"]]).shares_gpus("critic")
