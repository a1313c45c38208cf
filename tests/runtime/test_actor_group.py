"""ActorGroup: ranks form one torch.distributed group; batches split by rank and come back in order.

Ray tests share one 2-rank group (each actor start costs seconds on a
two-core machine); the pure split/concat helpers are tested without Ray."""

from __future__ import annotations

import sys

import pytest
import torch

from rlhf_ray.runtime.actor_group import ActorGroup, ActorGroupError, concat_shards, split_batch
from rlhf_ray.runtime.distributed import DistributedWorker
from rlhf_ray.runtime.placement import RoleResources, create_placement_group, plan_placement, wait_until_fits


class SumWorker(DistributedWorker):
    """A toy role: all-reduces a number and echoes a shard back with its rank."""

    def __init__(self, rank, world_size, master_addr, master_port, num_threads, scale=1.0):
        super().__init__(rank, world_size, master_addr, master_port, num_threads)
        self.scale = scale

    def all_reduce_sum(self, value: float) -> float:
        tensor = torch.tensor([value * self.scale])
        torch.distributed.all_reduce(tensor)
        return float(tensor.item())

    def double(self, shard: dict) -> dict:
        return {"x": shard["x"] * 2, "rank": [self.rank] * len(shard["x"]), "ids": shard["ids"]}

    def fail_on_rank1(self) -> int:
        try:
            if self.rank == 1:
                raise ValueError("rank 1 cannot do this")
        except ValueError as err:
            err.add_note("checking the rank")  # what a role adds about what it was doing
            raise
        return self.rank


class TempFolderWorker(DistributedWorker):
    """Writes a folder under the temp directory, as a vLLM engine does, and removes it in `shutdown`;
    `stall` makes its shutdown hang."""

    def __init__(self, rank, world_size, master_addr, master_port, num_threads, stall=False):
        super().__init__(rank, world_size, master_addr, master_port, num_threads)
        import tempfile

        self.folder = tempfile.mkdtemp(prefix="rlhf-ray-test-shutdown-")
        self.stall = stall

    def where(self) -> str:
        return self.folder

    def shutdown(self) -> None:
        if self.stall:
            import time

            time.sleep(600)
        import shutil

        shutil.rmtree(self.folder)


class BrokenWorker(DistributedWorker):
    """Rank 1 raises before joining the process group, as a bad config would."""

    def __init__(self, rank, world_size, master_addr, master_port, num_threads):
        if rank == 1:
            raise FileNotFoundError("no weights at /nowhere/model.safetensors")
        super().__init__(rank, world_size, master_addr, master_port, num_threads)


@pytest.fixture(scope="module")
def ship_test_classes():
    # Ray's workers cannot import this test module by name: send its classes by value.
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def sum_group(ray_cluster, ship_test_classes):
    group = ActorGroup(SumWorker, role="toy", num_ranks=2, num_cpus_per_rank=1, worker_kwargs={"scale": 10.0})
    yield group
    group.shutdown()


def test_two_ranks_all_reduce_to_the_sum(sum_group):
    # rank r contributes (r + 1) * scale: 1*10 + 2*10 = 30 on every rank.
    refs = [actor.all_reduce_sum.remote(rank + 1.0) for rank, actor in enumerate(sum_group.actors)]
    assert sum_group.gather(refs) == [30.0, 30.0]
    infos = sum_group.gather(sum_group.map(lambda actor: actor.rank_info.remote()))
    assert [i["rank"] for i in infos] == [0, 1]
    assert {i["world_size"] for i in infos} == {2}
    assert {i["backend"] for i in infos} == {"gloo"}
    assert {i["num_threads"] for i in infos} == {1}
    assert len(sum_group) == 2


def test_scatter_gather_concat_round_trip(sum_group):
    batch = {"x": torch.arange(6.0).reshape(6, 1), "ids": ["a", "b", "c", "d", "e", "f"]}
    results = sum_group.gather(sum_group.scatter(lambda actor, shard: actor.double.remote(shard), batch))
    merged = concat_shards(results)
    # rank 0 got rows 0-2, rank 1 rows 3-5; x doubled, order kept.
    assert torch.equal(merged["x"], torch.tensor([[0.0], [2.0], [4.0], [6.0], [8.0], [10.0]]))
    assert merged["rank"] == [0, 0, 0, 1, 1, 1]
    assert merged["ids"] == batch["ids"]


def test_scatter_refuses_a_batch_the_ranks_cannot_share(sum_group):
    with pytest.raises(ValueError, match="5 examples cannot be split evenly across the 2 ranks of role 'toy'"):
        sum_group.scatter(lambda actor, shard: actor.double.remote(shard),
                          {"x": torch.zeros(5, 1), "ids": list("abcde")})


def test_a_failing_call_says_in_one_line_who_raised_what_and_debug_adds_the_remote_traceback(sum_group, capsys):
    from rlhf_ray.cli.errors import report

    with pytest.raises(ActorGroupError) as caught:
        sum_group.gather(sum_group.map(lambda actor: actor.fail_on_rank1.remote()))
    first = ("role 'toy' rank 1 of 2 failed in SumWorker.fail_on_rank1 (checking the rank): "
             "ValueError: rank 1 cannot do this")
    assert str(caught.value).splitlines()[0] == first
    assert report(caught.value, debug=False) == 1
    assert capsys.readouterr().err == f"rlhf-ray: error: {first} (run with --debug for the remote traceback)\n"
    report(caught.value, debug=True)
    err = capsys.readouterr().err
    assert 'raise ValueError("rank 1 cannot do this")' in err  # the actor's own source line
    assert err.splitlines()[-1] == f"rlhf-ray: error: {first} (run with --debug for the remote traceback)"


def _live_placement_groups(ray_cluster) -> int:
    return sum(1 for pg in ray_cluster.util.placement_group_table().values() if pg["state"] != "REMOVED")


def test_a_rank_that_fails_to_start_is_named_and_the_group_released(ray_cluster, ship_test_classes):
    live_before = _live_placement_groups(ray_cluster)
    with pytest.raises(ActorGroupError, match=r"role 'broken' rank 1 of 2 failed to start[\s\S]*/nowhere/model"):
        ActorGroup(BrokenWorker, role="broken", num_ranks=2, num_cpus_per_rank=1)
    # The placement group the group reserved for itself is removed again.
    assert _live_placement_groups(ray_cluster) == live_before
    # Started without waiting, the failure is reported by `wait_started`, and the group released the same way
    # (once Ray has the removed group's CPUs back).
    wait_until_fits(plan_placement([RoleResources("broken", 2, 1)]), 60)
    group = ActorGroup(BrokenWorker, role="broken", num_ranks=2, num_cpus_per_rank=1, wait=False)
    with pytest.raises(ActorGroupError, match=r"role 'broken' rank 1 of 2 failed to start"):
        group.wait_started()
    assert _live_placement_groups(ray_cluster) == live_before and group.actors == []


def test_colocated_roles_share_bundles(ray_cluster, ship_test_classes):
    # Two one-rank roles on one 1-CPU bundle: each actor asks Ray for 0.5 CPU.
    plan = plan_placement([RoleResources("a", 1, 1), RoleResources("b", 1, 1)], colocate=[["a", "b"]])
    placement = create_placement_group(plan, timeout_s=120)
    groups = []
    try:
        for role in ("a", "b"):
            slots = placement.for_role(role)
            assert [(s.bundle_index, s.num_cpus) for s in slots] == [(0, 0.5)]
            # Created without waiting, both start at once (as a job's role groups do), then are waited for.
            groups.append(ActorGroup(SumWorker, role=role, num_ranks=1, num_cpus_per_rank=1, placement=slots,
                                     wait=False))
        for group in groups:
            group.wait_started()
        # Each one-rank group is its own torch.distributed world: the "sum" is its own value.
        assert [g.gather([g.rank0.all_reduce_sum.remote(3.0)]) for g in groups] == [[3.0], [3.0]]
        # A group of one hosts its own rendezvous, on a port it picked.
        infos = [g.gather(g.map(lambda actor: actor.rank_info.remote()))[0] for g in groups]
        assert all(i["master_addr"] == "127.0.0.1" and i["master_port"] > 0 for i in infos)
    finally:
        for group in groups:
            group.shutdown()
        placement.remove()


# without Ray ----------------------------------------------------------------------

def test_split_batch_gives_contiguous_copies():
    batch = {"x": torch.arange(8).reshape(4, 2), "names": ["p", "q", "r", "s"]}
    shards = split_batch(batch, 2)
    assert torch.equal(shards[0]["x"], torch.tensor([[0, 1], [2, 3]]))
    assert torch.equal(shards[1]["x"], torch.tensor([[4, 5], [6, 7]]))
    assert [s["names"] for s in shards] == [["p", "q"], ["r", "s"]]
    # A copy, not a view: shipping it to an actor carries 2 rows, not the 4-row storage.
    assert shards[1]["x"].untyped_storage().nbytes() == 4 * 8


def test_split_batch_errors_name_the_field():
    with pytest.raises(ValueError, match="x: 4, y: 3"):
        split_batch({"x": torch.zeros(4), "y": [1, 2, 3]}, 2)
    with pytest.raises(TypeError, match=r"batch\['beta'\] is a float"):
        split_batch({"x": torch.zeros(4), "beta": 0.1}, 2)


def test_concat_shards_joins_in_rank_order_and_rejects_scalars():
    merged = concat_shards([{"v": torch.tensor([1, 2]), "s": ["a"]}, {"v": torch.tensor([3]), "s": ["b", "c"]}])
    assert torch.equal(merged["v"], torch.tensor([1, 2, 3]))
    assert merged["s"] == ["a", "b", "c"]
    assert torch.equal(concat_shards([torch.ones(1), torch.zeros(2)]), torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(TypeError, match=r"result\['loss'\] is a float"):
        concat_shards([{"loss": 0.5}, {"loss": 0.7}])
    with pytest.raises(KeyError, match="rank 1's result has no key 'v'"):
        concat_shards([{"v": torch.ones(1)}, {"w": torch.ones(1)}])


def test_shutdown_lets_each_rank_clean_up_then_kills_it(ray_cluster, ship_test_classes):
    import os
    import time

    group = ActorGroup(TempFolderWorker, role="tidy", num_ranks=1, num_cpus_per_rank=1)
    folders = group.call(lambda actor: actor.where.remote())
    assert all(os.path.isdir(f) for f in folders)
    group.shutdown()
    assert not any(os.path.exists(f) for f in folders)
    stuck = ActorGroup(TempFolderWorker, role="stuck", num_ranks=1, num_cpus_per_rank=1, worker_kwargs={"stall": True})
    (folder,) = stuck.call(lambda actor: actor.where.remote())
    actor = stuck.rank0
    start = time.monotonic()
    stuck.shutdown(timeout_s=1.0)  # a rank whose shutdown never returns is killed after the timeout
    assert time.monotonic() - start < 30
    with pytest.raises(ActorGroupError, match="died"):
        stuck.gather([actor.where.remote()])
    os.rmdir(folder)
