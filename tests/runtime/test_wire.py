"""Weight buckets on the wire (`runtime.wire`): what comes out of the object store is what went in."""

from __future__ import annotations

import ray
import torch

from rlhf_ray.runtime.wire import pack_bucket, unpack_bucket


def _bucket() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [("w", torch.randn(3, 4, generator=g)),
            ("half", torch.randn(5, generator=g).to(torch.bfloat16)),  # a dtype NumPy has no type for
            ("strided", torch.randn(4, 6, generator=g).t()),             # not contiguous
            ("scalar", torch.tensor(2.5, dtype=torch.float64)),
            ("ids", torch.arange(7))]


def _assert_same(got, want) -> None:
    assert [name for name, _ in got] == [name for name, _ in want]
    for (name, a), (_, b) in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), name


def test_round_trip_keeps_names_dtypes_shapes_and_values():
    bucket = _bucket()
    _assert_same(unpack_bucket(pack_bucket(bucket)), bucket)


def test_unpacked_buckets_pass_through():
    bucket = _bucket()
    assert unpack_bucket(bucket) == bucket


def test_through_the_object_store_into_another_actor(ray_cluster):
    @ray.remote(num_cpus=0)
    class Receiver:
        def load(self, packed):
            into = {}
            for name, tensor in unpack_bucket(packed):  # read-only views of the store's bytes: copied from
                into[name] = torch.empty_like(tensor).copy_(tensor)
            return list(into.items())

    bucket = _bucket()
    got = ray.get(Receiver.remote().load.remote(ray.put(pack_bucket(bucket))))
    _assert_same(got, bucket)
