"""RoleGroups.in_turns: roles sharing CPU-only bundles take turns, other roles run at the same time.

The toy workers record when their call ran; a call that must overlap another waits for that other
call to start (a file it writes), so the test needs no timing margin: run in turns, it would wait in
vain and fail."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from rlhf_ray.config import load_config
from rlhf_ray.runtime.distributed import DistributedWorker
from rlhf_ray.runtime.role_groups import RoleGroups, RoleSpec


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
        for name, seconds in {"policy": {"forward": 0.3, "train": 2.0}, "reference": {"forward": 0.5},
                              "reward": {"forward": 0.7}}.items():
            roles[name].call(lambda a, s=seconds: a.set_compute.remote(s))
        out = roles.compute_times()
    assert out["time/compute/reference/forward_s"] == 0.5 and out["time/compute/policy_s"] == 2.3
    # policy then reference (0.3 + 0.5 in turns), beside the reward (0.7): 0.8.
    assert out["time/compute_of_kind/forward_s"] == pytest.approx(0.8)
    assert out["time/compute_of_kind/train_s"] == 2.0


def test_roles_in_bundles_of_their_own_run_at_once(ray_cluster, ship_test_classes, tmp_path):
    with _groups("[]", ("policy", "reference")) as roles:
        assert roles.turns(["policy", "reference"]) == [["policy"], ["reference"]]
        launch = {"policy": lambda: roles["policy"].map(lambda a: a.work.remote(str(tmp_path), "p", "r")),
                  "reference": lambda: roles["reference"].map(lambda a: a.work.remote(str(tmp_path), "r", "p"))}
        roles.in_turns(launch, lambda name, refs: roles[name].gather(refs))


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
