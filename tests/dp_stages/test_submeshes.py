"""Sub-mesh shapes (Alpa's get_submesh_choices) and their 2-D logical views."""

import pytest

from dp_stages import logical_views, num_devices, submesh_shapes


@pytest.mark.parametrize(
    "N,M,expected",
    [
        (2, 4, [(1, 1), (1, 2), (1, 4), (2, 4)]),
        (1, 1, [(1, 1)]),
        (2, 1, [(1, 1), (2, 1)]),
        (1, 8, [(1, 1), (1, 2), (1, 4), (1, 8)]),
        (3, 8, [(1, 1), (1, 2), (1, 4), (1, 8), (2, 8), (3, 8)]),
        (1, 6, [(1, 1), (1, 2), (1, 4), (1, 6)]),  # M not a power of two: (1, M) added
    ],
)
def test_submesh_shapes(N, M, expected):
    assert submesh_shapes(N, M) == expected


@pytest.mark.parametrize(
    "N,expected_hosts",
    [
        (8, [2, 4, 8]),
        (6, [2, 4, 6]),  # all N hosts stay a choice
        (128, [2, 4, 8, 16, 32, 64, 128]),
        (1, []),
    ],
)
def test_power_of_two_host_counts(N, expected_hosts):
    shapes = submesh_shapes(N, 8, "pow2")
    assert shapes == [(1, 1), (1, 2), (1, 4), (1, 8)] + [(k, 8) for k in expected_hosts]


@pytest.mark.parametrize("N", [3, 5, 6, 7, 12])
def test_power_of_two_host_counts_still_cover_every_cluster(N):
    """Some multiset of the shapes' device counts sums to every total up to N·M (the stage DP
    needs an exact cover of the cluster)."""
    sizes = {h * m for h, m in submesh_shapes(N, 8, "pow2")}
    reach = {0}
    for _ in range(N * 8):
        reach |= {r + s for r in reach for s in sizes if r + s <= N * 8}
    assert set(range(N * 8 + 1)) <= reach


def test_submesh_shapes_rejects_unknown_host_counts():
    with pytest.raises(ValueError, match="host_counts"):
        submesh_shapes(4, 8, "odd")


def test_submesh_shapes_rejects_empty_clusters():
    with pytest.raises(ValueError, match="num_hosts"):
        submesh_shapes(0, 4)


@pytest.mark.parametrize(
    "shape,expected",
    [
        ((1, 4), [(1, 4), (2, 2), (4, 1)]),
        ((1, 1), [(1, 1)]),
        ((2, 4), [(1, 8), (2, 4), (4, 2), (8, 1)]),
        ((1, 6), [(1, 6), (2, 3), (3, 2), (6, 1)]),
    ],
)
def test_logical_views(shape, expected):
    assert logical_views(shape) == expected
    assert all(dp * tp == num_devices(shape) for dp, tp in expected)
