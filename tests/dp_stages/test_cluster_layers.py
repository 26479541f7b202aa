"""Layer clustering: balanced FLOPs, then least (max, sum) bytes across cuts."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dp_stages import cluster_layers, layers


def key(flops, cut_bytes, starts):
    """(max cut bytes, sum cut bytes, Σ layer FLOPs²); cut_bytes[c - 1] for cut c."""
    cuts = [cut_bytes[c - 1] for c in starts[1:]]
    edges = [*starts, len(flops)]
    sizes = [sum(flops[a:b]) for a, b in itertools.pairwise(edges)]
    return (max(cuts, default=0), sum(cuts), sum(s * s for s in sizes)), max(sizes)


@pytest.mark.parametrize(
    "n,L,eps,expected",
    [
        (8, 4, 0.5, [0, 2, 4, 6]),
        (8, 4, 0.0, [0, 2, 4, 6]),
        (12, 3, 0.5, [0, 4, 8]),
        (5, 5, 0.5, [0, 1, 2, 3, 4]),
        (7, 1, 0.5, [0]),
    ],
)
def test_uniform_flops_give_equal_layers(n, L, eps, expected):
    assert cluster_layers(np.ones(n), np.ones(n - 1), L, eps) == expected


def test_prefers_small_boundaries_within_balance():
    # 8 equal ops, 2 layers, eps = 0.5: each layer may hold up to 1.5·8/2 = 6 ops
    b = np.full(7, 10.0)
    b[3 - 1] = 2.0  # cut 3: layers of 3 and 5 ops, allowed
    b[1 - 1] = 1.0  # cut 1: layers of 1 and 7 ops, cheaper but 7 > 6
    assert cluster_layers(np.ones(8), b, 2) == [0, 3]
    assert cluster_layers(np.ones(8), b, 2, eps=0.0) == [0, 4]  # only the even split fits


def test_max_bytes_first_then_sum():
    # 9 ops, 3 layers, eps = 1/3: layers of at most 4 ops. Cuts {1, 5} cost 0 + 7 (max 7,
    # sum 7); cuts {3, 6} cost 5 + 5 (max 5, sum 10); every other pair crosses a 9.
    b = {1: 0.0, 2: 9.0, 3: 5.0, 4: 9.0, 5: 7.0, 6: 5.0, 7: 9.0, 8: 9.0}
    cut_bytes = np.array([b[c] for c in range(1, 9)])
    assert cluster_layers(np.ones(9), cut_bytes, 3, eps=1 / 3) == [0, 3, 6]


def test_inf_bytes_forbid_a_cut():
    b = np.ones(7)
    b[4 - 1] = np.inf
    starts = cluster_layers(np.ones(8), b, 2)
    assert 4 not in starts and starts[0] == 0
    with pytest.raises(ValueError, match="forbidden"):
        cluster_layers(np.ones(4), np.full(3, np.inf), 2)


def test_boundary_bytes_lengths():
    flops = np.ones(6)
    by_cut = np.array([5.0, 1.0, 5.0, 5.0, 5.0])  # cut c at index c - 1
    want = cluster_layers(flops, by_cut, 2)
    assert want == [0, 2]
    assert cluster_layers(flops, np.concatenate([[99.0], by_cut]), 2) == want  # length n
    assert cluster_layers(flops, np.concatenate([[99.0], by_cut, [99.0]]), 2) == want  # n + 1
    with pytest.raises(ValueError, match="boundary_bytes"):
        cluster_layers(flops, np.ones(3), 2)


def test_heavy_op_raises_the_bound():
    # eps = 0 wants layers of 13/3 FLOPs, but one op has 10: the least largest layer is 10
    assert cluster_layers(np.array([1.0, 1.0, 10.0, 1.0]), np.ones(3), 3, eps=0.0) == [0, 2, 3]


def test_too_many_layers():
    with pytest.raises(ValueError, match=r"4 ops into 5 layers"):
        cluster_layers(np.ones(4), np.ones(3), 5)
    with pytest.raises(ValueError, match="num_layers"):
        cluster_layers(np.ones(4), np.ones(3), 0)


@pytest.mark.parametrize("seed", range(30))
def test_matches_exhaustive_search(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 10))
    L = int(rng.integers(1, n + 1))
    flops = rng.integers(0, 5, n).astype(float)
    cut_bytes = rng.integers(0, 6, max(n - 1, 0)).astype(float)
    if seed % 3 == 0:
        cut_bytes[rng.random(len(cut_bytes)) < 0.3] = np.inf  # forbidden cuts
    eps = float(rng.choice([0.0, 0.25, 0.5, 1.0]))
    bound = (1 + eps) * flops.sum() / L
    options = [[0, *c] for c in itertools.combinations(range(1, n), L - 1)]
    feasible = [s for s in options if key(flops, cut_bytes, s)[1] <= bound + 1e-9]
    if not feasible:  # the bound is raised to the least achievable largest layer
        least = min(key(flops, cut_bytes, s)[1] for s in options)
        feasible = [s for s in options if key(flops, cut_bytes, s)[1] <= least + 1e-9]
    best = min(key(flops, cut_bytes, s)[0] for s in feasible)
    if best[0] == np.inf:
        with pytest.raises(ValueError, match="forbidden"):
            cluster_layers(flops, cut_bytes, L, eps)
        return
    got = cluster_layers(flops, cut_bytes, L, eps)
    assert got in feasible
    assert key(flops, cut_bytes, got)[0] == best


def test_chunked_windows_agree(monkeypatch):
    """Small window chunks (as for long programs) give the same cuts as one chunk."""
    rng = np.random.default_rng(11)
    for _ in range(10):
        flops = rng.uniform(0.0, 3.0, 80)
        cut_bytes = rng.integers(0, 4, 79).astype(float)
        want = cluster_layers(flops, cut_bytes, 6)
        monkeypatch.setattr(layers, "_CHUNK", 8)
        assert cluster_layers(flops, cut_bytes, 6) == want
        monkeypatch.setattr(layers, "_CHUNK", 1 << 20)
