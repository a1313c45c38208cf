"""Placement plans: spread and colocated bundles, fractional shares, and layouts that cannot fit.

Plans and `check_fits` need no Ray (a fake `available` dict); the last tests
create placement groups (no actors) on the shared local cluster."""

from __future__ import annotations

import pytest

from rlhf_ray.runtime.placement import (
    PlacementError,
    RankSlot,
    RoleResources,
    check_fits,
    create_placement_group,
    plan_placement,
    wait_until_fits,
)


def test_spread_roles_get_bundles_of_their_own():
    plan = plan_placement([RoleResources("policy", 2, 2, 1), RoleResources("reward", 1, 1, 0)])
    # policy: 2 bundles of {2 CPU, 1 GPU}; reward: 1 bundle of {1 CPU}, after them.
    assert plan.bundles == ({"CPU": 2.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}, {"CPU": 1.0})
    assert plan.slots["policy"] == (RankSlot(0, 2.0, 1.0), RankSlot(1, 2.0, 1.0))
    assert plan.slots["reward"] == (RankSlot(2, 1.0, 0.0),)
    assert plan.total("CPU") == 5 and plan.total("GPU") == 2


def test_colocated_roles_share_one_bundle_per_rank():
    roles = [RoleResources("policy", 2, 1, 1), RoleResources("critic", 1, 1, 0),
             RoleResources("reference", 2, 1, 1), RoleResources("reward", 2, 1, 0)]
    plan = plan_placement(roles, colocate=[["policy", "reference", "reward"]])
    # The set's 2 bundles come first (where policy is listed), critic's after.
    # Bundle = the largest need: {1 CPU, 1 GPU}. CPU is split 3 ways: floor(1/3 to 1e-4) = 0.3333;
    # the GPU 2 ways between the roles that need one (policy, reference): 0.5; reward asks no GPU.
    assert plan.bundles == ({"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0})
    assert plan.slots["policy"] == (RankSlot(0, 0.3333, 0.5), RankSlot(1, 0.3333, 0.5))
    assert plan.slots["reference"] == (RankSlot(0, 0.3333, 0.5), RankSlot(1, 0.3333, 0.5))
    assert plan.slots["reward"] == (RankSlot(0, 0.3333, 0.0), RankSlot(1, 0.3333, 0.0))
    assert plan.slots["critic"] == (RankSlot(2, 1.0, 0.0),)
    assert plan.units == (("policy", "reference", "reward"), ("critic",))


def test_two_cpu_roles_on_a_one_cpu_bundle_take_half_each():
    plan = plan_placement([RoleResources("policy", 1, 1), RoleResources("reference", 1, 1)],
                          colocate=[("policy", "reference")])
    assert plan.bundles == ({"CPU": 1.0},)
    assert plan.slots["policy"] == plan.slots["reference"] == (RankSlot(0, 0.5, 0.0),)


@pytest.mark.parametrize("colocate, message", [
    ([["policy", "critic"]], r"need the same num_ranks; got policy.num_ranks=2, critic.num_ranks=1"),
    ([["policy", "reference"], ["reference", "critic"]], r"role 'reference' is in two colocate sets"),
    ([["policy", "vllm"]], r"names role 'vllm', which this job does not have"),
])
def test_colocation_mistakes_are_named(colocate, message):
    roles = [RoleResources("policy", 2, 1, 1), RoleResources("critic", 1, 1, 1), RoleResources("reference", 2, 1, 1)]
    with pytest.raises(PlacementError, match=message):
        plan_placement(roles, colocate=colocate)


def test_role_resources_are_validated():
    with pytest.raises(PlacementError, match="role 'policy': num_ranks must be >= 1"):
        RoleResources("policy", 0)
    with pytest.raises(PlacementError, match="role 'critic': num_gpus_per_rank=1.5"):
        RoleResources("critic", 1, 1, 1.5)
    with pytest.raises(PlacementError, match="role 'policy' is declared twice"):
        plan_placement([RoleResources("policy", 1), RoleResources("policy", 2)])


def test_a_layout_that_fits_passes():
    plan = plan_placement([RoleResources("policy", 2, 1, 1), RoleResources("reference", 2, 1, 1)],
                          colocate=[["policy", "reference"]])
    check_fits(plan, available={"CPU": 2.0, "GPU": 2.0, "memory": 1e9})


def test_too_few_gpus_names_the_role_and_the_fixes():
    plan = plan_placement([RoleResources("policy", 2, 1, 1), RoleResources("critic", 2, 1, 2)])
    # policy takes 2 x 1 = 2 GPUs; critic then needs 2 x 2 = 4 more: 6 > 3 free.
    with pytest.raises(PlacementError) as info:
        check_fits(plan, available={"CPU": 16.0, "GPU": 3.0})
    assert str(info.value) == (
        "role 'critic' needs 2 GPUs per rank x 2 ranks; the cluster has 3 GPUs free in total, of which the roles "
        "placed before it take 2 (policy: 2): lower critic.num_ranks or critic.num_gpus_per_rank, colocate it "
        "with 'policy' (placement.colocate), or add GPUs")


def test_gpu_roles_on_a_cpu_only_cluster_fail_on_the_first_role():
    plan = plan_placement([RoleResources("policy", 1, 1, 1), RoleResources("reward", 2, 1, 0)])
    with pytest.raises(PlacementError, match=r"^role 'policy' needs 1 GPU per rank x 1 rank; the cluster has "
                                             r"0 GPUs free in total: set policy.num_gpus_per_rank to 0 to run on CPUs"):
        check_fits(plan, available={"CPU": 4.0})


def test_too_few_cpus_for_a_colocated_set_names_the_set():
    plan = plan_placement([RoleResources("policy", 4, 1), RoleResources("reference", 4, 1)],
                          colocate=[["policy", "reference"]])
    # 4 shared 1-CPU bundles: 4 CPUs > 3 free.
    with pytest.raises(PlacementError, match=r"roles 'policy', 'reference' \(colocated\) need 1 CPU per rank x 4 "
                                             r"ranks; the cluster has 3 CPUs free in total: lower num_ranks"):
        check_fits(plan, available={"CPU": 3.0})


def _state(ray_cluster, placement_group) -> dict:
    return ray_cluster.util.placement_group_table(placement_group)


def test_create_placement_group_spread_and_remove(ray_cluster):
    plan = plan_placement([RoleResources("policy", 2, 1), RoleResources("reward", 1, 0.5)])
    placement = create_placement_group(plan, timeout_s=120, strategy="SPREAD")
    group = placement.placement_group
    table = _state(ray_cluster, group)
    assert table["strategy"] == "SPREAD" and table["state"] == "CREATED"
    assert list(table["bundles"].values()) == [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 0.5}]
    ranks = placement.for_role("reward")
    assert [(r.bundle_index, r.num_cpus, r.num_gpus, r.placement_group) for r in ranks] == [(2, 0.5, 0.0, group)]
    with pytest.raises(KeyError, match="role 'critic' is not in this placement"):
        placement.for_role("critic")
    placement.remove()
    placement.remove()  # a second call is harmless
    assert _state(ray_cluster, group)["state"] == "REMOVED"


def test_a_bundle_no_node_can_hold_fails_with_the_layout(ray_cluster):
    # 64 CPUs in one bundle: the 4-CPU local cluster can never place it.
    plan = plan_placement([RoleResources("policy", 1, 64)])
    with pytest.raises(PlacementError, match=r"could not place the bundles \(policy: 1 x \{CPU: 64\}\) with "
                                             r"strategy PACK within 1 s"):
        create_placement_group(plan, timeout_s=1)
    with pytest.raises(PlacementError, match="strategy 'RANDOM' is not one of PACK, SPREAD"):
        create_placement_group(plan, strategy="RANDOM")


def test_a_layout_waits_for_room_and_one_larger_than_the_cluster_fails_at_once(ray_cluster):
    import threading
    import time

    held = create_placement_group(plan_placement([RoleResources("other_job", 1, 3)]), timeout_s=120)
    try:
        plan = plan_placement([RoleResources("policy", 2, 1)])  # 2 CPUs; 1 of the cluster's 4 is free
        with pytest.raises(PlacementError, match=r"role 'policy' needs 1 CPU per rank x 2 ranks; the cluster has "
                                                 r"1 CPU free in total.* \(waited 1 s for other jobs to free them"):
            wait_until_fits(plan, timeout_s=1)
        started = time.monotonic()
        with pytest.raises(PlacementError, match=r"needs 64 CPUs per rank x 1 rank; the cluster has 4 CPUs in total"):
            wait_until_fits(plan_placement([RoleResources("policy", 1, 64)]), timeout_s=600)
        assert time.monotonic() - started < 60  # it never waited for the 600 s
        # The other job ends while this one waits: it goes on.
        threading.Timer(1.0, held.remove).start()
        wait_until_fits(plan, timeout_s=120)
        assert ray_cluster.available_resources().get("CPU", 0) >= 2
    finally:
        held.remove()
