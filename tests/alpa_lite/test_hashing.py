"""``alpa_lite.ir.hashing.cached_hash``: the specs, tensors and cluster the cost model memoises on
hash once, equal to the dataclass's own hash, and never carry a hash across a pickle."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from alpa_lite.ir.cluster import ClusterSpec
from alpa_lite.ir.graph import TensorInfo
from alpa_lite.ir.specs import ShardingSpec


def _field_hash(obj) -> int:
    return hash(tuple(getattr(obj, f.name) for f in dataclasses.fields(obj)))


@pytest.mark.parametrize("obj", [
    ShardingSpec.parse("[(x,y),R]|sum(z)"),
    TensorInfo((64, 32), "bfloat16"),
    ClusterSpec.preset("dgx-h100", num_hosts=2),
])
def test_hash_is_the_field_hash_and_is_kept(obj):
    assert hash(obj) == _field_hash(obj)
    assert obj.__dict__["_hash"] == hash(obj)  # computed once, then read back
    twin = dataclasses.replace(obj)
    assert twin == obj and hash(twin) == hash(obj) and twin is not obj


def test_pickle_drops_the_cached_hash():
    spec = ShardingSpec.parse("[x,R]")
    hash(spec)
    back = pickle.loads(pickle.dumps(spec))
    assert "_hash" not in back.__dict__  # string hashes differ between processes
    assert back == spec and hash(back) == hash(spec)


def test_still_frozen_and_unequal_objects_differ():
    spec = ShardingSpec.parse("[x,R]")
    hash(spec)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.dims = ((), ())
    assert {ShardingSpec.parse("[x,R]"), ShardingSpec.parse("[R,x]")} == {spec, ShardingSpec.parse("[R,x]")}
    assert len({ShardingSpec.parse("[x,R]"), ShardingSpec.parse("[R,x]")}) == 2
