"""Alpha-beta collective costs: each formula written out as arithmetic, per preset."""

import pytest

from alpa_lite.ir.cluster import ClusterSpec
from cost_model.collectives import (
    all_gather,
    all_reduce,
    all_to_all,
    collective,
    collective_permute,
    collective_time,
    reduce_scatter,
)
from cost_model.strategy import Collective

MiB = 2**20
# dgx-h100, 2 hosts: mesh (host=2, device=8). "device" stays in a host: NVLink, α 5 µs,
# β 450 GB/s; "host" spans hosts: InfiniBand, α 10 µs, β 50 GB/s.
H100 = ClusterSpec.preset("dgx-h100", num_hosts=2)
# cpu viewed as a 2×4 mesh: every axis α 20 µs, β 2 GB/s, no reduce-scatter.
CPU = ClusterSpec.preset("cpu").with_mesh((2, 4), ("x", "y"))

CASES = [
    # (kind, axes, nbytes, cluster, expected kind, expected nbytes, expected seconds)
    ("all-reduce", ("device",), 4 * MiB, H100, "all-reduce", 4 * MiB,
     5e-6 + 2 * 7 / 8 * 4 * MiB / 450e9),
    ("all-gather", ("device",), 4 * MiB, H100, "all-gather", 4 * MiB,
     5e-6 + 7 / 8 * 4 * MiB / 450e9),
    ("reduce-scatter", ("device",), MiB, H100, "reduce-scatter", MiB,
     5e-6 + 7 * MiB / 450e9),
    ("all-to-all", ("device",), 4 * MiB, H100, "all-to-all", 4 * MiB,
     5e-6 + 7 / 8 * 4 * MiB / 450e9),
    ("collective-permute", ("device",), MiB, H100, "collective-permute", MiB,
     5e-6 + MiB / 450e9),
    ("all-reduce", ("host",), 4 * MiB, H100, "all-reduce", 4 * MiB,
     10e-6 + 2 * 1 / 2 * 4 * MiB / 50e9),
    # two axes, 16 devices: the slowest axis's β and the largest α
    ("all-reduce", ("host", "device"), 4 * MiB, H100, "all-reduce", 4 * MiB,
     10e-6 + 2 * 15 / 16 * 4 * MiB / 50e9),
    ("all-gather", ("host", "device"), 4 * MiB, H100, "all-gather", 4 * MiB,
     10e-6 + 15 / 16 * 4 * MiB / 50e9),
    ("reduce-scatter", ("host", "device"), MiB, H100, "reduce-scatter", MiB,
     10e-6 + 15 * MiB / 50e9),
    ("all-to-all", ("host", "device"), 4 * MiB, H100, "all-to-all", 4 * MiB,
     10e-6 + 15 / 16 * 4 * MiB / 50e9),
    ("all-reduce", ("y",), 4 * MiB, CPU, "all-reduce", 4 * MiB,
     20e-6 + 2 * 3 / 4 * 4 * MiB / 2e9),
    ("all-gather", ("x", "y"), 4 * MiB, CPU, "all-gather", 4 * MiB,
     20e-6 + 7 / 8 * 4 * MiB / 2e9),
    ("all-to-all", ("x",), 4 * MiB, CPU, "all-to-all", 4 * MiB,
     20e-6 + 1 / 2 * 4 * MiB / 2e9),
    # no reduce-scatter on CPU: an all-reduce of the whole (4× larger) buffer, then a slice
    ("reduce-scatter", ("y",), MiB, CPU, "all-reduce", 4 * MiB,
     20e-6 + 2 * 3 / 4 * 4 * MiB / 2e9),
    ("reduce-scatter", ("x", "y"), MiB, CPU, "all-reduce", 8 * MiB,
     20e-6 + 2 * 7 / 8 * 8 * MiB / 2e9),
]


@pytest.mark.parametrize("kind,axes,nbytes,cluster,want_kind,want_bytes,seconds", CASES)
def test_formula(kind, axes, nbytes, cluster, want_kind, want_bytes, seconds):
    c = collective(kind, axes, nbytes, cluster)
    assert (c.kind, c.axes, c.nbytes) == (want_kind, axes, want_bytes)
    assert c.group_size == cluster.group_size(axes)
    assert collective_time(c, cluster) == pytest.approx(seconds, rel=1e-12)


def test_helpers_name_their_kind():
    assert all_reduce(("device",), MiB, H100) == Collective("all-reduce", ("device",), MiB, 8)
    assert all_gather(("host",), MiB, H100) == Collective("all-gather", ("host",), MiB, 2)
    assert reduce_scatter(("device",), MiB, H100) == Collective("reduce-scatter", ("device",),
                                                                MiB, 8)
    assert all_to_all(("x", "y"), MiB, CPU) == Collective("all-to-all", ("x", "y"), MiB, 8)
    assert collective_permute(("x",), MiB, CPU) == Collective("collective-permute", ("x",),
                                                              MiB, 2)


def test_time_is_alpha_plus_wire_bytes_over_beta():
    for kind in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all"):
        c = collective(kind, ("host", "device"), 3 * MiB, H100)
        assert collective_time(c, H100) == pytest.approx(10e-6 + c.wire_bytes() / 50e9)


def test_group_of_one_is_no_collective():
    single_host = ClusterSpec.preset("dgx-h100")  # mesh (1, 8): "host" has size 1
    assert collective("all-reduce", ("host",), MiB, single_host) is None
    assert reduce_scatter((), MiB, CPU) is None
    assert collective_time(None, CPU) == 0.0


def test_size_one_axes_are_dropped():
    # A size-1 axis moves nothing, so it must not pull in its (cross-host) link.
    single_host = ClusterSpec.preset("dgx-h100")
    c = all_reduce(("host", "device"), MiB, single_host)
    assert c.axes == ("device",) and c.group_size == 8
    assert collective_time(c, single_host) == pytest.approx(5e-6 + 2 * 7 / 8 * MiB / 450e9)


def test_unknown_kind_raises():
    with pytest.raises(ValueError, match="all-reduce"):
        collective("broadcast", ("x",), MiB, CPU)
