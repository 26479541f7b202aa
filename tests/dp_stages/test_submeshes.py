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
